"""`kvlink-bench report`: rebuild results.json, results.md and the plots from a quality run's samples."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvlink.eval.commands.common import Subparsers
from kvlink.eval.splits import SPLITS


def add_parser(sub: Subparsers) -> None:
    r = sub.add_parser("report", help="rebuild results.json, results.md and plots from a run's samples.jsonl")
    r.add_argument("out", help="the quality run's output directory")
    r.add_argument(
        "--split", choices=(*SPLITS, "all"), default="evaluation",
        help="report the samples of this split only (default evaluation; all: every sample)",
    )  # fmt: skip
    r.set_defaults(func=run)


def split_records(records: Sequence[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """The records of `split`'s examples (kvlink.eval.splits.split_of_eid); `all`: every record."""
    from kvlink.eval.splits import split_of_eid

    if split == "all":
        return list(records)
    return [r for r in records if split_of_eid(r["eid"]) == split]


def run(args: argparse.Namespace) -> int:
    from collections import Counter

    from kvlink.eval import grid, report
    from kvlink.eval.splits import split_of_eid

    out = Path(args.out)
    records, _ = grid.read_done(out)
    if not records:
        raise SystemExit(f"no samples in {out}/{grid.SAMPLES_GLOB}")
    chosen = split_records(records, args.split)
    if not chosen:
        held = Counter(str(split_of_eid(eid) or "no split") for eid in {r["eid"] for r in records})
        raise SystemExit(
            f"no samples of the {args.split} split in {out} (its examples: "
            f"{', '.join(f'{n} {s}' for s, n in sorted(held.items()))}); pick one with --split"
        )
    records = chosen
    meta = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    meta["report_split"] = args.split
    aliases = {c["name"]: c["aliases"] for c in meta.get("configs", []) if c.get("aliases")}
    result = report.write_report(records, out, meta, aliases)
    print(report.markdown(result["summary"], aliases))
    return 0
