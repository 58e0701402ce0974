# Developer and CI entry points. `make check` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
BROKER_DIR ?= .broker/dev

.PHONY: venv demo test test-plain test-slow chaos chaos-table lint docs bench canary broker-start broker-stop check

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -e . --group dev
	touch $@

demo: venv
	$(PY) examples/demo.py

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# The same suite on aiormq's public API for every frame (no demux, no own writer).
test-plain: venv
	AIO_WORKQ_FAST_PATH=0 $(PY) -m pytest $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -m slow

# The whole fault suite (about 10 minutes; `-m ""` lifts the default `not chaos`): its figures
# go to .chaos/results.jsonl.
chaos: venv
	$(PY) -m pytest tests/chaos -m ""
	$(PY) -m scripts.chaos_table

chaos-table:
	$(PYTHON) -m scripts.chaos_table

# The suite against the newest aio-pika / aiormq / pamqp releases, in a venv of its own.
canary:
	$(PYTHON) -m venv .venv-canary
	.venv-canary/bin/pip install -q -U pip
	.venv-canary/bin/pip install -q -e . --group test
	.venv-canary/bin/pip install -q -U --no-deps aio-pika aiormq pamqp yarl
	.venv-canary/bin/pip list 2>/dev/null | grep -iE "^(aio-pika|aiormq|pamqp|yarl) "
	.venv-canary/bin/python -m pytest $(PYTEST_ARGS)
	AIO_WORKQ_FAST_PATH=0 .venv-canary/bin/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: venv
	$(PIP) install -q -e . --group bench && $(PY) -m bench

# A local RabbitMQ node that keeps running (state in $(BROKER_DIR)); stdlib only, no venv needed.
broker-start:
	$(PYTHON) -m scripts.broker start --dir $(BROKER_DIR)

broker-stop:
	$(PYTHON) -m scripts.broker stop --dir $(BROKER_DIR)

check: lint docs test test-plain
