# Each target creates or refreshes the virtualenv first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv run test ui

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)  ## create or refresh the virtualenv only

run: $(STAMP)  ## run the default pipeline (extra CLI arguments: make run ARGS="--set seed=1")
	HF_HUB_OFFLINE=1 $(BIN)/rlhf run $(ARGS)

test: $(STAMP)  ## the whole test suite, as CI runs it
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

ui: $(STAMP)  ## the MLflow dashboard on http://127.0.0.1:5000
	$(BIN)/rlhf ui
