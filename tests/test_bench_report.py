"""The benchmarks page is generated whole: no hand-written section is lost when it is rewritten."""

from __future__ import annotations

from bench import report
from bench.runner import REPO_ROOT

DOC = REPO_ROOT / "docs" / "benchmarks.md"


def test_where_the_time_goes_and_the_offline_profile_come_from_the_generator() -> None:
    text = "\n".join(report.where_the_time_goes())
    assert text.startswith("## Where the time goes\n")
    assert "### Per message, offline: where the client's own CPU goes (#22)" in text
    page = DOC.read_text()
    assert text in page  # the page holds what the generator writes, word for word
