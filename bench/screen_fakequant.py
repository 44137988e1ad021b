"""CPU screen (issue 7), not part of the package: fake-quantized caches under candidate schemes; fidelity and KL on N SQuAD questions."""

import json
import sys
import time

import torch

from kvlink.cache import ContextKV, prefill
from kvlink.eval import fidelity
from kvlink.eval.tasks import squad_examples
from kvlink.models import load_model

N = int(sys.argv[1]) if len(sys.argv) > 1 else 30
torch.manual_seed(0)
lm = load_model(None, "cpu", "fp32")
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


def minmax(x, bits, g, axis):
    """x (H,T,D). axis channel: groups of g tokens per channel; token: groups of g channels per token."""
    H, T, D = x.shape
    levels = 2**bits - 1
    if axis == "channel":
        pad = (-T) % g
        xp = torch.nn.functional.pad(x, (0, 0, 0, pad), value=float("nan"))
        xg = xp.view(H, -1, g, D)
        lo = torch.nan_to_num(xg, nan=float("inf")).amin(2, keepdim=True)
        hi = torch.nan_to_num(xg, nan=float("-inf")).amax(2, keepdim=True)
        s = ((hi - lo) / levels).clamp_min(1e-8)
        y = (torch.round((xg - lo) / s).clamp(0, levels) * s + lo).view(H, -1, D)[:, :T]
        return y
    xg = x.view(H, T, D // g, g)
    lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    s = ((hi - lo) / levels).clamp_min(1e-8)
    return (torch.round((xg - lo) / s).clamp(0, levels) * s + lo).view(H, T, D)


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
                yb = with_outliers(body, out_frac, lambda z: minmax(z, b, g, axis))
                bits = body.numel() * (b + 32 / g) + out_frac * body.numel() * 32
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


SCHEMES = sys.argv[2].split(";") if len(sys.argv) > 2 else [
    "int8", "int4", "int4,sink=1", "int4,out=0.01", "int4,pre=1", "int4,pre=1,sink=1,out=0.01",
    "int5", "int6", "ecsq,a=0.3", "ecsq,a=0.15", "ecsq,a=0.3,pre=1",
]
examples = squad_examples(limit=N)
res = {s: {"fid": [], "kl": [], "bits": []} for s in SCHEMES}
t0 = time.time()

for i, ex in enumerate(examples):
    ctx, q = ex.encode(tok)
    kv = prefill(model, ctx).kv.to(dtype=torch.float16).to(dtype=torch.float32)
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
    m = lambda v: sum(v) / len(v)  # noqa
    print(f"{s:40s} bits/elt {m(r['bits']):5.2f} ({m(r['bits']) / 16 * 100:5.1f}%)  fid {m(r['fid']):.3f}  kl {m(r['kl']):.4f}")
json.dump(res, open(sys.argv[3] if len(sys.argv) > 3 else "screen.json", "w"))
