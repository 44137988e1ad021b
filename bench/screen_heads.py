"""CPU screen (issue 7), not part of the package: Q2C kept sets per layer vs per KV head (the same count
in every head), each with and without fake-quantized K4/V3 g64 + sink.

usage: python bench/screen_heads.py N RETENTIONS OUT.json     (RETENTIONS e.g. 0.4,0.9)
"""

import json
import sys
import time

import torch

from kvlink.cache import ContextKV, Observe, prefill_observations
from kvlink.eval import fidelity
from kvlink.eval.tasks import squad_examples
from kvlink.models import load_model
from kvlink.prompt import question_rows
from kvlink.select.base import keep_count
from kvlink.select.q2c import Q2C


def minmax(x, bits, g, axis):
    """Fake min/max quantization of x (H, T, D): keys per channel in groups of g tokens, values per token."""
    H, T, D = x.shape
    levels = 2**bits - 1
    if axis == "channel":
        pad = (-T) % g
        xg = torch.nn.functional.pad(x, (0, 0, 0, pad), value=float("nan")).view(H, -1, g, D)
        lo = torch.nan_to_num(xg, nan=float("inf")).amin(2, keepdim=True)
        hi = torch.nan_to_num(xg, nan=float("-inf")).amax(2, keepdim=True)
    else:
        xg = x.view(H, T, D // g, g)
        lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    s = ((hi - lo) / levels).clamp_min(1e-8)
    y = torch.round((xg - lo) / s).clamp(0, levels) * s + lo
    return y.view(H, -1, D)[:, :T] if axis == "channel" else y.view(H, T, D)


def quantize(x, which, bits=None):
    """K4/V3 (or `bits`) in groups of 64, the first kept entry (position 0, always kept) at fp16."""
    y = x.clone()
    axis = "channel" if which == "k" else "token"
    bits = bits or (4 if which == "k" else 3)
    y[:, 1:] = minmax(x[:, 1:], bits, 64, axis)
    return y


def head_sets(scores, n_keep):
    """(H, T) scores -> (H, n_keep) sorted positions per KV head, position 0 forced."""
    s = scores.clone()
    s[:, 0] = float("inf")
    return torch.sort(torch.argsort(s, dim=1, descending=True, stable=True)[:, :n_keep], dim=1).values


def build(kv, sets, quant):
    """sets[l]: (H, n_l) positions per head; gather per head, optional fake quantization."""
    keys, values, positions = [], [], []
    for layer, idx in enumerate(sets):
        k = torch.gather(kv.keys[layer], 1, idx[..., None].expand(-1, -1, kv.head_dim))
        v = torch.gather(kv.values[layer], 1, idx[..., None].expand(-1, -1, kv.head_dim))
        if quant:
            k, v = quantize(k, "k"), quantize(v, "v")
        keys.append(k)
        values.append(v)
        positions.append(torch.arange(idx.shape[1]))  # every context entry is visible to the question
    return ContextKV(keys, values, positions, kv.length)


def main():
    N = int(sys.argv[1])
    RETENTIONS = [float(r) for r in sys.argv[2].split(",")]
    OUT = sys.argv[3]
    torch.manual_seed(0)
    lm = load_model(None, "cpu", "fp32")
    model, tok = lm.model, lm.tokenizer
    examples = squad_examples(limit=N)
    names = [
        f"{scope}{int(r * 100)}{'-k4v3g64s' if q else ''}"
        for r in RETENTIONS
        for scope in ("layer", "head")
        for q in (False, True)
    ]
    res = {n: {"fid": [], "kl": [], "kept": []} for n in names}
    t0 = time.time()
    for i, ex in enumerate(examples):
        ctx, q = ex.encode(tok)
        kv, obs = prefill_observations(model, ctx, q, {Observe.QUESTION}, 32, question_rows(tok, ex.question))
        o = obs[Observe.QUESTION]
        kv = kv.to(dtype=torch.float16).to(dtype=torch.float32)
        T, H = kv.length, kv.kv_heads
        scores = [Q2C().score(lo, T, o.scale).float() for lo in o.layers]  # (H, T) per layer
        ref = fidelity.batched_answers(model, tok, [kv], q, (), 16)
        ref_tokens = ref.tokens[0]
        ref_text = fidelity.answer_text(tok, model, ref_tokens)
        ref_forced = fidelity.batched_answers(model, tok, [kv], q, [ref_tokens], 0).forced[0][0]
        decs, kept = [], []
        for r in RETENTIONS:
            n_keep = keep_count(r, T)
            layer = [head_sets(s.sum(0, keepdim=True), n_keep).expand(H, -1) for s in scores]
            head = [head_sets(s, n_keep) for s in scores]
            for sets in (layer, head):
                for quant in (False, True):
                    decs.append(build(kv, sets, quant))
                    kept.append(sum(s.shape[1] for s in sets) / (len(sets) * T))
        out = fidelity.batched_answers(model, tok, decs, q, [ref_tokens], 16)
        for j, name in enumerate(names):
            text = fidelity.answer_text(tok, model, out.tokens[j])
            res[name]["fid"].append(fidelity.answer_fidelity(text, ref_text))
            res[name]["kl"].append(fidelity.mean_kl(ref_forced, out.forced[0][j]))
            res[name]["kept"].append(kept[j])
        print(i, f"{time.time() - t0:.0f}s", flush=True)
    for name in names:
        r = res[name]
        m = lambda v: sum(v) / len(v)  # noqa: E731
        print(f"{name:24s} kept {m(r['kept']):.3f}  fid {m(r['fid']):.3f}  kl {m(r['kl']):.4f}")
    with open(OUT, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
