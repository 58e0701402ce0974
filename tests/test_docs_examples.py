"""The runnable examples the docs include (docs/examples/*.py) still run, end to end.

Each one runs as a script against the test broker; it must exit 0, print something, print what
its page says it prints (where the page shows its output), and delete every queue it declared.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from scripts.broker import LocalBroker

pytestmark = pytest.mark.broker

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))
SHARED = "workq.delay."  # the delay ladder, shared by every delayed publish on the vhost: it stays
# The examples whose output a page shows: the first ```text block after the page names them.
OUTPUT_SHOWN = {"quickstart": "docs/quickstart.md", "retries": "docs/guides/retries.md"}


def shown_output(page: str, script: str) -> list[str]:
    """The lines of the ```text block that follows the first mention of `script` in `page`."""
    text = (ROOT / page).read_text(encoding="utf-8")
    after = text[text.index(f"examples/{script}.py") :]
    block = re.search(r"^```text\n(.*?)^```", after, re.MULTILINE | re.DOTALL)
    assert block, f"{page}: no ```text block after examples/{script}.py"
    return block[1].splitlines()


def matches(shown: list[str], printed: list[str]) -> list[str]:
    """The shown lines (`…` standing for any text) that no printed line matches one-to-one,
    in any order (concurrent handlers print in any order), and the printed lines left over."""
    left = list(printed)
    missing: list[str] = []
    for line in shown:
        pattern = re.compile(".*".join(re.escape(part) for part in line.split("…")))
        hit = next((p for p in left if pattern.fullmatch(p)), None)
        if hit is None:
            missing.append(f"shown, not printed: {line}")
        else:
            left.remove(hit)
    return missing + [f"printed, not shown: {line}" for line in left]


def queue_names(broker: LocalBroker | None) -> set[str] | None:
    """Every queue on the session's own node; None with an outside broker (no rabbitmqctl)."""
    if broker is None:
        return None
    return {q["name"] for q in broker.queues() if not q["name"].startswith(SHARED)}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.stem)
async def test_docs_example_runs(amqp_url: str, broker: LocalBroker | None, script: Path) -> None:
    before = await asyncio.to_thread(queue_names, broker)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), env={**os.environ, "AMQP_URL": amqp_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = out.decode()
    assert proc.returncode == 0, output + err.decode()
    assert output.strip(), "the example printed nothing"

    if script.stem in OUTPUT_SHOWN:
        page = OUTPUT_SHOWN[script.stem]
        assert not matches(shown_output(page, script.stem), output.splitlines()), (
            f"{page} shows other output than {script.name} prints:\n"
            + "\n".join(matches(shown_output(page, script.stem), output.splitlines()))
        )
    after = await asyncio.to_thread(queue_names, broker)
    if before is not None and after is not None:  # with the session's own node
        assert sorted(after - before) == [], f"{script.name} left queues behind"
