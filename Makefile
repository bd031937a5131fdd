# The two set-up commands (README): `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs what it needs; torch is pinned through constraints.txt so a CPU
# machine takes the local CPU wheel and never pulls CUDA packages.
# `make test-fast` runs the quick part of the tests (every layer, under a minute on 2 CPU cores): all but
# the tests marked distributed, compile, triton or slow (markers: pyproject.toml); `make test` runs them all.
# torchtitan's loss module (tests of xent.integrations.torchtitan) without its training dependencies, whose
# pins (datasets < 4.8, torchdata, wandb, ...) conflict with the test extras': docs/torchtitan.md
TORCHTITAN := torchtitan==0.3.0 spmd-types==0.2.3
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	$(VENV)/bin/pip install --quiet -c constraints.txt --no-deps $(TORCHTITAN)
	$(VENV)/bin/pip install --quiet -c constraints.txt tyro
	touch $(STAMP)

.PHONY: demo test test-fast lint format verify bench clean
demo: $(STAMP)
	$(VENV)/bin/xent bench

verify: $(STAMP)
	$(VENV)/bin/xent verify

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not distributed and not compile and not triton and not slow"

# ruff, configured in pyproject.toml: the linter, and the formatter in check mode (`make format` applies it)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks examples
	$(VENV)/bin/ruff check --fix src tests benchmarks examples

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_cross_entropy.py
	$(VENV)/bin/python benchmarks/bench_linear_cross_entropy.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis src/*.egg-info
