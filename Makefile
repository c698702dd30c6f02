# Every target sets up what it needs: a virtual environment with the CPU build of torch,
# the package, and the registry-shipped encoder and datasets (no model or dataset hub).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
ASSETS := $(VENV)/.assets
DEMO_DIR ?= runs/demo

.PHONY: install assets test test-fast lint demo clean-demo

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,onnx,distributed]"
	touch $@

install: $(INSTALLED)

$(ASSETS): $(INSTALLED)
	$(BIN)/python -m layerexit.assets install all
	touch $@

assets: $(ASSETS)

lint: $(INSTALLED)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

test: $(ASSETS)
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -q -m "not integration and not slow"

demo: $(ASSETS)
	rm -rf $(DEMO_DIR)
	$(BIN)/layerexit train --model minilm-l6 --task tweets-binary --objective ensemble --lambda 0.3 \
		--max-train 6000 --epochs 2 --batch-size 32 --max-length 64 --threads 2 --output $(DEMO_DIR)
