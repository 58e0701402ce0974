"""Purging dead letters from the dashboard deletes what its user saw, never a dead letter that
arrived after the page showed the count (against a real broker)."""

from __future__ import annotations

import asyncio
import os
import re
import sys

import pytest

from aio_workq import ConfigurationError, Producer, Worker
from aio_workq.dashboard import Dashboard, Security
from tests.helpers import queue_depth, wait_until
from tests.test_dashboard import AUTH, TOKEN, make_dead_letters, reject, served


async def one_more_dead_letter(amqp_url: str, queue: str, body: str) -> None:
    """Publish `body` to `queue` and let a worker dead-letter it (one more in `queue.dlq`)."""
    before = await queue_depth(amqp_url, f"{queue}.dlq")
    async with Producer(amqp_url) as producer:
        await producer.publish(body, queue=queue)
        async with Worker(amqp_url, queue=queue, handler=reject, retry=None):

            async def arrived() -> bool:
                return await queue_depth(amqp_url, f"{queue}.dlq") == before + 1

            await wait_until(arrived, timeout=20)


def form_fields(page: str) -> dict[str, str]:
    """The hidden fields of the page's confirmation form."""
    return dict(re.findall(r'<input type="hidden" name="([a-z]+)" value="([^"]*)"', page))


@pytest.mark.broker
async def test_a_dead_letter_that_arrives_after_the_count_was_shown_is_not_purged(
    amqp_url: str, queue_name: str
) -> None:
    await make_dead_letters(amqp_url, queue_name, 5)
    dashboard = Dashboard(url=amqp_url, queues=[queue_name], management_url="",
                          security=Security(allow_actions=True, tokens=(TOKEN,)))  # fmt: skip
    async with served(dashboard) as client:
        listing = await client.get(f"/dead-letters/{queue_name}", headers=AUTH)
        assert "5 shown of 5" in listing.text
        seen = form_fields(listing.text.split("/purge", 1)[1])
        ask = await client.post(f"/dead-letters/{queue_name}/purge", headers=AUTH,
                                data={k: v for k, v in seen.items() if k != "csrf"})  # fmt: skip
        assert ask.status_code == 200 and "delete 5 dead letters" in ask.text
        confirm = {k: v for k, v in form_fields(ask.text).items() if k != "csrf"}
        assert confirm.get("confirm") == "yes"

        # A 6th arrives between the confirmation page and the click: the user never saw it.
        await one_more_dead_letter(amqp_url, queue_name, "the sixth")
        refused = await client.post(f"/dead-letters/{queue_name}/purge", headers=AUTH,
                                    data=confirm)  # fmt: skip
        assert refused.status_code == 409, refused.text
        assert "holds 6 now, not 5. Nothing was deleted." in refused.text
        assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 6

        # Asked again with the new count, confirmed: those 6 go.
        again = {k: v for k, v in form_fields(refused.text).items() if k != "csrf"}
        assert again.get("count") == "6"
        done = await client.post(f"/dead-letters/{queue_name}/purge", headers=AUTH, data=again)
        assert done.status_code == 200 and "purged 6 dead letters" in done.text
        assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 0

        # A confirmation without a count (an old page, a hand-made request) deletes nothing.
        await one_more_dead_letter(amqp_url, queue_name, "the seventh")
        bare = await client.post(f"/dead-letters/{queue_name}/purge", headers=AUTH,
                                 data={"confirm": "yes"})  # fmt: skip
        assert bare.status_code == 400 and "purge from the dead-letter page again" in bare.text
        assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 1


@pytest.mark.broker
async def test_purge_with_a_limit_deletes_the_oldest_and_keeps_the_later_ones(
    amqp_url: str, queue_name: str
) -> None:
    await make_dead_letters(amqp_url, queue_name, 3)
    await one_more_dead_letter(amqp_url, queue_name, "arrived after the count")
    async with Producer(amqp_url) as producer:
        letters = producer.dead_letters(queue_name)
        assert await letters.purge(limit=3) == 3
        left = await letters.read()
        assert [letter.body for letter in left] == [b"arrived after the count"]
        assert await letters.purge(limit=0) == 0 and await letters.count() == 1
        for bad in (-1, 1.5, True):
            with pytest.raises(ConfigurationError, match="limit must be a whole number"):
                await letters.purge(limit=bad)  # type: ignore[arg-type]


@pytest.mark.broker
async def test_the_cli_purge_deletes_the_letters_it_asked_about_not_those_that_arrive_meanwhile(
    amqp_url: str, queue_name: str
) -> None:
    await make_dead_letters(amqp_url, queue_name, 2)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aio_workq", "dlq", "purge", queue_name,
        env={**os.environ, "AMQP_URL": amqp_url, "PYTHONUNBUFFERED": "1"},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        shown = b""
        async with asyncio.timeout(30):
            while b"This cannot be undone" not in shown:
                chunk = await proc.stdout.read(200)
                assert chunk, shown
                shown += chunk
        assert b"2 dead letters" in shown
        # one arrives while the question waits: the user never saw it
        await one_more_dead_letter(amqp_url, queue_name, "unseen")
        proc.stdin.write(b"y\n")
        await proc.stdin.drain()
        proc.stdin.close()
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert b"purged 2 dead letters" in out
        assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
