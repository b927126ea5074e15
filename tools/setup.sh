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
# Reinstall also when the installed package is another checkout's (an editable install points at
# one folder; CI clones the repository elsewhere).
here=$(pwd -P)
installed=$(cd / && python3 -c "import os, s3rec; print(os.path.dirname(os.path.dirname(os.path.realpath(s3rec.__file__))))" 2>/dev/null || true)
if [ "$installed" != "$here" ] \
   || ! (cd / && python3 -c "import deepspeed, h5py, mpi4py, submitit, tensorboard, matplotlib, s3rec.data_prep, s3rec.launch, s3rec.analysis") 2>/dev/null \
   || ! command -v s3rec-prep >/dev/null || ! command -v mpiexec >/dev/null; then
  python3 -m pip install -q -e ".[dev]"
fi
