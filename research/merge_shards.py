"""Join the shards of a screen (results-<k>of<n>.json) into results.json, with paired comparisons.

usage: python research/merge_shards.py NAME [--pairs BASE:CAND,BASE:CAND,...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, print_summary, summarize, write_paired  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--pairs", default="", help="comma-separated BASE:CANDIDATE")
    args = ap.parse_args()
    out = ROOT / "results" / args.name
    shards = sorted(out.glob("results-*of*.json"))
    if not shards:
        raise SystemExit(f"no shards in {out}")
    parts = [json.loads(p.read_text()) for p in shards]
    merged = {"meta": {**parts[0]["meta"], "shards": [p.name for p in shards],
                       "seconds": sum(p["meta"]["seconds"] for p in parts)},
              "eids": [], "per_question": {}}  # fmt: skip
    for part in parts:
        merged["eids"] += part["eids"]
        for key, metrics in part["per_question"].items():
            into = merged["per_question"].setdefault(key, {m: [] for m in metrics})
            for m, values in metrics.items():
                into[m] += values
    merged["meta"]["questions"] = len(merged["eids"])
    merged["summary"] = {k: summarize(v) for k, v in merged["per_question"].items()}
    (out / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
    print_summary(merged)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs.split(",") if p]
    write_paired(args.name, pairs)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
