#!/usr/bin/env bash
# Deletes the TPU VM / pod slice $TPU_NAME (asks first unless YES=1).
#
# Usage: TPU_NAME=icm ZONE=us-west4-a tpu_scripts/delete_tpu.sh
#
# Everything on the workers' disks goes with it: fetch results first.

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if (($# > 0)); then
  die "usage: $0 (settings come from env vars; see tpu_scripts/README.md)"
fi
require_var TPU_NAME ZONE

if [[ "${YES:-0}" != 1 ]]; then
  answer=""
  read -r -p "Delete TPU $TPU_NAME in $ZONE${PROJECT:+ (project $PROJECT)}? [y/N] " \
    answer || true
  case "$answer" in
    y | Y | yes | YES) ;;
    *) die "not deleting $TPU_NAME (answer y, or set YES=1)" ;;
  esac
fi
gcloud_tpu delete "$TPU_NAME" --quiet
