"""Run an isolated local PostgreSQL node (Debian's postgresql) for tests, demos and benchmarks.

Everything the node needs lives in one directory: the cluster (``data/``), its Unix socket, its
log (``postgres.log``) and ``state.json`` (the port, so another process can stop it). The node
listens on 127.0.0.1 only, on a port of its own, with trust authentication for the ``postgres``
user: a throwaway for tests, not a server to keep data in.

PostgreSQL refuses to run as root, so as root the server tools run as the package's ``postgres``
user (``runuser -u postgres``) and the directory is handed to that user.

CLI::

    python -m scripts.postgres start --dir .postgres/dev [--port N]
    python -m scripts.postgres status --dir .postgres/dev
    python -m scripts.postgres stop --dir .postgres/dev
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from scripts._testing import nodekit

log = logging.getLogger(__name__)

PG_ROOT = Path("/usr/lib/postgresql")
RUN_AS = "postgres"  # the system user Debian's package creates
HOW_TO_GET_ONE = (
    "install it with `sudo apt-get install postgresql` (Debian/Ubuntu), or use a running server "
    "instead: set AIO_WORKQ_POSTGRES_DSN for the tests "
    "(e.g. postgresql://postgres@localhost:5432/postgres)"
)
_STATE_KEYS = ("port",)


class PostgresError(RuntimeError):
    """A local PostgreSQL node could not be installed, started, stopped or queried."""


def bin_dir() -> Path | None:
    """The newest installed server's bin directory (``/usr/lib/postgresql/N/bin``), or None."""
    found = [p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()]
    if not found:
        return None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def ensure_installed() -> Path:
    """Install Debian's postgresql if it is missing (only as root); returns its bin directory."""
    found = bin_dir()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise PostgresError(f"PostgreSQL is not installed (no {PG_ROOT}/*/bin): {HOW_TO_GET_ONE}")
    log.warning("PostgreSQL is missing: installing postgresql with apt-get")
    failed = nodekit.apt_install("postgresql")  # its chatter goes to stderr, not to the DSN
    if failed is not None:
        raise PostgresError(f"`{failed}` failed: {HOW_TO_GET_ONE}")
    found = bin_dir()
    if found is None:
        raise PostgresError(f"postgresql was installed but {PG_ROOT}/*/bin/initdb is missing")
    return found


def _children(pid: int) -> list[int]:
    """The pids whose parent is `pid`."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            found.append(int(stat_file.parent.name))
    return found


@dataclass
class LocalPostgres:
    """One PostgreSQL node whose whole state lives in ``base_dir``; data survives stop()/start()."""

    base_dir: Path
    port: int = 0

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).resolve()

    # --- paths and settings ---------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "postgres.log"

    @property
    def dsn(self) -> str:
        """A libpq URL for the ``postgres`` superuser and database (trust auth, no password)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """initdb on first use, then start the server and wait until it accepts connections."""
        if self.running():
            return
        t0 = time.monotonic()
        bindir = ensure_installed()
        self._prepare_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                bindir / "initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres",
                "-E", "UTF8", "--no-sync", timeout=timeout,
            )  # fmt: skip
        if not self.port or not self._port_free(self.port):
            self.port = nodekit.free_port()
        options = (
            f"-p {self.port} -k {self.base_dir} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200"
        )
        try:
            self._run(
                bindir / "pg_ctl", "-D", str(self.data_dir), "-o", options, "-l",
                str(self.log_file), "-w", "-t", str(int(timeout)), "start", timeout=timeout + 5,
            )  # fmt: skip
        except PostgresError as e:
            raise PostgresError(
                f"{e}\n{nodekit.tail(self.log_file)}\n"
                f"If PostgreSQL itself is the problem, {HOW_TO_GET_ONE}."
            ) from None
        self.save_state()
        log.info("PostgreSQL up on %s in %.1fs", self.dsn, time.monotonic() - t0)

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown (rolls back open transactions); idempotent. The data is kept."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        bindir = bin_dir()
        if bindir is not None:
            try:
                self._run(
                    bindir / "pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t",
                    str(int(timeout)), "stop", timeout=timeout + 5,
                )  # fmt: skip
            except PostgresError as e:
                log.warning("pg_ctl stop failed (%s): SIGKILL", e)
        if nodekit.alive(pid):
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server and its processes (a crash); start() recovers from the WAL."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        pids = [pid, *_children(pid)]
        for each in pids:
            nodekit.send_signal(each, signal.SIGKILL)
        nodekit.wait_until(lambda: not any(nodekit.alive(each) for each in pids), 10)
        # Where nothing reaps orphans, the dead postmaster stays a zombie whose pid still "runs"
        # for the next postmaster's lock checks; every process of the node is gone by now.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        (self.base_dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- queries --------------------------------------------------------------------------

    def postmaster_pid(self) -> int | None:
        """The running server's pid (first line of ``data/postmaster.pid``), or None."""
        return nodekit.read_pid(self.data_dir / "postmaster.pid")

    def running(self) -> bool:
        if self.postmaster_pid() is None or not self.port:
            return False
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    # --- state file (lets another process stop or query the node) -------------------------

    def save_state(self) -> None:
        nodekit.write_state(
            self.base_dir / "state.json", {k: getattr(self, k) for k in _STATE_KEYS}
        )

    @classmethod
    def from_dir(cls, base_dir: Path) -> LocalPostgres:
        """The node whose state.json is in base_dir (raises PostgresError if there is none)."""
        state = nodekit.read_state(Path(base_dir) / "state.json", PostgresError, "PostgreSQL")
        return cls(Path(base_dir), **{k: state[k] for k in _STATE_KEYS if k in state})

    # --- internals ------------------------------------------------------------------------

    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _prepare_dir(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if not self._as_root():
            return
        # The server runs as `postgres`: it must own the node's directory and reach it.
        shutil.chown(self.base_dir, RUN_AS, RUN_AS)
        self.base_dir.chmod(0o700)
        for path in [self.base_dir, *self.base_dir.parents]:
            if path.stat().st_mode & 0o001 == 0 and path != self.base_dir:
                raise PostgresError(
                    f"the `{RUN_AS}` user cannot reach {self.base_dir}: {path} is not searchable "
                    f"by others (mode {path.stat().st_mode & 0o777:o}); choose a directory "
                    "elsewhere, e.g. under /tmp"
                )

    def _run(self, *cmd: str | Path, timeout: float) -> str:
        argv = [str(c) for c in cmd]
        if self._as_root():
            argv = ["runuser", "-u", RUN_AS, "--", *argv]
        return nodekit.run_tool(
            argv,
            label=f"{Path(str(cmd[0])).name} {argv[-1]}",
            error=PostgresError,
            cwd=self.base_dir,
            timeout=timeout,
        )

    @staticmethod
    def _port_free(port: int) -> bool:
        with socket.socket() as s:
            # as the server binds it: a port whose last connections linger in TIME_WAIT
            # (a node killed, then started again on its port) is free
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.postgres", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=Path(".postgres/dev"), help="node directory")
    parser.add_argument("--port", type=int, default=0, help="TCP port (start; default: free)")
    parser.add_argument("--timeout", type=float, default=30, help="seconds (start/stop)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        if args.command == "start":
            try:
                node = LocalPostgres.from_dir(args.dir)
            except PostgresError:
                node = LocalPostgres(args.dir)
            if args.port and not node.running():
                node.port = args.port
            node.start(timeout=args.timeout)
            print(node.dsn)
            return 0
        if not (args.dir / "state.json").exists():
            print(f"no PostgreSQL node in {args.dir}")
            return 0 if args.command == "stop" else 1
        node = LocalPostgres.from_dir(args.dir)
        if args.command == "stop":
            node.stop(timeout=args.timeout)
            print(f"stopped PostgreSQL in {node.base_dir}")
            return 0
        up = node.running()
        print(f"PostgreSQL in {node.base_dir}: {'running' if up else 'stopped'}, {node.dsn}")
        return 0 if up else 1
    except PostgresError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
