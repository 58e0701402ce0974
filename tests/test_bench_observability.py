"""The observability bench can't rot: one small run with both hooks on, no timing threshold."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


async def test_a_run_with_metrics_and_tracing_on(amqp_url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.observability", "--child", "on", "--url", amqp_url,
        "--n", "300", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=100)
    assert proc.returncode == 0
    run = json.loads(out.decode().strip().splitlines()[-1])
    assert run["mode"] == "on" and run["n"] == 300
    assert run["rate"] > 0 and run["cpu_us"] > 0
