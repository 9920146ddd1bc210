# Two commands for a newcomer on a fresh machine (nothing but Python 3.11+ needed):
#   make demo   install into .venv (with the server) and run the offline demo
#   make test   install into .venv (with dev tools) and run the test suite
# The commands land in .venv/bin: `source .venv/bin/activate` puts `clipdex` on PATH.
PYTHON ?= python3
VENV ?= .venv
# the extras the test suite installs: `diffusion` (diffusers, transformers) only for the
# pixel-expansion test; `make test DEV_EXTRAS=dev` skips it and keeps open_clip's import lean
DEV_EXTRAS ?= dev,diffusion
BIN := $(VENV)/bin

.PHONY: install install-dev demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[server]'

install-dev: $(BIN)/python
	$(BIN)/pip install -q -e '.[$(DEV_EXTRAS)]'

demo: install
	$(BIN)/clipdex demo

test: install-dev
	$(BIN)/python -m pytest -q

lint: install-dev
	$(BIN)/ruff check .

clean:
	rm -rf clipdex-demo .pytest_cache build *.egg-info
