"""Quality runs cut to their calibration-split examples (issue 24), not part of the package.

usage: python bench/calibration_only.py OUT_DIR RUN_DIR [RUN_DIR ...]

`kvlink-bench calibrate` refuses a run holding any evaluation-split example. The runs the shipped quality
table was built from predate the split (each holds 7 evaluation questions of its 300, and some long and
needle items whose split cannot be told). For each RUN_DIR this writes OUT_DIR/<name>/ with its samples
(from results.json(.gz) or samples*.jsonl) and run.json, then `kvlink-bench report --split calibration`
there: a results.json of the calibration-split examples only, which calibrate accepts. Prints how many
examples of each split each run held.
"""

import argparse
import collections
import json
import shutil
import subprocess
import sys
from pathlib import Path

from kvlink.eval.report import load_results
from kvlink.eval.splits import split_of_eid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("runs", nargs="+")
    args = p.parse_args()
    for run in map(Path, args.runs):
        samples = load_results(run)["samples"]
        dst = Path(args.out) / run.name
        dst.mkdir(parents=True, exist_ok=True)
        with open(dst / "samples.jsonl", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
        if (run / "run.json").is_file():
            shutil.copy(run / "run.json", dst / "run.json")
        splits = collections.Counter(split_of_eid(e) for e in {s["eid"] for s in samples})
        print(f"{run.name}: examples by split {dict(splits)}")
        subprocess.run(
            [sys.executable, "-m", "kvlink.eval.cli", "report", str(dst), "--split", "calibration"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
