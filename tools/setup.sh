#!/usr/bin/env bash
# Idempotent set-up of everything the suite and its tests need (apt and pip).
set -eo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v slurmctld >/dev/null || need_apt+=(slurm-wlm)
command -v munged >/dev/null || need_apt+=(munge)
if ((${#need_apt[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# torch is pinned to the CPU wheel this machine has on disk (see setup.py).
if ! python3 -c "import s3rec, deepspeed, h5py, mpi4py, submitit, tensorboard, matplotlib" 2>/dev/null \
   || ! command -v s3rec-prep >/dev/null || ! command -v mpiexec >/dev/null; then
  python3 -m pip install -q -e ".[dev]"
fi
