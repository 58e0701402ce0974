"""`python -m bench --against REV`: the working tree against a reference commit, on one broker.

The reference (`bench/REFERENCE`, until a commit beats it) is extracted with `git archive` into
`.bench-ref/<commit>/tree` and installed, editable, into a venv of its own
(`.bench-ref/<commit>/venv`) with every dependency pinned to the version the running venv has:
the two sides differ in aio-workq's code only. The venv is built once per commit and reused.

The reference runs as the system `aio_workq@REV`: the working tree's harness
(`bench/systems/aio_workq.py` and `_common.py`, reached through `.bench-ref/harness/bench`, a
link to this `bench/`) with the reference's `aio_workq` package. The working tree, the reference
and raw aiormq (the yardstick) alternate within one run on one broker; the verdict compares the
working tree's rate with the reference's from that run: below `FLOOR` (0.90) is a regression.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.runner import BASELINE, OURS, PAIR, REPO_ROOT, WIDE, Launcher, Record

REFERENCE_FILE = REPO_ROOT / "bench" / "REFERENCE"
CACHE = REPO_ROOT / ".bench-ref"
WORKLOADS = ("publish", "consume", "chain")
"""The throughput workloads: the ones a rate ratio means something for."""
FLOOR = 0.90
"""working / reference below this is a regression (the "no more than 10 % slower" rule)."""
PASS = "PASS"
REGRESSION = "REGRESSION"
MISSING = "ERROR"

Row = dict[str, Any]


class ReferenceError(Exception):
    """The reference can't be resolved or built; the message says which and how to fix it."""


def default_rev(path: Path = REFERENCE_FILE) -> str:
    """The reference commit named in `bench/REFERENCE` (first word outside `#` comments).

    Raises:
        ReferenceError: the file is missing or names nothing.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ReferenceError(f"cannot read {path}: {exc}; pass --against REV") from None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            return words[0]
    raise ReferenceError(f"{path} names no commit: write one (e.g. a8e9305) on its first line")


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, check=False)


def resolve(rev: str) -> str:
    """The full commit id of rev.

    Raises:
        ReferenceError: rev names no commit of this repository.
    """
    done = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if done.returncode != 0 or not done.stdout.strip():
        raise ReferenceError(
            f"--against {rev!r}: no such commit in {REPO_ROOT} "
            "(give a commit id, tag or branch; `git fetch` if it is not here yet)"
        )
    return done.stdout.decode().strip()


@dataclass(frozen=True, slots=True)
class Reference:
    """A built reference: its tree, its venv and how to start its system."""

    rev: str
    commit: str
    root: Path
    harness: Path

    @property
    def tree(self) -> Path:
        return self.root / "tree"

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def label(self) -> str:
        """rev if it is a plain name (a8e9305, v0.2), else the short commit: fit for file names."""
        plain = self.rev and all(c.isalnum() or c in "._-" for c in self.rev)
        return self.rev if plain else self.commit[:12]

    @property
    def system(self) -> str:
        return f"{OURS}@{self.label}"

    @property
    def launcher(self) -> Launcher:
        return Launcher(
            module=f"bench.systems.{OURS}",
            python=str(self.python),
            cwd=self.harness,
            pythonpath=self.harness,
        )

    def describe(self) -> dict[str, str]:
        return {"rev": self.rev, "commit": self.commit, "system": self.system}


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Held while one process builds a reference; a second bench waits, then reuses it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ignore_cache(cache: Path) -> None:
    """The cache ignores itself (no edit of the project's .gitignore needed)."""
    cache.mkdir(parents=True, exist_ok=True)
    ignore = cache / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# python -m bench --against: reference trees and venvs\n*\n")


def _harness(cache: Path) -> Path:
    """A directory holding only a link to this `bench/`: the import root of the reference runs.

    Running from the working tree would import the working tree's `aio_workq`; from here,
    `bench` is this harness and `aio_workq` is the reference's (installed in its venv).
    """
    harness = cache / "harness"
    harness.mkdir(parents=True, exist_ok=True)
    link = harness / "bench"
    target = REPO_ROOT / "bench"
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return harness
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return harness


def _constraints() -> str:
    """`name==version` for every distribution of the running venv but aio-workq itself."""
    pins: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower().replace("_", "-") != "aio-workq":
            pins[name.lower()] = dist.version
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def _run_logged(cmd: Sequence[str], log: Path, what: str) -> None:
    with log.open("ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise ReferenceError(f"{what} failed (exit {done.returncode}); see {log}:\n{tail}")


def _build(commit: str, root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)  # a build that did not finish
    tree = root / "tree"
    tree.mkdir(parents=True)
    log = root / "build.log"
    archive = subprocess.Popen(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", commit],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert archive.stdout is not None
    with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        tar.extractall(tree, filter="data")
    _, err = archive.communicate()
    if archive.returncode != 0:
        raise ReferenceError(f"git archive {commit} failed: {err.decode(errors='replace')}")
    venv = root / "venv"
    _run_logged([sys.executable, "-m", "venv", str(venv)], log, "creating the reference venv")
    constraints = root / "constraints.txt"
    constraints.write_text(_constraints())
    _run_logged(
        [
            str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
            "-c", str(constraints), "-e", str(tree),
        ],
        log,
        "installing the reference (with the running venv's dependency versions)",
    )  # fmt: skip


def _probe(ref: Reference) -> None:
    """The reference system imports aio_workq from the reference tree and bench from here.

    Raises:
        ReferenceError: either comes from somewhere else.
    """
    code = (
        "import json, aio_workq, bench.systems._common as c; "
        "print(json.dumps([aio_workq.__file__, c.__file__]))"
    )
    launcher = ref.launcher
    done = subprocess.run(
        [launcher.python, "-c", code],
        cwd=launcher.cwd,
        env=launcher.env(),
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise ReferenceError(
            f"the reference venv {ref.python.parent.parent} cannot import aio_workq and the "
            f"bench; delete {ref.root} to rebuild it:\n{done.stderr.decode(errors='replace')}"
        )
    package, harness = (Path(p).resolve() for p in json.loads(done.stdout))
    if not package.is_relative_to(ref.tree.resolve()):
        raise ReferenceError(f"the reference run imports aio_workq from {package}, not {ref.tree}")
    if not harness.is_relative_to(REPO_ROOT / "bench"):
        raise ReferenceError(f"the reference run imports the bench from {harness}, not {REPO_ROOT}")


def prepare(rev: str, cache: Path = CACHE) -> Reference:
    """The reference for rev, built into cache unless an earlier run built it already.

    Raises:
        ReferenceError: rev is no commit, or the build failed (the message has the log's end).
    """
    commit = resolve(rev)
    _ignore_cache(cache)
    root = cache / commit[:12]
    with _locked(cache / f"{commit[:12]}.lock"):
        ref = Reference(rev=rev, commit=commit, root=root, harness=_harness(cache))
        ready = root / ".ready"
        if ready.exists():
            _say(f"reference {rev} ({commit[:12]}): reusing {root}")
        else:
            _say(f"reference {rev} ({commit[:12]}): building {root} (once per commit)…")
            started = time.monotonic()
            _build(commit, root)
            _probe(ref)
            ready.write_text(json.dumps({**ref.describe(), "python": sys.version}) + "\n")
            _say(f"reference built in {time.monotonic() - started:.0f} s")
            return ref
        _probe(ref)
    return ref


# --- the verdict ---------------------------------------------------------------------------------


def _by_repeat(
    records: Iterable[Record], system: str, workload: str, queue: str, field: str = "rate"
) -> dict[int, float]:
    return {
        int(r.get("repeat", 0)): float(r[field])
        for r in records
        if r["system"] == system
        and r["workload"] == workload
        and r["queue_type"] == queue
        and r["status"] == "ok"
    }


def verdicts(records: Sequence[Record], reference: str) -> list[Row]:
    """Per workload and queue type: both sides' ratios to raw aiormq and working / reference.

    Rates are medians over the repeats; `over_min`/`over_max` pair each repeat's two runs (they
    ran next to each other). `*_cpu_us`: the median client CPU µs per message, which a loaded
    machine moves less than the rates (shown beside them; the verdict is on the rates).
    verdict: PASS, REGRESSION (working / reference < FLOOR) or ERROR (a side has no
    successful run). `ceiling`: the best median rate of any system in the run (`ceiling_system`),
    and `*_share` each side's rate over it: one process's share of the broker's ceiling (#22;
    `PAIR`, aio-workq in two processes, runs for that ceiling); `wide_share`, the share of
    `WIDE`, one process with the pair's settings (None when it did not run).
    """
    keys: list[tuple[str, str]] = []
    for r in records:
        key = (r["workload"], r["queue_type"])
        if r["workload"] in WORKLOADS and key not in keys:
            keys.append(key)
    rows: list[Row] = []
    for workload, queue in keys:
        ours = _by_repeat(records, OURS, workload, queue)
        ref = _by_repeat(records, reference, workload, queue)
        base = _by_repeat(records, BASELINE, workload, queue)
        row: Row = {"workload": workload, "queue_type": queue, "runs": min(len(ours), len(ref))}
        rates = {"ours": ours, "reference": ref, "baseline": base}
        for side, values in rates.items():
            row[f"{side}_rate"] = statistics.median(values.values()) if values else None
        for side, system in (("ours", OURS), ("reference", reference)):
            rate, yard = row[f"{side}_rate"], row["baseline_rate"]
            row[f"{side}_x_baseline"] = rate / yard if rate and yard else None
            cpu = _by_repeat(records, system, workload, queue, "cpu_us_per_msg")
            row[f"{side}_cpu_us"] = statistics.median(cpu.values()) if cpu else None
        best = {
            system: statistics.median(values.values())
            for system in {r["system"] for r in records}
            if (values := _by_repeat(records, system, workload, queue))
        }
        row["ceiling_system"] = max(best, key=best.__getitem__, default=None)
        row["ceiling"] = best.get(row["ceiling_system"]) if best else None
        wide = best.get(WIDE)
        row["wide_share"] = wide / row["ceiling"] if wide and row["ceiling"] else None
        for side in ("ours", "reference"):
            rate, ceiling = row[f"{side}_rate"], row["ceiling"]
            row[f"{side}_share"] = rate / ceiling if rate and ceiling else None
        if row["ours_rate"] and row["reference_rate"]:
            row["over"] = row["ours_rate"] / row["reference_rate"]
            paired = [ours[k] / ref[k] for k in ours.keys() & ref.keys()]
            row["over_min"], row["over_max"] = min(paired, default=None), max(paired, default=None)
            row["verdict"] = PASS if row["over"] >= FLOOR else REGRESSION
        else:
            row.update(over=None, over_min=None, over_max=None, verdict=MISSING)
        rows.append(row)
    return rows


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _cpu(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _share(row: Row) -> str:
    ours, ref = row.get("ours_share"), row.get("reference_share")
    if ours is None:
        return "—"
    return f"{ours:.2f}" + ("" if ref is None else f" ({ref:.2f})")


def _over(row: Row) -> str:
    if row["over"] is None:
        return "—"
    spread = ""
    if row["runs"] > 1 and row["over_min"] is not None:
        spread = f" ({row['over_min']:.2f}–{row['over_max']:.2f})"
    return f"{row['over']:.2f}{spread}"


def table(rows: Sequence[Row], ref: Reference, plan: dict[str, Any]) -> str:
    """The comparison as Markdown, with the rule and the reference it is measured against."""
    head = (
        f"Working tree against the reference {ref.system} (commit {ref.commit[:12]}), one broker, "
        f"runs alternating; N = {plan['n']:,}, {plan['repeats']} repeat(s), medians "
        f"(paired min–max). Rule: working / reference ≥ {FLOOR:.2f}, otherwise {REGRESSION}."
    )
    out = [head, ""]
    out.append(
        f"| workload | queue | working × {BASELINE} | reference × {BASELINE} "
        "| working / reference | verdict | CPU µs/msg working, reference "
        "| share of the ceiling: working (reference) | one process, wide |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        out.append(
            f"| {r['workload']} | {r['queue_type']} | {_x(r['ours_x_baseline'])} "
            f"| {_x(r['reference_x_baseline'])} | {_over(r)} | {r['verdict']} "
            f"| {_cpu(r['ours_cpu_us'])}, {_cpu(r['reference_cpu_us'])} | {_share(r)} "
            f"| {_ratio(r.get('wide_share'))} |"
        )
    out += [
        "",
        "Share of the ceiling: each side's rate over the best median rate any system reached in "
        f"this run on that row, aio-workq in two processes on the one queue (`{PAIR}`) included "
        "(every other system runs one process). One process, wide: aio-workq in one process "
        f"with the pair's settings (`{WIDE}`: `Producer(channels=2)`, the worker's concurrency "
        "and prefetch doubled to the pair's 200), over the same ceiling.",
    ]
    return "\n".join(out) + "\n"


def outcome(rows: Sequence[Row]) -> str:
    """PASS if every row passed; otherwise the worst verdict (ERROR over REGRESSION)."""
    found = {r["verdict"] for r in rows}
    if not rows or MISSING in found:
        return MISSING
    return REGRESSION if REGRESSION in found else PASS
