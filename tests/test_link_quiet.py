"""aiormq's per-attempt log filter: installed when a Connection opens, once, not at import."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import asyncio, logging, socket
import aio_workq
from aio_workq._link.quiet import QuietAttempts

logger = logging.getLogger("aiormq.connection")
print(sum(isinstance(f, QuietAttempts) for f in logger.filters))
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

async def main():
    for _ in range(2):
        try:
            await aio_workq.connect(f"amqp://guest:guest@127.0.0.1:{port}/", timeout=1)
        except aio_workq.BrokerConnectionError:
            pass

asyncio.run(main())
print(sum(isinstance(f, QuietAttempts) for f in logger.filters))
"""


def test_the_filter_is_installed_by_the_first_connection_and_only_once() -> None:
    # A process of its own: this one's aiormq logger has seen other tests' connections.
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out == ["0", "1"], out
