"""Schedules hosted by the FastAPI and aiohttp apps: `Workq(..., schedules=[...])`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from datetime import timedelta

import httpx
import pytest
from aiohttp import web
from fastapi import FastAPI

from aio_workq import ConfigurationError, Worker
from aio_workq import aiohttp as workq_aiohttp
from aio_workq import fastapi as workq_fastapi
from aio_workq._web import Integration
from aio_workq.schedules import Schedule, Scheduler
from tests.servers import serve_aiohttp, serve_asgi
from tests.test_schedules import SECOND, Ticks, assert_contiguous

FRAMEWORKS = ("fastapi", "aiohttp")


@pytest.fixture
def group() -> str:
    return f"test-schedweb-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def ticks(amqp_url: str, group: str) -> AsyncIterator[Ticks]:
    recorder = Ticks()
    async with Worker(amqp_url, queue=f"{group}.poll", handler=recorder.handler):
        yield recorder


def app_of(framework: str, url: str, group: str, identity: str) -> tuple[Integration, object]:
    """An app of `framework` hosting a 1-second schedule; a route says whether it is active."""
    scheduler = Scheduler(
        url,
        [Schedule("poll", every=SECOND, queue=f"{group}.poll")],
        group=group,
        identity=identity,
    )
    if framework == "fastapi":
        fastapi_workq = workq_fastapi.Workq(url, schedules=scheduler)
        app = FastAPI(lifespan=fastapi_workq.lifespan)

        @app.get("/scheduler")
        async def status() -> dict[str, bool]:
            assert fastapi_workq.scheduler is not None
            return {"active": fastapi_workq.scheduler.active}

        return fastapi_workq, app
    aiohttp_workq = workq_aiohttp.Workq(url, schedules=scheduler)
    aiohttp_app = web.Application()
    aiohttp_workq.setup(aiohttp_app)

    async def aiohttp_status(request: web.Request) -> web.Response:
        assert aiohttp_workq.scheduler is not None
        return web.json_response({"active": aiohttp_workq.scheduler.active})

    aiohttp_app.router.add_get("/scheduler", aiohttp_status)
    return aiohttp_workq, aiohttp_app


def serve(framework: str, app: object) -> AbstractAsyncContextManager[str]:
    if framework == "fastapi":
        return serve_asgi(app)
    assert isinstance(app, web.Application)
    return serve_aiohttp(app)


async def is_active(base: str) -> bool:
    async with httpx.AsyncClient(base_url=base) as client:
        response = await client.get("/scheduler")
        assert response.status_code == 200, response.text
        return bool(response.json()["active"])


@pytest.mark.broker
@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_closing_the_active_app_hands_the_schedule_to_the_other_without_a_lost_tick(
    framework: str, amqp_url: str, group: str, ticks: Ticks
) -> None:
    made = [app_of(framework, amqp_url, group, f"app-{n}") for n in (1, 2)]
    stacks = [AsyncExitStack(), AsyncExitStack()]
    try:
        bases = [
            await stack.enter_async_context(serve(framework, app))
            for stack, (_, app) in zip(stacks, made, strict=True)
        ]
        schedulers = [integration.scheduler for integration, _ in made]
        assert schedulers[0] is not None and schedulers[1] is not None
        async with asyncio.timeout(30):
            while not any(s.active for s in schedulers if s is not None):
                await ticks.wait_for(len(ticks.seen) + 1)
        await ticks.wait_for(len(ticks.seen) + 2)
        flags = [await is_active(base) for base in bases]
        assert sorted(flags) == [False, True], flags  # exactly one of the two apps fires
        active = flags.index(True)
        standby = schedulers[1 - active]
        assert standby is not None
        await stacks[active].aclose()  # the app shuts down: its lifespan stops the scheduler
        async with asyncio.timeout(30):
            await standby.wait_active()
        assert await is_active(bases[1 - active])
        count = len(ticks.seen)
        await ticks.wait_for(count + 3)
    finally:
        for stack in stacks:
            await stack.aclose()
    assert max(ticks.seen.values()) == 1, ticks.seen
    assert_contiguous(ticks.due_times())
    assert all(s is not None and not s.active for s in schedulers)


def test_schedules_are_checked_when_the_integration_is_made() -> None:
    poll = Schedule("poll", every=timedelta(seconds=1), queue="poll")
    for make in (workq_fastapi.Workq, workq_aiohttp.Workq):
        workq = make("amqp://127.0.0.1/", schedules=[poll])
        assert workq.scheduler is not None and list(workq.scheduler.schedules) == ["poll"]
        assert make("amqp://127.0.0.1/", schedules=poll).scheduler is not None
        assert make("amqp://127.0.0.1/").scheduler is None
        own = Scheduler("amqp://127.0.0.1/", [poll])
        assert make("amqp://127.0.0.1/", schedules=own).scheduler is own
        with pytest.raises(ConfigurationError, match="two schedules named 'poll'"):
            make("amqp://127.0.0.1/", schedules=[poll, poll])
        with pytest.raises(ConfigurationError, match="expected a Schedule"):
            make("amqp://127.0.0.1/", schedules=["poll"])  # type: ignore[list-item]
        with pytest.raises(ConfigurationError, match="schedules= must be"):
            make("amqp://127.0.0.1/", schedules=3)  # type: ignore[arg-type]
