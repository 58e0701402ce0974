# Developer and CI entry points. `make check` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?= -m "not slow and not chaos"
BROKER_DIR ?= .broker/dev

.PHONY: venv demo test test-slow chaos chaos-table lint docs bench broker-start broker-stop check

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

test-slow: venv
	$(PY) -m pytest -m slow

# The whole fault suite (about 10 minutes): its figures go to .chaos/results.jsonl.
chaos: venv
	$(PY) -m pytest tests/chaos -m ""
	$(PY) -m scripts.chaos_table

chaos-table:
	$(PYTHON) -m scripts.chaos_table

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

check: lint docs test
