#!/usr/bin/env bash
# Runs every test: unit, multi-process (gloo, mpirun, torchrun, deepspeed) and cluster (real SLURM).
set -eo pipefail
cd "$(dirname "$0")/.."
export GLOO_SOCKET_IFNAME=lo
# Tests start several training processes on 2 cores: one thread each. With torch's default (all
# cores per process) OpenMP threads spin against each other and a step gets 10-50x slower, which
# also throws off the time-limit tests' speed calibration.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/s3rec-torch-extensions}
started_cluster=0
if [ -x slurm/local-cluster.sh ]; then
  if ! slurm/local-cluster.sh status >/dev/null 2>&1; then
    slurm/local-cluster.sh start
    started_cluster=1
  fi
fi
cleanup() { if [ "$started_cluster" = 1 ]; then slurm/local-cluster.sh stop || true; fi; }
trap cleanup EXIT
# --durations: the slowest tests named at the end of every run, where CI time is won back
python3 -m pytest -q -rs --durations=30 "$@"
