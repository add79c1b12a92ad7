# make demo   - set up everything, then train a tiny ViT on a small real dataset (CPU)
# make test   - set up everything, then run the whole test suite (CPU; starts its own services)
# make bench  - benchmarks (attention, train step, data); GPU numbers when a GPU is present
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test services demo test bench

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh test

# Debian's slurmctld/slurmd/munge and prometheus for the launcher and metrics tests (root + apt;
# a no-op when installed). The tests start and stop them on 127.0.0.1 themselves.
services:
	tests/services/slurm.sh install
	tests/services/prometheus.sh install

demo: setup
	DS_ACCELERATOR=cpu $(PY) -m vitscale demo

test: setup-test services
	DS_ACCELERATOR=cpu TRITON_INTERPRET=1 $(PY) -m pytest -x -q --durations=15 tests

bench: setup
	$(PY) -m vitscale bench all
