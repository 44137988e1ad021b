"""`kvlink-bench calibrate`: the model's quality table from calibration-split quality runs, and a check
that the planner's picks lie on the measured frontier."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvlink.eval.commands.common import Subparsers, make_console


def add_parser(sub: Subparsers) -> None:
    c = sub.add_parser(
        "calibrate", help="write the model's quality table; check the planner's picks are on the frontier"
    )
    c.add_argument(
        "results", nargs="+",
        help="results.json of a quality run (or its directory); several runs of one model merge",
    )  # fmt: skip
    c.add_argument(
        "--task", default=None, help="task whose results define quality (default: squad if present)"
    )
    c.add_argument("--quality", default="fidelity", help="summary metric used as quality (default fidelity)")
    c.add_argument("--out", default=None, help="table path (default <cache_dir>/quality/<fingerprint>.json)")
    c.add_argument("--budgets", default="18.75%,12.5%,6.25%", help="comma-separated budgets to check")
    c.add_argument("--json", default=None, help="also write the check as JSON here")
    c.set_defaults(func=run)


def quality_table(results: dict[str, Any], task: str = "squad", quality: str = "fidelity") -> Any:
    """A kvlink.budget.QualityTable: mean `quality` of each measured config of `task`, by quality_key."""
    from kvlink.budget import QualityTable

    rows = [r for r in results["summary"] if r["task"] == task]
    if not rows:
        raise ValueError(
            f"no results for task {task!r}; tasks: {sorted({r['task'] for r in results['summary']})}"
        )
    entries: dict[str, float] = {}
    for r in rows:
        value = r[quality]["mean"]
        if "key" in r and math.isfinite(value):
            entries[r["key"]] = float(value)
    meta = results.get("meta", {})
    return QualityTable(
        model=str(meta.get("fingerprint", "unknown")),
        entries=entries,
        source=f"kvlink-bench quality ({task}, {quality}, n={max(r['n'] for r in rows)})",
    )


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
    results = report.merge_results(args.results)
    tasks = sorted({r["task"] for r in results["summary"]})
    task = args.task or ("squad" if "squad" in tasks else tasks[0])
    table = quality_table(results, task, args.quality)
    fingerprint = results.get("meta", {}).get("fingerprint")
    from kvlink.budget import default_quality_path

    path = Path(args.out) if args.out else default_quality_path(fingerprint or "unknown")
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    checks = report.planner_check(results["summary"], table, budgets, task, args.quality)

    from rich.table import Table

    view = Table(title=f"planner pick vs the measured frontier ({task}, {args.quality})")
    for col in ("budget", "pick", "wire % FP16", args.quality, "on frontier", "best measured that fits"):
        view.add_column(col)
    for c in checks:
        view.add_row(
            f"{100 * c['budget']:.2f}%",
            str(c.get("pick")),
            f"{100 * c['pick_fraction']:.2f}%" if c.get("pick") else "–",
            f"{c['pick_quality']:.3f}" if c.get("pick") else "–",
            "yes" if c["on_frontier"] else "NO",
            f"{c.get('best')} ({c['best_quality']:.3f})" if c.get("best") else c.get("note", "–"),
        )
    console = make_console()
    console.print(view)
    console.print(f"wrote quality table ({len(table.entries)} configs) to {path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"table": str(path), "task": task, "checks": checks}, indent=1))
    return 0 if all(c["on_frontier"] for c in checks) else 1
