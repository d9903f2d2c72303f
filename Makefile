# Two entry points (see README.md): `make demo` and `make test`.
# Both create or reuse the virtual environment $(VENV). torch 2.13.0 (CPU wheel on CPU-only hosts) is installed
# first and pinned with a constraints file, so no dependency can swap it for a CUDA build; a torch already present
# in the environment is kept as it is.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dmaf-installed
TORCH ?= torch==2.13.0
DEMO_DIR ?= data/synthetic_brats

.PHONY: env demo test clean-env

env: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	@$(PY) -m pip install --quiet --disable-pip-version-check -c $(VENV)/torch-constraint.txt -e ".[test]"
	@touch $(STAMP)
	@echo "environment ready: $(VENV) ($$(cat $(VENV)/torch-constraint.txt))"

demo: $(STAMP)
	$(VENV)/bin/dmaf demo --data_dir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-env:
	rm -rf $(VENV)
