"""`/metrics` under `aio-workq worker --processes N`: the children's metrics, summed.

prometheus-client's multiprocess mode: every child writes its metrics to files of its own
(`counter_<pid>.db`, `gauge_livesum_<pid>.db`, ...) in the directory `PROMETHEUS_MULTIPROC_DIR`
names, which is in its environment from its first instruction, so before it imports
prometheus-client; the supervisor reads them all on each scrape.

- Counters and histograms of a child that died stay in the sum: a restarted child (a new pid,
  new files from zero) adds to them, so they never go backwards.
- Gauges are per live process (`livesum`, `livemax`): once a child has exited, the supervisor
  calls `mark_process_dead(pid)`, which deletes its gauge files, and its in-flight counts
  vanish from the sum.

The directory is a fresh private one, removed when the supervisor exits; or, when the
supervisor's own environment sets `PROMETHEUS_MULTIPROC_DIR`, that one, which must then exist
and be empty (a previous run's files would count twice).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from aio_workq import ConfigurationError

from ._errors import CliError

__all__ = ("CHILD_METRICS_ENV", "MULTIPROC_DIR_ENV", "MetricsDirError", "ProcessMetrics")

log = logging.getLogger("aio_workq.cli")

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's own variable: where each process writes its metric files."""
CHILD_METRICS_ENV = "AIO_WORKQ_CHILD_METRICS"
"""Set by the supervisor when it serves `/metrics`: the child counts into a `PrometheusHook`."""


class MetricsDirError(CliError, ConfigurationError):
    """`PROMETHEUS_MULTIPROC_DIR` is not a directory the supervisor can sum children into."""


class ProcessMetrics:
    """The multiprocess directory of one supervisor: what the children get, what it serves.

    Build it with `create()`; `close()` it once every child has exited.

    Args:
        path: the directory the children write their metric files into.
        owned: whether it was made for this run (then `close()` removes it) or is the user's
            (then `close()` removes only the files of this run's processes).
        render: the text format of everything in `path`.
        mark_dead: prometheus-client's `mark_process_dead(pid, path)`.
    """

    def __init__(
        self,
        *,
        path: Path,
        owned: bool,
        render: Callable[[], tuple[bytes, str]],
        mark_dead: Callable[[int, str], None],
    ) -> None:
        self.path = path
        self._owned = owned
        self._render = render
        self._mark_dead = mark_dead
        self._pids: set[int] = {os.getpid()}

    @classmethod
    def create(cls, environ: Mapping[str, str] = os.environ) -> ProcessMetrics | None:
        """A directory for the children's metrics; None without prometheus-client.

        Raises:
            MetricsDirError: `PROMETHEUS_MULTIPROC_DIR` is set but is not an empty directory.
        """
        try:
            from prometheus_client import CollectorRegistry
            from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

            from aio_workq.metrics import CONTENT_TYPE, render
        except ImportError:
            log.info("/metrics is off: install aio-workq[prometheus] for it")
            return None
        given = environ.get(MULTIPROC_DIR_ENV)
        if given:
            path = Path(given)
            _check_empty(path)
            owned = False
        else:
            path = Path(tempfile.mkdtemp(prefix="aio-workq-metrics-"))
            owned = True
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
        log.info("/metrics sums the children's metrics from %s", path)
        return cls(
            path=path,
            owned=owned,
            render=lambda: (render(registry), CONTENT_TYPE),
            mark_dead=mark_process_dead,
        )

    @property
    def env(self) -> dict[str, str]:
        """The environment a child needs to write its metrics here."""
        return {MULTIPROC_DIR_ENV: str(self.path), CHILD_METRICS_ENV: "1"}

    def render(self) -> tuple[bytes, str]:
        """The summed metrics of all children, and their `Content-Type`."""
        return self._render()

    def started(self, pid: int) -> None:
        """A child started with this pid (its files are removed by `close()`)."""
        self._pids.add(pid)

    def exited(self, pid: int) -> None:
        """A child exited: drop its live gauges; its counters keep counting in the sum."""
        self._pids.add(pid)
        try:
            self._mark_dead(pid, str(self.path))
        except OSError as exc:  # the sum may show its last gauges: not worth stopping for
            log.warning("could not drop the gauges of pid %d from %s: %s", pid, self.path, exc)

    def close(self) -> None:
        """Remove the directory if it was made for this run, else this run's files in it."""
        if self._owned:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for pid in self._pids:
            for name in glob.glob(os.path.join(glob.escape(str(self.path)), f"*_{pid}.db")):
                try:
                    os.remove(name)
                except FileNotFoundError:
                    pass


def _check_empty(path: Path) -> None:
    if not path.is_dir():
        raise MetricsDirError(
            f"{MULTIPROC_DIR_ENV}={str(path)!r} is not a directory: create it (empty), or unset "
            f"{MULTIPROC_DIR_ENV} and the supervisor uses a private one"
        )
    left = sorted(entry.name for entry in path.iterdir())
    if left:
        shown = ", ".join(left[:3]) + (", ..." if len(left) > 3 else "")
        raise MetricsDirError(
            f"{MULTIPROC_DIR_ENV}={str(path)!r} is not empty ({len(left)} "
            f"file{'s' if len(left) > 1 else ''}: {shown}), "
            "and a previous run's metrics would be counted again: empty it before starting "
            f"(rm {os.path.join(str(path), '*.db')}), or unset {MULTIPROC_DIR_ENV} and the "
            "supervisor uses a private one"
        )
