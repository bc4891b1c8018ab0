# Two commands set everything up on a fresh machine: `make up` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: up test install dev lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

## make up: create .venv, install Tidal, start a whole local cluster (Ctrl-C stops it)
up: install
	$(BIN)/tidal up

## make test: create .venv, install with dev extras, run the whole suite
test: dev
	$(BIN)/python -m pytest

lint: dev
	$(BIN)/ruff check .

## make bench: the benchmark harness, separate from make test (~30 min; BENCH_ARGS=--quick ~10)
## py-spy is a dev tool for the profiles: installed here, never a dependency of the project
bench: dev
	$(BIN)/python -m pip install --quiet py-spy || echo "py-spy not installed: profiles skipped"
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tidal .pytest_cache
