"""Where a text segment's recompute goes at the receiver (issue 22): kvlink.stream.recompute after the
joined prefix, segment by segment, each stage timed with the device synchronized, and the top operators of
a late segment under torch.profiler. Two paths side by side, in one process on one model: "mask" (the
model on Transformers' sdpa: an explicit segment x context mask, what the receiver did before
kvlink/attention.py) and "fast" (kvlink.attention's lower-right causal attention); then one prefill of the
whole context, and how far the fast path's keys and values are from the mask path's. Not part of the
package.

usage: python bench/profile_recompute.py [--model random:llama-3.1-8b] [--tokens 32768] [--segment 4096]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from kvlink.attention import IMPLEMENTATION
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
    caches: dict[str, list] = {}
    tables = {}
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for path in ("mask", "fast", "mask", "fast"):  # each twice: the first of each sees cold kernels
        lm.model.set_attn_implementation("sdpa" if path == "mask" else IMPLEMENTATION)
        rep = sum(r["path"] == path and r["start"] == 0 for r in rows)
        parts: list = []
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
            row = {"path": path, "pass": rep, "start": a, "n": b - a, "join_s": t1 - t0,
                   "from_context_s": t2 - t1, "recompute_s": t3 - t2}  # fmt: skip
            if dev.type == "cuda":
                row["allocated_gb"] = torch.cuda.memory_allocated(dev) / 1e9
                row["reserved_gb"] = torch.cuda.memory_reserved(dev) / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
        caches[path] = parts
        if rep == 1:  # the last full segment under the profiler
            a, b = bounds[-2]
            prefix = join(parts[:-2], a)
            sync()
            with profile(activities=activities) as prof:
                recompute(lm.model, prefix, ids[a:b], a)
                sync()
            key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
            tables[f"{path} {a}+{b - a}"] = prof.key_averages().table(sort_by=key, row_limit=14)
            print(f"--- {path}: recompute of {b - a} tokens after {a} ---\n{tables[f'{path} {a}+{b - a}']}")
    whole = []
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        recompute(lm.model, None, ids[: args.tokens], 0)
        sync()
        whole.append(time.perf_counter() - t0)
    # How far apart the two paths' caches are (bf16 on the GPU: rounding, not a different attention).
    diff = {"keys": 0.0, "values": 0.0, "keys_scale": 0.0}
    for m, f in zip(caches["mask"], caches["fast"], strict=True):
        for layer in range(m.num_layers):
            diff["keys"] = max(
                diff["keys"], (m.keys[layer].float() - f.keys[layer].float()).abs().max().item()
            )
            diff["values"] = max(
                diff["values"], (m.values[layer].float() - f.values[layer].float()).abs().max().item()
            )
            diff["keys_scale"] = max(diff["keys_scale"], m.keys[layer].float().abs().max().item())
    summary = {"whole_prefill_s": whole[-1], "max_abs_diff": diff}
    for path in ("mask", "fast"):
        summary[f"{path}_segments_s"] = sum(r["recompute_s"] + r["join_s"] + r["from_context_s"]
                                            for r in rows if r["path"] == path and r["pass"] == 1)  # fmt: skip
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": sys.argv, "summary": summary, "rows": rows, "profiles": tables}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
