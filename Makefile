# The README's two commands. Works offline from the package registries alone:
# the CPU build of torch 2.13.0 is installed first unless a torch is already present.
PYTHON ?= python3

.PHONY: setup compare test lint

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"

compare: setup
	$(PYTHON) -m fastdiff compare

test: setup
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check .
