# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv with the interpreter in $(PYTHON) and install what they need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The reference implementation, for side-by-side tests and benchmarks. It is
# installed without its (heavy) dependencies: we only load its patching module.
REFERENCE := careamics==0.3.5

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(REFERENCE)
	# PyTorch, for the tests of gpu_patching.torch and the two-process DDP test
	# (they skip without it). Pinned to 2.13.0 because this CI image keeps that
	# version's CPU build on disk (pip's find-links); any other version would
	# make pip download a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet 'torch==2.13.0'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/python -m gpu_patching.demo

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest

lint: $(VENV)/.test-installed
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/python -m ruff check gpu_patching tests benchmarks

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
