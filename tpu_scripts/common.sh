# shellcheck shell=bash
# Shared settings and helpers for the Cloud TPU scripts; sourced, not run.
#
# Settings come from environment variables (see README.md):
#   TPU_NAME          name of the TPU VM / pod slice            (required)
#   ZONE              its zone, e.g. us-west4-a                 (required)
#   PROJECT           GCP project; gcloud's default when unset
#   ACCELERATOR_TYPE  e.g. v5litepod-16, v5p-8, v6e-8, v4-8     (create only)
#   RUNTIME_VERSION   TPU VM image; picked from ACCELERATOR_TYPE when unset
#   REPO_DIR          checkout on the workers, relative to the worker's home
#                     or absolute (default: icm-jax)
#
# Remote commands run through the workers' login shell (bash on TPU VM
# images); every argument that travels there is quoted with printf %q.

set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 1
}

# require_var NAME...: exits naming the first unset/empty variable.
require_var() {
  local name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      die "$name is not set (export $name=...; see tpu_scripts/README.md)"
    fi
  done
}

PROJECT="${PROJECT:-}"
REPO_DIR="${REPO_DIR:-icm-jax}"

# default_runtime_version ACCELERATOR_TYPE: the TPU VM image for that chip.
default_runtime_version() {
  local accelerator="$1"
  case "$accelerator" in
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    *)
      die "no default RUNTIME_VERSION for ACCELERATOR_TYPE='$accelerator';" \
        "set RUNTIME_VERSION explicitly"
      ;;
  esac
}

# gcloud_tpu SUBCOMMAND ARGS...: `gcloud compute tpus tpu-vm` with the zone
# (and project, when set) appended.
gcloud_tpu() {
  require_var ZONE
  local flags=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    flags+=(--project="$PROJECT")
  fi
  gcloud compute tpus tpu-vm "$@" "${flags[@]}"
}

# run_on_all_workers COMMAND: runs the shell command string on every worker
# of $TPU_NAME at the same time (as multi-host JAX needs) and waits for all.
run_on_all_workers() {
  require_var TPU_NAME
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

# quote_args ARGS...: the arguments as one string the remote shell splits
# back into exactly these words.
quote_args() {
  if (($# > 0)); then
    printf '%q ' "$@"
  fi
}

# remote_cd: `cd` into REPO_DIR on a worker (relative paths are from $HOME,
# where an ssh command starts).
remote_cd() {
  printf 'cd %q' "$REPO_DIR"
}
