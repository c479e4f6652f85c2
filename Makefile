# clipsearch — the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
WORKDIR ?= demo-work
# torch from PyPI is a CUDA build on x86_64 (it also runs on CPU-only machines).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: help venv dev demo test lint format typecheck pytest bench clean

help:
	@echo "make demo   - set up .venv, build the emoji data, train, index and serve on http://127.0.0.1:$(PORT)"
	@echo "make test   - install dev dependencies, run lint, types and the whole test suite"
	@echo "make bench  - run the side-by-side benchmarks in benchmarks/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

demo: venv
	$(BIN)/clipsearch demo --workdir $(WORKDIR) --port $(PORT)

lint: dev
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy service indexer/images.py indexer/model.py indexer/bundle.py

format: dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

pytest: dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint pytest

bench: dev
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/index.py
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
