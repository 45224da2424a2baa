# Two entry points: `make demo` and `make test`. Each sets itself up on a fresh machine:
# system packages (PostgreSQL + PostGIS, through apt-get when missing), a virtual environment
# with the package and its dependencies, then its job.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-output
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint system venv clean help

help:
	@echo "make demo   - build the embedded catalog, serve it, run the whole pipeline (outputs in $(DEMO_DIR)/)"
	@echo "make test   - lint (ruff) and run the test suite"
	@echo "make clean  - remove the virtual environment and demo outputs"

system:
	@bash deploy/ensure-system-packages.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[train,k8s,dev]"
	@touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check pipeline tests benchmarks

demo: system venv
	DEMO_DIR=$(DEMO_DIR) $(BIN)/ssl4eo demo --out $(DEMO_DIR)

test: system venv lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR)
