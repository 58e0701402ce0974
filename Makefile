# Developer and CI entry points. `make check` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
BROKER_DIR ?= .broker/dev
CLUSTER_DIR ?= .broker/cluster
POSTGRES_DIR ?= .postgres/dev

.PHONY: venv demo test test-plain test-slow test-cli lint docs bench canary broker-start broker-stop check
.PHONY: chaos chaos-table
.PHONY: postgres-start postgres-stop outbox-test bench-outbox jobs-ledger jobs-store-down bench-tracking
.PHONY: cluster-test cluster-smoke cluster-start cluster-stop
.PHONY: schedules-ledger schedules-ledger-cluster
.PHONY: dashboard-test dashboard-screenshots bench-dashboard bench-chain-stop

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -e '.[cli]' --group dev
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

# 3 scheduler replicas, a 1-second and a 1-minute schedule, 3 minutes, the active one killed
# (-9) every 20 s and all down for 30 s once: each tick's deliveries counted (about 4 minutes).
schedules-ledger: venv
	$(PY) -m scripts.schedules_ledger --replicas 3 --duration 180 --kill-every 20 --outage 30 \
		--json .chaos/schedules-ledger.json

# The same on a local 3-node cluster of its own: 3 replicas on the URL list, the active scheduler's
# node (and in turn the lease queue's leader) killed -9 every 20 s and restarted (~5 min).
schedules-ledger-cluster: venv
	$(PY) -m scripts.schedules_ledger --cluster --replicas 3 --duration 180 --kill-every 20 \
		--json .chaos/schedules-ledger-cluster.json

# Failover tests on a 3-node cluster the session starts (needs rabbitmq-server; iptables for partitions).
cluster-test: venv
	$(PY) -m pytest -m cluster

# The CI subset of the cluster tests: the clients' node killed under 20,000 messages (~1 min).
cluster-smoke: venv
	$(PY) -m pytest -m cluster -k "killing_the_node_under_producer_and_worker or three_nodes_form"

# The suite against the newest aio-pika / aiormq / pamqp releases, in a venv of its own.
canary:
	$(PYTHON) -m venv .venv-canary
	.venv-canary/bin/pip install -q -U pip
	.venv-canary/bin/pip install -q -e '.[cli]' --group dev
	.venv-canary/bin/pip install -q -U --no-deps aio-pika aiormq pamqp yarl
	.venv-canary/bin/pip list 2>/dev/null | grep -iE "^(aio-pika|aiormq|pamqp|yarl) "
	.venv-canary/bin/python -m pytest $(PYTEST_ARGS)
	AIO_WORKQ_FAST_PATH=0 .venv-canary/bin/python -m pytest $(PYTEST_ARGS)

# Every dashboard test: the core, the pages on the broker, and all the browser tests (headless
# Chromium from Debian's packages: scripts/browser.py installs them as root). `make test` runs
# the fast browser subset; `browser_full` ones run here.
dashboard-test: venv
	$(PY) -m scripts.browser
	$(PY) -m pytest -m "browser or not browser" tests/test_dashboard.py tests/test_dashboard_browser.py

# The same browser run, saving docs/img/dashboard_*.png (the docs' screenshots).
dashboard-screenshots: venv
	AIO_WORKQ_SCREENSHOTS=1 $(PY) -m pytest -m browser tests/test_dashboard_browser.py

# A consume benchmark with and without 5 clients polling every dashboard page (BENCH_ARGS=--quick).
bench-dashboard: venv
	$(PY) -m bench.dashboard $(BENCH_ARGS)

# The `aio-workq` command end to end, the management-API (slow) test included.
test-cli: venv
	$(PY) -m pytest -m cli tests/test_cli.py tests/test_cli_offline.py tests/test_cli_procmetrics.py

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The full bench (writes docs/benchmarks.md), then the working tree against the reference commit
# of bench/REFERENCE (`--against`: fails, exit 3, if more than 10 % slower). Both always run.
bench: venv
	$(PIP) install -q -e . --group bench
	$(PY) -m bench; full=$$?; $(PY) -m bench --against; ref=$$?; \
	if [ $$full -ne 0 ]; then exit $$full; fi; exit $$ref

# Only the reference comparison, quick (N=5,000, 3 repeats; BENCH_ARGS=--workloads publish …).
.PHONY: bench-ref
bench-ref: venv
	$(PY) -m bench --against --quick --repeats 3 $(BENCH_ARGS)

# Consume with the metrics and tracing hooks on vs off (BENCH_ARGS=--quick for a short run).
.PHONY: bench-observability
bench-observability: venv
	$(PIP) install -q -e . --group observability && $(PY) -m bench.observability $(BENCH_ARGS)

# The stand-alone workloads (#22), each writing docs/img/bench_<name>.{json,png} and its section of
# docs/benchmarks.md: BENCH_ARGS=--quick for a short run, BENCH_ARGS=--url=... for a running broker.
.PHONY: bench-large bench-queues bench-rpc bench-processes soak bench-extra bench-deps
SOAK_N ?= 1000000

bench-deps: venv
	$(PIP) install -q -e '.[cli]' --group bench

bench-large: bench-deps
	$(PY) -m bench.large $(BENCH_ARGS)

bench-queues: bench-deps
	$(PY) -m bench.queues $(BENCH_ARGS)

bench-rpc: bench-deps
	$(PY) -m bench.rpc $(BENCH_ARGS)

bench-processes: bench-deps
	$(PY) -m bench.processes $(BENCH_ARGS)

# Where one process stops publishing to a quorum queue: one channel, two, two connections,
# two processes (prints only).
bench-channels: bench-deps
	$(PY) -m bench.channels $(BENCH_ARGS)

# The bench's two-process chain on a quorum queue, again and again: the duplicates a worker's
# stop leaves downstream (BENCH_ARGS="--runs 100 --n 4000"; see docs/guarantees.md).
bench-chain-stop: bench-deps
	$(PY) -m bench.chain_stop $(BENCH_ARGS)

# SOAK_N messages (default 1,000,000) through publish -> consume -> forward -> consume; fails
# (exit 1) if RSS grows more than 5 MB after warm-up or tasks/futures/window waiters remain.
soak: bench-deps
	$(PY) -m bench.soak $(SOAK_N) $(BENCH_ARGS)

# All of the above and the hooks' cost (bench.observability), one after the other.
bench-extra: bench-large bench-queues bench-rpc bench-processes bench-channels bench-observability soak

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

# A local PostgreSQL node (state in $(POSTGRES_DIR)); stdlib only. Prints its DSN.
postgres-start:
	$(PYTHON) -m scripts.postgres start --dir $(POSTGRES_DIR)

postgres-stop:
	$(PYTHON) -m scripts.postgres stop --dir $(POSTGRES_DIR)

# Every outbox / idempotent-consumer test, the long crash scenarios too, with their ledgers.
outbox-test: venv
	$(PY) -m pytest -m postgres --timeout 600 tests/test_outbox.py tests/test_outbox_ledger.py

# The jobs ledger (#23), a few minutes on a broker and PostgreSQL of its own: 2,000 jobs in groups
# of 20 with callbacks on 3 worker processes, one killed -9 every 10 s; 100 queued and 20 running
# jobs cancelled; the rate limit measured (tests/test_jobs_ledger.py is the CI subset).
jobs-ledger: venv
	$(PY) -m scripts.jobs_ledger $(LEDGER_ARGS)

# A job store outage: PostgreSQL killed for 10 s while jobs are enqueued and run (a minute).
jobs-store-down: venv
	$(PY) -m scripts.jobs_store_down $(LEDGER_ARGS)

# What job tracking costs: enqueue and consume through Tasks with a store vs none, same run
# (writes docs/img/bench_tracking.json; BENCH_ARGS=--quick for a short run).
bench-tracking: bench-deps
	$(PY) -m bench.tracking $(BENCH_ARGS)

# Outbox / idempotent-consumer throughput as ratios (own broker and PostgreSQL; see bench/outbox.py).
bench-outbox: venv
	$(PY) -m bench.outbox $(BENCH_ARGS)

check: lint docs test test-plain cluster-smoke
