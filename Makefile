# Two commands for a newcomer:  make demo  (the main job on the embedded data)  and  make test.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNS ?= runs
REPORTS ?= reports

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The core (demo) never needs torch; the tests also run the PyTorch-weight converter's parity checks.
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test,convert]"
	touch $@

install: $(VENV)/.core

demo: $(VENV)/.core
	$(BIN)/python train.py --config=configs/mae_mnist5k.py --workdir=$(RUNS)/mae
	$(BIN)/python train.py --config=configs/dino_mnist5k.py --workdir=$(RUNS)/dino
	$(BIN)/python evaluate.py --config=configs/eval_mnist5k.py --config.checkpoint=$(RUNS)/mae --config.checkpoint=$(RUNS)/dino --outdir=$(REPORTS)/demo

test: $(VENV)/.test
	$(BIN)/python -m pytest tests

# The linter CI runs before the tests (rules in pyproject.toml).
lint: $(VENV)/.test
	$(BIN)/ruff check .

clean:
	rm -rf $(RUNS) $(REPORTS)
