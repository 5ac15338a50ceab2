# make test: builds .venv from nothing, then lint, types and tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test lint typecheck pytest run clean venv deb rpm

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,collector,postgres]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/ruff format --check agent tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

run: $(STAMP)
	$(VENV)/bin/python -m agent.quickstart

deb:
	packaging/build-deb.sh

rpm:
	packaging/build-rpm.sh

clean:
	rm -rf $(VENV) build dist run *.egg-info .mypy_cache .pytest_cache .ruff_cache
