# make demo   - set up everything, then train a tiny ViT on a small real dataset (CPU)
# make test   - set up everything, then lint (ruff) and run the whole test suite (CPU; starts its own services)
# make test-fast - no root, no apt, no servers: lint, then every test but the Slurm/Prometheus and slow ones
# make bench  - benchmarks (attention, train step, data); GPU numbers when a GPU is present
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test services demo test test-fast bench

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
	DS_ACCELERATOR=cpu $(PY) -P -m vitscale demo

# python -P: the checkout's top-level kernels/ (installed as vitscale.kernels) must not shadow
# Hugging Face's `kernels` package, which transformers >= 5.25 imports.
test: setup-test services
	$(VENV)/bin/ruff check .
	DS_ACCELERATOR=cpu TRITON_INTERPRET=1 $(PY) -P -m pytest -x -q --durations=15 tests

test-fast: setup-test
	$(VENV)/bin/ruff check .
	DS_ACCELERATOR=cpu TRITON_INTERPRET=1 $(PY) -P -m pytest -x -q -m "not services and not slow" tests

bench: setup
	$(PY) -m vitscale bench all
