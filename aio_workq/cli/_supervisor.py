"""`aio-workq worker --processes N`: keep N worker processes running, drain them on a signal.

Each child is a fresh interpreter (`python -m aio_workq worker ...`, the spawn model: nothing is
inherited but the environment), in a process group of its own so that a terminal's Ctrl-C
reaches only the supervisor, which forwards it once to every child.

- SIGTERM or SIGINT: every child gets SIGTERM and drains (running handlers finish, within their
  worker's `shutdown_timeout`); the supervisor exits once all have exited.
- A second signal: every child gets a second SIGTERM and stops fast (running handlers are
  cancelled; their messages go back to the queue). A third: SIGKILL.
- A child that exits on its own (crash, SIGKILL, OOM) is restarted after a backoff that doubles
  with each crash in the restart window; past `max_restarts` crashes in the window the supervisor
  stops the others and exits 1.
- With `metrics` (`--metrics-port` and prometheus-client installed), `/metrics` serves the sum
  of every child's metrics (see `_procmetrics`): a child that exits has its gauges dropped, and
  its counters stay in the sum, so they never go backwards across a restart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._health import Debounce, HealthServer
from ._procmetrics import ProcessMetrics
from ._run import STATUS_FD_ENV, SUPERVISOR_ENV, HealthOptions

__all__ = ("RestartPolicy", "Supervisor")

log = logging.getLogger("aio_workq.cli")

_POLL = 0.2


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When a crashed child is restarted, and when the supervisor gives up.

    Args:
        max_restarts: crashes of one child within `window` seconds that are restarted; one
            more and the supervisor stops everything and exits 1.
        window: seconds over which crashes are counted.
        backoff_min: seconds before the first restart; doubled for each further crash in the
            window.
        backoff_max: the longest wait before a restart.
    """

    max_restarts: int = 5
    window: float = 60.0
    backoff_min: float = 0.5
    backoff_max: float = 30.0

    def delay(self, crashes: int) -> float:
        """Seconds to wait before restarting a child that crashed `crashes` times lately."""
        return float(min(self.backoff_max, self.backoff_min * 2 ** max(crashes - 1, 0)))


@dataclass(eq=False)
class _Child:
    index: int
    proc: asyncio.subprocess.Process | None = None
    healthy: bool = False
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    restarts: int = 0
    died_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Supervisor:
    """Runs `command` in `processes` children and keeps them running.

    Args:
        command: the child's argv (a single-process `aio-workq worker ...`).
        processes: how many children.
        policy: restarts and giving up.
        health: serve `/healthz` for all children here (200 while every child reports its
            workers consuming) when `health.port` is set.
        env: extra environment for the children.
        metrics: where the children write their metrics; `/metrics` on the health port
            serves their sum.
    """

    def __init__(
        self,
        *,
        command: Sequence[str],
        processes: int,
        policy: RestartPolicy,
        health: HealthOptions,
        env: Mapping[str, str] | None = None,
        metrics: ProcessMetrics | None = None,
    ) -> None:
        self._command = list(command)
        self._children = [_Child(index) for index in range(1, processes + 1)]
        self._policy = policy
        self._health = health
        self._env = dict(env or {})
        self._metrics = metrics
        if metrics is not None:
            self._env.update(metrics.env)
        self._stopping = asyncio.Event()
        self._signals = 0
        self._stop_started: float | None = None
        self._gave_up = False
        self._debounce = Debounce(health.grace)

    async def run(self) -> int:
        """Run until a signal or until a child keeps crashing; the exit code (0 or 1)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        server = None
        if self._health.port is not None:
            server = HealthServer(
                self._check,
                host=self._health.host,
                port=self._health.port,
                metrics=self._metrics.render if self._metrics is not None else None,
            )
            await server.start()
        polling = asyncio.create_task(self._poll_health())
        try:
            results = await asyncio.gather(*(self._keep(child) for child in self._children))
        finally:
            polling.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if server is not None:
                await server.close()
        if self._stop_started is not None:
            log.warning(
                "supervisor: all %d children exited %.1f s after the stop signal",
                len(self._children),
                time.monotonic() - self._stop_started,
            )
        return 1 if self._gave_up or any(code != 0 for code in results) else 0

    # -- children ------------------------------------------------------------------------

    async def _keep(self, child: _Child) -> int:
        """Run one child slot; its last exit code once stopping."""
        while True:
            proc, reader = await self._spawn(child)
            code = await proc.wait()
            child.healthy = False
            reader.cancel()
            if self._metrics is not None:
                self._metrics.exited(proc.pid)
            if self._stopping.is_set():
                log.info("child %d (pid %d) %s", child.index, proc.pid, _how(code))
                return 0 if code in (0, -signal.SIGTERM) else code
            now = time.monotonic()
            child.died_at = now
            child.crashes.append(now)
            while child.crashes and child.crashes[0] < now - self._policy.window:
                child.crashes.popleft()
            if len(child.crashes) > self._policy.max_restarts:
                log.error(
                    "child %d %s: %d crashes in %.0f s, giving up; stopping the others",
                    child.index, _how(code), len(child.crashes), self._policy.window,
                )  # fmt: skip
                self._gave_up = True
                self._stop()
                return 1
            delay = self._policy.delay(len(child.crashes))
            log.warning(
                "child %d (pid %d) %s; restarting in %.1f s",
                child.index, proc.pid, _how(code), delay,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return 0
            child.restarts += 1

    async def _spawn(self, child: _Child) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
        read_fd, write_fd = os.pipe()
        env = {
            **os.environ,
            **self._env,
            STATUS_FD_ENV: str(write_fd),
            SUPERVISOR_ENV: str(os.getpid()),
            "AIO_WORKQ_WORKER_INDEX": str(child.index),
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=subprocess.DEVNULL,
                env=env,
                pass_fds=(write_fd,),
                process_group=0,  # the terminal's Ctrl-C goes to the supervisor only
            )
        finally:
            os.close(write_fd)
        child.proc = proc
        if self._stopping.is_set():
            # A stop signal came while this child was on its way: `_send` could not reach it.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL if self._signals >= 3 else signal.SIGTERM)
        if self._metrics is not None:
            self._metrics.started(proc.pid)
        log.info("child %d started (pid %d)", child.index, proc.pid)
        return proc, asyncio.create_task(self._read_status(child, read_fd))

    async def _read_status(self, child: _Child, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            while line := await reader.readline():
                child.healthy = line.strip() == b"1"
                if child.healthy and child.died_at is not None:
                    log.warning(
                        "child %d consuming again %.1f s after the previous one died",
                        child.index, time.monotonic() - child.died_at,
                    )  # fmt: skip
                    child.died_at = None
        finally:
            transport.close()

    # -- signals -------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            log.warning(
                "%s received: draining %d children (a second signal stops them fast)",
                name, len(self._children),
            )  # fmt: skip
            self._stop()
        elif self._signals == 2:
            log.warning("%s received again: stopping the children fast", name)
            self._send(signal.SIGTERM)
        else:
            log.warning("%s received a third time: killing the children", name)
            self._send(signal.SIGKILL)

    def _stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stop_started = time.monotonic()
        self._stopping.set()
        self._send(signal.SIGTERM)

    def _send(self, sig: signal.Signals) -> None:
        for child in self._children:
            if child.alive:
                assert child.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(sig)

    # -- health --------------------------------------------------------------------------

    async def _poll_health(self) -> None:
        while True:
            self._check()
            await asyncio.sleep(_POLL)

    def _check(self) -> tuple[bool, dict[str, Any]]:
        ok = all(child.alive and child.healthy for child in self._children)
        healthy = self._debounce.update(ok and not self._stopping.is_set())
        body = {
            "status": "ok" if healthy else "unavailable",
            "processes": [
                {
                    "index": child.index,
                    "pid": child.proc.pid if child.proc else None,
                    "alive": child.alive,
                    "consuming": child.healthy,
                    "restarts": child.restarts,
                }
                for child in self._children
            ],
        }
        return healthy, body


def _how(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def child_command(args: Sequence[str]) -> list[str]:
    """The argv of a child: this interpreter running `aio-workq` with `args`."""
    return [sys.executable, "-m", "aio_workq", *args]
