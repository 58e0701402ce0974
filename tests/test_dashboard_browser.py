"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium against the
session's broker (scripts/browser.py finds or installs it).

The fast ones run with the suite (`make check`); those marked `browser_full` run in
`make dashboard-test`. With `AIO_WORKQ_SCREENSHOTS=1`, the run saves a screenshot of each page
to docs/img/dashboard_*.png (the docs' images; CI leaves them alone).

Selenium's calls block, so each runs in a thread (`asyncio.to_thread`) while the dashboard is
served on the test's own loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
from aiohttp import web
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from aio_workq import Job, Producer, Worker
from aio_workq.dashboard import Dashboard, Security, aiohttp_app
from aio_workq.jobs import JobState, MemoryStore, Write
from aio_workq.schedules import Schedule, Scheduler
from scripts.browser import BrowserError, ensure_installed
from tests.helpers import queue_depth
from tests.servers import serve_aiohttp
from tests.test_dashboard import EVIL, TOKEN, make_dead_letters

pytestmark = [pytest.mark.browser, pytest.mark.broker]

T = TypeVar("T")
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "img"
WAIT = 20.0


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    try:
        browser = ensure_installed()
    except BrowserError as exc:
        pytest.fail(str(exc))
    options = webdriver.ChromeOptions()
    options.binary_location = str(browser.chromium)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,900"):  # fmt: skip
        options.add_argument(flag)
    chrome = webdriver.Chrome(
        options=options, service=Service(executable_path=str(browser.chromedriver))
    )
    try:
        yield chrome
    finally:
        chrome.quit()


async def run(func: Callable[[], T]) -> T:
    """A blocking Selenium step, off the loop that serves the dashboard."""
    return await asyncio.to_thread(func)


def until(chrome: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    return WebDriverWait(chrome, WAIT, poll_frequency=0.2).until(condition, what)


def shot(chrome: WebDriver, name: str) -> None:
    if os.environ.get("AIO_WORKQ_SCREENSHOTS") == "1":
        chrome.set_window_size(1280, 900)
        height = chrome.execute_script("return document.documentElement.scrollHeight")
        chrome.set_window_size(1280, min(max(int(height) + 120, 600), 1800))
        chrome.save_screenshot(str(SHOTS / f"dashboard_{name}.png"))
        chrome.set_window_size(1280, 900)


def cell_text(chrome: WebDriver, queue: str, css: str) -> str:
    """The text of a queue row's cell, read in one script (htmx may swap the table any time)."""
    return str(chrome.execute_script(
        """const [queue, css] = arguments;
        for (const row of document.querySelectorAll('tr[data-queue]')) {
            if (row.dataset.queue === queue) {
                const cell = row.querySelector('td.' + css);
                return cell ? cell.textContent.trim() : '';
            }
        }
        return '';""", queue, css))  # fmt: skip


@asynccontextmanager
async def serve(dashboard: Dashboard) -> AsyncIterator[str]:
    root = web.Application()
    root.add_subapp("/workq", aiohttp_app(dashboard))
    async with serve_aiohttp(root) as base:
        yield base + "/workq"


def passive(amqp_url: str, queues: list[str], **kw: Any) -> Dashboard:
    """A dashboard on passive declares (the test broker has no management plugin)."""
    return Dashboard(url=amqp_url, queues=queues, management_url="", refresh=2, **kw)


# --- the fast subset (make check) --------------------------------------------------------------


async def test_queues_appear_with_their_depths_and_update_live(
    driver: WebDriver, amqp_url: str, queue_name: str
) -> None:
    async with Producer(amqp_url) as producer:
        await producer.publish_many(["a", "b", "c"], queue=queue_name)
        async with serve(passive(amqp_url, [queue_name])) as base:
            await run(lambda: driver.get(base + "/"))
            await run(lambda: until(driver, lambda d: cell_text(d, queue_name, "ready") == "3",
                                    "3 ready"))  # fmt: skip
            await producer.publish_many(["d", "e"], queue=queue_name)
            # no reload: htmx polls the fragment
            await run(lambda: until(driver, lambda d: cell_text(d, queue_name, "ready") == "5",
                                    "5 ready after the live update"))  # fmt: skip


async def test_an_action_without_the_token_is_refused(
    driver: WebDriver, amqp_url: str, queue_name: str
) -> None:
    await make_dead_letters(amqp_url, queue_name, 2)
    security = Security(allow_actions=True, tokens=(TOKEN,))
    async with serve(passive(amqp_url, [queue_name], security=security)) as base:

        def replay_unsigned() -> str:
            driver.delete_all_cookies()
            driver.get(f"{base}/dead-letters/{queue_name}")
            until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "input[name=id]"), "rows")
            driver.find_elements(By.CSS_SELECTOR, "input[name=id]")[0].click()
            driver.find_element(By.CSS_SELECTOR, "button[value=selected]").click()
            until(driver, lambda d: "Sign in first" in d.page_source, "the refusal")
            return driver.find_element(By.TAG_NAME, "main").text

        text = await run(replay_unsigned)
        assert "needs the dashboard's token" in text
    assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 2
    assert await queue_depth(amqp_url, queue_name) == 0


async def test_the_pages_fit_a_narrow_screen_and_escape_names(
    driver: WebDriver, amqp_url: str, queue_name: str
) -> None:
    async with Producer(amqp_url) as producer:
        await producer.publish("x", queue=queue_name)
    async with serve(passive(amqp_url, [queue_name])) as base:

        def narrow() -> list[tuple[str, int, int]]:
            driver.set_window_size(390, 844)
            try:
                widths = []
                for page in ("/", "/dead-letters", "/jobs", "/schedules", "/workers"):
                    driver.get(base + page)
                    widths.append((page, *driver.execute_script(
                        "return [document.body.scrollWidth, window.innerWidth]")))  # fmt: skip
                driver.get(base + "/")
                until(driver, lambda d: cell_text(d, queue_name, "ready") == "1", "the row")
                return widths
            finally:
                driver.set_window_size(1280, 900)

        widths = await run(narrow)
        assert all(scroll <= inner for _, scroll, inner in widths), widths

        def evil() -> str:  # a queue name with a script in it: a 400 page, the name as text
            driver.get(f"{base}/dead-letters/{quote(EVIL, safe='')}")
            return str(driver.find_element(By.TAG_NAME, "main").text)

        text = await run(evil)
        assert "Not an aio-workq queue" in text and EVIL in text


async def idle(job: Job) -> None:
    pass


async def test_a_worker_appears_and_disappears(
    driver: WebDriver, amqp_url: str, queue_name: str
) -> None:
    async with serve(passive(amqp_url, [queue_name])) as base:
        await run(lambda: driver.get(base + "/workers"))

        def states(d: WebDriver) -> list[str]:
            return list(d.execute_script(
                "return [...document.querySelectorAll('tr[data-worker]')].map(r => r.className);"
            ))  # fmt: skip

        async with Worker(amqp_url, queue=queue_name, handler=idle, presence_interval=0.5):
            async with Worker(amqp_url, queue=queue_name, handler=idle, presence_interval=0.5):
                await run(lambda: until(driver, lambda d: states(d) == ["alive", "alive"],
                                        "two live workers"))  # fmt: skip
            await run(lambda: until(driver, lambda d: states(d) == ["alive", "gone"],
                                    "one greyed out"))  # fmt: skip
            await run(lambda: shot(driver, "workers"))
        await run(lambda: until(driver, lambda d: states(d) == ["gone", "gone"], "both gone"))
        opacity = await run(lambda: driver.execute_script(
            "return getComputedStyle(document.querySelector('tr.gone')).opacity"))  # fmt: skip
        assert float(opacity) < 1


# --- the rest (make dashboard-test) ---------------------------------------------------------------


@pytest.mark.browser_full
async def test_a_dead_letter_is_replayed_from_the_page_and_arrives(
    driver: WebDriver, amqp_url: str, queue_name: str
) -> None:
    ids = await make_dead_letters(amqp_url, queue_name, 3)
    security = Security(allow_actions=True, tokens=(TOKEN,))
    async with serve(passive(amqp_url, [queue_name], security=security)) as base:

        def sign_in_and_replay_one() -> str:
            driver.delete_all_cookies()
            driver.get(base + "/login")
            driver.find_element(By.ID, "token").send_keys(TOKEN)
            driver.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()
            until(driver, lambda d: "Sign out" in d.page_source, "signed in")
            driver.get(f"{base}/dead-letters")
            until(driver, lambda d: cell_text(d, queue_name, "dead") == "3", "3 dead letters")
            shot(driver, "dead_letters")
            driver.get(f"{base}/dead-letters/{queue_name}")
            shot(driver, "dead_letter_list")
            driver.get(f"{base}/dead-letters/{queue_name}/{ids[0]}")
            until(driver, lambda d: "still broken" in d.page_source, "the reason")
            shot(driver, "dead_letter")
            driver.find_element(By.CSS_SELECTOR, "button[value=selected]").click()
            until(driver, lambda d: "Done: 1 replayed" in d.page_source, "the replay's end")
            shot(driver, "replay")
            return driver.find_element(By.ID, "action").text

        text = await run(sign_in_and_replay_one)
        assert "each confirmed by the broker" in text
    assert await queue_depth(amqp_url, queue_name) == 1  # it arrived
    assert await queue_depth(amqp_url, f"{queue_name}.dlq") == 2


@pytest.mark.browser_full
async def test_jobs_and_schedules_pages(driver: WebDriver, amqp_url: str, queue_name: str) -> None:
    store = MemoryStore()
    now = time.time()
    await store.record([
        Write(job_id=f"job-{i}", task="app.thumbnails.resize", queue=queue_name,
              state=JobState.FAILED, at=now - 60 * i, attempt=3, error_type="OSError",
              error_message=f"cannot read image {i}.png")
        for i in range(3)
    ] + [Write(job_id="job-ok", task="app.thumbnails.resize", queue=queue_name,
               state=JobState.SUCCEEDED, at=now, result=b'{"width": 400}',
               content_type="application/json")])  # fmt: skip
    async with serve(passive(amqp_url, [queue_name], store=store)) as base:

        def pages() -> None:
            driver.get(base + "/jobs")
            until(driver, lambda d: "job-2" in d.page_source, "recent failures")
            shot(driver, "jobs")
            driver.find_element(By.ID, "job-id").send_keys("job-ok")
            driver.find_element(By.CSS_SELECTOR, "form[role=search] button").click()
            until(driver, lambda d: "succeeded" in d.page_source, "the job")
            assert '"width": 400' in driver.find_element(By.TAG_NAME, "main").text
            shot(driver, "job")

        await run(pages)


@pytest.mark.browser_full
async def test_the_schedules_page_shows_the_active_scheduler(
    driver: WebDriver, amqp_url: str, queue_name: str
) -> None:
    group = f"test-dash-{queue_name}"
    schedules = [
        Schedule("poll-feeds", every=timedelta(seconds=1), queue=f"{queue_name}.poll"),
        Schedule("nightly-report", cron="0 3 * * *", tz="Europe/Paris",
                 queue=f"{queue_name}.reports"),
    ]  # fmt: skip
    scheduler = Scheduler(amqp_url, schedules, group=group, identity="scheduler-a")
    running = asyncio.create_task(scheduler.run())
    try:
        async with asyncio.timeout(30):
            await scheduler.wait_active()
        async with serve(passive(amqp_url, [], schedules_group=group)) as base:

            def page() -> str:
                driver.get(base + "/schedules")
                until(driver, lambda d: "scheduler-a" in d.page_source, "the active scheduler")
                until(driver, lambda d: "nightly-report" in d.page_source, "the schedules")
                shot(driver, "schedules")
                return str(driver.find_element(By.TAG_NAME, "main").text)

            text = await run(page)
            assert "poll-feeds" in text and f"{queue_name}.reports" in text
    finally:
        await scheduler.stop()
        await running


@pytest.mark.browser_full
async def test_the_overview_from_the_management_api(
    driver: WebDriver, management_broker: Any, queue_name: str
) -> None:
    url = management_broker.url
    await make_dead_letters(url, queue_name, 1)
    busy = f"{queue_name}-busy"
    handled = asyncio.Event()

    async def slow(job: Job) -> None:
        await asyncio.sleep(0.05)
        handled.set()

    async with Producer(url) as producer:
        await producer.publish_many([f"m{i}" for i in range(3)], queue=queue_name)
        await producer.publish_many([f"b{i}" for i in range(2000)], queue=busy)
        dashboard = Dashboard(url=url, management_url=management_broker.management_url, refresh=2)
        async with serve(dashboard) as base, Worker(url, queue=busy, handler=slow,
                                                     concurrency=20):  # fmt: skip
            await run(lambda: driver.get(base + "/"))
            await run(lambda: until(driver, lambda d: cell_text(d, queue_name, "ready") == "3",
                                    "3 ready (the API refreshes every 5 s)"))  # fmt: skip
            assert await run(lambda: cell_text(driver, queue_name, "dead")) == "1"
            text = await run(lambda: driver.find_element(By.TAG_NAME, "main").text)
            assert "Source: the management API at http://127.0.0.1:" in text
            assert "Throughput" in text
            await run(lambda: until(
                driver, lambda d: cell_text(d, busy, "num:last-child") not in ("", "0.0"),
                "a deliver rate",
            ))  # fmt: skip
            await run(lambda: shot(driver, "overview"))
