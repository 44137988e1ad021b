"""CommVQ-style screen: vector quantization with codebooks learned per (layer, K/V, KV head, sub-vector) on the fit
paragraphs (k-means), keys before RoPE (re-applied at their positions, as a RoPE-commutative codebook allows),
2 bits per element and below; no per-message scales: a message is the code indices plus the FP16 sink.

usage: python research/screen_vq.py N [--offset K] [--name NAME] [--only a,b]

Candidates: `vq<d>x<stages>` = sub-vectors of d channels, `stages` residual stages of 256 centroids each
(8 bits per stage per sub-vector: 8 * stages / d bits per element): vq4x1 (2 bits), vq8x2 (2 bits, residual),
vq8x1 (1 bit); `aqua+vq...` quantizes the residual of research/screen_predict.py's predictors instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PICK, CACHE, DEVICE, Bytes, Context, fit_kv, lm, rope, run_screen, unrope, write_paired  # noqa: E402

from kvlink.cache import ContextKV  # noqa: E402

INT2 = "kint2c/vint2t-g64+sink1"
BASELINES = (INT2, f"q2c40%/layer+{PICK}", f"q2c65%/layer+{PICK}")
CANDIDATES = ("vq4x1", "vq8x2", "vq8x1")
K = 256
ITERS = 8
FIT_TOKENS = 3000  # k-means on a random 3,000 of the fit tokens (2 shared CPU cores)


def _groups(x: Tensor, d: int) -> Tensor:
    """(H, N, D) -> (H * D/d, N, d): one row set per (head, sub-vector)."""
    h, n, dim = x.shape
    return x.reshape(h, n, dim // d, d).permute(0, 2, 1, 3).reshape(h * dim // d, n, d)


def _ungroups(g: Tensor, h: int, dim: int) -> Tensor:
    d = g.shape[-1]
    return g.reshape(h, dim // d, -1, d).permute(0, 2, 1, 3).reshape(h, -1, dim)


def assign(x: Tensor, c: Tensor) -> Tensor:
    """Nearest centroid: x (G, N, d), c (G, K, d) -> (G, N) indices, in chunks of tokens."""
    cc = (c * c).sum(-1)[:, None, :]
    out = []
    for i in range(0, x.shape[1], 2048):
        out.append((cc - 2 * torch.bmm(x[:, i : i + 2048], c.transpose(1, 2))).argmin(-1))
    return torch.cat(out, 1)


def kmeans(x: Tensor, k: int = K, iters: int = ITERS) -> Tensor:
    g, n, d = x.shape
    gen = torch.Generator().manual_seed(0)
    c = x[:, torch.randperm(n, generator=gen, device="cpu")[:k].to(x.device)].clone()
    for _ in range(iters):
        a = assign(x, c)
        s = torch.zeros(g, k, d, device=x.device).scatter_add_(1, a[..., None].expand(-1, -1, d), x)
        cnt = torch.zeros(g, k, device=x.device).scatter_add_(1, a, torch.ones(g, n, device=x.device))
        c = torch.where(cnt[..., None] > 0, s / cnt.clamp_min(1)[..., None], c)
    return c


def codebooks(d: int, stages: int) -> list[list[list[Tensor]]]:
    """[layer][kind][stage] -> (H * D/d, K, d), fitted (and cached) on the fit paragraphs."""
    path = CACHE / f"vq-d{d}-s{stages}.pt"
    if path.is_file():
        return torch.load(path, map_location=DEVICE)
    fit = fit_kv()
    started = time.time()
    gen = torch.Generator().manual_seed(1)
    subset = torch.randperm(fit.tokens, generator=gen, device="cpu")[:FIT_TOKENS].sort().values.to(DEVICE)
    books = []
    for layer in range(len(fit.keys)):
        pair = []
        for x in (fit.keys_pre[layer], fit.values[layer]):
            g = _groups(x[:, subset], d)
            stage_books = []
            for _ in range(stages):
                c = kmeans(g)
                stage_books.append(c)
                g = g - torch.gather(c, 1, assign(g, c)[..., None].expand(-1, -1, d))
            pair.append(stage_books)
        books.append(pair)
        print(f"codebooks d={d} x{stages}: layer {layer} {time.time() - started:.0f}s", flush=True)
    torch.save(books, path)
    return books


BOOKS: dict[tuple[int, int], list[list[list[Tensor]]]] = {}


def vq(x: Tensor, books: list[Tensor]) -> Tensor:
    """Residual VQ of x (H, n, D) with the stage codebooks; returns the decoded tensor."""
    h, _, dim = x.shape
    d = books[0].shape[-1]
    g = _groups(x, d)
    out = torch.zeros_like(g)
    for c in books:
        q = torch.gather(c, 1, assign(g - out, c)[..., None].expand(-1, -1, d))
        out = out + q
    return _ungroups(out, h, dim)


def candidate(c: Context, name: str) -> tuple[ContextKV, Bytes]:
    d, stages = (int(x) for x in name.removeprefix("vq").split("x"))
    books = BOOKS[(d, stages)]
    kv = c.kv
    h, dim = kv.kv_heads, kv.head_dim
    body = torch.arange(1, kv.length, device=kv.keys[0].device)
    keys, values = [], []
    for layer in range(kv.num_layers):
        k = kv.keys[layer].clone()
        v = kv.values[layer].clone()
        k[:, 1:] = rope(vq(unrope(kv.keys[layer][:, 1:], body), books[layer][0]), body)
        v[:, 1:] = vq(kv.values[layer][:, 1:], books[layer][1])
        keys.append(k)
        values.append(v)
    n = kv.length - 1
    payload = kv.num_layers * 2 * h * (dim // d) * n * stages  # one byte per code
    side = kv.num_layers * 2 * h * dim * 2  # FP16 sink
    return ContextKV(keys, values, kv.positions, kv.length), Bytes(payload, side)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--split", default="calibration", choices=("calibration", "evaluation"),
                    help="evaluation: MEASURE chosen candidates on the first N evaluation questions (no tuning)")
    ap.add_argument("--shard", default="0/1", help="K/N: questions K, K+N, ... (merge_shards.py joins them)")
    ap.add_argument("--task", default="squad", choices=("squad", "long"), help="long: 2k-8k-token contexts")
    ap.add_argument("--name", default="vq")
    ap.add_argument("--only", default=None)
    ap.add_argument("--baselines", default=",".join(BASELINES))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(CANDIDATES)
    lm()
    sizes = {}
    for name in names:
        d, stages = (int(x) for x in name.removeprefix("vq").split("x"))
        BOOKS[(d, stages)] = codebooks(d, stages)
        sizes[name] = 2 * sum(b.numel() for layer in BOOKS[(d, stages)] for kind in layer for b in kind)

    def candidates(c: Context) -> dict[str, tuple[ContextKV, Bytes]]:
        return {name: candidate(c, name) for name in names}

    meta = {"codebook_bytes_fp16": sizes, "kmeans_iters": ITERS, "centroids": K, "fit_tokens": FIT_TOKENS}
    run_screen(args.name, candidates, args.n, [b for b in args.baselines.split(",") if b], args.offset, meta,
               split=args.split, shard=tuple(int(x) for x in args.shard.split("/")), task=args.task)
    if args.shard != "0/1":
        return 0
    write_paired(args.name, [(INT2, n) for n in names])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
