# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv with the interpreter in $(PYTHON) and install what they need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The reference implementation, for side-by-side tests and benchmarks. It is
# installed without its (heavy) dependencies: we only load its patching module.
REFERENCE := careamics==0.3.5
TORCH ?= torch==2.13.0+cpu

.PHONY: demo test lint bench clean careamics-tier

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
	@# The reference (below) requires Python 3.11: say so before installing anything.
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11) and \
		"make test needs Python >= 3.11 (the reference, CAREamics 0.3.5, requires it); " \
		+ "$(VENV) has " + sys.version.split()[0] + ": remove $(VENV) and run " \
		+ "make test PYTHON=python3.11")'
	$(EDITABLE) '.[test]'
	@# PyTorch, for the tests of gpu_patching.torch and the two-process DDP test
	@# (they skip without it). The CPU build: the CI image keeps torch 2.13.0+cpu
	@# on disk (pip's find-links); elsewhere this fails fast instead of pulling a
	@# multi-GB CUDA build (set TORCH=... to choose another).
	$(BIN)/python -m pip install --quiet '$(TORCH)' \
		|| echo "note: no local $(TORCH) wheel; the PyTorch tests will be skipped"
	@# The reference goes in last: once it is installed, any later install of a
	@# package it depends on (torch, numpy, ...) makes pip list the reference's
	@# dependencies we leave out on purpose as a red resolver ERROR.
	$(BIN)/python -m pip install --quiet --no-deps $(REFERENCE)
	touch $@

# The optional CAREamics tier: CAREamics' own dependencies beside the CPU PyTorch
# above, for tests/test_careamics_tier.py (skipped without them; `make test` never
# installs them) and benchmarks/bench_careamics.py. The constraint keeps pip from
# replacing the CPU PyTorch. CAREamics 0.3.5 caps torchvision at 0.26, which is built
# for an older PyTorch, so torchvision comes without dependencies in the release built
# for this PyTorch; `pip check` then reports that cap (and CAREamics' cap on pyyaml),
# and nothing else. Runs the tier's tests, the spawn worker tests included, and the
# README's CAREamist example. Users follow the README's recipe instead, the same idea
# with PyTorch 2.11 and torchvision 0.26 from PyTorch's own index, then
# `pip install gpu-patching[careamics]` under the same kind of constraint; here only
# the 2.13 CPU wheel of PyTorch is at hand.
CAREAMICS_DEPS := 'bioimageio-core>=0.9.0,<=0.11.0' 'lightning>=2.2,<=2.6.6,!=2.6.2,!=2.6.3' \
	'microssim<=0.0.5' 'psutil<=7.2.2' 'pydantic>=2.11,<=2.14.1' 'torchmetrics>0.7.0,<1.9.0'
TORCHVISION ?= torchvision==0.28.0

$(VENV)/.careamics-installed: $(VENV)/.test-installed
	printf '%s\n' '$(TORCH)' > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/torch-constraint.txt $(CAREAMICS_DEPS)
	$(BIN)/python -m pip install --quiet --no-deps '$(TORCHVISION)'
	-$(BIN)/python -m pip check
	touch $@

careamics-tier: $(VENV)/.careamics-installed
	GPU_PATCHING_SPAWN_TIER=1 $(BIN)/python -m pytest -p no:cacheprovider -o timeout=0 tests/test_careamics_tier.py

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
