"""CPU screen (issue 7), not part of the package: KL each layer's K or V alone causes at BITS (groups of 64, fp16 sink),
teacher-forced on the greedy full-KV answer of N held-out questions (the reserved last article).

usage: python bench/sensitivity_screen.py N BITS OUT.json
"""
import json
import sys
import time

import torch

from kvlink.cache import ContextKV, prefill
from kvlink.eval import fidelity
from kvlink.eval.tasks import reserved_contexts, squad_examples
from kvlink.models import load_model

lm = load_model(None, "cpu", "fp32"); model, tok = lm.model, lm.tokenizer

def minmax(x, bits, g, axis):
    H, T, D = x.shape; levels = 2**bits - 1
    if axis == "channel":
        pad = (-T) % g
        xg = torch.nn.functional.pad(x, (0, 0, 0, pad), value=float("nan")).view(H, -1, g, D)
        lo = torch.nan_to_num(xg, nan=float("inf")).amin(2, keepdim=True); hi = torch.nan_to_num(xg, nan=float("-inf")).amax(2, keepdim=True)
    else:
        xg = x.view(H, T, D // g, g); lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    s = ((hi - lo) / levels).clamp_min(1e-8)
    y = torch.round((xg - lo) / s).clamp(0, levels) * s + lo
    return y.view(H, -1, D)[:, :T] if axis == "channel" else y.view(H, T, D)
BITS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
res = set(reserved_contexts())
exs = [e for e in squad_examples() if e.context in res][: int(sys.argv[1])]
print(len(exs), "examples")
L = model.config.num_hidden_layers
kl = torch.zeros(2, L)
t0 = time.time()
for i, ex in enumerate(exs):
    ctx, q = ex.encode(tok)
    kv = prefill(model, ctx).kv.to(dtype=torch.float16).to(dtype=torch.float32)
    ref = fidelity.batched_answers(model, tok, [kv], q, (), 16).tokens[0]
    variants = []
    for which in (0, 1):
        for l in range(L):
            keys, values = list(kv.keys), list(kv.values)
            t = (keys if which == 0 else values)
            x = t[l].clone(); x[:, 1:] = minmax(t[l][:, 1:], BITS, 64, "channel" if which == 0 else "token"); t[l] = x
            variants.append(ContextKV(keys, values, kv.positions, kv.length))
    out = fidelity.batched_answers(model, tok, [kv] + variants, q, [ref], 0).forced[0]
    for j in range(2 * L):
        kl.view(-1)[j] += fidelity.mean_kl(out[0], out[1 + j]) / len(exs)
    print(i, f"{time.time()-t0:.0f}s", flush=True)
for which in (0, 1):
    print("KV"[which], " ".join(f"{v:.4f}" for v in kl[which].tolist()))
json.dump(kl.tolist(), open("sys.argv[3]", "w"))
