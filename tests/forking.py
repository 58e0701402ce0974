"""A forked child running a coroutine on an event loop of its own, for the tests of objects
used before `fork()` (a pre-forking server that loaded the app, then forked its workers)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any


class Forked:
    """The child `fork_running` started: `wait()` for it and check it succeeded."""

    def __init__(self, pid: int, read: int) -> None:
        self.pid = pid
        self._read = read

    async def wait(self) -> None:
        """Wait for the child to exit (in a thread: the parent's loop goes on).

        Raises:
            AssertionError: it failed; the message is what it raised.
        """
        _, status = await asyncio.to_thread(os.waitpid, self.pid, 0)
        why = os.read(self._read, 600).decode(errors="replace")
        os.close(self._read)
        assert os.waitstatus_to_exitcode(status) == 0, why


def fork_running(child: Callable[[], Coroutine[Any, Any, None]], *, timeout: float) -> Forked:
    """Fork; the child runs `child()` within `timeout` seconds on a new event loop and exits
    (0 if it returned, 1 with what it raised written to the parent); the parent goes on."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            asyncio.run(asyncio.wait_for(child(), timeout))
            code = 0
        except BaseException as exc:  # noqa: B036 - reported to the parent
            os.write(write, repr(exc).encode()[:500])
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(write)
    return Forked(pid, read)
