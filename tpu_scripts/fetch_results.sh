#!/usr/bin/env bash
# Copies a run's workdir from worker 0 (where process 0 writes labels and
# reports) to this machine.
#
# Usage: TPU_NAME=icm ZONE=us-west4-a tpu_scripts/fetch_results.sh \
#          WORKDIR [LOCAL_DIR]
#
# WORKDIR is the --workdir given to launch.sh: absolute, or relative to
# REPO_DIR (where main.py ran), or a gs:// URL (copied from the bucket with
# gcloud storage, no TPU needed). LOCAL_DIR defaults to the current directory.
# For a workdir on a mounted bucket, copying from the bucket directly
# (gcloud storage cp --recursive) works as well.

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if (($# < 1 || $# > 2)); then
  die "usage: $0 WORKDIR [LOCAL_DIR]"
fi
workdir="$1"
local_dir="${2:-.}"
if [[ "$workdir" == gs://* ]]; then
  mkdir -p "$local_dir"
  echo "Fetching $workdir into $local_dir"
  exec gcloud storage cp --recursive "$workdir" "$local_dir"
fi
require_var TPU_NAME ZONE
case "$workdir" in
  /* | "~"*) ;;
  *) workdir="$REPO_DIR/$workdir" ;;
esac

mkdir -p "$local_dir"
echo "Fetching $TPU_NAME:$workdir (worker 0) into $local_dir"
gcloud_tpu scp --recurse --worker=0 "$TPU_NAME:$workdir" "$local_dir"
