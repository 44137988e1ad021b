"""One config of an evaluation run with questions measured again, or not reached, by later runs (issue 24).

usage: python bench/combined_capped.py NOW [NOW ...] BEFORE [--config C] [--screen RESULTS.json --ids IDS]
       [--out OUT.json]

Each NOW holds questions measured again (e.g. `kvlink-bench quality --examples @IDS` after a fix) or ones BEFORE
did not reach, BEFORE the earlier run; kvlink.eval.holdout.combine keeps the first run's sample of a question
several hold, on the questions whose full-KV answer the runs agree on. Prints CONFIG's fidelity [95% CI], wire
share and KL on all of them and on the contexts of >= 4k tokens. With --screen (a research/eval harness's
results.json: `eids` and `per_question`) the combined figures are paired question by question with the screen's
`--screen-config`, split by whether the question is in IDS.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvlink.eval.holdout import combine
from kvlink.eval.report import bootstrap_ci, load_results


def _figures(rows: list[Any]) -> dict[str, Any]:
    return {
        "n": len(rows),
        "fidelity": [round(x, 4) for x in bootstrap_ci([r["fidelity"] for r in rows])],
        "wire_pct": round(100 * sum(r["wire_frac"] for r in rows) / len(rows), 2),
        "kl": round(sum(r["kl"] for r in rows) / len(rows), 5),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("now", type=Path, nargs="+")
    ap.add_argument("before", type=Path)
    ap.add_argument("--config", default="xpred+fp16+pca1-q0.5+ans@10%")
    ap.add_argument("--screen", type=Path, default=None)
    ap.add_argument("--screen-config", default="xlw0.5l@10")
    ap.add_argument("--ids", type=Path, default=None, help="the questions NOW measured again, an id a line")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    runs = [*args.now, args.before]
    records, differ = combine([load_results(run)["samples"] for run in runs])
    rows = [r for r in records if r["config"] == args.config]
    out: dict[str, Any] = {"config": args.config, "runs": [str(r) for r in runs], "reference_differs": differ}
    out["all"] = _figures(rows)
    out[">=4k tokens"] = _figures([r for r in rows if r["T"] >= 4096])
    if args.screen is not None:
        screen = json.loads(args.screen.read_text())
        index = {eid: i for i, eid in enumerate(screen["eids"])}
        per = screen["per_question"][args.screen_config]
        again = set(args.ids.read_text().split()) if args.ids else set()
        common = [r for r in rows if r["eid"] in index]
        for name, chosen in (
            ("common", common),
            ("common, measured again", [r for r in common if r["eid"] in again]),
            ("common, not measured again", [r for r in common if r["eid"] not in again]),
        ):
            if not chosen:
                continue
            at = [index[r["eid"]] for r in chosen]
            out[f"screen vs product, {name}"] = {
                "product": _figures(chosen),
                "screen": {
                    "fidelity": round(sum(per["fidelity"][i] for i in at) / len(at), 4),
                    "wire_pct": round(100 * sum(per["wire_frac"][i] for i in at) / len(at), 2),
                    "kl": round(sum(per["kl"][i] for i in at) / len(at), 5),
                },
                "delta": [
                    round(x, 4)
                    for x in bootstrap_ci(
                        [r["fidelity"] - per["fidelity"][i] for r, i in zip(chosen, at, strict=True)]
                    )
                ],
            }
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
