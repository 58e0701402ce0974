# Developer and CI entry points. `make check` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?= -m "not slow and not cluster"
CLUSTER_DIR ?= .broker/cluster
BROKER_DIR ?= .broker/dev

.PHONY: venv demo test test-slow lint docs bench broker-start broker-stop check
.PHONY: cluster-test cluster-start cluster-stop

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

# Failover tests on a 3-node cluster the session starts (needs rabbitmq-server; iptables for partitions).
cluster-test: venv
	$(PY) -m pytest -m cluster

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

# A local 3-node cluster that keeps running; prints the host list (see scripts/cluster.py).
cluster-start:
	$(PYTHON) -m scripts.cluster start --dir $(CLUSTER_DIR)

cluster-stop:
	$(PYTHON) -m scripts.cluster stop --dir $(CLUSTER_DIR)

check: lint docs test
