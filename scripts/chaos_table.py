"""Turn the fault suite's results file into a Markdown table (the latest row of each scenario).

python -m scripts.chaos_table [.chaos/results.jsonl] [--all]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HEADER = (
    "| scenario | confirmed | processed | dead-lettered | lost | duplicates | typed errors "
    "| recover (s) | longest call (s) | run (s) |\n"
    "|---|--:|--:|--:|--:|--:|---|--:|--:|--:|"
)


def row(r: dict[str, Any]) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none"
    recover = "-" if r["recover_s"] is None else f"{r['recover_s']:.1f}"
    longest = r.get("longest_s") or 0.0
    return (
        f"| {r['scenario']} | {r['confirmed']:,} | {r['processed']:,} | {r['dead_lettered']:,} "
        f"| {r['lost']} | {r['duplicates']:,} | {errors} | {recover} | {longest:.1f} "
        f"| {r['seconds']:.0f} |"
    )


def table(rows: list[dict[str, Any]], *, latest: bool = True) -> str:
    if latest:  # the last row of each scenario, in the order scenarios first appeared
        by_name: dict[str, dict[str, Any]] = {}
        for r in rows:
            by_name.pop(r["scenario"], None)
            by_name[r["scenario"]] = r
        rows = list(by_name.values())
    dates = sorted({r["date"] for r in rows})
    when = f"Run of {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "") if dates else ""
    return "\n".join([when, "", HEADER, *(row(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.chaos_table", description=__doc__)
    parser.add_argument("path", nargs="?", type=Path, default=Path(".chaos/results.jsonl"))
    parser.add_argument("--all", action="store_true", help="every row, not the latest per scenario")
    args = parser.parse_args(argv)
    try:
        lines = args.path.read_text().splitlines()
    except OSError as e:
        print(f"no results in {args.path} ({e}): run `make chaos` first", file=sys.stderr)
        return 1
    print(table([json.loads(line) for line in lines if line.strip()], latest=not args.all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
