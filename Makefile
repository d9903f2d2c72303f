# Two entry points (see README.md): `make demo` and `make test` (`make test-fast`: without the slow tests).
# Both create or reuse the virtual environment $(VENV). torch 2.13.0 (CPU wheel on CPU-only hosts) is installed
# first and pinned with a constraints file, so no dependency can swap it for a CUDA build; a torch already present
# in the environment is kept as it is.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dmaf-installed
TORCH ?= torch==2.13.0
DEMO_DIR ?= data/demo_brats

MLVENV ?= .venv-monailabel
ML_STAMP := $(MLVENV)/.dmaf-installed

.PHONY: env demo test test-fast lint format wheel clean-env monailabel-env monailabel-check

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
	$(VENV)/bin/dmaf demo --data_dir $(DEMO_DIR) --work_dir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# The tests not marked slow (setup.cfg's markers): no subprocess, torchrun or bundle run, none over 20 s.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Static checks (pycodestyle errors/warnings and pyflakes) and the code format; settings in pyproject.toml's
# [tool.ruff]. `make format` rewrites the files that the format check rejects.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .

# The bundle's package as a wheel in bundle/wheels/: metadata.json's required_packages_version names
# dmaf-components==<version>, which no public index serves; `pip install --find-links bundle/wheels ...` (or
# PIP_FIND_LINKS=bundle/wheels for the model zoo's own install step) finds it there. See bundle/docs/README.md.
WHEEL_DIR ?= bundle/wheels
wheel: $(STAMP)
	@rm -rf build $(WHEEL_DIR)/dmaf_components-*.whl
	$(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w $(WHEEL_DIR) .
	@rm -rf build
	@ls $(WHEEL_DIR)/dmaf_components-*.whl

clean-env:
	rm -rf $(VENV)

# MONAI Label 0.8.5 needs its own environment (numpy<2, jsonschema 3, torch>=2.14 through torchvision); see
# docs/monailabel.md. The project package goes in without its dependencies, which monailabel's already provide.
monailabel-env: $(ML_STAMP)

$(ML_STAMP): setup.cfg pyproject.toml
	@test -x $(MLVENV)/bin/python || $(PYTHON) -m venv $(MLVENV)
	@$(MLVENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(MLVENV)/bin/python -m pip install --quiet --disable-pip-version-check monailabel==0.8.5 pydicom==2.4.4 \
		pynetdicom==2.0.2 "dicomweb-client[gcp]==0.59.1"
	@$(MLVENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(ML_STAMP)
	@echo "MONAI Label environment ready: $(MLVENV)"

monailabel-check: $(STAMP) $(ML_STAMP)
	$(PY) scripts/monailabel_check.py --monailabel-python $(MLVENV)/bin/python --work $(CURDIR)/runs/monailabel-check
