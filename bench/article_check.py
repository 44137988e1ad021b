"""Would the holdout check pass an honest quality table? Calibration articles against each other (issue 24).

usage: python bench/article_check.py RUN_DIR [RUN_DIR ...] [--task squad] [--configs A,B] [--json OUT.json]

`kvlink-bench holdout` holds a table entry (the mean over the calibration split's four articles) to the
95% interval of the evaluation split's mean, an interval over questions (kvlink.eval.report.bootstrap_ci).
Questions of one article are not independent: if articles differ, a table measured on four articles
misses four others by more than a question-level interval allows, however honest it is. This script
asks the calibration split alone (it refuses any other example), for each config of the runs:

- the articles' means and two variance components: `sigma` (questions within an article, pooled) and
  `tau` (between articles: the variance of the article means less what the questions' own noise gives
  them, method of moments; 0 when that is negative);
- half splits: for each way to split the articles in two halves (two and two), each half's mean held to
  the other half's interval as the holdout check does: `holds`, `overstated` or `understated`, and in how
  many of them every config holds at once;
- `p_holds`: the chance that a table of one set of articles lies within the question-level 95% interval
  of another set of the same size and question counts when both are drawn from the same population of
  articles (normal approximation: the difference of two means has variance tau^2 sum(w^2) + sigma^2/n on
  each side, w the articles' shares of the questions; the interval's half width is 1.96 sqrt(sigma^2 +
  tau^2)/sqrt(n), the pooled questions' spread).

A question measured by several runs counts once (the first run's sample). Prints a Markdown table.
"""

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path
from statistics import NormalDist

from kvlink.eval.holdout import verdict_of
from kvlink.eval.report import ALPHA, bootstrap_ci, load_results
from kvlink.eval.splits import article_of_eid, require_calibration

Z = NormalDist().inv_cdf(1 - ALPHA / 2)  # the two-sided quantile of the check's (1 - ALPHA) intervals


def components(groups: list[list[float]]) -> tuple[float, float]:
    """(sigma, tau) of per-article samples: the pooled within-article standard deviation and the
    between-article one (method of moments on the article means, floored at 0)."""
    n = [len(g) for g in groups]
    within = sum((len(g) - 1) * statistics.variance(g) for g in groups if len(g) > 1)
    sigma2 = within / max(1, sum(n) - len(groups))
    means = [statistics.fmean(g) for g in groups]
    between = statistics.variance(means) - statistics.fmean(sigma2 / k for k in n)
    return math.sqrt(sigma2), math.sqrt(max(0.0, between))


def p_holds(sigma: float, tau: float, n: list[int]) -> float:
    """The chance that one set of articles with question counts `n` has its mean within the question-level
    95% interval of another such set, both from one population (see the module docstring)."""
    total = sum(n)
    if sigma == 0 and tau == 0:
        return 1.0
    share2 = sum((k / total) ** 2 for k in n)
    sd = math.sqrt(2 * (tau**2 * share2 + sigma**2 / total))
    # the interval's half width: the pooled questions' spread, within and between articles, as the bootstrap sees it
    half = Z * math.sqrt(sigma**2 + tau**2) / math.sqrt(total)
    return math.erf(half / (sd * math.sqrt(2)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--task", default="squad", help="squad or long (a needle haystack mixes articles)")
    p.add_argument(
        "--configs", default=None, help="comma-separated configs (default: every config of the runs)"
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.task not in ("squad", "long"):
        raise SystemExit(f"--task must be squad or long (examples of one article each), got {args.task!r}")
    values: dict[str, dict[str, float]] = {}  # config -> eid -> fidelity
    for run in args.runs:
        samples = [s for s in load_results(Path(run))["samples"] if s["task"] == args.task]
        try:
            require_calibration(samples, "the article check")
        except ValueError as e:
            raise SystemExit(f"{run}: {e}") from None
        for s in samples:
            values.setdefault(s["config"], {}).setdefault(s["eid"], float(s["fidelity"]))
    configs = args.configs.split(",") if args.configs else list(values)
    missing = [c for c in configs if c not in values]
    if missing:
        raise SystemExit(f"no {args.task} samples of {', '.join(missing)} in {', '.join(args.runs)}")
    rows, splits_held = [], None
    for config in configs:
        by_title: dict[str, list[float]] = {}
        for eid, f in values[config].items():
            by_title.setdefault(str(article_of_eid(eid)), []).append(f)
        titles = sorted(by_title)
        if len(titles) < 2:
            raise SystemExit(
                f"{config!r} has samples of {len(titles)} article(s); the check needs two or more"
            )
        sigma, tau = components([by_title[t] for t in titles])
        halves = []
        for first in itertools.combinations(titles, len(titles) // 2):
            if titles[0] not in first:
                continue  # each split once, both directions below
            second = tuple(t for t in titles if t not in first)
            for table, check in ((first, second), (second, first)):
                entry = statistics.fmean(f for t in table for f in by_title[t])
                mean, lo, hi = bootstrap_ci(f for t in check for f in by_title[t])
                halves.append({"table": list(table), "entry": entry, "check": [mean, lo, hi],
                               "verdict": verdict_of(entry, lo, hi)})  # fmt: skip
        held = [h["verdict"] == "holds" for h in halves]
        splits_held = held if splits_held is None else [a and b for a, b in zip(splits_held, held)]
        rows.append({
            "config": config, "n": sum(len(v) for v in by_title.values()),
            "articles": {t: [len(by_title[t]), statistics.fmean(by_title[t])] for t in titles},
            "sigma": sigma, "tau": tau, "halves": halves, "halves_held": sum(held),
            "p_holds": p_holds(sigma, tau, [len(by_title[t]) for t in titles]),
        })  # fmt: skip
    print("| config | questions | article means | sigma | tau | half splits held | p_holds (same sizes) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        means = ", ".join(f"{m:.3f}" for _, m in r["articles"].values())
        print(
            f"| `{r['config']}` | {r['n']} | {means} | {r['sigma']:.3f} | {r['tau']:.3f} "
            f"| {r['halves_held']} of {len(r['halves'])} | {r['p_holds']:.2f} |"
        )
    every = sum(splits_held or [])
    print(f"\nhalf splits in which every config holds: {every} of {len(splits_held or [])}")
    if args.json:
        out = {"task": args.task, "runs": args.runs, "configs": rows, "splits_every_config_holds": every}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
