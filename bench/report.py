"""Turns run records into a summary, `docs/benchmarks.md` and the PNG charts in `docs/img/`."""

from __future__ import annotations

import ast
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.runner import BASELINE, OURS, REPO_ROOT, Record

THROUGHPUT = ("publish", "consume", "chain")
TITLES = {
    "publish": "Publish: N confirmed messages",
    "consume": "Consume: N queued messages, no-op handler, ack each",
    "chain": "Chain: consume, publish downstream (confirmed), then ack upstream",
    "latency": "Latency: publish to handler start at a fixed offered rate",
    "rss": "Worker memory over a long stream",
}
Row = dict[str, Any]


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summarize(records: Iterable[Record], systems: Sequence[str]) -> list[Row]:
    """One row per (workload, queue type, system): median and min-max over the repeats."""
    groups: dict[tuple[str, str, str], list[Record]] = {}
    for record in records:
        key = (record["workload"], record["queue_type"], record["system"])
        groups.setdefault(key, []).append(record)

    rows: list[Row] = []
    for (workload, queue_type, system), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        row: Row = {
            "workload": workload,
            "queue_type": queue_type,
            "system": system,
            "runs": len(ok),
        }
        if not ok:
            row["status"] = "n/a" if any(r["status"] == "n/a" for r in group) else "error"
            row["reason"] = next(
                (r.get("reason") or r.get("error", "") for r in group if r["status"] != "ok"), ""
            )
            rows.append(row)
            continue
        row["status"] = "ok"
        row["errors"] = [r["error"] for r in group if r["status"] == "error"]
        rates = [float(r["rate"]) for r in ok]
        row.update(
            rate=_median(rates),
            rate_min=min(rates),
            rate_max=max(rates),
            cpu_us_per_msg=_median([float(r["cpu_us_per_msg"]) for r in ok]),
        )
        if workload == "latency":
            for name in ("p50", "p99"):
                values = [float(r["latency_ms"][name]) for r in ok]
                row[name] = _median(values)
                row[f"{name}_min"], row[f"{name}_max"] = min(values), max(values)
        if workload == "rss":
            for name in ("rss_peak_mb", "rss_growth_mb", "rss_start_mb"):
                row[name] = _median([float(r[name]) for r in ok if name in r])
        rows.append(row)

    _add_ratios(rows)
    order = {name: i for i, name in enumerate(systems)}
    rows.sort(key=lambda r: (r["workload"], r["queue_type"], order.get(r["system"], 99)))
    return rows


def _add_ratios(rows: list[Row]) -> None:
    """Throughput ratios to the baseline, and ours over each system, from the same run."""
    by_key = {(r["workload"], r["queue_type"], r["system"]): r for r in rows}
    for row in rows:
        if row["workload"] not in THROUGHPUT or row["status"] != "ok":
            continue
        base = by_key.get((row["workload"], row["queue_type"], BASELINE), {})
        ours = by_key.get((row["workload"], row["queue_type"], OURS), {})
        if base.get("status") == "ok":
            row["x_baseline"] = row["rate"] / base["rate"]
            row["x_baseline_min"] = row["rate_min"] / base["rate"]
            row["x_baseline_max"] = row["rate_max"] / base["rate"]
        if ours.get("status") == "ok":
            row["ours_over"] = ours["rate"] / row["rate"]


# --- Markdown ------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _cell_missing(row: Row) -> str:
    reason = str(row.get("reason", "")).splitlines()[0][:120] if row.get("reason") else ""
    return f"{row['status']}: {reason}" if reason else row["status"]


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def _rows(rows: Sequence[Row], workload: str, queue_type: str) -> list[Row]:
    return [r for r in rows if r["workload"] == workload and r["queue_type"] == queue_type]


def _throughput_table(rows: Sequence[Row]) -> list[str]:
    header = [
        "system",
        "msg/s (median)",
        "min – max",
        f"× {BASELINE}",
        f"{OURS} ÷ system",
        "client CPU µs/msg",
        "runs",
    ]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["system"], _cell_missing(r), "", "", "", "", "0"])
            continue
        lines.append(
            [
                f"**{r['system']}**" if r["system"] == OURS else r["system"],
                _fmt(r["rate"]),
                f"{_fmt(r['rate_min'])} – {_fmt(r['rate_max'])}",
                _ratio(r.get("x_baseline")),
                "—" if r["system"] == OURS else _ratio(r.get("ours_over")),
                _fmt(r["cpu_us_per_msg"], 1),
                str(r["runs"]),
            ]
        )
    return _table(header, lines)


def _latency_table(rows: Sequence[Row]) -> list[str]:
    header = ["system", "p50 ms", "p99 ms (median)", "p99 min – max", "runs"]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["system"], _cell_missing(r), "", "", "0"])
            continue
        lines.append(
            [
                f"**{r['system']}**" if r["system"] == OURS else r["system"],
                _fmt(r["p50"], 2),
                _fmt(r["p99"], 2),
                f"{_fmt(r['p99_min'], 2)} – {_fmt(r['p99_max'], 2)}",
                str(r["runs"]),
            ]
        )
    return _table(header, lines)


def _rss_table(rows: Sequence[Row]) -> list[str]:
    header = ["system", "peak RSS MB", "after warm-up MB", "growth MB", "consume msg/s"]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["system"], _cell_missing(r), "", "", ""])
            continue
        lines.append(
            [
                f"**{r['system']}**" if r["system"] == OURS else r["system"],
                _fmt(r.get("rss_peak_mb"), 1),
                _fmt(r.get("rss_start_mb"), 1),
                _fmt(r.get("rss_growth_mb"), 1),
                _fmt(r["rate"]),
            ]
        )
    return _table(header, lines)


def _headline(rows: Sequence[Row], systems: Sequence[str], queue_type: str) -> list[str]:
    by_key = {(r["workload"], r["queue_type"], r["system"]): r for r in rows}
    header = ["system"] + [f"{w} × {BASELINE}" for w in THROUGHPUT]
    header += [f"{OURS} ÷ system ({w})" for w in THROUGHPUT]
    lines = []
    for system in systems:
        cells = [system]
        picked = [by_key.get((w, queue_type, system), {}) for w in THROUGHPUT]
        if not any(picked):
            continue
        cells += [_ratio(r.get("x_baseline")) if r.get("status") == "ok" else "n/a" for r in picked]
        cells += [
            "—"
            if system == OURS
            else _ratio(r.get("ours_over"))
            if r.get("status") == "ok"
            else "n/a"
            for r in picked
        ]
        lines.append(cells)
    return _table(header, lines)


def _docstring(system: str) -> str:
    """The system module's docstring, with blank lines around its lists (Python-Markdown)."""
    path = REPO_ROOT / "bench" / "systems" / f"{system}.py"
    try:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    except (OSError, SyntaxError):
        return ""
    lines: list[str] = []
    in_list = False
    for line in doc.splitlines():
        item = line.startswith("- ")
        starts_or_ends_list = (item and not in_list) or (in_list and not item and line[:1] != " ")
        if starts_or_ends_list and lines and lines[-1]:
            lines.append("")
        in_list = item or (in_list and line[:1] == " ")
        lines.append(line)
    return "\n".join(lines)


WHERE_THE_TIME_GOES = Path(__file__).with_name("where_the_time_goes.md")
"""The page's "Where the time goes" section, profiles included: prose measured by hand (with
`bench.micro`, callgrind, cProfile), kept in a file of its own so that every rewrite of the page
keeps it. Edit it there."""


def where_the_time_goes(path: Path = WHERE_THE_TIME_GOES) -> list[str]:
    """The lines of the hand-written section, as the page gets them."""
    return path.read_text().rstrip("\n").splitlines()


def against_reference(rev: str) -> list[str]:
    """The section on `python -m bench --against` (kept in the generated page)."""
    return [
        "## Against the reference commit",
        "",
        "`python -m bench --against` measures the working tree against a fixed reference "
        f"commit, the one on the first line of `bench/REFERENCE` (now `{rev}`). The reference "
        "is extracted with `git archive` into `.bench-ref/<commit>/` and installed, editable, "
        "into a venv of its own with every dependency at the version the running venv has, so "
        "that only aio-workq's code differs; that venv is built once per commit (about 10 s) "
        f"and reused. Its runs, `aio_workq@{rev}`, use this tree's bench harness with the "
        "reference's package. The working tree, the reference and raw aiormq (the yardstick) "
        "alternate run by run on one broker (the order rotates with each repeat), for publish, "
        "consume and chain on classic and quorum queues.",
        "",
        "```",
        "make bench-ref                    # quick: N = 5,000, 3 repeats (a few minutes)",
        "python -m bench --against         # N = 20,000, 3 repeats; the last step of `make bench`",
        "python -m bench --against REV --quick --workloads publish,consume",
        "```",
        "",
        "Per workload and queue type the table gives each side's throughput relative to raw "
        "aiormq, working / reference (the median over the repeats, and the min – max of the "
        "runs paired by repeat) and a verdict; beside them each side's client CPU µs per "
        "message, which a loaded machine moves less than the rates; and each side's share of "
        "the ceiling, its rate over the best median rate any system reached on that row in the "
        "same run, where the systems are the two sides, raw aiormq, `aio_workq.x2` (the "
        "working tree in two processes on the one queue, N / 2 messages each to publish, N "
        "between them to consume, the rate all of them over the span from the first start to "
        "the last end) and `aio_workq_wide` (the working tree in one process with the pair's "
        "settings: `Producer(channels=2)`, and the worker's concurrency and prefetch doubled "
        "to the pair's 200); the last column is that one process's share (#22 asks one "
        "process for 0.95 of that ceiling). The figures go to "
        "`bench/results/against-REV.json`.",
        "",
        "**The rule.** The working tree may be at most 10 % slower than the reference: "
        "working / reference ≥ 0.90 on every row, otherwise the row says REGRESSION and the "
        "command exits with status 3. A change note that touches speed quotes this table (with "
        "its N and repeats). The machine is shared and noisy: a REGRESSION in a quick run is a "
        "reason for a run with the full repeats, which decides.",
        "",
        "**Moving the reference.** When a commit beats the reference (every row at 1.00 or above "
        "in a full run), put that commit's id on the first line of `bench/REFERENCE` and quote "
        "the table in the commit's note; from then on the rule is against it. The next run "
        "builds the new reference's venv; delete `.bench-ref/` to drop the old ones.",
        "",
    ]


def _reference_rev() -> str:
    from bench.reference import ReferenceError, default_rev

    try:
        return default_rev()
    except ReferenceError:
        return "REV"


def _extra_workloads() -> list[str]:
    """The stand-alone workloads' sections (bench/harness.py), kept when the page is rewritten."""
    from bench.harness import extra_sections

    sections = extra_sections()
    return [*sections, ""] if sections else []


def markdown(meta: dict[str, Any], rows: Sequence[Row], images: dict[str, str]) -> str:
    plan = meta["plan"]
    systems: list[str] = plan["systems"]
    machine = meta["machine"]
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m bench` (bench/report.py); edit those, not this file. -->",
        "",
        f"Measured {meta['date']} on {machine['cpus']} × {machine['cpu_model']} "
        f"({machine['memory_gb']} GB, Linux {machine['kernel']}), Python {machine['python']}, "
        f"RabbitMQ {meta['broker'].get('version', '?')} ({meta['broker'].get('platform', '?')}) "
        "on the same machine. The machine is shared and noisy: read the ratios, which compare "
        "systems measured side by side in the same run, rather than the absolute rates.",
        "",
        f"## Headline: ratios on a {plan['queue_types'][0]} queue",
        "",
        f"Throughput relative to raw aiormq (`{BASELINE}`) and {OURS} relative to each system "
        "(medians; > 1 means faster than that system).",
        "",
        *_headline(rows, systems, plan["queue_types"][0]),
        "",
        *where_the_time_goes(),
        "",
        "## Settings",
        "",
        f"- Every message: a {meta['payload_bytes']}-byte body, persistent (delivery mode 2), "
        "publisher confirms on; every queue fresh (a new name per run), durable, "
        f"of type {' and '.join(plan['queue_types'])}.",
        f"- Prefetch {plan['prefetch']} for every consumer; where a system has a concurrency knob, "
        f"{plan['prefetch']} handlers at once (threads for the thread-based ones).",
        f"- N = {plan['n']:,} messages for publish, consume and chain; repeats: "
        f"{plan['repeats']} per system, workload and queue type; the systems alternate (the "
        "order rotates with each repeat); median and min – max over the repeats.",
        "- Every system runs in a process of its own, started fresh for every run "
        "(`python -m bench.systems.<name>`); the clock runs inside it: for publish from the "
        "runner's `GO` to the last confirm; for consume and chain from the first finished "
        "handler to the N-th (the steady rate over N - 1 messages, without start-up: "
        "connecting, declaring queues, the first prefetch).",
        "- consume and chain: the queue is pre-loaded (untimed) by a raw aiormq publisher with "
        "the system's own message format (task envelopes for Celery, Dramatiq, taskiq), then "
        "the consumer starts. After the process exits the runner checks with passive declares "
        "that the queue is empty (nothing left unacked) and, for chain, that the downstream "
        "queue holds N; a failed check makes the run an error, not a result.",
        f"- latency: the consumer runs, then a raw aiormq publisher offers "
        f"{plan['latency_rate']:,.0f} msg/s for {plan['latency_seconds']:g} s, writing the "
        "send time (monotonic clock) into each body; the handler's first act records now - "
        "sent. The systems' own publishers are measured by the publish workload.",
        f"- rss: the worker consumes {plan['rss_n']:,} messages while a raw aiormq publisher "
        "feeds the queue flat out; the runner samples the worker process's RSS every second. "
        "Growth is the last sample minus the sample at the end of the first fifth of the run. "
        f"Queue type{'s' if len(plan['rss_queue_types']) > 1 else ''}: "
        f"{', '.join(plan['rss_queue_types'])}; runs per system: {plan['rss_repeats']}.",
        "- client CPU µs/msg: the system process's CPU time (all threads) over the timed phase, "
        "divided by N.",
        "- Per-message logging is off in every framework that has it on by default (FastStream, "
        "taskiq, Celery at INFO; lapinmq prints): it would measure the terminal, not the "
        "library. With FastStream's default logging its consume rate drops by about a quarter.",
        "",
        "What is deliberately not equal, because each system is used its own way:",
        "",
        "- Messages in flight when publishing: raw aiormq, aio-pika, FastStream and taskiq "
        "gather batches of 1,000; aio-workq keeps its default sliding window (10,000 "
        "unconfirmed messages or 64 MiB); lapinmq's async "
        "publisher has no window (all N handed over at once); Dramatiq, Celery and lapinmq's sync "
        "publisher wait for each confirm before the next publish (they have no pipelined API).",
        "- chain: most handlers wait for the downstream confirm, then return and get acked; "
        "aio-workq's `job.forward` returns at once and the library acks upstream when the "
        "downstream confirm arrives (counted then); lapinmq acks from the confirm callback.",
        "- Concurrency: the asyncio consumers run each delivery's handler in a task of its own "
        "(up to the prefetch, or their concurrency setting of 100); the thread-based workers "
        "(Dramatiq, Celery, lapinmq) run 100 threads.",
        "",
    ]
    for workload in plan["workloads"]:
        out += [f"## {TITLES[workload]}", ""]
        if workload in images:
            out += [f"![{workload}]({images[workload]})", ""]
        for queue_type in plan["queue_types"]:
            subset = _rows(rows, workload, queue_type)
            if not subset:
                continue
            out += [f"### {queue_type} queue", ""]
            if workload in THROUGHPUT:
                out += _throughput_table(subset)
            elif workload == "latency":
                out += _latency_table(subset)
            else:
                out += _rss_table(subset)
            out.append("")
    errors = [r for r in rows if r["status"] == "error" or r.get("errors")]
    if errors:
        out += ["## Errors", ""]
        for r in errors:
            text = r.get("reason") or "; ".join(r.get("errors", []))
            first = str(text).splitlines()[0] if text else ""
            out.append(f"- {r['workload']} / {r['queue_type']} / {r['system']}: {first}")
        out.append("")
    out += _extra_workloads()
    out += ["## Systems and the settings that make them comparable", ""]
    for system in systems:
        doc = _docstring(system)
        if doc:
            out += [f"### {system}", "", doc, ""]
    out += ["## Versions", ""]
    out += _table(["package", "version"], sorted(meta["versions"].items()))
    out += [
        "",
        "## Reproduce",
        "",
        "```",
        "pip install -e . --group bench   # or: uv sync --group bench",
        f"{meta['command']}",
        "```",
        "",
        "`python -m bench --quick` takes a few minutes; `--systems a,b`, `--workloads …`, "
        "`--repeats N`, `--n N` narrow a run. Raw results: `bench/results/latest.json`.",
        "",
        *against_reference(_reference_rev()),
    ]
    return "\n".join(out)


# --- charts --------------------------------------------------------------------------------------


def charts(rows: Sequence[Row], plan: dict[str, Any], img_dir: Path) -> dict[str, Path]:
    """PNG bar charts, one per workload; returns workload -> file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    systems: list[str] = plan["systems"]
    files: dict[str, Path] = {}
    for workload in plan["workloads"]:
        queue_types = [q for q in plan["queue_types"] if _rows(rows, workload, q)]
        present = [
            s
            for s in systems
            if any(
                r["system"] == s and r["status"] == "ok"
                for q in queue_types
                for r in _rows(rows, workload, q)
            )
        ]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(present) + 2), 4.2), dpi=110)
        per_group = sum(len(_metrics(workload, q)) for q in queue_types)
        width = 0.8 / max(1, per_group)
        bar = 0
        for queue_type in queue_types:
            by_system = {r["system"]: r for r in _rows(rows, workload, queue_type)}
            for metric, label in _metrics(workload, queue_type):
                xs, heights, low, high = [], [], [], []
                for i, system in enumerate(present):
                    r = by_system.get(system, {})
                    value = r.get(metric) if r.get("status") == "ok" else None
                    if value is None:
                        continue
                    xs.append(i - 0.4 + (bar + 0.5) * width)
                    heights.append(value)
                    low.append(value - r.get(f"{metric}_min", value))
                    high.append(r.get(f"{metric}_max", value) - value)
                bars = ax.bar(xs, heights, width, label=label, yerr=[low, high], capsize=3)
                ax.bar_label(bars, fmt=_label_format(workload), fontsize=7, padding=2)
                bar += 1
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels(present, rotation=25, ha="right")
        ax.set_title(TITLES[workload], fontsize=10)
        ax.set_ylabel(_ylabel(workload))
        if workload in THROUGHPUT:
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = img_dir / f"bench_{workload}.png"
        fig.savefig(path)
        plt.close(fig)
        files[workload] = path
    return files


def _metrics(workload: str, queue_type: str) -> list[tuple[str, str]]:
    if workload in THROUGHPUT:
        return [("x_baseline", queue_type)]
    if workload == "latency":
        return [("p50", f"{queue_type} p50"), ("p99", f"{queue_type} p99")]
    return [("rss_peak_mb", f"{queue_type} peak"), ("rss_growth_mb", f"{queue_type} growth")]


def _label_format(workload: str) -> str:
    return "%.2f" if workload in THROUGHPUT else "%.1f"


def _ylabel(workload: str) -> str:
    if workload in THROUGHPUT:
        return f"msg/s relative to {BASELINE} (median, min–max)"
    return "ms (median over repeats, p99 min–max)" if workload == "latency" else "MB"
