"""Receiver decode time of whole messages per codec option, side by side in one run.

    python -m kvlink.eval.bench_decode --out bench/results/decode-h100.json

Each message is a random cache of the embedded model's geometry (30 layers, 3 KV
heads, head_dim 64) at T tokens, encoded once on the CPU; the timed step is
`Codec.decode` to float16 on the device (host-to-device copies of the parts,
dequantize, rotation, sink entries), the median of `--reps` runs after a warm-up.
Ratios are against the first config of the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kvlink.cache import ContextKV
from kvlink.codec import Codec
from kvlink.eval.grid import parse_name
from kvlink.models import Geometry
from kvlink.select import keep_count

CONFIGS = ("int4", "int4-sink1", "int4-vrot", "int4-vrot-sink1", "k4v3-sink1", "q2c75-layer-k4v3-sink1")
GEOMETRY = Geometry(num_layers=30, kv_heads=3, head_dim=64, q_heads=9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(name: str, length: int, device: torch.device, reps: int, seed: int = 0) -> dict[str, Any]:
    """Median seconds of Codec.decode for config `name` on a random message of `length` tokens."""
    g = GEOMETRY
    gen = torch.Generator().manual_seed(seed)
    kv = ContextKV(
        [torch.randn(g.kv_heads, length, g.head_dim, generator=gen) for _ in range(g.num_layers)],
        [torch.randn(g.kv_heads, length, g.head_dim, generator=gen) for _ in range(g.num_layers)],
        [torch.arange(length)] * g.num_layers,
        length,
    )
    config = parse_name(name)
    codec = Codec(config, g)
    kept = None
    if config.select is not None:  # a kept set per layer, as Q2C would choose: a seeded random one
        n = keep_count(config.retention, length)
        kept = [torch.sort(torch.randperm(length, generator=gen)[:n]).values for _ in range(g.num_layers)]
    encoded = codec.encode_kv(kv, kept)
    codec.decode(encoded, device, torch.float16)  # warm-up: kernels compiled, caches filled
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        codec.decode(encoded, device, torch.float16)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "config": name,
        "label": config.name,
        "T": length,
        "encoded_bytes": encoded.sizes().total,
        "decode_ms": 1000 * statistics.median(times),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated config names; the first is the base"
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    rows = []
    for length in args.lengths:
        base = None
        for name in names:
            row = time_decode(name, length, device, args.reps)
            base = base or row["decode_ms"]
            row["vs_first"] = row["decode_ms"] / base
            rows.append(row)
            print(f"T={length:6d} {name:24s} {row['decode_ms']:8.2f} ms  x{row['vs_first']:.2f}  "
                  f"{row['encoded_bytes']:,} B", flush=True)  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.out:
        meta = {"device": name, "torch": torch.__version__, "reps": args.reps, "geometry": vars(GEOMETRY)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
