"""The local-PostgreSQL helper (scripts/postgres.py) the outbox tests run on."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from scripts.postgres import LocalPostgres, PostgresError, main

pytestmark = pytest.mark.postgres


@pytest.fixture
def node_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="aio-workq-pg-script-"))
    yield path
    try:
        LocalPostgres.from_dir(path).stop()
    except PostgresError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def test_cli_start_status_stop_and_data_survives_a_restart(
    node_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["start", "--dir", str(node_dir)]) == 0
    dsn = capsys.readouterr().out.strip()
    assert dsn.startswith("postgresql://postgres@127.0.0.1:")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
    assert main(["status", "--dir", str(node_dir)]) == 0
    assert "running" in capsys.readouterr().out

    assert main(["stop", "--dir", str(node_dir)]) == 0
    assert main(["status", "--dir", str(node_dir)]) == 1
    assert "stopped" in capsys.readouterr().out

    node = LocalPostgres.from_dir(node_dir)
    node.start()
    with psycopg.connect(node.dsn) as conn:
        assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
    node.kill()
    assert not node.running()
    node.start()  # crash recovery from the WAL
    with psycopg.connect(node.dsn) as conn:
        assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]


def test_status_of_a_directory_without_a_node(node_dir: Path) -> None:
    assert main(["status", "--dir", str(node_dir / "none")]) == 1
    assert main(["stop", "--dir", str(node_dir / "none")]) == 0
    with pytest.raises(PostgresError, match="start one first"):
        LocalPostgres.from_dir(node_dir / "none")
