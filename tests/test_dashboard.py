"""The dashboard (aio_workq.dashboard): its core offline (escaping, tokens, CSRF, links under a
prefix, bad input), both adapters mounted under a prefix, and its pages against the broker."""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pytest
from aiohttp import web
from fastapi import FastAPI

from aio_workq import ConfigurationError, Job, Producer, Reject, Worker
from aio_workq.admin.queues import QueueRow, RawQueue
from aio_workq.dashboard import (
    Dashboard,
    Request,
    Security,
    aiohttp_app,
    asgi_app,
    store_from_url,
)
from aio_workq.dashboard._data import QueueSnapshot, visible
from aio_workq.jobs import JobState, MemoryStore, SQLiteStore, Write
from tests.helpers import header_room, negotiated_frame_max, queue_depth, wait_until
from tests.servers import serve_aiohttp, serve_asgi

TOKEN = "t0ken-for-the-dashboard-tests"
NOWHERE = "amqp://guest:s3cret-pass@127.0.0.1:1/"
EVIL = "<script>alert(1)</script>"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FixedQueues:
    """Stands in for QueueData offline: always the same snapshot (no broker)."""

    def __init__(self, rows: list[QueueRow], *, management: bool = False) -> None:
        self.history: deque[Any] = deque()
        self._snap = QueueSnapshot(rows, "a fixed test snapshot", management)

    async def snapshot(self) -> QueueSnapshot:
        return self._snap

    async def close(self) -> None:
        pass


def board(*, actions: bool = False, rows: list[QueueRow] | None = None, **kw: Any) -> Dashboard:
    security = Security(allow_actions=actions, tokens=(TOKEN,) if actions else ())
    dashboard = Dashboard(url=NOWHERE, management_url=NOWHERE.replace("amqp", "http"),
                          security=security, **kw)  # fmt: skip
    if rows is not None:
        dashboard.queues = FixedQueues(rows)  # type: ignore[assignment]
    return dashboard


async def get(dashboard: Dashboard, path: str, **kw: Any) -> tuple[int, str, dict[str, str]]:
    response = await dashboard.handle(Request(method="GET", path=path, prefix="/workq", **kw))
    return response.status, response.body.decode(), dict(response.all_headers())


async def post(
    dashboard: Dashboard, path: str, form: dict[str, list[str]], **kw: Any
) -> tuple[int, str, dict[str, str]]:
    response = await dashboard.handle(
        Request(method="POST", path=path, prefix="/workq", form=form, **kw)
    )
    return response.status, response.body.decode(), dict(response.all_headers())


# --- offline: escaping, links, bad input ----------------------------------------------------


async def test_a_queue_named_like_a_script_is_shown_as_text() -> None:
    dashboard = board(rows=[QueueRow(queue=EVIL, ready=3, dead_letters=1)])
    for path in ("/", "/fragments/queues", "/dead-letters"):
        status, body, _ = await get(dashboard, path)
        assert status == 200
        assert EVIL not in body
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    # ...and its links percent-encode it
    assert "/workq/dead-letters/%3Cscript%3Ealert%281%29%3C%2Fscript%3E" in body


def test_server_named_queues_are_not_listed() -> None:
    raws = [RawQueue("amq.gen-x1", 0, 0, 1), RawQueue("emails", 3, 0, 1)]
    assert [raw.name for raw in visible(raws)] == ["emails"]


async def test_every_link_and_form_respects_the_mount_prefix() -> None:
    dashboard = board(actions=True, rows=[QueueRow(queue="emails", ready=1, dead_letters=2)])
    for path in ("/", "/workers", "/dead-letters", "/jobs", "/schedules", "/login"):
        status, body, _ = await get(dashboard, path)
        targets = re.findall(r'(?:href|src|action|hx-get)="([^"#]*)"', body)
        assert targets, path
        assert all(t.startswith("/workq/") for t in targets), (path, targets)


async def test_bad_input_gets_a_message_page_with_a_4xx_never_a_traceback() -> None:
    dashboard = board()
    cases = {
        "/nowhere": 404,
        "/dead-letters/q/bad%01id%3Cb%3E": 400,  # a control character in a message id
        "/dead-letters/q/" + "i" * 256: 400,  # longer than a message id can be
        "/dead-letters/%01ctl": 400,  # a control character in a queue name
        "/dead-letters/" + "x" * 300: 400,  # longer than AMQP allows
        "/jobs/" + "%3Cscript%3E%0A": 400,
        "/jobs/abc": 404,  # no store: said so
        "/static/secret.txt": 404,
    }
    for path, expected in cases.items():
        status, body, headers = await get(dashboard, path)
        assert status == expected, (path, status)
        assert "Traceback" not in body and "<script>" not in body
        assert headers["Content-Type"].startswith("text/html")
    status, body, _ = await post(dashboard, "/workers", {})
    assert status == 405


async def test_no_password_is_rendered() -> None:
    dashboard = board()  # the management API at NOWHERE can't be reached: its error is shown
    status, body, _ = await get(dashboard, "/")
    assert status == 200
    assert "not reachable" in body and "***" in body
    assert "s3cret-pass" not in body
    assert "s3cret-pass" not in repr(dashboard)


def test_security_refuses_actions_without_a_token_or_with_a_short_one() -> None:
    with pytest.raises(ConfigurationError, match="actions need a token"):
        Security(allow_actions=True)
    with pytest.raises(ConfigurationError, match="at least 16 characters"):
        Security(allow_actions=True, tokens=("short",))


def test_the_token_file_and_the_environment(tmp_path: Any, monkeypatch: Any) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# who may act\n{TOKEN}\n")
    assert Security.load(allow_actions=True, token_file=path).tokens == (TOKEN,)
    monkeypatch.setenv("AIO_WORKQ_DASHBOARD_TOKEN", TOKEN)
    assert Security.load(allow_actions=True).tokens == (TOKEN,)
    path.write_text("# none\n")
    with pytest.raises(ConfigurationError, match="holds no token"):
        Security.load(allow_actions=True, token_file=path)
    with pytest.raises(ConfigurationError, match="cannot read the token file"):
        Security.load(allow_actions=True, token_file=tmp_path / "missing")


def test_a_store_from_its_url(tmp_path: Any) -> None:
    store = store_from_url(f"sqlite:///{tmp_path}/jobs.db")
    assert isinstance(store, SQLiteStore)
    with pytest.raises(ConfigurationError, match=r"redis://u:\*\*\*@h/.*sqlite:///"):
        store_from_url("redis://u:pw@h/0")


def test_a_session_cookie_is_signed_and_expires() -> None:
    security = Security(allow_actions=True, tokens=(TOKEN,))
    token_id = security.check_token(TOKEN)
    assert token_id is not None and token_id not in TOKEN
    assert security.check_token(TOKEN + "x") is None
    cookie = security.session_cookie(token_id, now=1000.0)
    assert security.check_session(cookie, now=1000.0) == token_id
    assert security.check_session(cookie, now=1000.0 + 13 * 3600) is None  # expired
    head, _, signature = cookie.rpartition(".")
    forged = f"{head.rsplit('.', 1)[0]}.{int(time.time()) + 10**6}.{signature}"
    assert security.check_session(forged) is None  # a longer life is not signed
    other = Security(allow_actions=True, tokens=("another-token-of-enough-length",))
    assert other.check_session(cookie, now=1000.0) is None  # the token revoked


# --- offline: who may act --------------------------------------------------------------------


async def test_a_read_only_dashboard_refuses_every_action() -> None:
    dashboard = board()
    for path in ("/dead-letters/q/replay", "/dead-letters/q/purge", "/jobs/j1/cancel"):
        status, body, _ = await post(
            dashboard, path, {"scope": ["filter"]}, headers={"authorization": f"Bearer {TOKEN}"}
        )
        assert status == 403 and "read-only" in body, path
    status, _, _ = await post(dashboard, "/login", {"token": [TOKEN]})
    assert status == 403


async def test_an_action_needs_the_token_and_a_form_needs_its_csrf_token() -> None:
    dashboard = board(actions=True)  # no store: an authorised cancel gets "no job store"
    status, body, _ = await post(dashboard, "/jobs/j1/cancel", {})
    assert status == 401 and "token" in body
    status, _, _ = await post(
        dashboard, "/jobs/j1/cancel", {}, headers={"authorization": "Bearer wrong-token-xxxxxxxx"}
    )
    assert status == 401
    status, body, _ = await post(
        dashboard, "/jobs/j1/cancel", {}, headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert status == 404 and "No job store" in body  # past the checks

    status, body, _ = await post(dashboard, "/login", {"token": ["not the token at all"]})
    assert status == 401 and "not the dashboard" in body
    status, _, headers = await post(dashboard, "/login", {"token": [TOKEN]})
    assert status == 303 and headers["Location"] == "/workq/"
    cookie = next(v for k, v in (await dashboard.handle(
        Request(method="POST", path="/login", prefix="/workq", form={"token": [TOKEN]})
    )).headers if k == "Set-Cookie")  # fmt: skip
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/workq" in cookie
    session = {"cookie": cookie.split(";", 1)[0]}

    status, body, _ = await post(dashboard, "/jobs/j1/cancel", {}, headers=session)
    assert status == 403 and "CSRF" in body
    status, body, _ = await post(
        dashboard, "/jobs/j1/cancel", {"csrf": ["0" * 32]}, headers=session
    )
    assert status == 403
    _, page, _ = await get(dashboard, "/jobs", headers=session)
    assert TOKEN not in page
    assert "Sign out" in page
    csrf = dashboard._security.csrf_token(session["cookie"].split("=", 1)[1])
    status, body, _ = await post(dashboard, "/jobs/j1/cancel", {"csrf": [csrf]}, headers=session)
    assert status == 404 and "No job store" in body


# --- the adapters, mounted under a prefix ----------------------------------------------------


async def test_mounted_in_aiohttp_under_a_prefix() -> None:
    dashboard = board(rows=[QueueRow(queue="emails", ready=7)])
    root = web.Application()
    root.add_subapp("/workq", aiohttp_app(dashboard))
    async with serve_aiohttp(root) as base, httpx.AsyncClient(base_url=base) as client:
        page = await client.get("/workq/")
        assert page.status_code == 200
        assert 'href="/workq/dead-letters"' in page.text and "emails" in page.text
        script = await client.get("/workq/static/htmx.min.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith(
            "application/javascript"
        )
        assert script.headers.get_list("cache-control") == ["public, max-age=3600"]
        assert page.headers.get_list("cache-control") == ["no-store"]
        assert page.headers["x-frame-options"] == "DENY"
        assert (await client.get("/workq/nope")).status_code == 404
        assert (await client.get("/workq/dead-letters/%3Cx%3E/%01")).status_code == 400


async def test_mounted_in_fastapi_under_a_prefix() -> None:
    dashboard = board(rows=[QueueRow(queue="emails", ready=7)])
    app = FastAPI()
    app.mount("/workq", asgi_app(dashboard))
    async with serve_asgi(app) as base, httpx.AsyncClient(base_url=base) as client:
        page = await client.get("/workq/")
        assert page.status_code == 200
        assert 'href="/workq/dead-letters"' in page.text and "emails" in page.text
        fragment = await client.get("/workq/fragments/queues", headers={"HX-Request": "true"})
        assert "<html" not in fragment.text and "emails" in fragment.text
        assert (await client.get("/workq/static/dashboard.css")).status_code == 200
        login = await client.post("/workq/login", data={"token": TOKEN})
        assert login.status_code == 403  # read-only
    await dashboard.close()


async def test_the_asgi_app_served_alone_from_options() -> None:
    app = asgi_app(url=NOWHERE, management_url="http://127.0.0.1:1/", queues=["emails"])
    async with serve_asgi(app) as base, httpx.AsyncClient(base_url=base) as client:
        page = await client.get("/")
        assert page.status_code == 200 and 'href="/dead-letters"' in page.text
        assert "s3cret-pass" not in page.text


# --- against the broker ------------------------------------------------------------------------


async def reject(job: Job) -> None:
    raise Reject("still broken")


async def dead_letters_of(
    amqp_url: str, queue: str, messages: list[tuple[Any, dict[str, Any]]]
) -> list[str]:
    """Publish each `(body, options)` to `queue` and let a worker dead-letter them all; their
    message ids."""
    async with Producer(amqp_url) as producer:
        ids = [await producer.publish(body, queue=queue, **options) for body, options in messages]
        async with Worker(amqp_url, queue=queue, handler=reject, retry=None, concurrency=10):
            letters = producer.dead_letters(queue)

            async def all_there() -> bool:
                return await letters.count() == len(messages)

            await wait_until(all_there, timeout=20)
    return ids


async def make_dead_letters(amqp_url: str, queue: str, count: int) -> list[str]:
    """`count` dead letters in `queue`'s dead-letter queue (bodies m0, m1, ...); their ids."""
    return await dead_letters_of(amqp_url, queue, [(f"m{i}", {}) for i in range(count)])


async def replay_from_the_page(client: httpx.AsyncClient, queue: str, ids: list[str]) -> None:
    """Replay the dead letters `ids` of `queue` as the page's "Replay selected" does, and wait
    for the action's page to say that every one of them was replayed."""
    started = await client.post(f"/dead-letters/{queue}/replay", headers=AUTH,
                                data={"scope": "selected", "id": ids})  # fmt: skip
    assert started.status_code == 303, started.text
    progress = started.headers["location"].removeprefix("/workq")

    async def finished() -> bool:
        return f"Done: {len(ids)} replayed" in (await client.get(progress)).text

    await wait_until(finished, timeout=20)


@asynccontextmanager
async def served(dashboard: Dashboard) -> AsyncIterator[httpx.AsyncClient]:
    root = web.Application()
    root.add_subapp("/workq", aiohttp_app(dashboard))
    async with serve_aiohttp(root) as base, httpx.AsyncClient(base_url=base + "/workq") as client:
        yield client


def cell(page: str, queue: str, css: str) -> str:
    row = page.split(f'data-queue="{queue}"', 1)[1].split("</tr>", 1)[0]
    return re.search(rf'class="num {css}">(?:<a [^>]*>)?([^<]*)<', row)[1]  # type: ignore[index]


@pytest.mark.broker
async def test_queues_show_their_depths_from_passive_declares(
    amqp_url: str, queue_name: str
) -> None:
    await make_dead_letters(amqp_url, queue_name, 2)
    async with Producer(amqp_url) as producer:
        await producer.publish_many(["a", "b", "c"], queue=queue_name)
    dashboard = Dashboard(url=amqp_url, queues=[queue_name], management_url="")
    async with served(dashboard) as client:
        page = (await client.get("/")).text
        assert cell(page, queue_name, "ready") == "3"
        assert cell(page, queue_name, "dead") == "2"
        assert "passive declares" in page
        listing = (await client.get(f"/dead-letters/{queue_name}")).text
        assert "2 shown of 2" in listing and "still broken" in listing
        missing = await client.get("/dead-letters/no-such-queue-here")
        assert missing.status_code == 404 and "does not exist" in missing.text
        evil = await client.get("/dead-letters/" + quote(EVIL, safe=""))
        assert evil.status_code == 400 and EVIL not in evil.text
        assert "Not an aio-workq queue" in evil.text


@pytest.mark.broker
async def test_a_dead_letter_grown_past_frame_max_is_flagged_on_its_pages(
    amqp_url: str, queue_name: str
) -> None:
    """leftovers2: the broker's x-death headers grew a dead letter past frame_max. It was listed
    like the others, and why it can't be copied (and what to do) reached only the server's
    log; its pages say so now, and the replay that moves it is offered."""
    room = header_room(await negotiated_frame_max(amqp_url), "near-full") - 100
    await dead_letters_of(amqp_url, queue_name, [
        (b"small", {"message_id": "small"}),
        (b"x", {"message_id": "near-full", "headers": {"h": "x" * room}}),
    ])  # fmt: skip
    dashboard = Dashboard(url=amqp_url, queues=[queue_name], management_url="",
                          security=Security(allow_actions=True, tokens=(TOKEN,)))  # fmt: skip
    async with served(dashboard) as client:
        listing = (await client.get(f"/dead-letters/{queue_name}", headers=AUTH)).text
        assert "2 shown of 2" in listing
        [alert] = re.findall(r'<p role="alert"[^>]*>(.*?)</p>', listing, re.S)
        assert "near-full" in alert and "frame_max" in alert  # what it is
        assert f"aio-workq dlq replay {queue_name} --id near-full" in alert  # what to do
        assert "purge" in alert
        small = listing.split('data-id="small"', 1)[1].split("</tr>", 1)[0]
        large = listing.split('data-id="near-full"', 1)[1].split("</tr>", 1)[0]
        assert "too large to copy" in large and "too large" not in small
        page = (await client.get(f"/dead-letters/{queue_name}/near-full", headers=AUTH)).text
        [alert] = re.findall(r'<p role="alert"[^>]*>(.*?)</p>', page, re.S)
        assert "frame_max" in alert and "--id near-full" in alert
        assert "Replay this dead letter" in page
        other = (await client.get(f"/dead-letters/{queue_name}/small", headers=AUTH)).text
        assert 'role="alert"' not in other
    assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 2  # the pages took nothing


@pytest.mark.broker
async def test_a_dead_letter_is_replayed_from_the_page_and_arrives(
    amqp_url: str, queue_name: str
) -> None:
    ids = await make_dead_letters(amqp_url, queue_name, 3)
    dashboard = Dashboard(url=amqp_url, queues=[queue_name], management_url="",
                          security=Security(allow_actions=True, tokens=(TOKEN,)))  # fmt: skip
    async with served(dashboard) as client:
        refused = await client.post(f"/dead-letters/{queue_name}/replay",
                                    data={"scope": "selected", "id": ids[0]})  # fmt: skip
        assert refused.status_code == 401
        # Without the token, whatever the request asks: refused first (not a 400 about it).
        for data in ({"scope": "bogus"}, {"scope": "selected"}):
            refused = await client.post(f"/dead-letters/{queue_name}/replay", data=data)
            assert refused.status_code == 401, data
        assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 3

        listed = await client.get(f"/dead-letters/{queue_name}", headers=AUTH)
        assert ">Replay all (3)</button>" in listed.text  # one space, not two
        filtered = await client.get(f"/dead-letters/{queue_name}?exception=Reject", headers=AUTH)
        assert ">Replay all matching (3)</button>" in filtered.text
        bogus = await client.post(f"/dead-letters/{queue_name}/replay", headers=AUTH,
                                  data={"scope": "bogus"})  # fmt: skip
        assert bogus.status_code == 400 and "unknown replay scope" in bogus.text
        await replay_from_the_page(client, queue_name, ids[:1])
        assert await queue_depth(amqp_url, queue_name) == 1
        assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 2

        ask = await client.post(f"/dead-letters/{queue_name}/purge", headers=AUTH)
        assert ask.status_code == 200 and "Delete the 2 dead letters" in ask.text
        assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 2  # asked, not done
        done = await client.post(f"/dead-letters/{queue_name}/purge", headers=AUTH,
                                 data={"confirm": "yes", "count": "2"})  # fmt: skip
        assert "purged 2 dead letters" in done.text
        assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 0


@pytest.mark.broker
async def test_jobs_are_looked_up_listed_and_cancelled(amqp_url: str, queue_name: str) -> None:
    store = MemoryStore()
    now = time.time()
    await store.record([
        Write(job_id="job-failed", task="app.resize", queue=queue_name, state=JobState.FAILED,
              at=now, attempt=3, error_type="app.Broken", error_message=EVIL),
        Write(job_id="job-waiting", task="app.resize", queue=queue_name,
              state=JobState.QUEUED, at=now),
    ])  # fmt: skip
    dashboard = Dashboard(url=amqp_url, store=store,
                          security=Security(allow_actions=True, tokens=(TOKEN,)))  # fmt: skip
    async with served(dashboard) as client:
        listing = (await client.get("/jobs")).text
        assert "job-failed" in listing and "job-waiting" not in listing
        assert EVIL not in listing and "app.Broken" in listing
        found = await client.get("/jobs", params={"id": "job-waiting"}, follow_redirects=True)
        assert (
            found.status_code == 200 and "queued" in found.text and "Cancel this job" in found.text
        )
        assert (await client.get("/jobs/nope")).status_code == 404
        cancelled = await client.post(
            "/jobs/job-waiting/cancel", headers=AUTH, follow_redirects=True
        )
        assert cancelled.status_code == 200 and "cancelled" in cancelled.text
    record = await store.get("job-waiting")
    assert record is not None and record.status.state is JobState.CANCELLED


@pytest.mark.broker
async def test_schedules_page_without_a_scheduler_says_so(amqp_url: str) -> None:
    dashboard = Dashboard(url=amqp_url, schedules_group="workq.dashboard-test")
    async with served(dashboard) as client:
        page = (await client.get("/schedules")).text
        assert "No scheduler has run on this broker yet" in page
        # a scheduler of another group is the usual cause: the page says how to read it
        assert "Dashboard(schedules_group=...)" in page and "--schedules MODULE:ATTR" in page


async def nothing(job: Job) -> None:
    pass


@pytest.mark.broker
async def test_a_worker_appears_live_and_is_greyed_out_when_gone(
    amqp_url: str, queue_name: str
) -> None:
    dashboard = Dashboard(url=amqp_url, management_url="")
    async with served(dashboard) as client:
        empty = (await client.get("/workers")).text  # the watcher starts listening
        assert "No worker has sent a heartbeat" in empty
        worker = Worker(amqp_url, queue=queue_name, handler=nothing, presence_interval=0.5)
        async with worker:

            async def alive() -> bool:
                page = (await client.get("/fragments/workers")).text
                return queue_name in page and 'class="alive"' in page

            await wait_until(alive, timeout=20)
            overview = (await client.get("/")).text  # its queue is known by its beats
            assert f'data-queue="{queue_name}"' in overview

        async def gone() -> bool:
            page = (await client.get("/fragments/workers")).text
            return queue_name in page and 'class="gone"' in page and 'class="alive"' not in page

        await wait_until(gone, timeout=20)  # its goodbye beat


@pytest.mark.usefixtures("restored_loggers")
def test_the_command_refuses_actions_without_a_token(monkeypatch: Any) -> None:
    from click.testing import CliRunner

    from aio_workq.cli._app import cli

    monkeypatch.delenv("AIO_WORKQ_DASHBOARD_TOKEN", raising=False)
    result = CliRunner().invoke(cli, ["dashboard", "--allow-actions", "--url", NOWHERE])
    assert result.exit_code != 0
    assert "actions need a token" in str(result.exception)
    result = CliRunner().invoke(cli, ["dashboard", "--store", "redis://u:pw@h/0", "--url", NOWHERE])
    assert "sqlite:///" in str(result.exception) and "pw" not in str(result.exception)


async def check_recent(store: Any) -> None:
    now = time.time()
    await store.record([
        Write(job_id=f"j{i}", task="t", queue="q", state=state, at=now - 100 + i)
        for i, state in enumerate([JobState.FAILED, JobState.SUCCEEDED, JobState.FAILED,
                                   JobState.FAILED])
    ])  # fmt: skip
    failed = await store.recent(state="failed", limit=2)
    assert [status.job_id for status in failed] == ["j3", "j2"]
    assert [s.job_id for s in await store.recent(state=JobState.SUCCEEDED)] == ["j1"]
    # Bad input names the argument (a bare ValueError, a StoreError blaming the store, or an
    # OverflowError before): the same on every store.
    for state, limit, named in [("bogus", 2, "state"), ("failed", -1, "limit"),
                                ("failed", True, "limit"), ("failed", 2**70, "limit")]:  # fmt: skip
        with pytest.raises(ConfigurationError, match=f"^{named} must be"):
            await store.recent(state=state, limit=limit)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_stores_list_recent_jobs_by_state_newest_first(kind: str, tmp_path: Any) -> None:
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "jobs.db")
    try:
        await check_recent(store)
    finally:
        await store.close()


@pytest.mark.postgres
async def test_the_postgres_store_lists_recent_jobs_too(postgres_dsn: str) -> None:
    import uuid

    import psycopg

    from aio_workq.jobs.postgres import PostgresStore, migrate

    schema = f"j_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await migrate(conn, schema=schema)
        store = PostgresStore(postgres_dsn, schema=schema)
        try:
            await check_recent(store)
        finally:
            await store.close()
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


# --- what a new user met first (docs/dashboard.md walked through) ----------------------------


def wrong_password(amqp_url: str) -> str:
    parts = urlsplit(amqp_url)
    netloc = f"guest:not-the-password@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.mark.broker
async def test_a_wrong_password_is_explained_on_the_overview_as_elsewhere(amqp_url: str) -> None:
    dashboard = Dashboard(url=wrong_password(amqp_url), management_url="", queues=["emails"])
    try:
        status, body, _ = await get(dashboard, "/")
    finally:
        await dashboard.close()
    assert status == 200
    assert "refused the user name or password" in body and "RABBITMQ_PASSWORD" in body
    assert "not-the-password" not in body


@pytest.mark.broker
@pytest.mark.usefixtures("restored_loggers")
def test_the_command_checks_the_credentials_before_serving(amqp_url: str, monkeypatch: Any) -> None:
    from click.testing import CliRunner

    from aio_workq.cli._app import cli

    served: list[Any] = []
    monkeypatch.setattr(web, "run_app", lambda app, **kw: served.append(app))
    result = CliRunner().invoke(cli, ["dashboard", "--url", wrong_password(amqp_url)])
    assert served == [] and result.exit_code != 0
    assert "refused the user name or password" in str(result.exception)
    assert "not-the-password" not in str(result.exception)
    result = CliRunner().invoke(
        cli, ["dashboard", "--url", amqp_url, "--no-management", "--port", "0"]
    )
    assert result.exit_code == 0 and len(served) == 1


@pytest.mark.broker
async def test_a_named_queue_that_does_not_exist_gets_a_row_saying_so(
    amqp_url: str, queue_name: str
) -> None:
    async with Producer(amqp_url) as producer:
        await producer.publish_many(["a"], queue=queue_name)
    missing = f"{queue_name}-emailz"
    dashboard = Dashboard(url=amqp_url, management_url="", queues=[queue_name, missing])
    try:
        _, page, _ = await get(dashboard, "/")
    finally:
        await dashboard.close()
    assert cell(page, queue_name, "ready") == "1"
    row = page.split(f'data-queue="{missing}"', 1)[1].split("</tr>", 1)[0]
    assert "does not exist" in row
    only_missing = Dashboard(url=amqp_url, management_url="", queues=[missing])
    try:
        _, page, _ = await get(only_missing, "/")
    finally:
        await only_missing.close()
    assert "No queues." not in page and f'data-queue="{missing}"' in page


@pytest.mark.broker
async def test_the_first_overview_says_it_listens_for_beats_before_suggesting_queue(
    amqp_url: str,
) -> None:
    dashboard = Dashboard(url=amqp_url, management_url="")
    try:
        _, page, _ = await get(dashboard, "/")
    finally:
        await dashboard.close()
    assert "listening for the workers" in page
    assert "no queue names: start the dashboard with" not in page


async def test_an_unreachable_default_management_api_says_how_to_give_its_address() -> None:
    dashboard = Dashboard(url=NOWHERE, queues=["emails"])  # tries 127.0.0.1:15672
    try:
        _, page, _ = await get(dashboard, "/")
    finally:
        await dashboard.close()
    assert "--management-url" in page
    assert "Dashboard(management_url=" in page  # the fix for a dashboard mounted in an app
    assert "s3cret-pass" not in page


async def test_with_no_queue_names_the_overview_says_how_to_name_them_in_code_too() -> None:
    from aio_workq.dashboard._data import QueueData

    data = QueueData(url=NOWHERE, management_url="")  # no API, no names, done listening
    snapshot = await data.snapshot()
    assert snapshot.error is not None and "--queue NAME" in snapshot.error
    assert "Dashboard(queues=" in snapshot.error  # the fix for a dashboard mounted in an app


async def test_a_store_that_cannot_be_opened_is_said_so_on_the_jobs_page(tmp_path: Any) -> None:
    store = SQLiteStore(tmp_path / "nodir" / "jobs.db")
    dashboard = board(store=store)
    status, body, _ = await get(dashboard, "/jobs")
    assert status == 503, body
    assert "nodir/jobs.db" in body and "unable to open database file" in body
    status, body, _ = await get(dashboard, "/jobs/job-1")
    assert status == 503 and "unable to open database file" in body
    await store.close()


async def test_a_wrong_bearer_token_is_told_apart_from_none() -> None:
    dashboard = board(actions=True)
    status, body, _ = await post(dashboard, "/jobs/j1/cancel", {})
    assert status == 401 and "not the dashboard" not in body
    wrong = "wrong-token-xxxxxxxx"
    status, body, _ = await post(
        dashboard, "/jobs/j1/cancel", {}, headers={"authorization": f"Bearer {wrong}"}
    )
    assert status == 401 and "that is not the dashboard&#39;s token" in body
    assert wrong not in body


@pytest.mark.usefixtures("restored_loggers")
def test_the_startup_line_is_one_line_whatever_the_width(monkeypatch: Any) -> None:
    from click.testing import CliRunner

    from aio_workq.cli import _dashboard_cmd
    from aio_workq.cli._app import cli

    monkeypatch.setattr(web, "run_app", lambda app, **kw: None)
    monkeypatch.setattr(_dashboard_cmd, "check_broker", lambda url: None, raising=False)
    long_url = "amqp://guest:pw@" + "a-rather-long-host-name." * 4 + "example:5672/vhost"
    result = CliRunner().invoke(
        cli, ["dashboard", "--url", long_url, "--no-management", "--port", "0"]
    )
    line = next(x for x in result.stderr.splitlines() if x.startswith("aio-workq dashboard on"))
    assert line.endswith("read-only"), result.stderr


async def test_without_queue_names_an_unreachable_broker_is_said_so() -> None:
    dashboard = Dashboard(url=NOWHERE, management_url="")
    try:
        _, page, _ = await get(dashboard, "/")
    finally:
        await dashboard.close()
    assert "cannot connect to amqp://guest:***@127.0.0.1:1/" in page
    assert "no worker has named a queue" not in page and "s3cret-pass" not in page


@pytest.mark.usefixtures("restored_loggers")
def test_a_port_in_use_is_one_error_line_naming_it_and_nothing_says_it_serves(
    monkeypatch: Any,
) -> None:
    # It printed "aio-workq dashboard on http://127.0.0.1:PORT/" and then aiohttp's
    # "[Errno 98] error while attempting to bind on address ...", with no hint.
    import socket

    from click.testing import CliRunner

    from aio_workq.cli import _dashboard_cmd
    from aio_workq.cli._app import cli

    served: list[Any] = []
    monkeypatch.setattr(web, "run_app", lambda app, **kw: served.append(kw))
    monkeypatch.setattr(_dashboard_cmd, "check_broker", lambda url: None, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            cli, ["dashboard", "--url", NOWHERE, "--no-management", "--port", str(port)]
        )
    assert result.exit_code == 1 and served == [], result.output
    assert str(result.exception) == (
        f"cannot listen on 127.0.0.1:{port}: Address already in use; give another --port "
        "(or --host)"
    )
    assert "aio-workq dashboard on" not in result.stderr


@pytest.mark.usefixtures("restored_loggers")
def test_port_0_says_the_port_it_listens_on(monkeypatch: Any) -> None:
    # `--port 0` printed "aio-workq dashboard on http://127.0.0.1:0/": no way to find it.
    from click.testing import CliRunner

    from aio_workq.cli import _dashboard_cmd
    from aio_workq.cli._app import cli

    served: list[int] = []
    monkeypatch.setattr(
        web, "run_app", lambda app, **kw: served.append(kw["sock"].getsockname()[1])
    )
    monkeypatch.setattr(_dashboard_cmd, "check_broker", lambda url: None, raising=False)
    result = CliRunner().invoke(
        cli, ["dashboard", "--url", NOWHERE, "--no-management", "--port", "0"]
    )
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stderr.splitlines() if x.startswith("aio-workq dashboard on"))
    port = served[0]
    assert port != 0 and f"http://127.0.0.1:{port}/" in line, line
