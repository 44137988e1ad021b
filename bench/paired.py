"""Paired comparison of two quality runs on the same questions (issue 7), not part of the package.

usage: python bench/paired.py BASE_DIR [BASE_DIR ...] --against RUN_DIR --suffix -qround --out PAIRED.json
       python bench/paired.py BASE_DIR ... --against RUN_DIR --suffix "" --replace mix3.5=k4v3 --out PAIRED.json
       python bench/paired.py BASE_DIR --against RUN_DIR --same --out PAIRED.json

For every config C of RUN_DIR that ends in SUFFIX and whose twin C-without-SUFFIX was measured in a
BASE_DIR, the answer fidelity of the two is compared question by question: mean difference and a 95%
bootstrap interval (kvlink.eval.report.bootstrap_ci: resamples of the questions, seed 0). Configs without
SUFFIX present in both (anchors) are checked for identical answers, which says whether the runs are comparable.
With --replace OLD=NEW (repeatable) a config's twin is its name with OLD replaced by NEW instead. With
--same every config is paired with the config of the same name in BASE_DIR (one recipe measured by two codes
or on two devices), on the questions both runs gave the same full-KV answer (the others are counted).
"""

import argparse
import json
from pathlib import Path

from kvlink.eval.holdout import combine
from kvlink.eval.report import bootstrap_ci, load_results


def load(run_dir: Path) -> dict[str, dict[str, dict]]:
    """config -> eid -> sample, from a `kvlink-bench quality` results.json."""
    samples = load_results(run_dir)["samples"]
    by_config: dict[str, dict[str, dict]] = {}
    for s in samples:
        by_config.setdefault(s["config"], {})[s["eid"]] = s
    return by_config


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", nargs="+", type=Path)
    ap.add_argument("--against", type=Path, required=True)
    ap.add_argument("--suffix", default="-qround")
    ap.add_argument("--replace", action="append", default=[], metavar="OLD=NEW")
    ap.add_argument("--same", action="store_true", help="pair each config with its namesake in BASE")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    base: dict[str, dict[str, dict]] = {}
    for d in args.base:
        for config, samples in load(d).items():
            base.setdefault(config, samples)
    run = load(args.against)
    replacements = [tuple(r.split("=", 1)) for r in args.replace]

    def twin_of(config: str) -> str:
        for old, new in replacements:
            if old in config:
                return config.replace(old, new)
        return config.removesuffix(args.suffix) if args.suffix else config

    lines, out = [], {"anchors": {}, "pairs": {}}
    if args.same:  # a fidelity scores against its own run's full-KV answer: pair where both runs' agree
        records = [[r for s in runs.values() for r in s.values()] for runs in (run, base)]
        _, split = combine(records)
        out["reference_differs"] = split
        both = {e for s in run.values() for e in s} & {e for s in base.values() for e in s}
        lines.append(f"{len(split)} of {len(both)} questions have another full-KV answer in BASE")
    for config in sorted(c for c in set(run) & set(base) if twin_of(c) == c and not args.same):
        eids = sorted(set(run[config]) & set(base[config]))
        same = sum(run[config][e]["answer"] == base[config][e]["answer"] for e in eids)
        out["anchors"][config] = {"n": len(eids), "identical_answers": same}
        lines.append(f"anchor {config}: {same}/{len(eids)} answers identical across the runs")
    lines.append(f"{'config':<28} {'fid base':>8} {'fid run':>8} {'delta [95% CI]':>24} {'KL base':>8} {'KL run':>8} {'wire%':>6} {'base':>6}")
    for config in run:
        twin = twin_of(config)
        if (twin == config and not args.same) or twin not in base:
            continue
        eids = sorted(set(run[config]) & set(base[twin]) - set(out.get("reference_differs", ())))
        a = [base[twin][e] for e in eids]
        b = [run[config][e] for e in eids]
        delta, lo, hi = bootstrap_ci(y["fidelity"] - x["fidelity"] for x, y in zip(a, b))
        row = {
            "n": len(eids),
            "fid_base": mean([x["fidelity"] for x in a]),
            "fid_run": mean([y["fidelity"] for y in b]),
            "delta": delta,
            "ci": [lo, hi],
            "kl_base": mean([x["kl"] for x in a]),
            "kl_run": mean([y["kl"] for y in b]),
            "wire_pct": 100 * mean([y["wire_frac"] for y in b]),
            "wire_pct_base": 100 * mean([x["wire_frac"] for x in a]),
        }
        out["pairs"][config] = row
        lines.append(
            f"{twin:<28} {row['fid_base']:8.3f} {row['fid_run']:8.3f} "
            f"{row['delta']:+7.3f} [{lo:+.3f}, {hi:+.3f}] {row['kl_base']:8.4f} {row['kl_run']:8.4f} {row['wire_pct']:6.2f} {row['wire_pct_base']:6.2f}"
        )
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
