"""CPU screen (issue 7): fake-quantized caches under candidate schemes; fidelity and KL on N SQuAD questions.

Min/max INT schemes (`intB`, `kb=`/`vb=`, `mix`) go through kvlink's INT quantizer (research/fake_quant.py:
INT8/4/3/2 only); the per-channel and per-row widths (`ka`, `kg`, `va`), GPTQ rounding (`gq`, `gv`), ECSQ
and VQ are this screen's own prototypes (research/README.md says what each became in kvlink).

usage: python research/screen_fakequant.py N "scheme;scheme;..." [out.json]
(bench/results/screen-cpu/README.md lists the schemes and the runs.)
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_quant import fake_quant

from kvlink.cache import ContextKV, Observe, prefill, prefill_observations
from kvlink.eval import fidelity
from kvlink.eval.tasks import squad_examples
from kvlink.models import load_model
from kvlink.prompt import question_rows
from kvlink.rotation import rotate, unrotate
from kvlink.select.q2c import Q2C

DEFAULT_SCHEMES = (
    "int8;int4;int4,sink=1;int4,out=0.01;int4,pre=1;int4,pre=1,sink=1,out=0.01;"
    "ecsq,a=0.3;ecsq,a=0.15;ecsq,a=0.3,pre=1"
)
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("n", type=int, nargs="?", default=30, help="the first N answerable SQuAD questions")
ap.add_argument("schemes", nargs="?", default=DEFAULT_SCHEMES, help='"scheme;scheme;..."')
ap.add_argument("out", nargs="?", default="screen.json")
ARGS = ap.parse_args()
N = ARGS.n
torch.manual_seed(0)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_default_device(DEVICE)
lm = load_model(None, DEVICE, "fp32")
model, tok = lm.model, lm.tokenizer
rot = model.model.rotary_emb


def rope_cs(T):
    pos = torch.arange(T)[None]
    x = torch.zeros(1, T, 64)
    cos, sin = rot(x, pos)
    return cos[0], sin[0]  # (T, D)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def with_outliers(x, frac, quant):
    if frac <= 0:
        return quant(x)
    med = x.median(dim=1, keepdim=True).values
    dev = (x - med).abs().flatten()
    k = max(1, int(frac * dev.numel()))
    idx = dev.topk(k).indices
    xc = x.flatten().clone()
    xc[idx] = med.expand_as(x).flatten()[idx]
    y = quant(xc.view_as(x)).flatten()
    y[idx] = x.flatten()[idx]
    return y.view_as(x)


def ent(codes):
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum()) * codes.numel()


def ecsq(x, alpha):
    """Per-channel uniform step alpha*std over tokens; returns (dequant, bits)."""
    mu = x.mean(1, keepdim=True)
    sd = x.std(1, keepdim=True).clamp_min(1e-6)
    step = alpha * sd
    q = torch.round((x - mu) / step)
    return q * step + mu, ent(q)


def group_perm(D, c, rope_pairs):
    """Channel order whose consecutive runs of c are coupled: RoPE pairs (i, i + D/2) together, or contiguous."""
    if not rope_pairs:
        return torch.arange(D)
    half = D // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], 1).flatten()


def kmeans(x, k, iters=int(os.environ.get("KMEANS_ITERS", 30))):
    """Batched Lloyd: x (G, N, c) -> centroids (G, k, c)."""
    G, N, c = x.shape
    gen = torch.Generator().manual_seed(0)
    C = x[:, torch.randperm(N, generator=gen, device="cpu")[:k].to(DEVICE)].clone()
    for _ in range(iters):
        a = assign(x, C)
        S = torch.zeros(G, k, c).scatter_add_(1, a[..., None].expand(-1, -1, c), x)
        n = torch.zeros(G, k).scatter_add_(1, a, torch.ones(G, N))
        C = torch.where(n[..., None] > 0, S / n.clamp_min(1)[..., None], C)
    return C


def assign(x, C):
    G, N, _ = x.shape
    step = max(1, (1 << 28) // (G * C.shape[1]))
    cc = (C * C).sum(-1)[:, None, :]
    return torch.cat([(cc - 2 * torch.bmm(x[:, i : i + step], C.transpose(1, 2))).argmin(-1) for i in range(0, N, step)], 1)


CODEBOOKS = {}


def to_groups(x, perm, c):
    """(H, T, D) -> (H * D/c, T, c)."""
    H, T, D = x.shape
    return x[..., perm].view(H, T, D // c, c).permute(0, 2, 1, 3).reshape(H * D // c, T, c)


def from_groups(g, perm, H, T, D):
    c = g.shape[-1]
    y = g.view(H, D // c, T, c).permute(0, 2, 1, 3).reshape(H, T, D)
    out = torch.empty_like(y)
    out[..., perm] = y
    return out


def extra_calibration():
    """CALIB_EXTRA=1: also the paragraphs of articles 4-7 (the first 300 questions use articles 1-3)."""
    if os.environ.get("CALIB_EXTRA") != "1":
        return []
    from kvlink.eval.tasks import _articles

    articles = list(_articles(None).values())
    return [p for a in articles[3:7] for p in a]


def train_codebooks(key, c, b, pre, rope_pairs):
    """Per (layer, K/V, head, channel group) k-means on the reserved calibration paragraphs (sink excluded)."""
    from kvlink.eval.tasks import calibration_texts
    from kvlink.prompt import context_ids

    if not hasattr(train_codebooks, "kvs"):
        train_codebooks.kvs = [
            prefill(model, context_ids(tok, t)).kv.to(dtype=torch.float16).to(dtype=torch.float32)
            for t in calibration_texts(64) + extra_calibration()
        ]
    t0 = time.time()
    books = []
    for layer in range(model.config.num_hidden_layers):
        pair = []
        for which in ("k", "v"):
            xs = []
            for kv in train_codebooks.kvs:
                x = (kv.keys if which == "k" else kv.values)[layer].float()
                if which == "k" and pre:
                    cos, sin = rope_cs(kv.length)
                    x = x * cos - rotate_half(x) * sin
                xs.append(x[:, 1:])
            x = torch.cat(xs, 1)
            H, T, D = x.shape
            perm = group_perm(D, c, rope_pairs and which == "k")
            pair.append(kmeans(to_groups(x, perm, c), 2**b))
        books.append(pair)
    print(f"codebooks {key}: {time.time() - t0:.0f}s on {T} tokens", flush=True)
    CODEBOOKS[key] = books


def vq(x, layer, which, c, b, pre, rope_pairs):
    key = (c, b, pre, rope_pairs)
    if key not in CODEBOOKS:
        train_codebooks(key, c, b, pre, rope_pairs)
    C = CODEBOOKS[key][layer][0 if which == "k" else 1]
    H, T, D = x.shape
    perm = group_perm(D, c, rope_pairs and which == "k")
    g = to_groups(x, perm, c)
    a = assign(g, C)
    q = torch.gather(C, 1, a[..., None].expand(-1, -1, c))
    return from_groups(q, perm, H, T, D)


def channel_bits(x, w, mean_bits, g, top=8):
    """Per-channel key widths (H, D) at the given mean: greedy on sum_i w_i * range_i^2 * 4^-b_i, where w_i is the
    queries' mean square in channel i and range_i the channel's mean min/max range over groups of g tokens."""
    H, T, D = x.shape
    pad = (-T) % g
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad), value=float("nan")).view(H, -1, g, D)
    rng = torch.nan_to_num(xp, nan=float("-inf")).amax(2) - torch.nan_to_num(xp, nan=float("inf")).amin(2)
    e = (w * (rng**2).mean(1)).double()
    b = torch.zeros(H, D, dtype=torch.long)
    for _ in range(int(round(mean_bits * D))):
        gain = e * (4.0 ** -b - 4.0 ** -(b + 1))
        gain[b >= top] = -1
        b[torch.arange(H), gain.argmax(1)] += 1
    return b


def minmax_channels(x, bits, g):
    """Keys (H, T, D), groups of g tokens per channel, channel (h, i) at bits[h, i] (0: the group's midpoint)."""
    H, T, D = x.shape
    pad = (-T) % g
    xg = torch.nn.functional.pad(x, (0, 0, 0, pad), value=float("nan")).view(H, -1, g, D)
    lo = torch.nan_to_num(xg, nan=float("inf")).amin(2, keepdim=True)
    hi = torch.nan_to_num(xg, nan=float("-inf")).amax(2, keepdim=True)
    levels = (2.0 ** bits - 1).to(x.dtype)[:, None, None, :]
    s = ((hi - lo) / levels.clamp_min(1)).clamp_min(1e-8)
    y = torch.round((xg - lo) / s).clamp_min(0)
    y = torch.minimum(y, levels) * s + lo
    y = torch.where(levels == 0, (lo + hi) / 2, y)
    return y.view(H, -1, D)[:, :T]


def gptq_keys(x, bits, g, hess, damp, act_order):
    """x (H, T, D) keys, per-channel groups of g tokens; rounding that minimizes ||Q (k - k_hat)||^2 for the
    observed queries Q (hess (H, D, D) = Q^T Q per KV head), one channel at a time (GPTQ)."""
    H, T, D = x.shape
    per_channel = torch.is_tensor(bits)
    levels = 2**bits - 1
    out = torch.empty_like(x)
    pad = (-T) % g
    for h in range(H):
        Hm = hess[h].double().clone()
        Hm += damp * Hm.diagonal().mean() * torch.eye(D, dtype=torch.float64)
        order = torch.argsort(Hm.diagonal(), descending=True) if act_order else torch.arange(D)
        Hm = Hm[order][:, order]
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hm)), upper=True)
        X = x[h][:, order].double().clone()
        for j in range(D):
            col = X[:, j]
            cp = torch.nn.functional.pad(col, (0, pad), value=float("nan")).view(-1, g)
            lo = torch.nan_to_num(cp, nan=float("inf")).amin(1, keepdim=True)
            hi = torch.nan_to_num(cp, nan=float("-inf")).amax(1, keepdim=True)
            lv = int(levels[h, order[j]]) if per_channel else levels
            if lv == 0:
                qv = ((lo + hi) / 2).expand_as(cp).flatten()[:T]
            else:
                sc = ((hi - lo) / lv).clamp_min(1e-8)
                qv = (torch.round((cp - lo) / sc).clamp(0, lv) * sc + lo).flatten()[:T]
            err = (col - qv) / U[j, j]
            X[:, j + 1 :] -= err[:, None] * U[j, j + 1 :][None, :]
            X[:, j] = qv
        out[h][:, order] = X.float()
    return out


def gptq_values(x, bits, g, hess, damp):
    """x (H, T, D) values, per-token groups of g channels; rounding that minimizes the error of the observed
    queries' attention outputs (hess (H, T, T) = P^T P per KV head), one token at a time (GPTQ over tokens)."""
    H, T, D = x.shape
    levels = 2**bits - 1
    out = torch.empty_like(x)
    for h in range(H):
        Hm = hess[h].double().clone()
        Hm += damp * Hm.diagonal().mean() * torch.eye(T, dtype=torch.float64)
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hm)), upper=True)
        X = x[h].double().clone()
        for i in range(T):
            row = X[i].view(-1, g)
            lo, hi = row.amin(1, keepdim=True), row.amax(1, keepdim=True)
            sc = ((hi - lo) / levels).clamp_min(1e-8)
            qv = (torch.round((row - lo) / sc).clamp(0, levels) * sc + lo).flatten()
            err = (X[i] - qv) / U[i, i]
            X[i + 1 :] -= U[i, i + 1 :][:, None] * err[None, :]
            X[i] = qv
        out[h] = X.float()
    return out


def attn_probs(o, T, group):
    """(kv_heads, n_q * group, T) attention probabilities of the observed queries over the context."""
    q, k = o.queries.float(), o.keys.float()
    k = k.repeat_interleave(group, 0)
    logits = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    vis = o.key_positions[None, :] <= o.query_positions[:, None]
    p = torch.softmax(logits.masked_fill(~vis[None], float("-inf")), -1)[:, :, :T]
    return p.view(k.shape[0] // group, -1, T)


def token_bits(x, weight, mean_bits, top=8, floor=0):
    """Per-token value widths (H, T) at about the given mean: Lagrangian on weight_t * range_t^2 * dist(w), where
    dist(w) = 1/(2^w - 1)^2 (width 0, the midpoint, as width 1); bisection on the price of a bit per head."""
    H, T, D = x.shape
    rng2 = ((x.amax(-1) - x.amin(-1)) ** 2).double()  # (H, T)
    e = weight.double() * rng2
    dist = torch.tensor([1.0] + [1.0 / (2**w - 1) ** 2 for w in range(1, top + 1)], dtype=torch.float64)
    dist[:floor] = float("inf")
    widths = torch.arange(top + 1, dtype=torch.float64)
    budget = mean_bits * T
    lo = torch.full((H, 1), -60.0, dtype=torch.float64)
    hi = torch.full((H, 1), 60.0, dtype=torch.float64)
    for _ in range(80):
        mid = (lo + hi) / 2
        w = (e[..., None] * dist + (2.0**mid)[..., None] * widths).argmin(-1)
        over = w.sum(1, keepdim=True) > budget
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    return (e[..., None] * dist + (2.0**hi)[..., None] * widths).argmin(-1)


def joint_key_bits(kv, sink, g, mean_bits, mode, top=8):
    """Key widths for every (layer, head, channel) at once, one price per bit (Lagrangian on
    E[q_i^2] * mean group range_i^2 * dist(w)): layers and heads get what their weights ask for."""
    es = []
    for layer in range(kv.num_layers):
        x = kv.keys[layer].float()[:, sink:]
        H, T, D = x.shape
        Q = OBS["q"][layer].queries.float()
        Qh = Q.view(H, -1, *Q.shape[1:]).flatten(1, 2)
        pad = (-T) % g
        xp = torch.nn.functional.pad(x, (0, 0, 0, pad), value=float("nan")).view(H, -1, g, D)
        rng = torch.nan_to_num(xp, nan=float("-inf")).amax(2) - torch.nan_to_num(xp, nan=float("inf")).amin(2)
        es.append(((Qh**2).mean(1) * (rng**2).mean(1)).double())
    e = torch.stack(es)  # (L, H, D)
    dist = torch.tensor([1.0] + [1.0 / (2**w - 1) ** 2 for w in range(1, top + 1)], dtype=torch.float64)
    widths = torch.arange(top + 1, dtype=torch.float64)
    per_row = mode == "h"  # "h": every (layer, head) spends mean * D; "1": one budget for all
    shape = (*e.shape[:2], 1) if per_row else (1, 1, 1)
    budget = mean_bits * (e.shape[-1] if per_row else e.numel())
    lo = torch.full(shape, -80.0, dtype=torch.float64)
    hi = torch.full(shape, 80.0, dtype=torch.float64)
    for _ in range(100):
        mid = (lo + hi) / 2
        w = (e[..., None] * dist + (2.0**mid)[..., None] * widths).argmin(-1)
        spent = w.sum(-1, keepdim=True) if per_row else w.sum().view(1, 1, 1)
        over = spent > budget
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    return (e[..., None] * dist + (2.0**hi)[..., None] * widths).argmin(-1)


def minmax_tokens(x, bits):
    """Values (H, T, D), one group per token row at bits[h, t] (0: the row's midpoint)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    levels = (2.0**bits - 1).to(x.dtype)[..., None]
    s = ((hi - lo) / levels.clamp_min(1)).clamp_min(1e-8)
    y = torch.minimum(torch.round((x - lo) / s).clamp_min(0), levels) * s + lo
    return torch.where(levels == 0, (lo + hi) / 2, y)


def scheme(name, kv, cs):
    """Returns (decoded ContextKV, bits per element)."""
    cos, sin = cs
    opts = dict(p.split("=") for p in name.split(",")[1:])
    kind = name.split(",")[0]
    sink = int(opts.get("sink", 0))
    out_frac = float(opts.get("out", 0))
    pre = opts.get("pre", "0") == "1"
    g = int(opts.get("g", 32))
    keys, values, total_bits, n = [], [], 0.0, 0
    if opts.get("kg", "0") != "0":
        KG = joint_key_bits(kv, sink, int(opts.get("g", 32)), float(opts.get("kmean", opts.get("kb", 4))), opts["kg"])
    for layer in range(kv.num_layers):
        res = []
        for which, x in (("k", kv.keys[layer]), ("v", kv.values[layer])):
            x = x.float()
            if which == "k" and pre:
                x = x * cos - rotate_half(x) * sin
            H, T, D = x.shape
            y = x.clone()
            top = int(opts.get("top", 0))
            if top:
                if which == "k":
                    kk = kv.keys[layer].float()
                    med = kk.median(1, keepdim=True).values
                    score = ((kk - med).abs() / kk.std(1, keepdim=True)).amax(dim=(0, 2))
                    keep = score.topk(min(top, T)).indices
                    rest = torch.ones(T, dtype=torch.bool)
                    rest[keep] = False
                body = x[:, rest]
            else:
                body = x[:, sink:]
            if kind.startswith("int"):
                b = int(kind[3:])
                bits_k = opts.get("kb")
                bits_v = opts.get("vb")
                if which == "k" and bits_k:
                    b = int(bits_k)
                if which == "v" and bits_v:
                    b = int(bits_v)
                axis = "channel" if which == "k" else "token"
                g = min(int(opts.get("g", 32)), D) if axis == "token" else int(opts.get("g", 32))
                gq = opts.get("gq", "0")
                kbits = b
                if which == "k" and opts.get("ka", "0") != "0":
                    Q = OBS[opts["ka"]][layer].queries.float()
                    Qh = Q.view(H, -1, *Q.shape[1:]).flatten(1, 2)
                    kbits = channel_bits(body, (Qh**2).mean(1), float(opts.get("kmean", b)), g)
                if which == "k" and opts.get("kg", "0") != "0":
                    kbits = KG[layer]
                if which == "k" and gq != "0":
                    Q = OBS[gq][layer].queries.float()
                    Qh = Q.view(H, -1, *Q.shape[1:]).flatten(1, 2)  # queries of each KV group
                    hess = Qh.transpose(1, 2) @ Qh
                    yb = gptq_keys(body, kbits, g, hess, float(opts.get("damp", 0.01)), opts.get("ao", "1") == "1")
                elif which == "k" and torch.is_tensor(kbits):
                    yb = minmax_channels(body, kbits, g)
                elif which == "v" and opts.get("gv", "0") != "0":
                    o = OBS[opts["gv"]][layer]
                    P = attn_probs(o, kv.length, o.queries.shape[0] // H)[:, :, sink:]
                    hess = P.transpose(1, 2) @ P
                    yb = gptq_values(body, b, g, hess, float(opts.get("dampv", 0.1)))
                elif which == "v" and opts.get("va", "0") != "0":
                    o = OBS["q"][layer]
                    P = attn_probs(o, kv.length, o.queries.shape[0] // H)[:, :, sink:]
                    weight = (P**2).sum(1) if opts["va"] == "q" else P.sum(1)
                    weight = weight + float(opts.get("veps", 0)) * weight.mean(1, keepdim=True)
                    kbits = token_bits(body, weight, float(opts.get("vmean", b)), floor=int(opts.get("vmin", 0)))
                    yb = minmax_tokens(body, kbits)
                else:
                    yb = with_outliers(body, out_frac, lambda z: fake_quant(z, b, g, axis))
                mean_b = float(kbits.double().mean()) if torch.is_tensor(kbits) else b
                bits = body.numel() * (mean_b + 32 / g) + out_frac * body.numel() * 32
                if which == "v" and opts.get("va", "0") != "0":
                    bits += body.shape[0] * body.shape[1] * 4  # a 4-bit width per token row
            elif kind == "mix":
                hi = HI[(float(opts["f"]), opts.get("scope", "global"))][layer][sink:] - sink
                hb, lb, lg = int(opts["hb"]), int(opts["lb"]), int(opts.get("lg", 32))
                lo_mask = torch.ones(body.shape[1], dtype=torch.bool)
                lo_mask[hi] = False
                axis = "channel" if which == "k" else "token"
                rot = opts.get("rot", "0") == "1"
                src = rotate(body, 0, layer, which) if rot else body
                yb = torch.empty_like(src)
                gh = 32 if axis == "channel" else min(32, D)
                gl = lg if axis == "channel" else min(lg, D)
                yb[:, ~lo_mask] = fake_quant(src[:, ~lo_mask], hb, gh, axis)
                yb[:, lo_mask] = fake_quant(src[:, lo_mask], lb, gl, axis)
                if rot:
                    yb = unrotate(yb, 0, layer, which)
                n_hi = int((~lo_mask).sum()) * H * D
                bits = n_hi * (hb + 32 / gh) + (body.numel() - n_hi) * (lb + 32 / gl)
            elif kind == "vq":
                c = int(opts.get("c" + which, opts.get("c", 2)))
                b = int(opts.get("b" + which, opts.get("b", 8)))
                yb = vq(body, layer, which, c, b, pre, opts.get("rp", "0") == "1")
                bits = body.numel() * b / c
            elif kind == "ecsq":
                a = float(opts.get("a" + which, opts.get("a", 0.3)))
                yb, bits = ecsq(body, a)
                bits += H * D * 32
            else:
                yb, bits = body, body.numel() * 16
            if top:
                y[:, rest] = yb
                bits += top * H * D * 16
            else:
                y[:, sink:] = yb
                bits += sink * H * D * 16
            if which == "k" and pre:
                y = y * cos + rotate_half(y) * sin
            res.append(y)
            total_bits += bits
            n += x.numel()
        keys.append(res[0])
        values.append(res[1])
    return ContextKV(keys, values, kv.positions, kv.length), total_bits / n


SCHEMES = ARGS.schemes.split(";")
examples = squad_examples(limit=N)
res = {s: {"fid": [], "kl": [], "bits": []} for s in SCHEMES}
t0 = time.time()

for i, ex in enumerate(examples):
    ctx, q = ex.encode(tok)
    kv, obs = prefill_observations(
        model, ctx, q, {Observe.QUESTION, Observe.WINDOW}, 32, question_rows(tok, ex.question)
    )
    OBS = {"q": obs[Observe.QUESTION].layers, "w": obs[Observe.WINDOW].layers}
    OBS["qw"] = [
        type(a)(torch.cat([a.queries, b.queries], 1), a.query_positions, a.keys, a.key_positions)
        for a, b in zip(OBS["q"], OBS["w"])
    ]
    kv = kv.to(dtype=torch.float16).to(dtype=torch.float32)
    HI = {}
    for s in SCHEMES:
        if s.startswith("mix"):
            o = dict(p.split("=") for p in s.split(",")[1:])
            key = (float(o["f"]), o.get("scope", "global"))
            if key not in HI:
                HI[key] = Q2C().keep(obs[Observe.QUESTION], key[0], key[1])
    cs = rope_cs(kv.length)
    ref = fidelity.batched_answers(model, tok, [kv], q, (), 16)
    ref_tokens = ref.tokens[0]
    ref_text = fidelity.answer_text(tok, model, ref_tokens)
    ref_forced = fidelity.batched_answers(model, tok, [kv], q, [ref_tokens], 0).forced[0][0]
    decs, bits = [], []
    for s in SCHEMES:
        d, b = scheme(s, kv, cs)
        decs.append(d)
        bits.append(b)
    out = fidelity.batched_answers(model, tok, decs, q, [ref_tokens], 16)
    for r, s in enumerate(SCHEMES):
        text = fidelity.answer_text(tok, model, out.tokens[r])
        res[s]["fid"].append(fidelity.answer_fidelity(text, ref_text))
        res[s]["kl"].append(fidelity.mean_kl(ref_forced, out.forced[0][r]))
        res[s]["bits"].append(bits[r])
    print(i, f"{time.time() - t0:.0f}s", flush=True)
for s in SCHEMES:
    r = res[s]
    m = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"{s:40s} bits/elt {m(r['bits']):5.2f} ({m(r['bits']) / 16 * 100:5.1f}%)  fid {m(r['fid']):.3f}  kl {m(r['kl']):.4f}")
with open(ARGS.out, "w") as f:
    json.dump(res, f)
