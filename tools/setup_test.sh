#!/usr/bin/env bash
# What `make test` needs besides the demo's pip packages: the system packages of the local SLURM
# cluster (slurm/local-cluster.sh), then tools/setup.sh with the test extras.
# System packages are installed only when this runs as root (CI, a container); otherwise it says
# which are missing and how to get them, and goes on with pip. Reads no standard input.
set -eo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v slurmctld >/dev/null || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
  else
    echo "tools/setup_test.sh: the cluster tests need the Debian/Ubuntu packages" \
         "${missing[*]}, missing here and not installed (that needs root): as root," \
         "apt-get install -y --no-install-recommends ${missing[*]}; or run only the tests" \
         "without a cluster: make test-unit" >&2
  fi
fi
bash tools/setup.sh dev
