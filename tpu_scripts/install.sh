#!/usr/bin/env bash
# Puts icm-jax on every worker of the TPU, installs it with its `tpu` extra
# (jax[tpu], i.e. jax with the matching libtpu) into a venv, and checks that
# JAX sees the TPU chips of all workers.
#
# Usage: TPU_NAME=icm ZONE=us-west4-a tpu_scripts/install.sh
#
# Code: by default this checkout is copied (tracked files plus untracked,
# non-ignored ones, so local edits travel; .git and .venv do not) into
# REPO_DIR on each worker. Files deleted locally are not deleted there. With
# REPO_URL set, the workers `git clone` it instead (or pull when already
# cloned), checking out REPO_REF when set.
#
# Python: jax 0.10 needs Python >= 3.11 while TPU VM images ship 3.10, so the
# venv (REPO_DIR/.venv) is made by uv with PYTHON_VERSION (default 3.11),
# which uv downloads when the image lacks it. An existing venv is reused.

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if (($# > 0)); then
  die "usage: $0 (settings come from env vars; see tpu_scripts/README.md)"
fi
require_var TPU_NAME ZONE
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
# setup.py's `tpu` extra pins jax[tpu] to install_requires' jax range.
PACKAGE_SPEC='.[tpu]'
MULTIHOST="${ICM_JAX_MULTIHOST:-1}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
repo="$(printf %q "$REPO_DIR")"

# NUL-separated paths of this checkout's files worth copying.
list_source_files() {
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' path; do
      case "$path" in
        .git/* | .venv/* | */.venv/*) continue ;;
      esac
      # --cached still lists files deleted from the work tree.
      if [[ -f "$path" || -L "$path" ]]; then
        printf '%s\0' "$path"
      fi
    done
}

if [[ -n "${REPO_URL:-}" ]]; then
  echo "Cloning $REPO_URL into REPO_DIR=$REPO_DIR on all workers of $TPU_NAME"
  fetch="if [ -d $repo/.git ]; then git -C $repo pull --ff-only;"
  fetch+=" else git clone $(printf %q "$REPO_URL") $repo; fi"
  if [[ -n "${REPO_REF:-}" ]]; then
    fetch+=" && git -C $repo checkout $(printf %q "$REPO_REF")"
  fi
  run_on_all_workers "$fetch"
else
  if ! git -C "$repo_root" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    die "$repo_root is not a git checkout; set REPO_URL to clone instead"
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  tarball="$tmp/icm-jax-src.tar.gz"
  (cd "$repo_root" && list_source_files | tar -czf "$tarball" --null -T -)
  echo "Copying $repo_root ($(du -h "$tarball" | cut -f1) compressed) to" \
    "REPO_DIR=$REPO_DIR on all workers of $TPU_NAME"
  gcloud_tpu scp "$tarball" "$TPU_NAME:icm-jax-src.tar.gz" --worker=all
  run_on_all_workers "mkdir -p $repo && tar -xzf icm-jax-src.tar.gz -C $repo \
&& rm icm-jax-src.tar.gz"
fi

echo "Installing icm-jax with its tpu extra (pip install -e '$PACKAGE_SPEC')" \
  "into $REPO_DIR/.venv on the workers"
setup="$(remote_cd) && export PATH=\"\$HOME/.local/bin:\$PATH\""
setup+=" && { command -v uv > /dev/null"
setup+=" || python3 -m pip install --user --quiet uv"
setup+=" || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
setup+=" && { [ -x .venv/bin/python ]"
setup+=" || uv venv --seed --python $(printf %q "$PYTHON_VERSION") .venv; }"
setup+=" && .venv/bin/python -m pip install --quiet --upgrade pip"
setup+=" && .venv/bin/python -m pip install -e $(printf %q "$PACKAGE_SPEC")"
run_on_all_workers "$setup"

echo "Checking JAX on all workers (ICM_JAX_MULTIHOST=$MULTIHOST)"
check='from icm_jax import sharding
sharding.initialize_distributed()
import jax
print(f"process {jax.process_index()} of {jax.process_count()}: "
      f"{jax.local_device_count()} local of {jax.device_count()} devices, "
      f"{jax.devices()[0].device_kind}")'
run_on_all_workers "$(remote_cd) && ICM_JAX_MULTIHOST=$(printf %q "$MULTIHOST") \
.venv/bin/python -c $(printf %q "$check")"
