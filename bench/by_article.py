"""Quality of quality runs' SQuAD configs by article (issue 24), not part of the package.

usage: python bench/by_article.py RUN_DIR [RUN_DIR ...] [--configs A,B] [--json OUT.json]

The split is by article (kvlink.eval.splits), so a table entry measured on the calibration articles meets
other articles on the evaluation split. For each config and each article of the SQuAD samples of the runs
(a question measured by several runs counts once, the first run's sample): the questions and the answer
fidelity's mean with its 95% bootstrap interval (kvlink.eval.report.bootstrap_ci, seed 0), then per split
the mean over questions and the spread of the article means. Prints a Markdown table.
"""

import argparse
import json
from pathlib import Path

from kvlink.eval.report import bootstrap_ci, load_results
from kvlink.eval.splits import CALIBRATION, EVALUATION, article_of_eid, split_of_title


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument(
        "--configs", default=None, help="comma-separated configs (default: every config of the runs)"
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    fidelity: dict[str, dict[str, float]] = {}  # config -> eid -> fidelity
    for run in args.runs:
        for s in load_results(Path(run))["samples"]:
            if s["task"] == "squad":
                fidelity.setdefault(s["config"], {}).setdefault(s["eid"], s["fidelity"])
    configs = args.configs.split(",") if args.configs else list(fidelity)
    missing = [c for c in configs if c not in fidelity]
    if missing:
        raise SystemExit(f"no SQuAD samples of {', '.join(missing)} in {', '.join(args.runs)}")
    rows = []
    for config in configs:
        by_title: dict[str, list[float]] = {}
        for eid, f in fidelity[config].items():
            by_title.setdefault(str(article_of_eid(eid)), []).append(f)
        for split in (CALIBRATION, EVALUATION):
            titles = sorted(t for t in by_title if split_of_title(t) == split)
            if not titles:
                continue
            means = []
            for t in titles:
                mean, lo, hi = bootstrap_ci(by_title[t])
                means.append(mean)
                rows.append({"config": config, "split": split, "article": t, "n": len(by_title[t]),
                             "fidelity": mean, "ci": [lo, hi]})  # fmt: skip
            pooled = [f for t in titles for f in by_title[t]]
            mean, lo, hi = bootstrap_ci(pooled)
            rows.append({"config": config, "split": split, "article": "all", "n": len(pooled), "fidelity": mean,
                         "ci": [lo, hi], "article_range": [min(means), max(means)]})  # fmt: skip
    print("| config | split | article | questions | answer fidelity [95% CI] | article means |")
    print("|---|---|---|---:|---|---|")
    for r in rows:
        spread = f"{r['article_range'][0]:.3f}-{r['article_range'][1]:.3f}" if "article_range" in r else ""
        print(
            f"| `{r['config']}` | {r['split']} | {r['article']} | {r['n']} "
            f"| {r['fidelity']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {spread} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
