"""Quality of a quality run's configs by context length (issue 24), not part of the package.

usage: python bench/by_length.py RUN_DIR [--task long] [--edges 4096] [--json OUT.json]

For each config and each length bucket of the samples' context tokens T (edges split them: 4096 gives
T < 4096 and T >= 4096, plus "all"): the questions, mean wire bytes as % of FP16, and the answer
fidelity's mean with its 95% bootstrap interval (kvlink.eval.report.bootstrap_ci, seed 0). Prints a
Markdown table.
"""

import argparse
import itertools
import json
from pathlib import Path

from kvlink.eval.report import bootstrap_ci, load_results


def buckets(edges: list[int]) -> list[tuple[str, int, float]]:
    bounds = [0, *edges, float("inf")]
    out = [("all", 0, float("inf"))]
    for lo, hi in itertools.pairwise(bounds):
        out.append(
            (f"T < {hi:,}" if lo == 0 else f"T >= {lo:,}" if hi == float("inf") else f"{lo:,}-{hi:,}", lo, hi)
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--task", default="long")
    p.add_argument("--edges", default="4096", help="comma-separated token edges (default 4096)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    samples = [s for s in load_results(Path(args.run))["samples"] if s["task"] == args.task]
    configs = list(dict.fromkeys(s["config"] for s in samples))
    rows = []
    for name, lo, hi in buckets([int(e) for e in args.edges.split(",") if e]):
        for config in configs:
            mine = [s for s in samples if s["config"] == config and lo <= s["T"] < hi]
            if not mine:
                continue
            mean, ci_lo, ci_hi = bootstrap_ci(s["fidelity"] for s in mine)
            rows.append({
                "bucket": name, "config": config, "n": len(mine),
                "tokens_mean": sum(s["T"] for s in mine) / len(mine),
                "wire_percent": 100 * sum(s["wire_frac"] for s in mine) / len(mine),
                "fidelity": mean, "ci": [ci_lo, ci_hi],
            })  # fmt: skip
    print("| length | config | questions | mean T | wire % FP16 | answer fidelity [95% CI] |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['bucket']} | `{r['config']}` | {r['n']} | {r['tokens_mean']:,.0f} | {r['wire_percent']:.2f} "
            f"| {r['fidelity']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
