"""The sender's rANS encode (kvlink.ans.encode) against a baseline, side by side in one process: identical
streams required, median seconds and the ratio per shape.

usage: python bench/ans_encode.py --baseline COMMIT --out FILE.json [--repeats 5]
       python bench/ans_encode.py --kernel --out FILE.json [--repeats 5]      (on a CUDA device)
With --baseline: numpy against `git show COMMIT:kvlink/ans.py`, loaded as its own module (it must not
import from a kvlink that has changed its API). Shapes: the embedded model's messages (60 streams x 192
components) at T=200, 2048 and 8192, symbols from Laplace tables of 0.2-60 steps, as bench/ans_decode.py
draws them. With --kernel: the Triton encoder (kvlink.kernels.ans, what a CUDA sender runs) against the
numpy reference, on those shapes, the 8192 one with question-aware row shifts, and an 8B geometry (64 x
1024); and the code length (Tables.code_bits) counted on the device against the host's. Writes a PNG beside
the JSON when matplotlib is there. --quick: one tiny shape (CPU, TRITON_INTERPRET=1: a check of the script).
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
from functools import partial
from pathlib import Path

import numpy as np
from ans_decode import laplace_symbols, plot_rates, timed  # bench/: the script's own folder is on sys.path

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


KERNEL_SHAPES = [
    ("smollm2-135m T=200", 60, 200, 192, False),
    ("smollm2-135m T=2048", 60, 2048, 192, False),
    ("smollm2-135m T=8192", 60, 8192, 192, False),
    ("smollm2-135m T=8192 shifted", 60, 8192, 192, True),
    ("llama-8b T=2048", 64, 2048, 1024, False),
]


def kernel_main(args: argparse.Namespace) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (args.quick and os.environ.get("TRITON_INTERPRET") == "1"):
        print("--kernel needs a CUDA device (or --quick with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    model = ans.laplace_tables()
    rows = []
    for i, (name, b, n, f, shifted) in enumerate(
        [("quick", 4, 40, 64, True)] if args.quick else KERNEL_SHAPES
    ):
        sym, tab = laplace_symbols(b, n, f, seed=i)
        shifts = np.random.default_rng(i).integers(-40, 80, size=(b, n)) if shifted else None
        os.environ["KVLINK_KERNELS"] = "triton"
        kernel_s, got = timed(partial(ans.encode, sym, tab, model, shifts, device=device), args.repeats, True)
        os.environ["KVLINK_KERNELS"] = "reference"
        ref_s, ref = timed(partial(ans.encode, sym, tab, model, shifts), 2, False)
        if digest(got) != digest(ref):  # type: ignore[arg-type]
            print(f"{name}: the kernel's streams differ from the reference's", file=sys.stderr)
            return 1
        on_device = torch.from_numpy(sym).to(device=device, dtype=torch.int32)
        bits_dev_s, bits_dev = timed(partial(model.code_bits, on_device, tab, shifts), args.repeats, True)
        bits_host_s, bits_host = timed(partial(model.code_bits, sym, tab, shifts), 2, False)
        agree = bits_dev == bits_host
        if not agree:
            print(f"{name}: code length {bits_dev} on the device, {bits_host} on the host", file=sys.stderr)
            return 1
        row = {"shape": name, "symbols": b * n * f, "shifted": shifted, "wire_bytes": sum(len(s) for s in ref),  # type: ignore[attr-defined]
               "reference_s": round(ref_s, 4), "triton_s": round(kernel_s, 4), "speedup": round(ref_s / kernel_s, 2),
               "identical": True, "sha256": digest(ref),  # type: ignore[arg-type]
               "code_bits_host_s": round(bits_host_s, 4), "code_bits_device_s": round(bits_dev_s, 4),
               "code_bits_speedup": round(bits_host_s / bits_dev_s, 2), "code_bits_equal": agree}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "mode": "kernel", "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__, "triton": __import__("triton").__version__, "numpy": np.__version__,
        "repeats": args.repeats, "reference_repeats": 2, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot_rates(
        [r["shape"] for r in rows],
        [r["symbols"] / r["triton_s"] for r in rows],
        [r["symbols"] / r["reference_s"] for r in rows],
        f"rANS encode, {meta['device']}",
        args.out.with_suffix(".png"),
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="the commit whose kvlink/ans.py is the baseline")
    ap.add_argument("--kernel", action="store_true", help="the Triton encoder against the numpy reference")
    ap.add_argument("--quick", action="store_true", help="with --kernel: one tiny shape")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.kernel:
        return kernel_main(args)
    if not args.baseline:
        ap.error("--baseline COMMIT or --kernel")
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
