"""Merge quality runs on the same questions into one report directory (issue 7's frontier), not part of the package.

usage: python bench/merge_runs.py OUT_DIR RUN_DIR [RUN_DIR ...]
       kvlink-bench report OUT_DIR

Writes OUT_DIR/run.json (the first run's, its "configs" extended by the later runs' so configs whose name
does not say everything, like `mix3.5`, keep their codec) and OUT_DIR/samples.jsonl (the first occurrence of
each (config, question) over the runs, in the order given). Merging is sound only where the runs agree on
what they share: check with bench/paired.py (anchors) first.
"""

import json
import sys
from pathlib import Path

from kvlink.eval.report import load_results


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    out, runs = Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((runs[0] / "run.json").read_text())
    names = {c["name"] for c in meta["configs"]}
    seen: set[tuple[str, str]] = set()
    with (out / "samples.jsonl").open("w") as f:
        for run in runs:
            for c in json.loads((run / "run.json").read_text())["configs"]:
                if c["name"] not in names:
                    names.add(c["name"])
                    meta["configs"].append(c)
            for s in load_results(run)["samples"]:
                key = (s["config"], s["eid"])
                if key not in seen:
                    seen.add(key)
                    f.write(json.dumps(s) + "\n")
    (out / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{len(seen)} samples of {len(names)} configs from {len(runs)} runs -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
