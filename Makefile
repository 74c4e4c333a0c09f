# Two commands for a newcomer:  make demo  (the main job on the embedded data)  and  make test.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNS ?= runs
REPORTS ?= reports

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py --config=configs/mae_mnist5k.py --workdir=$(RUNS)/mae
	$(BIN)/python train.py --config=configs/dino_mnist5k.py --workdir=$(RUNS)/dino
	$(BIN)/python evaluate.py --config=configs/eval_mnist5k.py --config.checkpoint=$(RUNS)/mae,$(RUNS)/dino --outdir=$(REPORTS)/demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(RUNS) $(REPORTS)
