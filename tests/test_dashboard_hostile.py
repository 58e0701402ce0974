"""The dashboard against hostile or unusual content on a real broker: message and job ids a
publisher chose, huge dead letters."""

from __future__ import annotations

import asyncio
import re
import time
import tracemalloc
import uuid
from typing import Any
from urllib.parse import quote

import aio_pika
import httpx
import pytest

from aio_workq.dashboard import Dashboard, Security
from aio_workq.jobs import JobState, MemoryStore, Write
from scripts.broker import LocalBroker
from tests.faultproxy import FaultProxy
from tests.helpers import queue_depth, wait_until
from tests.test_dashboard import AUTH, EVIL, TOKEN, dead_letters_of, replay_from_the_page, served


@pytest.mark.broker
async def test_dead_letters_with_the_publishers_own_ids_are_shown_and_replayed(
    amqp_url: str, queue_name: str
) -> None:
    ids = ["order 42", EVIL, "ünïcode-id", "a/b?c#d"]
    await dead_letters_of(amqp_url, queue_name, [("m", {"message_id": one}) for one in ids])
    dashboard = Dashboard(url=amqp_url, queues=[queue_name], management_url="",
                          security=Security(allow_actions=True, tokens=(TOKEN,)))  # fmt: skip
    async with served(dashboard) as client:
        listing = await client.get(f"/dead-letters/{queue_name}", headers=AUTH)
        assert listing.status_code == 200 and EVIL not in listing.text
        links = re.findall(r'<a href="/workq(/dead-letters/[^"]+/[^"]+)">', listing.text)
        assert len(links) == len(ids)
        for link in links:  # every link the listing gives leads to its dead letter
            shown = await client.get(link.replace("&amp;", "&"), headers=AUTH)
            assert shown.status_code == 200, (link, shown.text)
            assert EVIL not in shown.text
        await replay_from_the_page(client, queue_name, ids[:2])
    assert await queue_depth(amqp_url, queue_name) == 2
    assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 2


async def test_a_job_with_an_id_of_its_users_choice_is_looked_up() -> None:
    store = MemoryStore()
    await store.record([Write(job_id="invoice 2026/12", task="app.bill", queue="bills",
                              state=JobState.QUEUED, at=time.time())])  # fmt: skip
    dashboard = Dashboard(url="amqp://guest:guest@127.0.0.1:1/", store=store, management_url="")
    async with served(dashboard) as client:
        found = await client.get("/jobs", params={"id": "invoice 2026/12"}, follow_redirects=True)
        assert found.status_code == 200 and "app.bill" in found.text
        direct = await client.get("/jobs/" + quote("invoice 2026/12", safe=""))
        assert direct.status_code == 200 and "app.bill" in direct.text
        control = await client.get("/jobs/" + quote("bad\x01id", safe=""))
        assert control.status_code == 400


async def publish_raw(amqp_url: str, queue: str, body: bytes, headers: dict[str, Any]) -> None:
    """A message put straight into `queue` by another publisher (no aio-workq checks)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        message = aio_pika.Message(body, headers=headers, message_id=f"raw-{len(body)}")
        await channel.default_exchange.publish(message, routing_key=queue)


@pytest.mark.broker
async def test_a_huge_dead_letter_gives_a_page_of_bounded_size(
    amqp_url: str, queue_name: str
) -> None:
    await dead_letters_of(amqp_url, queue_name, [("small", {})])
    huge = 16 * 1024 * 1024
    long_text = EVIL + "x" * 30_000  # three of them fill a frame, as headers must
    headers = {
        "x-workq-exception-type": "app.Broken",
        "x-workq-exception-message": long_text,
        "x-workq-traceback": long_text,
        "x-other": long_text,
    }
    await publish_raw(amqp_url, f"{queue_name}.dlq", b"\xff" * huge, headers)
    await publish_raw(amqp_url, f"{queue_name}.dlq", b"y" * huge, headers)
    dashboard = Dashboard(url=amqp_url, queues=[queue_name], management_url="")
    async with served(dashboard) as client:
        listing = await client.get(f"/dead-letters/{queue_name}")
        assert listing.status_code == 200 and "3 shown of 3" in listing.text
        assert len(listing.content) < 40_000, len(listing.content)
        assert EVIL not in listing.text
        for size in (huge, huge):
            page = await client.get(f"/dead-letters/{queue_name}/raw-{size}")
            assert page.status_code == 200
            assert len(page.content) < 200_000, len(page.content)
            assert "16,777,216 bytes" in page.text  # says how much there is, and that it is cut
            assert "aio-workq dlq show" in page.text
            assert EVIL not in page.text


@pytest.mark.broker
async def test_a_broker_that_never_answers_holds_no_tab_for_one_connect_after_another(
    amqp_url: str, queue_name: str
) -> None:
    async with FaultProxy.to(amqp_url) as proxy:
        proxy.black_hole()  # connections accepted, nothing ever answered
        dashboard = Dashboard(url=proxy.url(amqp_url), queues=[queue_name], management_url="")
        async with served(dashboard) as client:
            client.timeout = httpx.Timeout(60)

            async def poll() -> tuple[float, str]:
                started = time.monotonic()
                page = await client.get("/fragments/queues", headers={"HX-Request": "true"})
                return time.monotonic() - started, page.text

            # Five tabs polling at once: each waits for the connects under way (the beats'
            # watcher's, then the queues'; 3 s each), not for one tab's after the other's.
            polls = await asyncio.gather(*(poll() for _ in range(5)))
            for took, text in polls:
                assert "no answer within 3 s; check the host and port" in text
                assert took < 9, [round(took, 1) for took, _ in polls]
            took, _ = await poll()  # the watcher failed a moment ago: not tried again yet
            assert took < 6


@pytest.mark.broker
async def test_the_overview_recovers_when_the_broker_closes_its_connection(
    amqp_url: str, queue_name: str, local_broker: LocalBroker
) -> None:
    await dead_letters_of(amqp_url, queue_name, [("m", {})])
    dashboard = Dashboard(url=amqp_url, queues=[queue_name], management_url="")
    async with served(dashboard) as client:
        first = await client.get("/fragments/queues")
        assert first.status_code == 200 and f'data-queue="{queue_name}"' in first.text
        # as a broker restart or an operator does: CONNECTION_FORCED on every connection
        await asyncio.to_thread(local_broker.ctl, "close_all_connections", "test")
        closed = time.time()

        async def back() -> bool:
            page = await client.get("/fragments/queues")
            assert page.status_code == 200, page.text  # never the 500 page
            snap = await dashboard.queues.snapshot()  # the one the page showed, or a newer one
            return snap.taken > closed and snap.error is None and bool(snap.row(queue_name))

        await wait_until(back, timeout=20)


async def peaks_of(
    client: httpx.AsyncClient, *paths: str
) -> tuple[list[httpx.Response], list[int]]:
    """Each page of `paths`, and the peak of memory traced while it was made (bytes)."""
    pages, peaks = [], []
    tracemalloc.start()
    try:
        for path in paths:
            tracemalloc.reset_peak()
            pages.append(await client.get(path))
            peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    return pages, peaks


@pytest.mark.broker
async def test_listing_many_large_dead_letters_keeps_only_those_it_shows(
    amqp_url: str, queue_name: str
) -> None:
    await dead_letters_of(amqp_url, queue_name, [("first", {})])
    body = b"x" * 64 * 1024
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await asyncio.gather(*(
            channel.default_exchange.publish(
                aio_pika.Message(body, message_id=f"big-{i}"), routing_key=f"{queue_name}.dlq"
            )
            for i in range(800)
        ))  # fmt: skip
    dashboard = Dashboard(url=amqp_url, queues=[queue_name], management_url="")
    async with served(dashboard) as client:
        client.timeout = httpx.Timeout(60)
        (listing, one), peaks = await peaks_of(
            client, f"/dead-letters/{queue_name}", f"/dead-letters/{queue_name}/big-799"
        )
    peak = max(peaks)
    assert listing.status_code == 200 and "200 shown of 801" in listing.text
    assert one.status_code == 200 and "big-799" in one.text
    # 801 dead letters of 64 KiB are 51 MiB: the pages keep the 200 shown (13 MiB), not all
    assert peak < 32 * 1024 * 1024, peak // 1024 // 1024


@pytest.mark.broker
async def test_a_page_over_large_dead_letters_holds_a_few_of_them_at_a_time(
    amqp_url: str, queue_name: str
) -> None:
    """Eight dead letters of 4 MiB (as a queue of 16 MiB ones, smaller): the listing shows
    an 80-byte preview of each and one letter's page 64 KiB, and the pass that reads them
    takes them a few MiB at a time. Before, it took 100 at a time and the listing kept every
    body it showed (up to 200): 32 MiB here, GiBs with 16 MiB letters."""
    await dead_letters_of(amqp_url, queue_name, [("first", {})])
    size = 4 * 1024 * 1024
    for i in range(8):
        await publish_raw(amqp_url, f"{queue_name}.dlq", bytes([65 + i]) * (size + i), {})
    dashboard = Dashboard(url=amqp_url, queues=[queue_name], management_url="")
    async with served(dashboard) as client:
        client.timeout = httpx.Timeout(60)
        (listing, one), (listing_peak, one_peak) = await peaks_of(
            client, f"/dead-letters/{queue_name}", f"/dead-letters/{queue_name}/raw-{size + 7}"
        )
    assert listing.status_code == 200 and "9 shown of 9" in listing.text, listing.text[-2000:]
    assert one.status_code == 200 and "HHHH" in one.text
    mib = 1024 * 1024
    assert listing_peak < 20 * mib, listing_peak // mib
    assert one_peak < 20 * mib, one_peak // mib


@pytest.mark.slow
async def test_thousands_of_queues_give_pages_of_bounded_size_and_a_filter(
    management_broker: Any,
) -> None:
    """1,200 work queues, each with a dead-letter queue, from the management API: the overview
    and the dead-letters index list 200 of them, say how many more there are, and find any one
    by a part of its name (the live update keeps the filter). Before, every page listed every
    queue, re-rendered every 3 s: 1,200 rows, 840 KB a refresh here."""
    url = management_broker.url
    prefix = f"many-{uuid.uuid4().hex[:6]}"
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for i in range(1200):
            await channel.declare_queue(f"{prefix}-{i:04}", auto_delete=False)
            await channel.declare_queue(f"{prefix}-{i:04}.dlq", auto_delete=False)
    dashboard = Dashboard(url=url, management_url=management_broker.management_url)
    async with served(dashboard) as client:
        client.timeout = httpx.Timeout(60)

        async def all_listed() -> bool:
            snap = await dashboard.queues.snapshot()
            return sum(row.queue.startswith(prefix) for row in snap.rows) == 1200

        await wait_until(all_listed, timeout=30)
        for path in ("/", "/fragments/queues", "/dead-letters", "/fragments/dead-letters"):
            page = await client.get(path)
            assert page.status_code == 200
            assert len(page.content) < 200_000, (path, len(page.content))
            assert page.text.count(f'data-queue="{prefix}-') == 200, path
            assert "1,000 more not shown" in page.text, path
            one = await client.get(path, params={"q": f"{prefix}-1042"})
            assert one.text.count(f'data-queue="{prefix}-') == 1, path
            assert f'data-queue="{prefix}-1042"' in one.text, path
        overview = await client.get("/", params={"q": f"{prefix}-1042"})
        assert f'hx-get="/workq/fragments/queues?q={prefix}-1042"' in overview.text
