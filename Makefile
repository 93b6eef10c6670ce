# Everyday commands. `make serve` and `make test` each set up everything they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-dev system-deps serve check-config version lint test protos bench loadtest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

serve: install  ## run the gateway on 127.0.0.1:8000 with the settings in the environment
	$(BIN)/tokenrelay serve $(ARGS)

check-config: install  ## validate the settings (ARGS="--config FILE") and report every problem
	$(BIN)/tokenrelay check-config $(ARGS)

version: install
	$(BIN)/tokenrelay --version

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

system-deps:  ## Debian's chromium, redis-server, nginx and wrk for the tests and the bench (installed when missing; fails if unusable)
	scripts/install-system-deps

test: lint system-deps  ## install, lint, type-check and run the whole test suite
	$(BIN)/pytest $(ARGS)

protos: install-dev  ## regenerate the gRPC stubs in server/classification/stubs from proto/
	PYTHON=$(BIN)/python scripts/gen-protos

bench: install-dev  ## direct vs gateway: TTFB, CPU per chunk, memory, capacity, cancels (~4 min)
	$(BIN)/python -m loadtests.bench $(ARGS)

loadtest: install-dev  ## locust, headless, through the gateway to the fake upstream
	$(BIN)/python -m loadtests.loadtest $(ARGS)
