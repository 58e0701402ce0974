"""Node-level helpers shared by the local servers: processes, ports, files and state.

What the local RabbitMQ node (`_broker.py`), the repository's 3-node cluster
(`scripts/cluster.py`) and its PostgreSQL node (`scripts/postgres.py`) all need: start a server
process in a session of its own with its output in a log file, tell whether a pid still runs,
signal it, wait for a condition, pick free loopback ports, write a cookie, keep ``state.json``
so that another process can find the node, and install a missing Debian package.

Standard library only: the scripts load this file also without the package's dependencies.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = (
    "alive",
    "apt_install",
    "free_port",
    "pick_ports",
    "read_pid",
    "read_state",
    "run_tool",
    "send_signal",
    "spawn",
    "tail",
    "terminate",
    "wait_until",
    "write_cookie",
    "write_state",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pick_ports(node: object, attrs: tuple[str, ...], taken: set[int] | None = None) -> None:
    """Give each port attribute of node that is 0 (or already in taken) a free port.

    The ports chosen are added to taken, so that nodes started side by side get distinct ones.
    """
    taken = set() if taken is None else taken
    for attr in attrs:
        port = getattr(node, attr)
        while not port or port in taken:
            port = free_port()
        taken.add(port)
        setattr(node, attr, port)


def alive(pid: int | None, comm: str | None = None) -> bool:
    """Whether pid runs (and is named comm, if given); a zombie counts as gone."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, rest = stat.split(" (", 1)[1].rsplit(") ", 1)
    return rest[0] != "Z" and (comm is None or name == comm)


def read_pid(path: Path, comm: str | None = None) -> int | None:
    """The pid on the first line of a pid file, if that process runs (as comm, if given)."""
    try:
        pid = int(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid, comm) else None


def send_signal(pid: int | None, sig: signal.Signals) -> None:
    """Send sig to pid, if there is a pid and it still exists."""
    if pid:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_until(done: Callable[[], bool], timeout: float) -> bool:
    """Poll done every 50 ms until it is true (True) or timeout seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def terminate(pid: int | None, comm: str, timeout: float = 5) -> None:
    """SIGTERM pid if it runs as comm, and wait up to timeout seconds for it to go."""
    if alive(pid, comm):
        send_signal(pid, signal.SIGTERM)
        wait_until(lambda: not alive(pid), timeout)


def spawn(
    cmd: list[str],
    log_file: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start cmd in a session of its own (so its process group can be killed as one), its
    stdout and stderr appended to log_file, its stdin closed."""
    with log_file.open("ab") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_tool(
    argv: list[str],
    *,
    label: str,
    error: Callable[[str], Exception],
    cwd: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run a server's command-line tool to completion; returns its stdout.

    Raises:
        Exception: `error(message)` if it timed out or exited non-zero; the message names it as
            label and carries its stderr (or stdout).
    """
    try:
        res = subprocess.run(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise error(f"`{label}` timed out after {timeout}s") from e
    if res.returncode != 0:
        raise error(
            f"`{label}` failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()}"
        )
    return res.stdout


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file, headed by its path, for an error message."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"({path} not found)"
    return f"--- last lines of {path} ---\n" + "\n".join(text)


def write_cookie(path: Path, value: str | None = None) -> str:
    """The Erlang cookie in path, written (read-only, a fresh random one unless value is given)
    if the file does not exist yet."""
    if not path.exists():
        path.write_text(value if value is not None else secrets.token_hex(16).upper())
        path.chmod(0o400)
    return path.read_text()


def write_state(path: Path, state: Mapping[str, Any]) -> None:
    """Write a node's state (ports, pids) as JSON, for another process to find the node."""
    path.write_text(json.dumps(state, indent=1) + "\n")


def read_state(path: Path, error: Callable[[str], Exception], what: str) -> dict[str, Any]:
    """The state written by `write_state`.

    Raises:
        Exception: `error(message)` if path is missing or not JSON (message says to start a
            `what` first).
    """
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise error(f"no {what} state in {path} ({e}): start one first") from e
    return state


def apt_install(package: str) -> str | None:
    """`apt-get update` and `apt-get install -y package`; None on success, else the command
    that failed. Its output goes to stderr, so that a CLI's stdout stays clean."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", package]):
        if subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=2).returncode != 0:
            return " ".join(cmd)
    return None
