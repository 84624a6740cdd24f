# dsys developer commands. Every target sets up .venv itself when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck pytest docs-build docs bench demo chat trading shop clean venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,docs,bench,examples]'
	touch $(STAMP)

venv: $(STAMP)

## test: ruff, mypy --strict, pytest (fast suite), mkdocs build --strict
test: lint typecheck pytest docs-build

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict src examples

pytest: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir .site

## docs: serve the documentation on 127.0.0.1:8000
docs: $(STAMP)
	$(BIN)/mkdocs serve -a 127.0.0.1:8000

## bench: run every benchmarks/bench_*.py (ours and the peers, same run)
bench: $(STAMP)
	@set -e; for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; done

## demo: the main showcase on localhost
demo: $(STAMP)
	$(BIN)/python examples/demo.py

## chat: the chat example (issue 15) on localhost until Ctrl-C; CHAT_ARGS="--seconds 10"
chat: $(STAMP)
	$(BIN)/python -m examples.chat $(CHAT_ARGS)

## shop: the e-commerce example (examples/shop) on localhost; Ctrl-C stops it
shop: $(STAMP)
	$(BIN)/python -m examples.shop $(SHOP_ARGS)

clean:
	rm -rf $(VENV) .site .mypy_cache .pytest_cache .ruff_cache

## trading: the stock ticker and trading example on localhost (Ctrl-C stops it)
trading: $(STAMP)
	$(BIN)/python -m examples.trading $(TRADING_ARGS)
