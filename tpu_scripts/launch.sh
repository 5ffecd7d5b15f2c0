#!/usr/bin/env bash
# Runs `python main.py ARGS...` on every worker of the TPU at the same time.
#
# Usage: TPU_NAME=icm ZONE=us-west4-a tpu_scripts/launch.sh \
#          --config=configs/truthfulqa.py --workdir=/mnt/bucket/run1 [flags...]
#
# Every worker runs the same command in REPO_DIR's venv (see install.sh) with
# ICM_JAX_MULTIHOST=1, so jax.distributed.initialize() joins the workers into
# one job (it finds the pod's other hosts through the TPU metadata server).
# Output goes to the terminal and to ~/$LOG_FILE on each worker (default
# icm_run.log). DETACH=1 starts the job under nohup and returns at once, so a
# dropped ssh connection does not kill it; follow it with
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 \
#     --command='tail -f ~/icm_run.log'
#
# The workdir: only process 0 writes labels and reports, while orbax writes
# checkpoints collectively from all processes, and resuming reads them back on
# every worker. So give a path every worker reaches (e.g. a Cloud Storage
# bucket mounted with gcsfuse at the same place on each worker). A relative
# workdir is relative to REPO_DIR on each worker.

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if (($# == 0)); then
  die "usage: $0 --config=configs/<task>.py --workdir=DIR [main.py flags...]"
fi
require_var TPU_NAME ZONE
LOG_FILE="${LOG_FILE:-icm_run.log}"
MULTIHOST="${ICM_JAX_MULTIHOST:-1}"

# What each worker runs, from its home directory.
job="$(remote_cd) && source .venv/bin/activate"
job+=" && export ICM_JAX_MULTIHOST=$(printf %q "$MULTIHOST")"
job+=" && python main.py $(quote_args "$@")"
log="\"\$HOME\"/$(printf %q "$LOG_FILE")"

if [[ "${DETACH:-0}" == 1 ]]; then
  # A fresh bash runs the job; nohup + redirected stdin/out lets ssh return.
  remote="nohup bash -c $(printf %q "$job") > $log 2>&1 < /dev/null &"
  remote+=" echo \"\$(hostname): started pid \$!\""
else
  remote="set -o pipefail; { $job; } 2>&1 | tee $log"
fi

echo "Launching on all workers of $TPU_NAME (log: ~/$LOG_FILE on each):" \
  "python main.py $*"
run_on_all_workers "$remote"
