# The two commands of the README:
#   make demo   - set up, then run a small grid end to end on the embedded synthetic default
#   make test   - set up, start the local SLURM cluster, run every test (unit, multi-process, cluster)
SHELL := /bin/bash
PY ?= python3
export GLOO_SOCKET_IFNAME ?= lo
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/s3rec-torch-extensions

.PHONY: setup demo test test-unit cluster-start cluster-stop

setup:
	bash tools/setup.sh

demo: setup
	s3rec-grid --demo --out runs/demo

test: setup
	bash tools/run_tests.sh

test-unit: setup
	$(PY) -m pytest -q -m "not multiproc and not cluster and not slow"
