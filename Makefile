# Every target sets up what it needs: a virtual environment with the CPU build of torch,
# the package, and the registry-shipped encoder and datasets (no model or dataset hub).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
ASSETS := $(VENV)/.assets
DEMO_DIR ?= runs/demo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install assets browser test test-fast lint docs demo clean-demo report

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,docs,onnx,distributed,report,serve,ray]"
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

# The report's browser test drives the system's Chromium (Playwright is only the driver; no browser download).
browser:
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

test: $(ASSETS) browser
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	LAYEREXIT_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The documentation site (mkdocs, material theme), built offline into site/; strict: a broken link fails.
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -q -m "not integration and not slow"

demo: $(ASSETS)
	rm -rf $(DEMO_DIR)
	$(BIN)/layerexit train --model minilm-l6 --task tweets-binary --objective ensemble --lambda 0.3 \
		--max-train 6000 --epochs 2 --batch-size 32 --max-length 64 --threads 2 --output $(DEMO_DIR)

report: $(INSTALLED)
	$(BIN)/layerexit report $(DEMO_DIR)
