# The README's two commands. Works offline from the package registries alone:
# the CPU build of torch 2.13.0 is installed first unless a torch is already present.
# `make test` also installs the triton extra: fastdiff.kernels' interpreter tests (TRITON_INTERPRET=1) run on a CPU.
PYTHON ?= python3
EXTRAS ?= dev

.PHONY: setup compare test lint

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[$(EXTRAS)]"

compare: setup
	$(PYTHON) -m fastdiff compare

test: EXTRAS = dev,triton
test: setup
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check .
