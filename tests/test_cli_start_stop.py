"""`aio-workq worker --processes 2` stopped by SIGTERM while its children are still starting:
connecting, declaring their queues, binding the jobs' control listener. The broker answers
slowly here (a proxy with latency), so the signal lands in the middle of that. The stop is
quiet: no traceback, no aiormq "Closing channel ... RPC call ... cancelled", exit code 0.

Each case sends the signal at another point after both children connected (found by trying:
the children are still connecting or declaring at every one of them; a later one would find
them consuming, an earlier one still importing the app)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.faultproxy import FaultProxy
from tests.test_cli import cli

pytestmark = [pytest.mark.broker, pytest.mark.cli]

_NOISE = ("Traceback", "cancelled", "Exception", "ERROR", "CRITICAL")


@pytest.mark.parametrize("extra_wait", [0.0, 0.5, 1.0, 1.5])
async def test_a_sigterm_while_the_children_declare_their_topology_stops_them_quietly(
    amqp_url: str, queue_name: str, tmp_path: Path, extra_wait: float
) -> None:
    async with FaultProxy.to(amqp_url) as proxy:
        proxy.latency = 0.1  # each round trip of the start-up: 0.2 s
        env = {
            **os.environ, "PYTHONUNBUFFERED": "1", "AMQP_URL": proxy.url(amqp_url),
            "WORKQ_GROUPS_QUEUE": queue_name,
            "WORKQ_GROUPS_DB": str(tmp_path / "jobs.db"),
            "WORKQ_GROUPS_DIE": str(tmp_path / "die.mark"),
        }  # fmt: skip
        (tmp_path / "die.mark").touch()  # no store death in these runs
        args = ["worker", "tests.jobs_groups_app:workers", "--processes", "2"]
        async with cli(*args, env=env) as sup:
            async with asyncio.timeout(30):
                await proxy.wait_accepted(2)  # both children are connecting
            await asyncio.sleep(extra_wait)  # a point in the start-up
            sup.proc.send_signal(signal.SIGTERM)
            code = await sup.exit_code()
    err = "\n".join(sup.err)
    assert code == 0, err
    assert not [w for w in _NOISE if w in err], err
    # A listener stopped before its server-named queue was declared is not named ''.
    assert "stopped:" not in err or "'' (bound" not in err, err
