# One entry point per job; each target sets up what it needs (venv, packages, data) itself.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
FMNIST   := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: test unit demo stop venv data typecheck bench paper-table clean

# torch/torchvision pinned to the builds on local disk (2.14.1 / 0.29.1); zarr 3.1.6 is the
# newest release for Python 3.11 (3.2+ requires Python 3.12).
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]" "zarr==3.1.6" "numcodecs==0.16.6" "prefect==3.9.1" \
	    "webdataset==1.0.2" "faiss-cpu==1.15.1" "timm==1.0.31"
	touch $(STAMP)

venv: $(STAMP)

$(FMNIST):
	apt-get update -q && apt-get install -y -q dataset-fashion-mnist

data: $(FMNIST)

## make test: install everything, then lint, type-check (beside the unit tier: one core each), the integration tier
test: venv data
	$(BIN)/ruff check --select F --no-cache seed pipeline flows bench tests
	typing=$$(mktemp); $(BIN)/python -m mypy > $$typing 2>&1 & mypy=$$!; \
	    $(BIN)/python -m pytest -q tests/unit; unit=$$?; \
	    wait $$mypy; typed=$$?; cat $$typing; rm -f $$typing; test $$unit = 0 && test $$typed = 0
	$(BIN)/python -m pytest -q --durations=8 tests/integration

## make unit: the fast tier alone (no subprocess, no server; under a minute): run it after every change
unit: venv data
	$(BIN)/python -m pytest -q tests/unit

typecheck: venv
	$(BIN)/python -m mypy

## make demo: the main job: the Prefect pipeline on Fashion-MNIST (servers stay up; `make stop` ends them)
demo: venv data
	bash scripts/demo.sh

stop:
	bash scripts/stop.sh

bench: venv data
	$(BIN)/python bench/teacher_stage.py

## make paper-table: the SEED comparison on full Fashion-MNIST, >= 3 seeds per arm (about 12 h on 2 CPU cores: resumable, finished rows are committed under docs/results/rows)
paper-table: venv data
	$(BIN)/python bench/paper_table.py

clean: stop
	rm -rf $(VENV) data .prefect
