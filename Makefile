# Two commands for a newcomer on a fresh machine (nothing but Python 3.11+ needed):
#   make demo   install into .venv and run the offline demo
#   make test   install into .venv (with dev tools) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-dev demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'

demo: install
	$(BIN)/clipdex demo

test: install-dev
	$(BIN)/python -m pytest -q

lint: install-dev
	$(BIN)/ruff check .

clean:
	rm -rf clipdex-demo .pytest_cache build *.egg-info
