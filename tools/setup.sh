#!/usr/bin/env bash
# The suite's Python packages, with pip only: what `make demo` needs (no root, apt or SLURM).
#   tools/setup.sh          the package, editable, into the Python that runs it ($PY, else python3)
#   tools/setup.sh dev      also the test extras (pytest, the mpich wheel)
# It installs into that Python's environment: activate your own (venv, conda) first. A torch
# already there is kept (setup.py admits a range, see docs/install.md); only where there is no
# torch at all does tools/constraints-ci.txt choose the CPU wheel. Idempotent: nothing is
# installed when this checkout's package and its dependencies are already there.
set -eo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
extras=${1:+[$1]}

need=(deepspeed h5py submitit tensorboard matplotlib yaml packaging s3rec.data_prep s3rec.launch
      s3rec.analysis)
[ "$1" = dev ] && need+=(mpi4py pytest scipy)
# Installed from this checkout (an editable install points at one folder; CI clones the
# repository elsewhere) and every module found. Found, not imported: importing DeepSpeed and
# TensorBoard alone takes seconds.
here=$(pwd -P)
installed_here() {
  (cd / && "$PY" - "$here" "${need[@]}" 2>/dev/null) <<'EOF'
import importlib.util, os, sys
here, *modules = sys.argv[1:]
import s3rec
sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(s3rec.__file__))) != here
         or any(importlib.util.find_spec(m) is None for m in modules))
EOF
}
if installed_here && command -v s3rec-prep >/dev/null \
   && { [ "$1" != dev ] || command -v mpiexec >/dev/null; }; then
  exit 0
fi

# PEP 668: a distribution's own Python (Debian 12, Ubuntu 23.04 on) refuses pip outside a venv.
externally_managed() {
  "$PY" - <<'EOF'
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(sys.prefix != sys.base_prefix or not os.path.exists(marker))
EOF
}
if externally_managed; then
  echo "tools/setup.sh: $PY is the system's Python, which does not take pip packages" \
       "(EXTERNALLY-MANAGED); make and activate an environment first, e.g." \
       "python3 -m venv --system-site-packages ~/s3rec-env && . ~/s3rec-env/bin/activate" >&2
  exit 1
fi
constraints=()
(cd / && "$PY" -c "import importlib.util, sys; sys.exit(not importlib.util.find_spec('torch'))") \
  || constraints=(-c tools/constraints-ci.txt)
"$PY" -m pip install -q --no-input "${constraints[@]}" -e ".$extras"
