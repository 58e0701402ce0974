"""The bench's CPU per process counts its own nodes only (`harness.watch_nodes`): on a machine
shared with other brokers and databases, the processes of the same name are someone else's."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from bench import harness

# A process named `postgres` (its comm, which psutil reports) that spins for CPU time; with a
# port, it listens there first (a node of "ours"). It prints "ready" once it has spun.
_SPIN = """
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"postgres", 0, 0, 0)  # PR_SET_NAME
port = int(sys.argv[1])
if port:
    s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen()
spin = float(sys.argv[2])
end = time.process_time() + spin
while time.process_time() < end:
    pass
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def spinners() -> Iterator[list[subprocess.Popen[str]]]:
    made: list[subprocess.Popen[str]] = []
    yield made
    for process in made:
        process.kill()
        process.communicate()  # closes its pipes
    harness._NODES.clear()


def _spin(made: list[subprocess.Popen[str]], port: int, seconds: float) -> int:
    process = subprocess.Popen(
        [sys.executable, "-c", _SPIN, str(port), str(seconds)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    made.append(process)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"  # spun (the pipe read has a timeout: 30 s)
    return process.pid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.timeout(30)
def test_cpu_seconds_counts_the_watched_node_not_others_of_its_name(
    spinners: list[subprocess.Popen[str]],
) -> None:
    port = _free_port()
    ours = _spin(spinners, port, 0.2)
    other = _spin(spinners, 0, 1.0)  # someone else's "postgres" on the same machine

    found = harness.watch_nodes(postgres=port, broker=None)

    assert found == {"postgres": [ours], "broker": []}
    counted = harness.cpu_seconds()["postgres"]
    mine = psutil.Process(ours).cpu_times()
    theirs = psutil.Process(other).cpu_times()
    assert counted == pytest.approx(mine.user + mine.system, abs=0.05)
    assert counted < theirs.user + theirs.system
    assert harness.cpu_seconds()["broker"] == 0.0  # a node elsewhere counts 0
