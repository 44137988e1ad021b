"""CPU screen (issue 7): Q2C kept sets per layer vs per KV head (the same count in every head), each with
and without K4/V3 g64 + sink fake-quantized by kvlink's INT quantizer (research/fake_quant.py).

usage: python research/screen_heads.py N RETENTIONS OUT.json     (RETENTIONS e.g. 0.4,0.9)
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_quant import fake_quant

from kvlink.cache import ContextKV, Observe, prefill_observations
from kvlink.eval import fidelity
from kvlink.eval.tasks import squad_examples
from kvlink.models import load_model
from kvlink.prompt import question_rows
from kvlink.select.base import keep_count
from kvlink.select.q2c import Q2C


def quantize(x, which, bits=None):
    """K4/V3 (or `bits`) in groups of 64, the first kept entry (position 0, always kept) at fp16."""
    y = x.clone()
    axis = "channel" if which == "k" else "token"
    bits = bits or (4 if which == "k" else 3)
    y[:, 1:] = fake_quant(x[:, 1:], bits, 64, axis)
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, help="the first N answerable SQuAD questions")
    ap.add_argument("retentions", help="comma-separated kept fractions, e.g. 0.4,0.9")
    ap.add_argument("out", help="output JSON")
    args = ap.parse_args()
    N = args.n
    RETENTIONS = [float(r) for r in args.retentions.split(",")]
    OUT = args.out
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
