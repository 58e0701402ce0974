"""The worker `python -m bench.processes` runs as `aio-workq worker bench.processes_target:workers`.

Configured by the environment (the CLI's children inherit it): `BENCH_QUEUE`, `BENCH_STATS_DIR`,
`BENCH_WORK_US` (CPU microseconds each handler spins; default 0), `AMQP_URL` (set by `--url`).
Each process writes `<pid>.json` into the stats directory every 0.1 s from its first message
on: its count, the wall-clock time and process CPU time of its first and latest message, and a
series of (wall time, count) samples, so that the runner can sum the processes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from aio_workq import Job, Worker
from bench.harness import spin

CONCURRENCY = 100


class _Stats:
    def __init__(self, directory: Path) -> None:
        self.path = directory / f"{os.getpid()}.json"
        self.count = 0
        self.first = self.last = 0.0
        self.cpu_first = self.cpu_last = 0.0
        self.series: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._write_loop, daemon=True)

    def hit(self) -> None:
        now = time.time()
        self.count += 1
        self.last, self.cpu_last = now, time.process_time()
        if self.count == 1:
            self.first, self.cpu_first = now, self.cpu_last
            self._thread.start()

    def _write_loop(self) -> None:
        while True:
            self.series.append((time.time(), self.count))
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({
                "pid": os.getpid(), "count": self.count, "first": self.first,
                "last": self.last, "cpu_first": self.cpu_first, "cpu_last": self.cpu_last,
                "series": self.series,
            }))  # fmt: skip
            tmp.replace(self.path)
            time.sleep(0.1)


def workers() -> Worker:
    """One Worker on BENCH_QUEUE (classic, concurrency and prefetch 100, no retries)."""
    stats = _Stats(Path(os.environ["BENCH_STATS_DIR"]))
    work = float(os.environ.get("BENCH_WORK_US", "0"))

    async def handle(job: Job) -> None:
        if work:
            spin(work)
        stats.hit()

    return Worker(
        queue=os.environ["BENCH_QUEUE"], handler=handle, queue_type="classic",
        concurrency=CONCURRENCY, prefetch=CONCURRENCY, retry=None,
    )  # fmt: skip
