# Shared by the sbatch scripts in this folder (sourced, not run). Bash.
#
# run_stage RUN_DIR PRODUCT COMMAND [ARGS...]
#   Runs COMMAND with `srun --kill-on-bad-exit=1` (one task per GPU or CPU slot), unless RUN_DIR
#   already holds a finished stage (run.json status "done" and PRODUCT, e.g. final.pt). On the
#   preemption signal (sbatch --signal=B:USR1@SECONDS, sent to this batch shell) it passes USR1 to
#   the tasks, which save a checkpoint and exit; then the job requeues itself and, when it starts
#   again, the same command resumes from RUN_DIR/checkpoints/latest.

# MASTER_ADDR/PORT for torch.distributed: the first node of the allocation, a port from the job id.
s3rec_master_env() {
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    export MASTER_ADDR
  fi
  export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
}

# 0 if RUN_DIR/run.json says "done" and RUN_DIR/PRODUCT exists.
s3rec_stage_done() {
  [ -f "$1/$2" ] && [ -f "$1/run.json" ] || return 1
  python3 - "$1/run.json" <<'PY'
import json, sys
sys.exit(0 if json.load(open(sys.argv[1])).get("status") == "done" else 1)
PY
}

# This job for scancel/scontrol: an array task by its own name (the array's job id would address
# every task of the array).
s3rec_job_id() {
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else echo "$SLURM_JOB_ID"; fi
}

s3rec_preempted=0
s3rec_on_usr1() {
  s3rec_preempted=1
  echo "$(date -Is) [s3rec] USR1: asking the tasks to checkpoint, then requeueing job $(s3rec_job_id)" >&2
  # All steps of the job (the training tasks), not this batch shell.
  scancel --signal=USR1 "$(s3rec_job_id)" || true
}

run_stage() {
  local run_dir="$1" product="$2"
  shift 2
  if s3rec_stage_done "$run_dir" "$product"; then
    echo "[s3rec] $run_dir is done; skipping $1"
    return 0
  fi
  s3rec_master_env
  echo "$(date -Is) [s3rec] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} nodes ${SLURM_JOB_NODELIST:-?} tasks ${SLURM_NTASKS:-?}: srun $*  (MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT)"
  trap s3rec_on_usr1 USR1
  local rc
  # In the background so that the trap runs while srun is busy; `wait` returns early (>128)
  # when the signal arrives, so wait again until srun has really finished.
  srun --kill-on-bad-exit=1 "$@" &
  local pid=$!
  set +e
  wait "$pid"; rc=$?
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done
  set -e
  trap - USR1
  if [ "$s3rec_preempted" = 1 ] && ! s3rec_stage_done "$run_dir" "$product"; then
    echo "$(date -Is) [s3rec] checkpoint saved (srun exit $rc); requeueing job $(s3rec_job_id)" >&2
    scontrol requeue "$(s3rec_job_id)"
    exit 0
  fi
  if [ "$rc" != 0 ]; then
    echo "[s3rec] $1 failed with exit status $rc" >&2
    exit "$rc"
  fi
  s3rec_stage_done "$run_dir" "$product" || { echo "[s3rec] $1 exited 0 but $run_dir is not done" >&2; exit 1; }
}
