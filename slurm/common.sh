# Shared by the sbatch scripts in this folder (sourced, not run). Bash.
#
# run_stage RUN_DIR PRODUCT COMMAND [ARGS...]
#   Runs COMMAND with `srun --kill-on-bad-exit=1` (one task per GPU or CPU slot), unless RUN_DIR
#   already holds a finished stage (run.json status "done" and PRODUCT, e.g. final.pt). On the
#   preemption signal (sbatch --signal=B:USR1@SECONDS, sent to this batch shell) it passes USR1 to
#   the tasks, which save a checkpoint and exit; then the job requeues itself and, when it starts
#   again, the same command resumes from RUN_DIR/checkpoints/latest.

# MASTER_ADDR/PORT for torch.distributed: the first node of the allocation, a port from the job id.
# Set from the allocation even when the environment has them: sbatch exports the submitting
# shell's variables, and a MASTER_ADDR=127.0.0.1 from there would strand the other nodes' ranks.
# S3REC_MASTER_ADDR / S3REC_MASTER_PORT choose them on purpose (another interface's host name).
s3rec_master_env() {
  if [ -n "${S3REC_MASTER_ADDR:-}" ]; then
    MASTER_ADDR="$S3REC_MASTER_ADDR"
  elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  fi
  export MASTER_ADDR
  export MASTER_PORT="${S3REC_MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
}

# RUN_DIR/run.json's status (running, done, preempted, failed), or nothing without a readable
# one: the run-folder contract (s3rec/run_folder.py) answers, as for launch/ and analysis/.
s3rec_run_status() {
  python3 -m s3rec.run_folder status "$1"
}

# 0 if RUN_DIR/run.json says "done" and RUN_DIR/PRODUCT (final.pt, results.json) exists.
s3rec_stage_done() {
  python3 -m s3rec.run_folder done "$1" "$2"
}

# This job for scancel/scontrol: an array task by its own name (the array's job id would address
# every task of the array).
s3rec_job_id() {
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else echo "$SLURM_JOB_ID"; fi
}

s3rec_requeue() {
  echo "$(date -Is) [s3rec] $1; requeueing job $(s3rec_job_id)" >&2
  scontrol requeue "$(s3rec_job_id)"
  exit 0
}

# The preemption warning may come at any time, also between stages: the trap is set for the
# whole script (bash's default for USR1 would end it), and only a running stage is signalled.
s3rec_preempted=0
s3rec_step_pid=""
s3rec_on_usr1() {
  s3rec_preempted=1
  if [ -n "$s3rec_step_pid" ]; then
    echo "$(date -Is) [s3rec] USR1: asking the tasks to checkpoint, then requeueing job $(s3rec_job_id)" >&2
    # All steps of the job (the training tasks), not this batch shell.
    scancel --signal=USR1 "$(s3rec_job_id)" || true
  else
    echo "$(date -Is) [s3rec] USR1 between stages: requeueing job $(s3rec_job_id) before the next" >&2
  fi
}
trap s3rec_on_usr1 USR1

run_stage() {
  local run_dir="$1" product="$2"
  shift 2
  if s3rec_stage_done "$run_dir" "$product"; then
    echo "[s3rec] $run_dir is done; skipping $1"
    return 0
  fi
  # Warned already (during an earlier stage that still finished): too little time is left to
  # start this one, and no second warning would come.
  [ "$s3rec_preempted" = 0 ] || s3rec_requeue "the time limit is near before $1"
  s3rec_master_env
  # The command last and quoted (${*@Q}): what follows "$ " pastes into a shell as it ran.
  echo "$(date -Is) [s3rec] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} nodes ${SLURM_JOB_NODELIST:-?} tasks ${SLURM_NTASKS:-?} MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT \$ srun --kill-on-bad-exit=1 ${*@Q}"
  local rc
  # In the background so that the trap runs while srun is busy; `wait` returns early (>128)
  # when the signal arrives, so wait until srun has really finished, then once more for its
  # own status (bash keeps a reaped child's status for `wait PID`).
  srun --kill-on-bad-exit=1 "$@" &
  s3rec_step_pid=$!
  set +e
  wait "$s3rec_step_pid"
  while kill -0 "$s3rec_step_pid" 2>/dev/null; do wait "$s3rec_step_pid"; done
  wait "$s3rec_step_pid"; rc=$?
  set -e
  s3rec_step_pid=""
  # Tasks that saved a checkpoint on a signal and exited 0 (run.json "preempted") requeue the
  # job, whoever signalled them: our USR1 (time limit, or preemption with the user signal), or
  # SLURM's own SIGTERM when it preempts the job (PreemptMode=REQUEUE with a GraceTime). In
  # the latter case SLURM does not requeue a job whose batch shell ended first: it would end
  # FAILED or COMPLETED with the stage unfinished. (A user's scancel ends this shell too.)
  if [ "$rc" = 0 ] && [ "$(s3rec_run_status "$run_dir")" = preempted ]; then
    local why="checkpoint saved"
    [ "$s3rec_preempted" = 1 ] || why="$why on a signal from SLURM (preemption)"
    s3rec_requeue "$why"
  fi
  if [ "$s3rec_preempted" = 1 ] && ! s3rec_stage_done "$run_dir" "$product"; then
    # Requeue only what left a checkpoint behind: tasks that failed instead would fail again
    # from the same checkpoint after every requeue, for ever.
    echo "[s3rec] $1 was asked to checkpoint but failed (exit status $rc, run.json not" \
         "\"preempted\"); not requeueing" >&2
    exit $(( rc == 0 ? 1 : rc ))
  fi
  if [ "$rc" != 0 ]; then
    echo "[s3rec] $1 failed with exit status $rc" >&2
    exit "$rc"
  fi
  s3rec_stage_done "$run_dir" "$product" || { echo "[s3rec] $1 exited 0 but $run_dir is not done" >&2; exit 1; }
}
