# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv with the interpreter in $(PYTHON) and install what they need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The reference implementation, for side-by-side tests and benchmarks. It is
# installed without its (heavy) dependencies: we only load its patching module.
REFERENCE := careamics==0.3.5
TORCH ?= torch==2.13.0+cpu

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# setuptools announces every editable install with a note (a Python warning
# its build backend prints even under --quiet) about folders named like the
# package; it is information only, so the editable installs below silence it.
EDITABLE := PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet -e

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(EDITABLE) '.[cli]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(EDITABLE) '.[test]'
	# PyTorch, for the tests of gpu_patching.torch and the two-process DDP test
	# (they skip without it). The CPU build: the CI image keeps torch 2.13.0+cpu
	# on disk (pip's find-links); elsewhere this fails fast instead of pulling a
	# multi-GB CUDA build (set TORCH=... to choose another).
	$(BIN)/python -m pip install --quiet '$(TORCH)' \
		|| echo "note: no local $(TORCH) wheel; the PyTorch tests will be skipped"
	# The reference goes in last: once it is installed, any later install of a
	# package it depends on (torch, numpy, ...) makes pip list the reference's
	# dependencies we leave out on purpose as a red resolver ERROR.
	$(BIN)/python -m pip install --quiet --no-deps $(REFERENCE)
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/gpu-patching demo --output demo-output --overwrite

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest

lint: $(VENV)/.test-installed
	$(BIN)/python -m pip install --quiet ruff mypy
	$(BIN)/python -m ruff check gpu_patching tests benchmarks
	$(BIN)/python -m ruff format --check gpu_patching tests benchmarks
	$(BIN)/python -m mypy gpu_patching

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
