"""Where a text segment's recompute goes at the receiver (issue 22): kvlink.stream.recompute after the
joined prefix, segment by segment, each stage timed with the device synchronized, and the top operators of
a late segment under torch.profiler. Not part of the package.

usage: python bench/profile_recompute.py [--model random:llama-3.1-8b] [--tokens 32768] [--segment 4096]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from kvlink.hfcache import KVLinkCache
from kvlink.models import load_model
from kvlink.stream import join, recompute


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--segment", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lm = load_model(args.model, device=args.device)
    dev = lm.device

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.tokenizer.vocab_size - 1, (args.tokens + 31,), generator=gen)
    bounds = [(a, min(a + args.segment, args.tokens)) for a in range(0, args.tokens, args.segment)]
    bounds.append((args.tokens, args.tokens + 31))
    rows = []
    parts: list = []
    for rep in range(2):  # the second pass sees a warm allocator and compiled kernels
        parts = []
        for a, b in bounds:
            sync()
            t0 = time.perf_counter()
            prefix = join(parts, a) if parts else None
            sync()
            t1 = time.perf_counter()
            if prefix is not None:
                KVLinkCache.from_context(prefix, lm.model)
            sync()
            t2 = time.perf_counter()
            kv = recompute(lm.model, prefix, ids[a:b], a)
            sync()
            t3 = time.perf_counter()
            parts.append(kv)
            row = {"pass": rep, "start": a, "n": b - a, "join_s": t1 - t0, "from_context_s": t2 - t1,
                   "recompute_s": t3 - t2}  # fmt: skip
            if dev.type == "cuda":
                row["allocated_gb"] = torch.cuda.memory_allocated(dev) / 1e9
                row["reserved_gb"] = torch.cuda.memory_reserved(dev) / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
    # The last two segments under the profiler: a full one after the longest prefix, and the short last one.
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    tables = {}
    for a, b in bounds[-2:]:
        prefix = join(parts[: bounds.index((a, b))], a)
        sync()
        with profile(activities=activities) as prof:
            recompute(lm.model, prefix, ids[a:b], a)
            sync()
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        tables[f"{a}+{b - a}"] = prof.key_averages().table(sort_by=key, row_limit=18)
        print(f"--- recompute of {b - a} tokens after {a} ---\n{tables[f'{a}+{b - a}']}", flush=True)
        tables[f"{a}+{b - a} (cpu)"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=12)
        print(tables[f"{a}+{b - a} (cpu)"], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv, "rows": rows, "profiles": tables}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
