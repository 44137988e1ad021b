"""The sender's rANS encode (kvlink.ans.encode, numpy) against the same function at an earlier commit, side
by side in one process: identical streams required, median seconds and the ratio per shape.

usage: python bench/ans_encode.py --baseline COMMIT --out FILE.json [--repeats 5]
The baseline is `git show COMMIT:kvlink/ans.py`, loaded as its own module (it must not import from a kvlink
that has changed its API). Shapes: the embedded model's messages (60 streams x 192 components) at T=200,
2048 and 8192, symbols from Laplace tables of 0.2-60 steps, as bench/ans_decode.py draws them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ans_decode import laplace_symbols  # bench/: the script's own folder is on sys.path

from kvlink import ans

SHAPES = [(60, 200, 192), (60, 2048, 192), (60, 8192, 192)]


def baseline_module(commit: str) -> object:
    source = subprocess.run(
        ["git", "show", f"{commit}:kvlink/ans.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "ans_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ans_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digest(streams: list[bytes]) -> str:
    return hashlib.sha256(b"".join(len(s).to_bytes(8, "little") + s for s in streams)).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="the commit whose kvlink/ans.py is the baseline")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    old = baseline_module(args.baseline)
    rows = []
    for i, (b, n, f) in enumerate(SHAPES):
        sym, tab = laplace_symbols(b, n, f, seed=i)
        model_new, model_old = ans.laplace_tables(), old.laplace_tables()  # type: ignore[attr-defined]
        times: dict[str, list[float]] = {"new": [], "baseline": []}
        hashes = set()
        for _ in range(args.repeats):  # alternate, so both see the same machine
            for name, fn, model in (("baseline", old.encode, model_old), ("new", ans.encode, model_new)):  # type: ignore[attr-defined]
                t0 = time.perf_counter()
                streams = fn(sym, tab, model)
                times[name].append(time.perf_counter() - t0)
                hashes.add(digest(streams))
        if len(hashes) != 1:
            print(f"{b}x{n}x{f}: the streams differ from the baseline's", file=sys.stderr)
            return 1
        new, base = statistics.median(times["new"]), statistics.median(times["baseline"])
        row = {"shape": f"{b}x{n}x{f}", "symbols": b * n * f, "baseline_s": round(base, 4), "new_s": round(new, 4),
               "speedup": round(base / new, 2), "identical": True, "sha256": hashes.pop()}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "baseline": args.baseline, "repeats": args.repeats, "cpu": platform.processor() or platform.machine(),
        "threads": os.cpu_count(), "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
