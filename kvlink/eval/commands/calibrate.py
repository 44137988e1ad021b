"""`kvlink-bench calibrate`: the model's quality table from calibration-split quality runs, and a check
that the planner's picks lie on the measured frontier.

Given examples of one context-length bucket (kvlink.budget.LENGTH_EDGES; SQuAD's ~200-token paragraphs all
fall in the first) the table is flat, one quality per config; given examples of several (`--task
squad,long`), it also holds each bucket's mean over the examples whose context length falls in it, and the
planner looks quality up at the length of the context it sends."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from kvlink.eval.commands.common import Subparsers, make_console

if TYPE_CHECKING:
    from kvlink.budget import LengthBucket, QualityTable


def add_parser(sub: Subparsers) -> None:
    c = sub.add_parser(
        "calibrate", help="write the model's quality table; check the planner's picks are on the frontier"
    )
    c.add_argument(
        "results", nargs="+",
        help="results.json of a quality run (or its directory); several runs of one model merge",
    )  # fmt: skip
    c.add_argument(
        "--task", default=None,
        help="task(s) whose results define quality, comma-separated, e.g. squad,long (default: squad if "
        "present); examples of several context-length buckets give a quality per bucket",
    )  # fmt: skip
    c.add_argument("--quality", default="fidelity", help="summary metric used as quality (default fidelity)")
    c.add_argument("--out", default=None, help="table path (default <cache_dir>/quality/<fingerprint>.json)")
    c.add_argument("--budgets", default="18.75%,12.5%,6.25%", help="comma-separated budgets to check")
    c.add_argument("--json", default=None, help="also write the check as JSON here")
    c.add_argument(
        "--holdout", action="append", default=[], metavar="RUN",
        help="an evaluation-split quality run (repeatable): a refined config enters the table only if its "
        "gain over its plain twin (kvlink.eval.holdout.plain_twin) holds there, paired",
    )  # fmt: skip
    c.set_defaults(func=run)


def task_list(task: str | Sequence[str]) -> list[str]:
    """'squad,long' (or a sequence of names) -> ['squad', 'long']; 'all' (every task pooled) stands alone."""
    tasks = [t.strip() for t in task.split(",")] if isinstance(task, str) else [str(t) for t in task]
    tasks = list(dict.fromkeys(t for t in tasks if t))
    if not tasks:
        raise ValueError(f"no task given: {task!r}")
    if "all" in tasks and len(tasks) > 1:
        raise ValueError(f"task 'all' already pools every task; give it alone, got {task!r}")
    return tasks


def quality_table(
    results: dict[str, Any],
    task: str | Sequence[str] = "squad",
    quality: str = "fidelity",
    runs: Sequence[dict[str, Any]] | None = None,
) -> QualityTable:
    """A kvlink.budget.QualityTable: mean `quality` of each measured config of `task`, by quality_key.

    `task`: one task, or several (comma-separated or a sequence) whose examples are pooled. `entries` holds
    each config's mean over all of them (one task: its summary row's mean; several: the rows' means weighted
    by their examples). When the examples' context lengths fall in more than one bucket of
    kvlink.budget.LENGTH_EDGES, the table also holds each bucket's means (length_buckets over `runs`, the
    runs `results` merges, samples and all; default [results]); else it is flat.
    """
    from kvlink.budget import QualityTable

    tasks = task_list(task)
    known = sorted({r["task"] for r in results["summary"]})
    rows = [r for r in results["summary"] if r["task"] in tasks]
    absent = [t for t in tasks if t not in known]
    if absent:
        raise ValueError(f"no results for task {', '.join(map(repr, absent))}; tasks: {known}")
    by_task: dict[str, dict[str, tuple[float, int]]] = {}
    for r in rows:
        value = r[quality]["mean"]
        if "key" in r and math.isfinite(value):
            by_task.setdefault(r["task"], {})[r["key"]] = (float(value), int(r["n"]))  # the last row wins
    pooled: dict[str, list[tuple[float, int]]] = {}
    for measured in by_task.values():
        for key, cell in measured.items():
            pooled.setdefault(key, []).append(cell)
    entries = {
        key: cells[0][0] if len(cells) == 1 else sum(v * n for v, n in cells) / sum(n for _, n in cells)
        for key, cells in pooled.items()
    }
    buckets = length_buckets(runs if runs is not None else [results], tasks, quality)
    n = sum(max(r["n"] for r in rows if r["task"] == t) for t in tasks)  # examples: the most of each task
    source = f"kvlink-bench quality ({'+'.join(tasks)}, {quality}, n={n})"
    if len(buckets) > 1:
        spans = ", ".join(f"{_span(b.lo, b.hi)}: n={b.n}" for b in buckets)
        source += f" per context length ({spans})"
    meta = results.get("meta", {})
    return QualityTable(
        model=str(meta.get("fingerprint", "unknown")),
        entries=entries,
        source=source,
        buckets=tuple(buckets) if len(buckets) > 1 or any(_fits_rate(b) for b in buckets) else (),
        metric=quality,
    )


def _fits_rate(bucket: LengthBucket) -> bool:
    """Whether `bucket` holds a rate-fitted entry: the planner reads those only from the bucket of the
    context's length (QualityTable.fitted), so a table holding one keeps its buckets even when one."""
    from kvlink.budget import parse_fitted

    return any(parse_fitted(key) is not None for key in bucket.entries)


def _span(lo: int, hi: int | None) -> str:
    """[lo, hi) tokens in words: '0-1k', '16k+'."""

    def k(tokens: int) -> str:
        return f"{tokens // 1024}k" if tokens and tokens % 1024 == 0 else str(tokens)

    return f"{k(lo)}+" if hi is None else f"{k(lo)}-{k(hi)}"


def length_buckets(
    runs: Sequence[dict[str, Any]], tasks: Sequence[str], quality: str = "fidelity"
) -> list[LengthBucket]:
    """Each config's mean `quality` per context-length bucket (kvlink.budget.LENGTH_EDGES) over the examples
    of `tasks` whose context length falls in it: kvlink.budget.LengthBucket, shortest first, only buckets
    some example fell in.

    A (task, config) measured by several runs is taken from the run whose summary row has the most examples
    (the first on a tie), as report.merge_results merges them. Its examples are that run's samples, each
    with its context length T; a run without samples (or without `quality` in them) counts the row whole,
    in the bucket of its mean length (approximate for a task whose contexts span buckets), and a row that
    does not say its length counts in none. Task 'all' takes the samples of every task.
    """
    from kvlink.budget import LengthBucket, length_bucket

    chosen: dict[tuple[str, str], tuple[int, int]] = {}  # (task, key) -> (run index, examples)
    for i, run in enumerate(runs):
        for row in run["summary"]:
            cell = (str(row["task"]), str(row.get("key")))
            if row["task"] in tasks and "key" in row and (cell not in chosen or row["n"] > chosen[cell][1]):
                chosen[cell] = (i, row["n"])
    sums: dict[tuple[int, int | None], dict[str, list[float]]] = {}  # bucket -> key -> [sum, count]

    def add(tokens: float, key: str, total: float, count: int) -> None:
        acc = sums.setdefault(length_bucket(round(tokens)), {}).setdefault(key, [0.0, 0])
        acc[0] += total
        acc[1] += count

    for i, run in enumerate(runs):
        mine: dict[tuple[str, str], dict[str, Any]] = {}  # (task, key) -> its row (the last, as entries)
        for row in run["summary"]:
            cell = (str(row["task"]), str(row.get("key")))
            if chosen.get(cell) == (i, row["n"]):
                mine[cell] = row
        by_name = {(task, row["config"]): row for (task, _), row in mine.items()}
        counted: set[tuple[str, str]] = set()
        for sample in run.get("samples") or []:
            value, tokens = sample.get(quality), sample.get("T")
            if not (_finite(value) and _finite(tokens)):
                continue
            for task in {str(sample.get("task")), "all"} & set(tasks):
                row = by_name.get((task, str(sample.get("config"))))
                if row is not None:
                    add(tokens, row["key"], value, 1)
                    counted.add((task, row["key"]))
        for cell, row in mine.items():
            value, tokens = row[quality]["mean"], row.get("T")
            if cell not in counted and _finite(value) and _finite(tokens):
                add(tokens, row["key"], value * row["n"], row["n"])
    return [
        LengthBucket(lo, hi, {key: total / count for key, (total, count) in cells.items()},
                     n=int(max(count for _, count in cells.values())))
        for (lo, hi), cells in sorted(sums.items())
    ]  # fmt: skip


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def gated(
    table: QualityTable, holdout_runs: Sequence[str | Path], tasks: Sequence[str], quality: str
) -> tuple[QualityTable, dict[str, str]]:
    """`table` through the evaluation-split gate of `holdout_runs` (kvlink.eval.holdout.gate) for each of
    `tasks` the runs have samples of; unchanged without runs. A table per length is gated, task by task,
    in the buckets that task's samples fall in only (SQuAD's ~200 tokens gate the short bucket, the long
    task's 2k-8k the long ones). Several runs pair across each other (kvlink.eval.holdout.combine: a
    question the runs answered differently at full KV is left out). The runs' samples must all be
    evaluation-split examples, of one of `tasks` at least (ValueError otherwise)."""
    from kvlink.eval import holdout

    if not holdout_runs:
        return table, {}
    records, _ = holdout.combine([holdout.read_samples(path) for path in holdout_runs])
    present = [t for t in tasks if any(r.get("task") == t for r in records)]
    if not present:
        holdout.evaluation_records(records)  # a run of the wrong split says so first
        found = sorted({str(r.get("task")) for r in records})
        raise ValueError(
            f"the holdout runs have no samples of {', '.join(tasks)} (they have {', '.join(found)})"
        )
    dropped: dict[str, str] = {}
    for task in present:
        _, pairs = holdout.check(records, table, task, quality)
        lengths = [int(r["T"]) for r in records if r.get("task") == task and r.get("T") is not None]
        table, now = holdout.gate(table, pairs, lengths)
        for key, why in now.items():
            dropped[key] = f"{dropped[key]}; {task}: {why}" if key in dropped else f"{task}: {why}"
    return table, dropped


def check_calibration_results(paths: Sequence[str | Path]) -> None:
    """Refuse (ValueError naming the example and its article) any quality run that measured an example outside
    the calibration split: the table is fitted on calibration data only. A run without samples counts as
    calibration only when its meta says it ran on that split."""
    from kvlink.eval import report
    from kvlink.eval.splits import CALIBRATION, require_calibration

    for path in paths:
        run = report.load_results(path)
        samples = run.get("samples") or []
        if samples:
            require_calibration(samples, f"kvlink-bench calibrate ({path})")
        elif run.get("meta", {}).get("split") != CALIBRATION:
            raise ValueError(
                f"kvlink-bench calibrate ({path}): no samples, and its meta does not say it ran on the calibration "
                f"split (split: {run.get('meta', {}).get('split')!r}); calibrate takes calibration-split runs only "
                "(kvlink-bench quality --split calibration)"
            )


def run(args: argparse.Namespace) -> int:
    from kvlink.budget import parse_budget
    from kvlink.eval import report

    try:
        check_calibration_results(args.results)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    runs = [report.load_results(p) for p in args.results]
    results = report.merge_runs(runs)
    known = sorted({r["task"] for r in results["summary"]})
    try:
        tasks = task_list(args.task or ("squad" if "squad" in known else known[0]))
        table = quality_table(results, tasks, args.quality, runs)
        table, dropped = gated(table, args.holdout, tasks, args.quality)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    fingerprint = results.get("meta", {}).get("fingerprint")
    from kvlink.budget import default_quality_path

    path = Path(args.out) if args.out else default_quality_path(fingerprint or "unknown")
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    budgets = [parse_budget(b) for b in args.budgets.split(",")]

    from rich.table import Table

    console = make_console()
    checks: list[dict[str, Any]] = []
    for task in tasks:  # each task's picks against its own frontier, at its rows' context lengths
        mine = report.planner_check(results["summary"], table, budgets, task, args.quality)
        view = Table(title=f"planner pick vs the measured frontier ({task}, {args.quality})")
        for col in ("budget", "pick", "wire % FP16", args.quality, "on frontier", "best measured that fits"):
            view.add_column(col)
        for c in mine:
            view.add_row(
                f"{100 * c['budget']:.2f}%",
                str(c.get("pick")),
                f"{100 * c['pick_fraction']:.2f}%" if c.get("pick") else "–",
                f"{c['pick_quality']:.3f}" if c.get("pick") else "–",
                "yes" if c["on_frontier"] else "NO",
                f"{c.get('best')} ({c['best_quality']:.3f})" if c.get("best") else c.get("note", "–"),
            )
        console.print(view)
        checks += [{"task": task, **c} for c in mine]
    for key, why in dropped.items():
        console.print(f"left out {key}: {why}")
    lengths = f", {len(table.buckets)} context-length buckets" if table.buckets else ""
    console.print(f"wrote quality table ({len(table.entries)} configs{lengths}) to {path}")
    if args.json:
        doc = {"table": str(path), "task": ",".join(tasks), "checks": checks, "left_out": dropped}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0 if all(c["on_frontier"] for c in checks) else 1
