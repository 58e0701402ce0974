"""The enqueues' batched `queued` records (`GroupCommit`) across `fork()`: a pre-forking
server (gunicorn `--preload`) whose app enqueued before the fork, with a `SyncProducer`'s
loop thread that may be adding its loop's batches at the moment of the fork."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from aio_workq.jobs import JobState, SQLiteStore, Tasks, Write
from tests.forking import fork_running


async def test_a_child_forked_while_another_thread_held_the_batches_lock_records_its_enqueues(
    tmp_path: Path,
) -> None:
    """The lock guarding the registry's batches per event loop was the parent's: forked
    while another thread held it (a loop thread making its batches), the child's first
    enqueue waited on it forever (the thread that would release it does not exist there)."""
    store = SQLiteStore(tmp_path / "jobs.db")
    tasks = Tasks(store=store)
    commits = tasks.commits(store)

    def write(job_id: str) -> Write:
        return Write(job_id=job_id, task="t", queue="q", state=JobState.QUEUED, at=time.time())

    # The parent's own loop recorded before the fork (its batches are the parent's).
    await commits.record(write("parent"))
    held, release = threading.Event(), threading.Event()

    def holder() -> None:  # a SyncProducer's loop thread, making its batches
        with commits._lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)

    async def child() -> None:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a deadlocked child is killed,
        signal.alarm(20)  # not left behind
        await commits.record(write("child"))
        await commits.close()
        status = await store.get("child")
        assert status is not None and status.status.state is JobState.QUEUED, status
        await store.close()

    try:
        forked = fork_running(child, timeout=10)
    finally:
        release.set()
        thread.join()
    await forked.wait()
    await commits.record(write("parent-after"))  # the parent's go on
    await commits.close()
    assert await store.get("parent-after") is not None
    await store.close()
