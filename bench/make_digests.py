"""Write the codec digests of the shipped quality table's configs for the tree on PYTHONPATH.

    PYTHONPATH=. python bench/make_digests.py --compare tests/data/digests-12bfafe-<machine>.json

The kvlink package is imported from PYTHONPATH, the computation from this repository's
tests/digests.py (see its docstring for what is recorded): today's scripts need a tree with
kvlink.recipe (issue 19 on). The baseline itself is 12bfafe's code's output on the machine that runs
the tests (the float32 prefill depends on the CPU): bench/rebaseline_digests.sh makes it with 12bfafe's
tree and this script and tests/digests.py as they were committed with it (a996675). Configs come from the
tree's shipped quality table: its keys are Recipe labels, parsed back (digests.config_from_label)
with per-layer allocations from the tree's shipped sensitivity profile; each must label back to its
key exactly. With --runs, the configs are also checked against the codec dicts that the calibration
runs the table was made from recorded for the same keys (results.json.gz summary rows).

--compare recomputes with the configs and contexts of a baseline file (not the table's) and prints
every difference: the same check as tests/test_digests.py, with a report instead of an assertion.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "tests"))  # appended: kvlink itself comes from PYTHONPATH

import digests  # noqa: E402

# The runs `kvlink-bench calibrate` merged into the shipped table (docs/results.md, "The planner's quality table and its picks").
CALIBRATION_RUNS = (
    "quality-h100", "beyond-h100", "qround-fixed-h200", "qround-g64-h200", "layerbits-h200", "fill-h200",
    "kwidths-h200", "kwidths2-h200", "vwidths-h200", "ceiling-h200",
)  # fmt: skip


def check_runs(configs: dict[str, Any], runs_dir: Path) -> dict[str, list[str]]:
    """Label -> the runs whose summary rows recorded a codec dict for that key; raises when one of
    those dicts is not the parsed config (a missing field is its default: older runs lacked them)."""
    from kvlink.recipe import Recipe

    seen: dict[str, list[str]] = {label: [] for label in configs}
    for run in CALIBRATION_RUNS:
        with gzip.open(runs_dir / run / "results.json.gz") as handle:
            rows = json.load(handle)["summary"]
        for row in rows:
            label = row.get("key")
            if row["task"] != "squad" or label not in configs or "codec" not in row:
                continue
            if Recipe.from_dict(row["codec"]) != configs[label]:
                raise ValueError(f"{run}: {label!r} was measured as {row['codec']}, not {configs[label]}")
            if run not in seen[label]:
                seen[label].append(run)
    missing = [label for label, runs in seen.items() if not runs]
    if missing:
        raise ValueError(f"no calibration run measured {missing}")
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=digests.BASELINE, help="JSON to write")
    parser.add_argument("--commit", default="12bfafe", help="the commit of the tree on PYTHONPATH, recorded")
    parser.add_argument(
        "--runs", type=Path, default=None, help="bench/results of the tree: check configs against its runs"
    )
    parser.add_argument("--compare", type=Path, default=None, help="baseline to recompute and compare with")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import kvlink
    from kvlink.recipe import Recipe

    started = time.perf_counter()
    lm = digests.load_lm()
    table, sensitivity = digests.baseline_table_and_profile(lm.name)
    print(
        f"kvlink from {Path(kvlink.__file__).parent}; model {lm.fingerprint[:12]}; {len(table.entries)} table entries"
    )

    def progress(context: str, label: str) -> None:
        print(f"  {time.perf_counter() - started:7.1f} s  {context:8s} {label}", flush=True)

    if args.compare is not None:
        baseline = json.loads(args.compare.read_text())["digests"]
        configs = {label: Recipe.from_dict(d) for label, d in baseline["configs"].items()}
        contexts = [c["facts"] for c in baseline["contexts"]]
        specs = [{k: c[k] for k in ("name", "title", "context", "question")} for c in contexts]
        now = digests.compute(lm, specs, configs, table, sensitivity, progress=progress)
        now = json.loads(json.dumps(now))
        diffs = digests.differences(baseline, now)
        print(f"{len(diffs)} differences from {args.compare} ({time.perf_counter() - started:.0f} s)")
        for line in diffs:
            print("  " + line)
        return 1 if diffs else 0

    configs = digests.table_configs(table, sensitivity)
    sources = check_runs(configs, args.runs) if args.runs is not None else None
    specs = digests.pick_contexts(lm.tokenizer)
    result = digests.compute(lm, specs, configs, table, sensitivity, progress=progress)
    doc = {
        "about": (
            "Codec digests of every config of the shipped quality table (and the planner's picks) on fixed "
            f"contexts, made with commit {args.commit} by bench/make_digests.py; tests/test_digests.py "
            "compares the current code with them (issue 19's proof)."
        ),
        "commit": args.commit,
        "made_s": round(time.perf_counter() - started, 1),
        "table": {
            "source": "kvlink/" + table.source.rsplit("/kvlink/", 1)[-1],
            "entries": dict(sorted(table.entries.items())),
            "config_from": "each key parsed back to the Recipe whose label it is (tests/digests.py "
            "config_from_label; per-layer bits: the shipped sensitivity profile at budget.MIX_AVERAGES)",
            "measured_in": sources,
        },
        "budgets": list(digests.BUDGETS),
        "ids": {
            "session_id": digests.SESSION_ID,
            "message_id": digests.MESSAGE_ID,
            "chunk_bytes": digests.CHUNK_BYTES,
        },
        "digests": result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(digests.dumps(doc))
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
