"""The observability bench can't rot: one small run with both hooks on, no timing threshold."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


@pytest.mark.parametrize(
    ("mode", "work"), [("on", "0"), ("sampled", "20"), ("tracing-sampled", "0")]
)
async def test_a_run_with_metrics_and_tracing_on(amqp_url: str, mode: str, work: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.observability", "--child", mode, "--url", amqp_url,
        "--n", "300", "--work", work, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=100)
    assert proc.returncode == 0
    run = json.loads(out.decode().strip().splitlines()[-1])
    assert run["mode"] == mode and run["n"] == 300
    assert run["rate"] > 0 and run["cpu_us"] > 0
