# The two commands of the README:
#   make demo   - set up (pip only: no root, apt or SLURM), then run a small grid end to end on
#                 the embedded synthetic default
#   make test   - set up (adds the local SLURM cluster's system packages where run as root), start
#                 the local SLURM cluster, run every test (unit, multi-process, cluster)
# Every recipe's standard input is /dev/null, so they run alike from a terminal, a background
# script or CI (where it may be closed: a closed descriptor 0 would be reused by the first file
# a child opens).
SHELL := /bin/bash
PY ?= python3
export GLOO_SOCKET_IFNAME ?= lo
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/s3rec-torch-extensions

.PHONY: setup setup-test demo test test-unit

setup:
	PY=$(PY) bash tools/setup.sh </dev/null

setup-test:
	PY=$(PY) bash tools/setup_test.sh </dev/null

demo: setup
	s3rec-grid --demo --out runs/demo </dev/null

test: setup-test
	bash tools/run_tests.sh </dev/null

test-unit:
	PY=$(PY) bash tools/setup.sh dev </dev/null
	$(PY) -m pytest -q -m "not multiproc and not cluster and not slow" </dev/null
