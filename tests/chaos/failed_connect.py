"""Run in a process of its own: does a failed connect leave anything running?

    python -m tests.chaos.failed_connect AMQP_URL

Prints one JSON line: `error` (the class the connect raised), `connected_after` (connections the
proxy accepted once the network was back) and `tasks_left` (tasks still running), then exits hard,
so that a leaked reconnect loop cannot hold up the test session.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from aio_workq import Producer
from tests.faultproxy import FaultProxy


async def main(url: str) -> None:
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    async with FaultProxy(upstream_port=port) as proxy:
        before = asyncio.all_tasks()
        proxy.black_hole()
        error = "none"
        try:
            await Producer(proxy.url(url), connect_timeout=1).start()
        except Exception as exc:
            error = type(exc).__name__
        accepted = proxy.accepted
        proxy.heal()
        try:  # whatever is left would connect now that the network is back
            async with asyncio.timeout(3):
                await proxy.wait_accepted(accepted + 1)
        except TimeoutError:
            pass
        left = [t for t in asyncio.all_tasks() - before if not t.done()]
        result = {
            "error": error,
            "connected_after": proxy.accepted - accepted,
            "tasks_left": len(left),
        }
        print(json.dumps(result), flush=True)  # noqa: T201
        os._exit(0)  # no teardown: a leak must not hold the process


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
