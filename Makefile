# Developer and CI entry points. `make check` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?= -m "not slow"
BROKER_DIR ?= .broker/dev
POSTGRES_DIR ?= .postgres/dev

.PHONY: venv demo test test-slow lint docs bench broker-start broker-stop check
.PHONY: postgres-start postgres-stop outbox-test bench-outbox

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

# A local PostgreSQL node (state in $(POSTGRES_DIR)); stdlib only. Prints its DSN.
postgres-start:
	$(PYTHON) -m scripts.postgres start --dir $(POSTGRES_DIR)

postgres-stop:
	$(PYTHON) -m scripts.postgres stop --dir $(POSTGRES_DIR)

# Every outbox / idempotent-consumer test, the long crash scenarios too, with their ledgers.
outbox-test: venv
	$(PY) -m pytest -m postgres --timeout 600 tests/test_outbox.py tests/test_outbox_ledger.py

# Outbox / idempotent-consumer throughput as ratios (own broker and PostgreSQL; see bench/outbox.py).
bench-outbox: venv
	$(PY) -m bench.outbox $(BENCH_ARGS)

check: lint docs test
