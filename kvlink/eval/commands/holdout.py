"""`kvlink-bench holdout`: the planner's quality table against a quality run on the evaluation split
(kvlink.eval.holdout): does each entry hold on data nobody tuned on, and does each refinement's gain
over its simpler twins?"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvlink.eval.commands.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    h = sub.add_parser(
        "holdout", help="check the quality table's entries and gains on an evaluation-split quality run"
    )
    h.add_argument(
        "runs",
        nargs="+",
        help="quality run directories (samples*.jsonl or results.json(.gz)); several pair across each other "
        "on the questions they answered alike at full KV",
    )
    h.add_argument(
        "--table", default=None,
        help="quality table JSON (default: the one the planner uses for the run's model)",
    )  # fmt: skip
    h.add_argument("--task", default="squad", help="task to check (default squad)")
    h.add_argument("--quality", default="fidelity", help="sample metric (default fidelity)")
    h.add_argument(
        "--pair", action="append", default=[], metavar="CONFIG=TWIN",
        help="also compare CONFIG against TWIN, paired (each config meets its measured twins anyway)",
    )  # fmt: skip
    h.add_argument("--json", default=None, help="write the check as JSON here")
    h.add_argument("--md", default=None, help="write the Markdown tables here")
    h.set_defaults(func=run)


def _pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition("=")
    if not sep or not a or not b:
        raise SystemExit(f"--pair takes CONFIG=TWIN, got {text!r}")
    return a, b


def run(args: argparse.Namespace) -> int:
    from kvlink.budget import QualityTable
    from kvlink.eval import holdout

    runs = []
    meta: dict[str, object] = {}
    for path in map(Path, args.runs):
        try:
            runs.append(holdout.read_samples(path))
        except ValueError as e:
            raise SystemExit(f"kvlink-bench holdout: {e}") from None
        run_json = path / "run.json"
        if not meta and run_json.is_file():
            meta = json.loads(run_json.read_text())
    records, split = holdout.combine(runs)
    if split:
        print(f"left out {len(split)} questions the runs answered differently at full KV: {', '.join(split[:5])}"
              + (", ..." if len(split) > 5 else ""))  # fmt: skip
    if args.table:
        table = QualityTable.load(args.table)
        source = args.table
    else:
        table = QualityTable.for_model(str(meta.get("fingerprint", "")), str(meta.get("model", "")))
        source = table.source
    try:
        cells, pairs = holdout.check(records, table, args.task, args.quality, [_pair(p) for p in args.pair])
    except ValueError as e:
        raise SystemExit(f"kvlink-bench holdout: {e}") from None
    text = holdout.markdown(cells, pairs, args.quality)
    if args.quality != table.metric:
        print(f"the table ({source}) rates {table.metric}, not {args.quality}: its entries are not compared, "
              "the pairs are")  # fmt: skip
    print(text, end="")
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        doc = holdout.as_json(
            cells, pairs, runs=list(args.runs), table=source, task=args.task, quality=args.quality
        )
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0
