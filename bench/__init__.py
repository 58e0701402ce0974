"""Benchmarks of aio-workq against raw aiormq, aio-pika and the task-queue frameworks.

Run `python -m bench` (see `bench/__main__.py`); results go to `bench/results/latest.json`,
`docs/benchmarks.md` and `docs/img/bench_*.png`. Needs the `bench` dependency group.
"""
