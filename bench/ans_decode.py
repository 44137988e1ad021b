"""The receiver's rANS decode (kvlink.ans) on a GPU: the Triton kernel against the numpy reference, side by
side in one run, on the message shapes transform coding sends (one stream per layer and K/V, N positions x F
components, symbols drawn from the profile's Laplace tables).

usage: python bench/ans_decode.py --out DIR [--repeats 5]
writes DIR/ans-decode.json (and ans-decode.png when matplotlib is there): per shape, each backend's median
seconds for `kvlink.ans.decode` (host parsing and copies included: what the stage pays), symbols per second,
the ratio, and whether the kernel's symbols equal the reference's (they must: the run fails otherwise).
The reference is timed only where it takes under ~30 s (`--reference-max`, symbols).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvlink import ans

# (name, tensors B, positions N, components F): the embedded model (30 layers x K/V, 3 KV heads x 64) at
# SQuAD and long-context lengths, and an 8B geometry (32 layers x K/V, 8 KV heads x 128).
SHAPES = [
    ("smollm2-135m T=200", 60, 200, 192),
    ("smollm2-135m T=2048", 60, 2048, 192),
    ("smollm2-135m T=8192", 60, 8192, 192),
    ("llama-8b T=1024", 64, 1024, 1024),
    ("llama-8b T=2048", 64, 2048, 1024),
]
QUICK = [("quick", 4, 40, 64)]  # --quick: a check of this script on the CPU under TRITON_INTERPRET=1


def laplace_symbols(b: int, n: int, f: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, N, F) Laplace symbols, each component at its own scale (0.2-60 steps), and the table of that
    scale for each component (B, F), as a residual profile assigns them (bench/ans_encode.py's too)."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.2, 60.0, size=(b, f))
    sym = np.round(rng.laplace(0.0, scale[:, None, :], size=(b, n, f))).astype(np.int64)
    tab = np.clip(np.round(ans.SCALE_STEPS * np.log2(scale)).astype(int), ans.J_MIN, ans.J_MAX) - ans.J_MIN
    return sym, tab


def message(b: int, n: int, f: int, seed: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """B streams of `laplace_symbols`, coded: (streams, tables, symbols)."""
    sym, tab = laplace_symbols(b, n, f, seed)
    return ans.encode(sym, tab, ans.laplace_tables()), tab, sym


def timed(fn, repeats: int, warm: bool) -> tuple[float, np.ndarray]:
    out = fn() if warm else None  # warm-up: compiles the kernel on first use
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()  # returns host arrays: the device work is finished
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def damaged_agree(streams: list[bytes], n: int, tab: np.ndarray, device: str, trials: int, seed: int) -> int:
    """Flip one byte of one stream, `trials` times: the kernel must refuse with the reference's message, or
    decode the reference's symbols. The number of damaged messages both refused."""
    rng = np.random.default_rng(seed)
    model, refused = ans.laplace_tables(), 0
    for _ in range(trials):
        i = int(rng.integers(len(streams)))
        bad = bytearray(streams[i])
        bad[int(rng.integers(len(bad)))] ^= int(rng.integers(1, 256))
        damaged = [*streams[:i], bytes(bad), *streams[i + 1 :]]
        results = []
        for backend in ("reference", "triton"):
            os.environ["KVLINK_KERNELS"] = backend
            try:
                results.append(ans.decode(damaged, n, tab, model, device=device))
            except ans.AnsError as e:
                results.append(str(e))
        ref, got = results
        same = ref == got if isinstance(ref, str) or isinstance(got, str) else np.array_equal(ref, got)
        if not same:
            raise SystemExit(f"a damaged stream: reference {str(ref)[:200]!r}, kernel {str(got)[:200]!r}")
        refused += isinstance(ref, str)
    return refused


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--reference-max", type=float, default=1.5e8, help="symbols up to which the reference runs"
    )
    ap.add_argument("--damaged", type=int, default=40, help="damaged messages checked on the first shape")
    ap.add_argument("--quick", action="store_true", help="one tiny shape (on the CPU: TRITON_INTERPRET=1)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (args.quick and os.environ.get("TRITON_INTERPRET") == "1"):
        print("needs a CUDA device (or --quick with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    model = ans.laplace_tables()
    rows = []
    for i, (name, b, n, f) in enumerate(QUICK if args.quick else SHAPES):
        t0 = time.perf_counter()
        streams, tab, sym = message(b, n, f, seed=i)
        encode_s = time.perf_counter() - t0
        wire = sum(len(s) for s in streams)
        os.environ["KVLINK_KERNELS"] = "triton"
        kernel_s, got = timed(
            functools.partial(ans.decode, streams, n, tab, model, device=device), args.repeats, True
        )
        if not np.array_equal(got, sym):
            print(f"{name}: the kernel's symbols differ from the coded ones", file=sys.stderr)
            return 1
        row = {
            "shape": name, "tensors": b, "positions": n, "components": f, "symbols": b * n * f,
            "wire_bytes": wire, "bits_per_symbol": round(8 * wire / (b * n * f), 3), "encode_s": round(encode_s, 3),
            "triton_s": kernel_s, "triton_symbols_per_s": b * n * f / kernel_s, "equal": True,
        }  # fmt: skip
        if b * n * f <= args.reference_max:
            os.environ["KVLINK_KERNELS"] = "reference"
            ref_s, ref = timed(functools.partial(ans.decode, streams, n, tab, model, device=device), 2, False)
            row["equal"] = bool(np.array_equal(ref, got))
            row.update(reference_s=ref_s, reference_symbols_per_s=b * n * f / ref_s, speedup=ref_s / kernel_s)
            if not row["equal"]:
                print(f"{name}: the kernel and the reference disagree", file=sys.stderr)
                return 1
        if i == 0:
            row["damaged_refused"] = [
                damaged_agree(streams, n, tab, device, args.damaged, seed=i),
                args.damaged,
            ]
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (Triton interpreter)", "torch": torch.__version__,
        "triton": __import__("triton").__version__, "repeats": args.repeats,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }  # fmt: skip
    (args.out / "ans-decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot_rates(
        [r["shape"] for r in rows],
        [r["triton_symbols_per_s"] for r in rows],
        [r.get("reference_symbols_per_s", 0) for r in rows],
        f"rANS decode, {meta['device']}",
        args.out / "ans-decode.png",
    )
    return 0


def plot_rates(
    shapes: list[str], kernel: list[float], reference: list[float], title: str, path: Path
) -> None:
    """Symbols per second of the kernel and the reference per shape, as a PNG (nothing without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(shapes))
    ax.bar(x - 0.2, [v / 1e6 for v in kernel], 0.4, label="Triton kernel")
    ax.bar(x + 0.2, [v / 1e6 for v in reference], 0.4, label="numpy reference")
    ax.set_xticks(x, shapes, rotation=15, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(f"M symbols / s ({title.split()[1].rstrip(',')})")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
