"""Long actions (a replay) run in the background; their page shows progress until they end.

Every action is logged (logger `aio_workq.dashboard`) with who asked and what, when it starts
and when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ("Action", "Actions", "log")

log = logging.getLogger("aio_workq.dashboard")

_KEEP = 50


@dataclass(slots=True)
class Action:
    """One action under way or done: what, by whom, how far (`done` of `total`)."""

    id: str
    what: str
    who: str
    total: int | None = None
    done: int = 0
    finished: bool = False
    error: str | None = None
    started: float = field(default_factory=time.time)
    back: str = ""
    """Where the page links when it has finished (below the mount point)."""

    def step(self, count: int) -> None:
        """`count` more items done."""
        self.done += count


class Actions:
    """The background actions of this dashboard (the last 50 kept)."""

    def __init__(self) -> None:
        self._actions: dict[str, Action] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, action_id: str) -> Action | None:
        """The action with this id."""
        return self._actions.get(action_id)

    def start(
        self,
        *,
        what: str,
        who: str,
        run: Callable[[Action], Awaitable[None]],
        total: int | None = None,
        back: str = "",
    ) -> Action:
        """Run `run(action)` in the background; `run` calls `action.step()` as it goes."""
        action = Action(secrets.token_hex(8), what, who, total=total, back=back)
        self._actions[action.id] = action
        while len(self._actions) > _KEEP:
            oldest = next(iter(self._actions))
            if not self._actions[oldest].finished:
                break
            del self._actions[oldest]
        log.info("action %s started: %s, by %s", action.id, what, who)
        task = asyncio.create_task(self._run(action, run), name=f"workq-dashboard {what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return action

    async def _run(self, action: Action, run: Callable[[Action], Awaitable[None]]) -> None:
        try:
            await run(action)
        except asyncio.CancelledError:
            action.error = "stopped: the dashboard was shut down"
            raise
        except Exception as exc:  # shown on the action's page and logged
            action.error = f"{type(exc).__name__}: {exc}"
        finally:
            action.finished = True
            log.info(
                "action %s ended: %s, by %s: %d done%s",
                action.id, action.what, action.who, action.done,
                f", failed: {action.error}" if action.error else "",
            )  # fmt: skip

    async def close(self) -> None:
        """Stop the actions under way. A replay stopped leaves every dead letter in one of the
        two queues (one whose copy was confirmed but not yet acked: in both)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except asyncio.CancelledError:
                pass
