"""The outbox bench can't rot: every kind runs a couple of hundred messages, rates positive."""

from __future__ import annotations

import argparse

import pytest

from bench.outbox import KINDS, measure, table

pytestmark = [pytest.mark.postgres, pytest.mark.broker, pytest.mark.timeout(120)]


async def test_outbox_bench_runs_every_kind(amqp_url: str, postgres_dsn: str) -> None:
    args = argparse.Namespace(
        n=200, repeats=1, per_tx=10, apps=2, concurrency=4, queue_type="classic"
    )

    result = await measure(amqp_url, postgres_dsn, args)

    assert set(result["rates"]) == set(KINDS)
    assert all(rate > 0 for rate in result["rates"].values())
    assert all(ratio > 0 for ratio in result["ratios"].values())
    assert "| outbox / direct publish_many |" in table(result)
