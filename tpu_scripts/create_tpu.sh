#!/usr/bin/env bash
# Creates a Cloud TPU VM (single host or pod slice) and waits until READY.
#
# Usage: TPU_NAME=icm ZONE=us-west4-a tpu_scripts/create_tpu.sh [ACCELERATOR_TYPE]
#
# ACCELERATOR_TYPE (argument or env, e.g. v5litepod-16, v5p-8, v4-8) picks the
# default RUNTIME_VERSION. SPOT=1 asks for a spot VM (cheaper, preemptible).
# CREATE_TIMEOUT (seconds, default 1800) bounds the wait for READY, polled
# every POLL_INTERVAL seconds (default 15).

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if (($# > 1)); then
  die "usage: $0 [ACCELERATOR_TYPE]"
fi
ACCELERATOR_TYPE="${1:-${ACCELERATOR_TYPE:-}}"
require_var TPU_NAME ZONE ACCELERATOR_TYPE
if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  RUNTIME_VERSION="$(default_runtime_version "$ACCELERATOR_TYPE")"
fi
CREATE_TIMEOUT="${CREATE_TIMEOUT:-1800}"
POLL_INTERVAL="${POLL_INTERVAL:-15}"

create_flags=(--accelerator-type="$ACCELERATOR_TYPE"
  --version="$RUNTIME_VERSION")
if [[ "${SPOT:-0}" == 1 ]]; then
  create_flags+=(--spot)
fi

echo "Creating $TPU_NAME: $ACCELERATOR_TYPE, runtime $RUNTIME_VERSION," \
  "zone $ZONE${SPOT:+, spot=$SPOT}"
gcloud_tpu create "$TPU_NAME" "${create_flags[@]}"

deadline=$((SECONDS + CREATE_TIMEOUT))
while true; do
  state="$(gcloud_tpu describe "$TPU_NAME" --format='value(state)')"
  case "$state" in
    READY)
      echo "$TPU_NAME is READY"
      exit 0
      ;;
    PREEMPTED | TERMINATED | STOPPED | STOPPING | DELETING | FAILED)
      die "$TPU_NAME is $state, not READY"
      ;;
  esac
  if ((SECONDS >= deadline)); then
    die "$TPU_NAME still '$state' after CREATE_TIMEOUT=${CREATE_TIMEOUT}s"
  fi
  echo "$TPU_NAME is '$state'; waiting ${POLL_INTERVAL}s"
  sleep "$POLL_INTERVAL"
done
