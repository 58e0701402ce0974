"""Fixtures of the fault suite, and the table of its figures at the end of the session."""

from __future__ import annotations

import pytest

from tests.chaos.ledger import RESULTS, ROWS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    terminalreporter.section("fault suite ledger")
    for row in ROWS:
        terminalreporter.write_line(row.line())
    terminalreporter.write_line(
        f"(appended to {RESULTS}; `python -m scripts.chaos_table` tabulates)"
    )
