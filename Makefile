# Scripts to rule them all: each target does one obvious thing, for people and CI alike.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export ECHO_DATA_DIR ?= ./var

.PHONY: run demo test lint fmt typecheck bench soak clean

# The runtime install (what `make run` needs) and the dev install (tests, lint, types).
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Echo needs Python 3.11 or newer (set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $@

## run: install, migrate the embedded SQLite databases under ./var, serve on :8000
run: $(VENV)/.installed
	$(BIN)/echo-auth db upgrade
	exec $(BIN)/echo-auth serve

## demo: like run, after `echo-auth demo seed` fills a fresh ./var with accounts and activity
demo: $(VENV)/.installed
	$(BIN)/echo-auth db upgrade
	$(BIN)/echo-auth demo seed
	exec $(BIN)/echo-auth serve

## test: lint, type-check and the whole suite, on SQLite and MySQL/MariaDB
test: $(VENV)/.installed-dev lint typecheck
	PY=$(BIN)/python scripts/ensure-mysql
	scripts/ensure-chromium
	scripts/ensure-mysql-client
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

fmt: $(VENV)/.installed-dev
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

## bench: the benchmarks in bench/ (results in bench/results/)
bench: $(VENV)/.installed-bench
	PY=$(BIN)/python scripts/ensure-mysql
	scripts/ensure-wrk
	$(BIN)/python -m bench

## soak: only the 10-minute soak (mixed traffic, two relays; bench/results/soak.json)
soak: $(VENV)/.installed-bench
	PY=$(BIN)/python scripts/ensure-mysql
	$(BIN)/python -m bench soak

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
