"""Several quality runs' samples of some configs as one run folder (issue 24), not part of the package.

usage: python bench/composite_run.py OUT META RUN[:OLD=NEW,...] [RUN[:OLD=NEW,...] ...] [--split S] [--task T]

For a table entry measured on more questions than one run holds: OUT gets META's run.json (its config list
names the configs kept; a key "composite" lists the sources) and one samples file per RUN holding that run's
samples of those configs (a sample named OLD in RUN is renamed NEW, e.g. an alias of an early grid to the
canonical name), each (question, config) once: the first RUN's sample wins. Refuses runs of another model
fingerprint. Then `kvlink-bench report OUT --split S` writes its results.json, which `kvlink-bench calibrate`
takes like any run (a config measured by several runs is taken from the one with the most questions).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path

from kvlink.eval import grid
from kvlink.eval.report import load_results


def _source(arg: str) -> tuple[Path, dict[str, str]]:
    """'RUN:OLD=NEW,OLD2=NEW2' -> (RUN, {OLD: NEW, ...})."""
    path, _, renames = arg.partition(":")
    pairs = [r.split("=", 1) for r in renames.split(",") if r]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"{arg!r}: renames are OLD=NEW, comma-separated")
    return Path(path), dict((old, new) for old, new in pairs)


def _samples(run: Path) -> tuple[list[dict], str | None]:
    """A run's samples and model fingerprint: its results.json(.gz) (which `report --split` cut to one split),
    else its samples*.jsonl (a run still going) and run.json."""
    if any((run / name).is_file() for name in ("results.json", "results.json.gz")) or run.is_file():
        results = load_results(run)
        return results["samples"], results.get("meta", {}).get("fingerprint")
    return grid.read_done(run)[0], json.loads((run / "run.json").read_text()).get("fingerprint")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("meta", type=Path, help="the run whose run.json (model, configs) OUT takes")
    p.add_argument("runs", nargs="+", help="RUN or RUN:OLD=NEW,...")
    p.add_argument("--split", default="calibration")
    p.add_argument("--task", default=None, help="keep this task's samples only (default: every task)")
    args = p.parse_args()

    meta = json.loads((args.meta / "run.json").read_text())
    wanted = {c["name"] for c in meta["configs"]}
    seen: set[tuple[str, str]] = set()
    args.out.mkdir(parents=True, exist_ok=True)
    sources = []
    for i, arg in enumerate(args.runs):
        run, renames = _source(arg)
        samples, printed = _samples(run)
        if printed not in (None, meta["fingerprint"]):
            raise SystemExit(f"{run}: model fingerprint {printed}, not {meta['fingerprint']} (META's)")
        kept = []
        for s in samples:
            s = {**s, "config": renames.get(s["config"], s["config"])}
            key = (s["eid"], s["config"])
            if s["config"] in wanted and key not in seen and args.task in (None, s["task"]):
                seen.add(key)
                kept.append(s)
        with open(args.out / f"samples-{i}.jsonl", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in kept)
        counts = collections.Counter(s["config"] for s in kept)
        sources.append({"run": str(run), "renames": renames, "samples": dict(counts)})
        print(f"{run}: {len(kept)} samples, {dict(counts)}")
    (args.out / "run.json").write_text(json.dumps({**meta, "composite": sources}, indent=1) + "\n")
    return subprocess.run(
        [sys.executable, "-m", "kvlink.eval.cli", "report", str(args.out), "--split", args.split]
    ).returncode


if __name__ == "__main__":
    raise SystemExit(main())
