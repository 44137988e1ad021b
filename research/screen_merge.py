"""Token merging screen: the positions Q2C per layer drops are merged into kept neighbours instead of dropped
(values weighted by the question's attention; optionally the kept key refitted so that the question's logit
for it carries the merged positions' attention mass), at FP16: the same bytes as dropping them.

usage: python research/screen_merge.py N [--offset K] [--name NAME] [--only a,b]

Candidates `<how>@<retention %>`:
  drop        Q2C per layer (the codec's q2c<r>%/layer+fp16), the twin
  pos-v       each dropped position joins the nearest kept position; value = attention-weighted mean
  pos-lse     ... and the key is refitted: s q.k' ~= logsumexp_j s q.k_j over the merged set, for the
              question's queries (ridge LAMBDA toward the kept key), so the set keeps its attention mass
  key-lse     the same, each dropped position joining the kept key most similar to its own (per KV head)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Bytes, Context, lm, run_screen, write_paired  # noqa: E402

from kvlink.cache import ContextKV  # noqa: E402
from kvlink.positions import encoded_size  # noqa: E402
from kvlink.select.base import attention_to_context  # noqa: E402
from kvlink.select.q2c import Q2C  # noqa: E402

BASELINES = ("q2c50%/layer+fp16", "q2c75%/layer+fp16", "q2c90%/layer+fp16")
CANDIDATES = ("drop@50", "pos-v@50", "pos-lse@50", "key-lse@50", "drop@75", "pos-lse@75", "key-lse@75")
LAMBDA = 1.0


def _owner(keep: Tensor, length: int, keys: Tensor | None) -> Tensor:
    """(H, T): index into `keep` of the kept entry each position joins (kept positions join themselves)."""
    h = 1 if keys is None else keys.shape[0]
    pos = torch.arange(length, device=keep.device)
    if keys is None:  # nearest kept position (ties: the earlier one)
        dist = (pos[:, None] - keep[None, :]).abs()
        owner = dist.argmin(1)[None].expand(h, -1)
    else:
        kn = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        sim = kn @ kn[:, keep].transpose(1, 2)  # (H, T, n_kept)
        owner = sim.argmax(-1)
    owner = owner.clone()
    owner[:, keep] = torch.arange(keep.numel(), device=keep.device)[None].expand(owner.shape[0], -1)
    return owner


def merge_layer(k: Tensor, v: Tensor, keep: Tensor, mass: Tensor, obs: object, scale: float, how: str) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Kept keys and values (H, n_kept, D) with the dropped positions merged in."""
    h, length, d = k.shape
    owner = _owner(keep, length, k if how.startswith("key") else None)  # (H, T)
    if owner.shape[0] == 1:
        owner = owner.expand(h, -1)
    n = keep.numel()
    w = mass.clamp_min(1e-12)  # (H, T)
    wsum = torch.zeros(h, n, device=k.device).scatter_add_(1, owner, w)
    v_new = torch.zeros(h, n, d, device=k.device).scatter_add_(1, owner[..., None].expand(-1, -1, d), w[..., None] * v)
    v_new = v_new / wsum[..., None]
    if how.endswith("-v"):
        return k[:, keep], v_new
    q = obs.queries.float()  # (Hq, nq, D)
    group = q.shape[0] // h
    qh = q.reshape(h, group * q.shape[1], d)  # the queries of each KV group
    logits = scale * qh @ k.transpose(1, 2)  # (H, nq', T)
    top = logits.amax(-1, keepdim=True)
    sums = torch.zeros(h, qh.shape[1], n, device=k.device).scatter_add_(2, owner[:, None, :].expand(-1, qh.shape[1], -1), (logits - top).exp())
    lse = sums.log() + top  # (H, nq', n): the merged set's log attention mass per query
    a = scale**2 * qh.transpose(1, 2) @ qh  # (H, D, D)
    ridge = LAMBDA * a.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(d, device=k.device)
    k_keep = k[:, keep]
    rhs = scale * qh.transpose(1, 2) @ lse + ridge @ k_keep.transpose(1, 2)  # (H, D, n)
    k_fit = torch.linalg.solve(a + ridge, rhs).transpose(1, 2)  # (H, n, D)
    merged = torch.zeros(h, n, device=k.device).scatter_add_(1, owner, torch.ones(h, length, device=k.device)) > 1
    return torch.where(merged[..., None], k_fit, k_keep), v_new


def candidate(c: Context, name: str, kept_cache: dict[float, list[Tensor]]) -> tuple[ContextKV, Bytes]:
    how, r = name.split("@")
    retention = float(r) / 100
    if retention not in kept_cache:
        kept_cache[retention] = Q2C().keep(c.question, retention, "layer")
    kept = kept_cache[retention]
    kv = c.kv
    keys, values = [], []
    nbytes = positions = 0.0
    for layer in range(kv.num_layers):
        keep = kept[layer]
        k, v = kv.keys[layer], kv.values[layer]
        if how == "drop" or keep.numel() == kv.length:
            keys.append(k[:, keep])
            values.append(v[:, keep])
        else:
            obs = c.question.layers[layer]
            mass = attention_to_context(obs, kv.length, c.question.scale)
            kk, vv = merge_layer(k, v, keep, mass, obs, c.question.scale, how)
            keys.append(kk)
            values.append(vv)
        nbytes += 2 * k.shape[0] * keep.numel() * k.shape[2] * 2
        positions += encoded_size(keep, kv.length)
    return ContextKV(keys, values, kept, kv.length), Bytes(nbytes, 0.0, positions)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--split", default="calibration", choices=("calibration", "evaluation"),
                    help="evaluation: MEASURE chosen candidates on the first N evaluation questions (no tuning)")
    ap.add_argument("--shard", default="0/1", help="K/N: questions K, K+N, ... (merge_shards.py joins them)")
    ap.add_argument("--task", default="squad", choices=("squad", "long"), help="long: 2k-8k-token contexts")
    ap.add_argument("--name", default="merge")
    ap.add_argument("--only", default=None)
    ap.add_argument("--baselines", default=",".join(BASELINES))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(CANDIDATES)
    lm()

    def candidates(c: Context) -> dict[str, tuple[ContextKV, Bytes]]:
        kept: dict[float, list[Tensor]] = {}
        return {name: candidate(c, name, kept) for name in names}

    run_screen(args.name, candidates, args.n, [b for b in args.baselines.split(",") if b], args.offset,
               {"lambda": LAMBDA}, split=args.split, shard=tuple(int(x) for x in args.shard.split("/")), task=args.task)  # fmt: skip
    if args.shard != "0/1":
        return 0
    pairs = [(f"drop@{n.split('@')[1]}", n) for n in names if not n.startswith("drop")]
    pairs += [(f"q2c{n.split('@')[1]}%/layer+fp16", f"drop@{n.split('@')[1]}") for n in names if n.startswith("drop")]
    write_paired(args.name, pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
