"""The CLI keeps aiormq's and aio-pika's log lines off stderr without losing what aio-workq
reads from them: a broker's block of publishers (reliance 9 of `_wire/seams.py`)."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

from aio_workq._wire import seams
from aio_workq.cli._app import cli


class _Conn:  # a stand-in for the aiormq connection a record names (weak-referenceable)
    pass


@pytest.mark.usefixtures("restored_loggers")
def test_a_command_other_than_worker_still_notes_a_block_and_prints_no_aiormq_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Any command that isn't `worker` (this one stops at its first check, without a broker).
    result = CliRunner().invoke(cli, ["dashboard", "--allow-actions", "--url", "amqp://nowhere/"])
    assert result.exit_code != 0
    from aio_workq._link import quiet

    quiet.install()  # as the first Connection does
    connection = _Conn()
    caplog.set_level(logging.DEBUG)
    logging.getLogger("aiormq.connection").warning(
        "Connection %r was blocked by: %r", connection, "low on memory"
    )
    assert seams.blocked_reason(connection) == "low on memory"
    assert not [r for r in caplog.records if r.name.startswith("aiormq")]
