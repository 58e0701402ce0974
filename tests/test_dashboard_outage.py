"""The dashboard while its broker is away: every page answers within seconds, saying the broker
is not reachable (no password), and works again on the next refresh once it is back."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import httpx
import pytest

from aio_workq import ConfigurationError
from aio_workq.dashboard import Dashboard
from scripts.broker import LocalBroker
from tests.faultproxy import FaultProxy
from tests.helpers import wait_until
from tests.test_dashboard import make_dead_letters, served

PAGES = ("/", "/fragments/queues", "/workers", "/dead-letters", "/schedules")
DOWN = ("not reachable", "cannot connect", "is down", "connection failed", "no answer within")


async def timed(client: httpx.AsyncClient, path: str) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    page = await client.get(path)
    return time.monotonic() - started, page


def secret_of(url: str) -> str:
    password = urlsplit(url).password
    assert password
    return f":{password}@"


@pytest.mark.broker
async def test_every_page_answers_within_seconds_while_the_broker_is_stopped(
    amqp_url: str, queue_name: str, local_broker: LocalBroker
) -> None:
    await make_dead_letters(amqp_url, queue_name, 1)
    dashboard = Dashboard(url=amqp_url, queues=[queue_name], management_url="")
    pages = (*PAGES, f"/dead-letters/{queue_name}")
    async with served(dashboard) as client:
        client.timeout = httpx.Timeout(90)
        for path in pages:  # every connection opened while the broker is up
            took, page = await timed(client, path)
            assert page.status_code == 200, (path, page.text)
        await asyncio.to_thread(local_broker.stop)
        try:
            for path in pages:

                async def says_so(path: str = path) -> bool:
                    took, page = await timed(client, path)
                    assert took < 8, (path, round(took, 1))
                    assert page.status_code in (200, 503), (path, page.status_code)
                    assert secret_of(amqp_url) not in page.text
                    # the watcher, open, waits for its connection to be back: no message there
                    return path == "/workers" or any(word in page.text for word in DOWN)

                # a snapshot taken a moment ago (within the refresh interval) may be shown
                await wait_until(says_so, timeout=20)
        finally:
            await asyncio.to_thread(local_broker.start)

        async def back() -> bool:
            listing = await client.get(f"/dead-letters/{queue_name}")
            overview = await client.get("/fragments/queues")
            return (
                listing.status_code == 200 and "1 shown of 1" in listing.text
                and f'data-queue="{queue_name}"' in overview.text
            )  # fmt: skip

        await wait_until(back, timeout=30)


@pytest.mark.broker
async def test_every_page_answers_within_seconds_when_nothing_listens_or_answers(
    amqp_url: str, queue_name: str
) -> None:
    async with FaultProxy.to(amqp_url) as proxy:
        await proxy.close()  # nothing listens on its port any more: connection refused
        refused = proxy.url(amqp_url)
    async with FaultProxy.to(amqp_url) as proxy:
        proxy.black_hole()  # connections accepted, nothing ever answered
        for url in (refused, proxy.url(amqp_url)):
            dashboard = Dashboard(url=url, queues=[queue_name], management_url="")
            async with served(dashboard) as client:
                client.timeout = httpx.Timeout(90)
                for path in (*PAGES, f"/dead-letters/{queue_name}"):
                    took, page = await timed(client, path)
                    # the overview waits for two attempts (the beats' watcher, the queues)
                    assert took < (7.5 if path in ("/", "/fragments/queues") else 4.5), (
                        urlsplit(url).port, path, round(took, 1),
                    )  # fmt: skip
                    assert page.status_code in (200, 503)
                    assert secret_of(amqp_url) not in page.text


def test_a_bad_connect_timeout_is_refused_with_what_to_give() -> None:
    for bad in (0, -1, "3", True, 61):
        with pytest.raises(ConfigurationError, match="connect_timeout must be a number"):
            Dashboard(url="amqp://guest:guest@127.0.0.1:1/", connect_timeout=bad)  # type: ignore[arg-type]
