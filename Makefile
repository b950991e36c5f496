# The README's two commands. Works offline from the package registries alone:
# the CPU build of torch 2.13.0 is installed first unless a torch is already present.
# `make test` also installs the triton extra (fastdiff.kernels' interpreter tests, TRITON_INTERPRET=1, run on a CPU)
# and the notebooks extra (tests/test_notebooks.py executes notebooks/ with nbclient).
PYTHON ?= python3
EXTRAS ?= dev

.PHONY: setup compare test test-oldest lint notebooks

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[$(EXTRAS)]"

compare: setup
	$(PYTHON) -m fastdiff compare

test: EXTRAS = dev,triton,notebooks
test: setup
	$(PYTHON) -m pytest -q tests

# The suite again, in the virtualenv $(OLDEST_VENV), against the oldest diffusers / transformers / accelerate
# pyproject.toml accepts (constraints-oldest.txt): what a user with an older stack gets. CI runs it too.
OLDEST_VENV ?= .venv-oldest
test-oldest:
	$(PYTHON) -m venv $(OLDEST_VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints-oldest.txt $(MAKE) test PYTHON=$(CURDIR)/$(OLDEST_VENV)/bin/python

lint:
	$(PYTHON) -m ruff check .

# Re-execute every notebook in place at its default size (outputs and notebooks/figures/*.png updated; minutes
# each on a 2-core CPU; the small CI size runs in tests/test_notebooks.py, without touching them).
notebooks: EXTRAS = notebooks
notebooks: setup
	cd notebooks && for nb in *.ipynb; do \
		OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} \
		$(PYTHON) -m nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=3600 "$$nb" || exit 1; \
	done
