# clipsearch — the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
WORKDIR ?= demo-work
# torch from PyPI is a CUDA build on x86_64 (it also runs on CPU-only machines).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

# Debian packages the tests need: the emoji font (demo data), Chromium (the search page's browser tests),
# fontconfig (to find the font), FriBiDi (Pillow's complex text layout draws emoji sequences with it) and
# Node.js (the page's pure logic, state.js and terms.js, is tested in Node without a browser), and
# libatomic1, which the Node binary inside the Playwright wheel links against (without it the driver exits
# at once and every browser test fails with "Connection closed while reading from the driver").
TEST_PACKAGES ?= fonts-noto-color-emoji chromium fontconfig libfribidi0 nodejs libatomic1

.PHONY: help venv dev demo test test-fast system-deps lint format typecheck pytest bench faults docker-test clean

help:
	@echo "make demo   - set up .venv, build the emoji data, train, index and serve on http://127.0.0.1:$(PORT)"
	@echo "make test   - install dev dependencies and system packages, run lint, types and the whole test suite"
	@echo "make test-fast - the tests not marked slow (a loop of under two minutes for day-to-day work)"
	@echo "make bench  - run the side-by-side benchmarks in benchmarks/"
	@echo "make faults - the fault suite (kill -9, reloads, fuzzing, slow clients, soak, full disk; docs/reliability.md)"
	@echo "make docker-test - build the image and run the compose services for real (opt-in, ~10 minutes)"

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
	$(BIN)/mypy service indexer/core

format: dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Installs what is missing with apt-get when root or with password-less sudo, as `make demo` does for the
# font; otherwise one line says what to run.
system-deps:
	@missing=$$(for p in $(TEST_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	missing=$$(echo $$missing); \
	if ! command -v apt-get >/dev/null; then echo "error: the tests need these Debian packages (or your system's equivalents): $$missing" >&2; exit 1; fi; \
	if [ "$$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "error: the tests need system packages; run: sudo apt-get install $$missing" >&2; exit 1; fi; \
	echo "installing $$missing with apt-get"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null

pytest: dev system-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint pytest

test-fast: dev
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: dev
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/index.py
	$(BIN)/python benchmarks/serve.py

# About 50 minutes (a 30-minute soak included); `make faults FAULTS_ARGS=--quick` takes about 10.
faults: dev
	$(BIN)/python benchmarks/faults.py $(FAULTS_ARGS)

# Opt-in, not part of `make test` or CI: builds the image and runs docker-compose.yml's services for real
# (Docker where an engine exists, podman following the file where not; docs/docker.md, "How it is tested").
docker-test: dev
	nice -n 19 $(BIN)/python -m tests.ship.compose_run $(DOCKER_TEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
