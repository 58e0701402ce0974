"""Dead letters against the session's broker: one-pass replay, header-preserving reads, filters.

The library (`Producer.dead_letters()`) and the `aio-workq dlq` command, which uses it.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from aio_workq import DeadLetter, Job, Producer, Reject, Worker
from tests.helpers import Counter, queue_depth, wait_until
from tests.test_cli import env, ids_in, make_dead_letters, run_cli  # noqa: F401 - a fixture

pytestmark = [pytest.mark.broker, pytest.mark.cli]


@asynccontextmanager
async def rejecting_worker(amqp_url: str, queue: str, runs: Counter) -> AsyncIterator[Worker]:
    """A worker whose handler fails every message at once, for good (`Reject`)."""

    async def reject(job: Job) -> None:
        runs.add(job.message_id)
        raise Reject("still broken")

    async with Worker(amqp_url, queue=queue, handler=reject, retry=None, concurrency=10) as worker:
        yield worker


async def _dlq_holds(producer: Producer, queue: str, count: int) -> bool:
    return await producer.dead_letters(queue).count() == count


# --- replay: one pass ----------------------------------------------------------------------


async def test_replay_moves_each_dead_letter_once_when_it_fails_again_at_once(
    amqp_url: str, queue_name: str
) -> None:
    runs = Counter()
    async with Producer(amqp_url) as producer, rejecting_worker(amqp_url, queue_name, runs):
        await producer.publish_many([f"m{i}" for i in range(4)], queue=queue_name)
        await runs.wait_for(4, timeout=20)
        await wait_until(lambda: _dlq_holds(producer, queue_name, 4), timeout=20)

        moved = await producer.dead_letters(queue_name).replay()

        assert moved == 4
        await runs.wait_for(8, timeout=20)  # each replayed copy failed again...
        await wait_until(lambda: _dlq_holds(producer, queue_name, 4), timeout=20)
        assert len(runs.items) == 8  # ...once: nothing was replayed twice
        assert sorted(runs.items[4:]) == sorted(runs.items[:4])


async def test_cli_replay_moves_each_dead_letter_once_and_dry_run_agrees(
    env: dict[str, str],  # noqa: F811 - the fixture
    amqp_url: str,
    queue_name: str,
) -> None:
    runs = Counter()
    async with Producer(amqp_url) as producer, rejecting_worker(amqp_url, queue_name, runs):
        await producer.publish_many([f"m{i}" for i in range(4)], queue=queue_name)
        await runs.wait_for(4, timeout=20)
        await wait_until(lambda: _dlq_holds(producer, queue_name, 4), timeout=20)

        code, out, err = await run_cli("dlq", "replay", queue_name, "--dry-run", env=env)
        assert (code, out) == (0, f"would replay 4 dead letters of {queue_name!r} (dry run)"), err
        code, out, err = await run_cli("dlq", "replay", queue_name, "--rate", "20", env=env)
        assert (code, out) == (0, f"replayed 4 dead letters into {queue_name!r}, all confirmed"), (
            err
        )
        await runs.wait_for(8, timeout=20)
        await wait_until(lambda: _dlq_holds(producer, queue_name, 4), timeout=20)
        assert len(runs.items) == 8


# --- reads leave the dead letters as they were ---------------------------------------------


async def test_reading_leaves_every_header_and_the_order_unchanged(
    env: dict[str, str],  # noqa: F811 - the fixture
    amqp_url: str,
    queue_name: str,
) -> None:
    ids = await make_dead_letters(amqp_url, queue_name, ["ValueError: 1", "KeyError: 2"])
    async with Producer(amqp_url) as producer:
        letters = producer.dead_letters(queue_name)
        first = await letters.read()
        for _ in range(30):  # RabbitMQ 4.0-4.2 drop a quorum queue's message at its 20th return
            await letters.read()
        _assert_unchanged(first, await letters.read())
        code, _, err = await run_cli("dlq", "list", queue_name, "--json", env=env)
        assert code == 0, err
        code, _, err = await run_cli("dlq", "show", queue_name, ids[0], env=env)
        assert code == 0, err
        code, _, err = await run_cli("dlq", "replay", queue_name, "--dry-run", env=env)
        assert code == 0, err
        last = await letters.read()
        assert await letters.count() == 2
    _assert_unchanged(first, last)
    assert sorted(str(letter.message_id) for letter in last) == sorted(ids)


def _assert_unchanged(first: list[DeadLetter], last: list[DeadLetter]) -> None:
    assert [letter.message_id for letter in last] == [letter.message_id for letter in first]
    for before, after in zip(first, last, strict=True):
        assert after.headers.get("x-delivery-count") == before.headers.get("x-delivery-count")
        assert dict(after.headers) == dict(before.headers)
        assert after.body == before.body


# --- filters, ids and prefixes -------------------------------------------------------------


async def test_replay_by_id_prefix_exception_and_time(
    env: dict[str, str],  # noqa: F811 - the fixture
    amqp_url: str,
    queue_name: str,
) -> None:
    bodies = ["ValueError: 1", "KeyError: 2", "ValueError: 3", "KeyError: 4"]
    ids = await make_dead_letters(amqp_url, queue_name, bodies)
    by_body = {}
    async with Producer(amqp_url) as producer:
        for letter in await producer.dead_letters(queue_name).read(10):
            by_body[letter.body.decode()] = str(letter.message_id)

    # An id prefix wherever an id goes; the ids of one producer share a long prefix.
    one = by_body["KeyError: 2"]
    code, out, err = await run_cli("dlq", "show", queue_name, _unique_prefix(one, ids), env=env)
    assert code == 0, err
    assert "KeyError: 2" in out
    shared = _common_prefix(ids)
    code, _, err = await run_cli("dlq", "show", queue_name, shared, env=env)
    assert code == 1 and f"{shared!r} is ambiguous" in err
    assert all(i in err for i in ids)
    code, _, err = await run_cli("dlq", "replay", queue_name, "--id", "zzz", env=env)
    assert code == 1 and "no dead letter with message id 'zzz'" in err

    code, out, err = await run_cli(
        "dlq", "replay", queue_name, "--id", _unique_prefix(one, ids),
        "--id", by_body["ValueError: 3"], env=env,
    )  # fmt: skip
    assert (code, out) == (0, f"replayed 2 dead letters into {queue_name!r}, all confirmed"), err
    assert sorted(await ids_in(amqp_url, queue_name)) == sorted([one, by_body["ValueError: 3"]])
    left = [by_body["ValueError: 1"], by_body["KeyError: 4"]]
    assert await ids_in(amqp_url, f"{queue_name}.dlq") == left  # in their order

    future = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).isoformat()
    code, out, _ = await run_cli(
        "dlq", "replay", queue_name, "--since", future, "--dry-run", env=env
    )
    assert out == f"would replay 0 dead letters of {queue_name!r} (dry run)"
    code, out, _ = await run_cli(
        "dlq", "replay", queue_name, "--before", future, "-e", "KeyError", "--dry-run", env=env
    )
    assert out == f"would replay 1 dead letter of {queue_name!r} (dry run)"
    code, _, err = await run_cli("dlq", "replay", queue_name, "--since", "yesterday", env=env)
    assert code == 2 and "--since" in err and "ISO 8601" in err


async def test_an_empty_id_is_refused_not_taken_for_every_dead_letter(
    env: dict[str, str],  # noqa: F811 - the fixture
    amqp_url: str,
    queue_name: str,
) -> None:
    """`--id "$ID"` with `ID` unset: an empty id (or a bare `..`) is the start of every id, so
    with one dead letter it replayed that one, and with more it said "ambiguous"."""
    ids = await make_dead_letters(amqp_url, queue_name, ["ValueError: 1"])
    for empty in ("", " ", "..", "…"):
        code, out, err = await run_cli("dlq", "replay", queue_name, "--id", empty, env=env)
        assert code == 1 and "empty message id" in err, (empty, out, err)
        code, out, err = await run_cli("dlq", "show", queue_name, empty, env=env)
        assert code == 1 and "empty message id" in err, (empty, out, err)
    assert await ids_in(amqp_url, f"{queue_name}.dlq") == ids  # nothing replayed


def _common_prefix(ids: list[str]) -> str:
    prefix = ids[0]
    for other in ids[1:]:
        while not other.startswith(prefix):
            prefix = prefix[:-1]
    return prefix


def _unique_prefix(one: str, ids: list[str]) -> str:
    """The shortest prefix of `one` that no other id starts with (the common prefix of all
    the ids and one character more was not: for ids ending 0e, 0f, 10, 11, as they do after
    13 earlier publishes in the process, `...0` named two)."""
    others = [i for i in ids if i != one]
    size = len(_common_prefix(ids)) + 1
    while any(other.startswith(one[:size]) for other in others):
        size += 1
    return one[:size]


async def test_dlq_list_shows_short_unique_ids_and_public_exception_names(
    env: dict[str, str],  # noqa: F811 - the fixture
    amqp_url: str,
    queue_name: str,
) -> None:
    await make_dead_letters(amqp_url, queue_name, ["ValueError: 1", "Reject: 2"])
    code, out, _ = await run_cli("dlq", "list", queue_name, "--json", env=env)
    listed = json.loads(out)
    ids = [item["message_id"] for item in listed]
    assert [item["reason"] for item in listed] == [
        "builtins.ValueError: ValueError: 1",
        "aio_workq.Reject: Reject: 2",
    ]
    code, out, err = await run_cli("dlq", "list", queue_name, env={**env, "COLUMNS": "80"})
    assert code == 0, err
    assert all(len(line) <= 80 for line in out.splitlines())
    assert "aio_workq.Reject" in out and "_exceptions" not in out
    rows = [line for line in out.splitlines() if "Error" in line or "Reject" in line]
    shown = [row.strip("│┃ ").split()[0] for row in rows]
    assert len(shown) == 2 and all(len(s) < 16 for s in shown), out  # one line each
    for short, full in zip(shown, ids, strict=True):
        head, _, tail = short.partition("\u2026")
        assert [i for i in ids if i.startswith(head) and i.endswith(tail)] == [full]
        code, out, err = await run_cli("dlq", "show", queue_name, short, "--json", env=env)
        assert code == 0, err
        assert json.loads(out)["message_id"] == full


async def test_dlq_list_shows_square_brackets_in_reasons_and_bodies_as_they_are(
    env: dict[str, str],  # noqa: F811 - the fixture
    amqp_url: str,
    queue_name: str,
) -> None:
    """A reason or body with square brackets (the task registry's own hint `aliases=[its old
    name]`, a list in an exception message, a JSON array) is printed as it is: before, rich
    read it as markup, dropped `[its old name]`, and a `[/x]` ended the command with a
    MarkupError traceback."""
    await make_dead_letters(amqp_url, queue_name, ["Reject: aliases=[its old name]", "[/x]"])
    wide = {**env, "COLUMNS": "200"}
    code, out, err = await run_cli("dlq", "list", queue_name, env=wide)
    assert code == 0, err
    assert "aliases=[its old name]" in out and "[/x]" in out, out


def test_old_private_exception_names_read_as_public_ones() -> None:
    letter = DeadLetter(
        body=b"",
        message_id="1",
        headers={
            "x-workq-exception-type": "aio_workq._exceptions.PayloadError",
            "x-workq-exception-message": "bad",
        },
        content_type=None,
    )
    assert letter.exception_type == "aio_workq.PayloadError"
    assert letter.reason == "aio_workq.PayloadError: bad"
    app = DeadLetter(b"", "2", {"x-workq-exception-type": "app._errors.Mine"}, None)
    assert app.exception_type == "app._errors.Mine"  # not ours: as it is


async def test_replay_where_selects_and_leaves_the_rest_in_order(
    amqp_url: str, queue_name: str
) -> None:
    ids = await make_dead_letters(amqp_url, queue_name, ["ValueError: a", "KeyError: b"] * 3)
    async with Producer(amqp_url) as producer:
        letters = producer.dead_letters(queue_name)
        order = [letter.message_id for letter in await letters.read(10)]
        moved = await letters.replay(where=lambda d: d.exception_type == "builtins.KeyError")
        assert moved == 3
        assert await queue_depth(amqp_url, queue_name) == 3
        kept = [letter.message_id for letter in await letters.read(10)]
    assert kept == [i for i in order if i in kept] and len(kept) == 3
    assert sorted(str(i) for i in order) == sorted(ids)


async def test_an_id_given_by_its_end_says_how_to_name_the_dead_letter(
    env: dict[str, str],  # noqa: F811 - the fixture
    amqp_url: str,
    queue_name: str,
) -> None:
    # `dlq list` shows f54c376c…0002; a user who types the end they can tell apart ("0002")
    # learns which forms an id takes, and which dead letter ends so (it said only "no dead
    # letter with message id '0002'").
    ids = await make_dead_letters(amqp_url, queue_name, ["ValueError: 1", "KeyError: 2"])
    tail = ids[1][-4:]
    code, _, err = await run_cli("dlq", "show", queue_name, tail, env=env)
    assert code == 1
    assert f"no dead letter with message id {tail!r}" in err
    assert "the whole id, its start, or HEAD…TAIL as `aio-workq dlq list` shows it" in err
    assert f"{ids[1][:8]}…{tail}" in err or ids[1] in err, err


async def test_dlq_show_prints_a_reason_with_square_brackets_as_it_is(
    env: dict[str, str],  # noqa: F811 - the fixture
    amqp_url: str,
    queue_name: str,
) -> None:
    """`dlq show` printed the reason as rich markup, as `dlq list` did: `[/x]` ended the
    command with a MarkupError traceback and `[its old name]` vanished."""
    reason = "Reject: aliases=[its old name] [/x]"
    [message_id] = await make_dead_letters(amqp_url, queue_name, [reason])
    code, out, err = await run_cli("dlq", "show", queue_name, message_id, env=env)
    assert code == 0, err
    assert reason in out, out
