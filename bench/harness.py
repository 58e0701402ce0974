"""What the stand-alone workloads share (`python -m bench.large`, `.queues`, `.rpc`, `.processes`,
`.soak`, `.observability`): a broker, child processes, peak RSS, results and their docs section.

Each workload runs its systems in child processes of its own (`python -m bench.<name> --child
…`, one JSON line on stdout), writes its results to `docs/img/bench_<name>.json` and a chart to
`docs/img/bench_<name>.png`, then rewrites the part of `docs/benchmarks.md` between
`<!-- extra workloads -->` and `<!-- /extra workloads -->` from every such JSON file present.
`python -m bench` (bench/report.py) renders the same part, so neither run drops the other's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC = REPO_ROOT / "docs" / "benchmarks.md"
IMAGES = REPO_ROOT / "docs" / "img"
BEGIN = "<!-- extra workloads -->"
END = "<!-- /extra workloads -->"
ANCHOR = "## Systems and the settings that make them comparable"
"""The extra sections go before this heading of the generated page (at the end if absent)."""

SECTIONS = ("large", "queues", "rpc", "processes", "observability", "tracking", "soak")
"""The stand-alone workloads, in the order of their sections (module `bench.<name>`, each with
`section(result, image) -> list[str]`)."""

MiB = 2**20
T = TypeVar("T")


# --- running -------------------------------------------------------------------------------------


def on_broker(url: str | None, run: Callable[[str], T], name: str = "workqbenchx") -> T:
    """run(url) on url, or on a RabbitMQ node of its own (scripts/broker.py) started for it."""
    if url:
        return run(url)
    from scripts.broker import LocalBroker, ensure_installed

    ensure_installed()
    with tempfile.TemporaryDirectory(prefix="aio-workq-bench-") as tmp:
        node = LocalBroker(Path(tmp), name=name)
        print("starting a RabbitMQ node for the bench…", file=sys.stderr, flush=True)
        with node:
            return run(node.url)


def workload(
    name: str,
    argv: Sequence[str] | None,
    *,
    url: str | None,
    measure: Callable[[str], list[dict[str, Any]]],
    plan: dict[str, Any],
    chart: Callable[[dict[str, Any], Path], None],
    no_docs: bool,
) -> int:
    """Run one stand-alone workload (`python -m bench.<name>`) and keep what it measured.

    measure(url) runs on url, or on a node of its own; its runs, the plan and when/where it ran
    are printed as JSON (no_docs) or saved beside the chart with the page's section rewritten.
    Returns the exit status: 1 if any run recorded an "error", else 0.
    """
    command = ["python", "-m", f"bench.{name}", *(sys.argv[1:] if argv is None else argv)]
    result: dict[str, Any] = {"meta": meta(command), "plan": plan}
    result["runs"] = runs = on_broker(url, measure, f"workqbench{name}")
    if no_docs:
        print_json(result)
    else:
        save(name, result, chart)
    return 1 if any("error" in run for run in runs) else 0


def child(module: str, args: Sequence[str], timeout: float = 900) -> dict[str, Any]:
    """Run `python -m module --child …args` and return its last stdout line, parsed as JSON.

    Raises:
        RuntimeError: the child failed or printed no JSON (its stderr's tail is in the message).
    """
    cmd = [sys.executable, "-m", module, "--child", *args]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = "\n".join(out.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[2:])} exited with {out.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def print_json(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def meta(command: Sequence[str]) -> dict[str, Any]:
    """When, where (with the load average: these runs share the machine) and how."""
    from bench.__main__ import machine

    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(_redacted(command)),
        "machine": machine(),
        "load_before": [round(x, 1) for x in os.getloadavg()],
    }


def _redacted(command: Sequence[str]) -> list[str]:
    """command with any broker URL (`--url X` or `--url=X`) shown without its password."""
    from aio_workq import redact_url

    out: list[str] = []
    for arg in command:
        if arg.startswith("--url="):
            arg = "--url=" + redact_url(arg[len("--url=") :])
        elif out and out[-1] == "--url":
            arg = redact_url(arg)
        out.append(arg)
    return out


def spin(microseconds: float) -> None:
    """Use `microseconds` of CPU, as a handler doing some work would."""
    import time

    end = time.process_time() + microseconds / 1e6
    while time.process_time() < end:
        pass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank, of values (not empty)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# --- memory --------------------------------------------------------------------------------------


def rss_mb(pid: int | str = "self") -> float:
    """The resident set size of this process (or of pid) now, in MiB."""
    return _status_kb("VmRSS", pid) / 1024


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) from now; False where that is unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak RSS in MiB since `reset_peak_rss` (or since start: getrusage where /proc lacks it)."""
    try:
        return _status_kb("VmHWM") / 1024
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kb(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {field} in /proc/{pid}/status")


def asyncio_census() -> dict[str, Any]:
    """Live asyncio tasks, and pending futures that are not tasks (found by the GC), now."""
    import gc

    tasks = asyncio.all_tasks()
    pending = [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, asyncio.Future) and not isinstance(obj, asyncio.Task) and not obj.done()
    ]
    return {"tasks": len(tasks), "pending_futures": len(pending)}


def task_names() -> list[str]:
    """The coroutines of the live asyncio tasks, sorted (to name what a census counted)."""
    names = []
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        names.append(getattr(coro, "__qualname__", type(coro).__name__))
    return sorted(names)


# --- results and the docs ------------------------------------------------------------------------


def results_path(name: str) -> Path:
    return IMAGES / f"bench_{name}.json"


def image_path(name: str) -> Path:
    return IMAGES / f"bench_{name}.png"


def save(name: str, result: dict[str, Any], chart: Callable[[dict[str, Any], Path], None]) -> None:
    """Write the results and the chart, then rewrite the extra sections of docs/benchmarks.md."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    result.setdefault("meta", {})["load_after"] = [round(x, 1) for x in os.getloadavg()]
    results_path(name).write_text(json.dumps(result, indent=1) + "\n")
    chart(result, image_path(name))
    refresh_doc()
    print(
        f"wrote {results_path(name).relative_to(REPO_ROOT)}, "
        f"{image_path(name).relative_to(REPO_ROOT)} and {DOC.relative_to(REPO_ROOT)}",
        file=sys.stderr,
    )


INTRO = (
    "## Workloads beyond the side-by-side comparison",
    "",
    "Bodies of 64 KiB to 16 MiB, 1,000 queues in one process, RPC round trips, "
    "`aio-workq worker --processes N`, the hooks' cost, and a soak of a million messages. Each "
    "is `python -m bench.<name>` (`--quick` for a short run; `make bench-extra` runs them all), "
    "starts a RabbitMQ node of its own unless given `--url`, runs every system in a fresh "
    "process, and writes its figures to `docs/img/bench_<name>.json` beside its chart; this "
    "part of the page is rendered from those files.",
    "",
    "The machine has 2 cores, shared with the broker: each section gives the load average at "
    "the start and end of its run (2.0 is a full machine; the bench's own processes count), "
    "and one run while the machine was loaded by other jobs says so. Each workload ran once, "
    "at a moderate size: read the ratios between systems measured in the same run before "
    "the absolute rates.",
    "",
)


def extra_sections() -> list[str]:
    """The extra sections, rendered from the JSON results in docs/img (none: nothing)."""
    out: list[str] = []
    for name in SECTIONS:
        path = results_path(name)
        if not path.exists():
            continue
        module = importlib.import_module(f"bench.{name}")
        result = json.loads(path.read_text())
        image = os.path.relpath(image_path(name), DOC.parent)
        out += [*module.section(result, image), ""]
    if not out:
        return []
    return [BEGIN, "", *INTRO, *out, END]


def splice(page: str, sections: Sequence[str]) -> str:
    """page with its extra-workloads block replaced by sections (inserted before ANCHOR)."""
    block = "\n".join(sections)
    if BEGIN in page and END in page:
        head, rest = page.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        return head + block + tail
    if ANCHOR in page:
        head, tail = page.split(ANCHOR, 1)
        return head + block + "\n\n" + ANCHOR + tail
    return page.rstrip("\n") + "\n\n" + block + "\n"


def refresh_doc() -> None:
    page = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    DOC.write_text(splice(page, extra_sections()))


QUIET_LOAD = 2.5
"""A load average below this before and after a run (2 cores: the bench's own processes
count) marks its figures as from a quiet machine."""


def measured_on(result: dict[str, Any]) -> str:
    """One sentence: when, on what and how loaded, with the command."""
    m = result.get("meta", {})
    machine = m.get("machine", {})
    before = m.get("load_before", ["?"])[0]
    after = m.get("load_after", ["?"])[0]
    loads = [x for x in (before, after) if isinstance(x, int | float)]
    quiet = len(loads) == 2 and max(loads) < QUIET_LOAD
    return (
        f"Measured {m.get('date', '?')} on {machine.get('cpus', '?')} × "
        f"{machine.get('cpu_model', '?')}, Python {machine.get('python', '?')}, load average "
        f"{before} before and {after} after{'' if quiet else ' (loaded: to be refreshed)'}; "
        f"`{m.get('command', '?')}`."
    )


def table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CPU_PARTS = ("client", "broker", "postgres")


_NODES: dict[str, list[int]] = {}
"""The processes `cpu_seconds` counts for a part (`watch_nodes`), by part."""


def watch_nodes(**ports: int | None) -> dict[str, list[int]]:
    """Count, for each part given (`broker=5672, postgres=5432`), only the local process that
    listens on that TCP port and its children (a PostgreSQL node's backends), not every
    process of the part's name: on a machine shared with other brokers and databases those
    are someone else's. A part given None, or whose port no local process listens on,
    counts 0 (a node elsewhere). Returns the processes found, by part.

    Raises:
        ImportError: no psutil (the bench group's: `make bench-deps`).
    """
    import psutil  # the bench group's

    listening: dict[int, set[int]] = {}
    for conn in psutil.net_connections(kind="tcp"):
        port = getattr(conn.laddr, "port", None)  # no address: ()
        if conn.status == psutil.CONN_LISTEN and conn.pid is not None and port is not None:
            listening.setdefault(port, set()).add(conn.pid)
    for part, wanted in ports.items():
        if part not in CPU_PARTS or part == "client":
            raise ValueError(f"watch_nodes: no part {part!r} (one of broker, postgres)")
        _NODES[part] = [] if wanted is None else sorted(listening.get(wanted, ()))
    return dict(_NODES)


def _node_seconds(pids: list[int]) -> float:
    import psutil  # the bench group's

    seconds = 0.0
    for pid in pids:
        try:
            node = psutil.Process(pid)
            processes = [node, *node.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:  # a backend that ended meanwhile
                continue
            seconds += times.user + times.system
    return seconds


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process, the local broker's and PostgreSQL's: the nodes
    `watch_nodes` found (and their children), else by process name (`beam.smp`, `postgres`,
    every one on the machine; a broker or a database elsewhere counts 0).

    Raises:
        ImportError: no psutil (the bench group's: `make bench-deps`).
    """
    import psutil  # the bench group's

    me = os.getpid()
    total = dict.fromkeys(CPU_PARTS, 0.0)
    for watched, pids in _NODES.items():
        total[watched] = _node_seconds(pids)
    for process in psutil.process_iter(["name", "cpu_times"]):
        times, name = process.info["cpu_times"], process.info["name"] or ""
        if times is None:
            continue
        part = (
            "client" if process.pid == me
            else "broker" if name.startswith(("beam", "erl"))
            else "postgres" if name.startswith("postgres")
            else None
        )  # fmt: skip
        if part is not None and part not in _NODES:
            total[part] += times.user + times.system
    return total
