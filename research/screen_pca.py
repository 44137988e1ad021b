"""KVTC-style screen: PCA per layer + one step per tensor + entropy coding, at a byte budget (research/transform.py).

usage: python research/screen_pca.py N [--offset K] [--name NAME] [--only a,b]

Each candidate is `[q2c<r>+]<space>[-<weights>][-id]@<budget %>`: the rate parameter c is searched per
message (bisection) so that the message's bytes (rANS payload, c, each tensor's symbol range, the FP16
sink, kept positions, framing) reach the budget; `id` replaces PCA by the identity (entropy coding alone).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PICK, Bytes, Context, fit_kv, lm, run_screen, sensitivity, unrope, rope, write_paired  # noqa: E402
from transform import Profile, _rows, _unrows, ans_bytes, fit_profile, laplace_bits  # noqa: E402

from kvlink.cache import ContextKV  # noqa: E402
from kvlink.positions import encoded_size  # noqa: E402
from kvlink.select.q2c import Q2C  # noqa: E402

BASELINES = (
    f"q2c90%/layer+{PICK}",  # the planner's 25% pick (24.7% on SQuAD)
    PICK,  # every position, ~27%
    f"q2c40%/layer+{PICK}",  # the 12.5% pick (12.0%)
)
CANDIDATES = (
    "pre-sens@25", "pre-sens@18.75", "pre-sens@12.5", "pre-sens@8",
    "post-sens@25", "pre-flat@25", "pre-sens-id@25",
    "q2c90+pre-sens@25", "q2c80+pre-sens@12.5",
)  # fmt: skip

PROFILES: dict[tuple[str, str, bool], Profile] = {}
STATS: dict[str, list[float]] = {"ans_over_model": [], "zstd_over_ans": []}


def profile(keys: str, weights: str, identity: bool) -> Profile:
    key = (keys, weights, identity)
    if key not in PROFILES:
        s = sensitivity()
        PROFILES[key] = fit_profile(fit_kv(), keys, weights, identity, s.k, s.v)
    return PROFILES[key]


def parse(name: str) -> tuple[float | None, str, str, bool, float]:
    body, budget = name.split("@")
    retention = None
    if "+" in body:
        sel, body = body.split("+")
        retention = float(sel.removeprefix("q2c")) / 100
    parts = body.split("-")
    return retention, parts[0], parts[1], "id" in parts[2:], float(budget) / 100


def candidate(c: Context, name: str, kept_cache: dict[float, list[torch.Tensor]]) -> tuple[ContextKV, Bytes]:
    retention, keys, weights, identity, budget = parse(name)
    prof = profile(keys, weights, identity)
    kv, length = c.kv, c.kv.length
    if retention is None:
        kept = [torch.arange(length, device=kv.keys[0].device) for _ in range(kv.num_layers)]
    else:
        if retention not in kept_cache:
            kept_cache[retention] = Q2C().keep(c.question, retention, "layer")
        kept = kept_cache[retention]
    # Project once per tensor; only the rounding depends on the rate parameter.
    ys: list[tuple[torch.Tensor, torch.Tensor]] = []
    positions_bytes = 0.0
    for layer in range(kv.num_layers):
        pos = kept[layer]
        body = pos[pos > 0]  # the sink travels as FP16
        kb, vb = prof.bases[layer]
        k = kv.keys[layer][:, body]
        if keys == "pre":
            k = unrope(k, body)
        ys.append(((_rows(k) - kb.mean) @ kb.basis, (_rows(kv.values[layer][:, body]) - vb.mean) @ vb.basis))
        if retention is not None:
            positions_bytes += encoded_size(pos, length)
    h, d = kv.kv_heads, kv.head_dim
    side = 4 + 4 * 2 * kv.num_layers + kv.num_layers * 2 * h * d * 2  # c, symbol ranges, FP16 sink
    target = budget * c.fp16_bytes - side - positions_bytes - c.framing

    def payload(rate: float) -> float:
        total = 0.0
        for layer, (yk, yv) in enumerate(ys):
            for j, (y, basis) in enumerate(((yk, prof.bases[layer][0]), (yv, prof.bases[layer][1]))):
                step = rate / math.sqrt(float(prof.weight[layer, j]))
                sym = torch.round(y / step)
                total += math.ceil(float(laplace_bits(sym, (basis.var / 2).sqrt() / step).sum()) / 8)
        return total

    lo, hi = math.log(1e-6), math.log(1e3)  # log c: bytes fall as c grows
    for _ in range(16):  # c to 0.05%: bytes to well under 0.1%
        mid = (lo + hi) / 2
        if payload(math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    rate = math.exp(hi)
    keys_out, values_out, real, model_bits, zstd_bytes = [], [], 0, 0.0, 0
    compressor = zstandard.ZstdCompressor(level=3)
    for layer, (yk, yv) in enumerate(ys):
        pos = kept[layer]
        body = pos[pos > 0]
        out = []
        for j, (y, basis) in enumerate(((yk, prof.bases[layer][0]), (yv, prof.bases[layer][1]))):
            step = rate / math.sqrt(float(prof.weight[layer, j]))
            sym = torch.round(y / step)
            scale = (basis.var / 2).sqrt() / step
            model_bits += float(laplace_bits(sym, scale).sum())
            real += ans_bytes(sym, scale)
            zstd_bytes += len(compressor.compress(sym.to(torch.int16).cpu().numpy().tobytes()))
            rec = _unrows((sym * step) @ basis.basis.T + basis.mean, h)
            if j == 0 and keys == "pre":
                rec = rope(rec, body)
            x = (kv.keys if j == 0 else kv.values)[layer]
            full = x[:, pos].clone()
            full[:, pos > 0] = rec
            out.append(full)
        keys_out.append(out[0])
        values_out.append(out[1])
    STATS["ans_over_model"].append(real / (model_bits / 8))
    STATS["zstd_over_ans"].append(zstd_bytes / real)
    return ContextKV(keys_out, values_out, kept, length), Bytes(real, side, positions_bytes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--split", default="calibration", choices=("calibration", "evaluation"),
                    help="evaluation: MEASURE chosen candidates on the first N evaluation questions (no tuning)")
    ap.add_argument("--shard", default="0/1", help="K/N: questions K, K+N, ... (merge_shards.py joins them)")
    ap.add_argument("--task", default="squad", choices=("squad", "long"), help="long: 2k-8k-token contexts")
    ap.add_argument("--name", default="pca")
    ap.add_argument("--only", default=None, help="comma-separated candidates (default: all)")
    ap.add_argument("--baselines", default=",".join(BASELINES))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(CANDIDATES)
    baselines = [b for b in args.baselines.split(",") if b]

    def candidates(c: Context) -> dict[str, tuple[ContextKV, Bytes]]:
        kept: dict[float, list[torch.Tensor]] = {}
        return {name: candidate(c, name, kept) for name in names}

    lm()
    fit = fit_kv()
    for name in names:  # fit the profiles before the clock starts
        _, keys, weights, identity, _ = parse(name)
        profile(keys, weights, identity)
    sizes = {f"{k[0]}-{k[1]}{'-id' if k[2] else ''}": PROFILES[k].nbytes for k in PROFILES}
    meta = {"fit_tokens": fit.tokens, "fit_paragraphs": fit.texts, "profile_bytes_fp16": sizes}
    run_screen(args.name, candidates, args.n, baselines, args.offset, meta, split=args.split, shard=tuple(int(x) for x in args.shard.split("/")), task=args.task)
    if args.shard != "0/1":
        return 0
    stats = {k: round(sum(v) / len(v), 4) for k, v in STATS.items() if v}
    print("rANS bytes / model bits:", stats)
    import json

    path = Path(__file__).resolve().parent / "results" / args.name / "results.json"
    data = json.loads(path.read_text())
    data["meta"]["coder"] = stats
    path.write_text(json.dumps(data, indent=1) + "\n")
    pairs = [(BASELINES[0], n) for n in names if n.endswith("@25")]
    pairs += [(BASELINES[2], n) for n in names if n.endswith("@12.5")]
    write_paired(args.name, pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
