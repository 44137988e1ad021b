"""CPU screen (issue 7): Q2C per layer, the dropped positions merged into one summary entry per layer and
KV head instead of dropped; fidelity and KL at fp16 on N SQuAD questions. (Was bench/screen_merge.py;
issue 24's token merging, nearest kept position, is research/screen_merge.py.)

usage: [START=k] python research/screen_summary.py N "scheme;scheme;..." out.json   (questions k..N-1)
scheme: drop,r=0.4[,obs=words|all|tail] | merge,r=0.4,k=mean|lse,lam=0.1
  obs: the question rows Q2C observes: its own words (the sender's default), every question row (the chat
  template around it too), or its words and every row after them (the assistant prompt the answer follows)
  merge: v* = the dropped values weighted by the question's attention mass on them;
  k=mean: k* = the same weighted mean of the dropped keys;
  k=lse: k* fitted so that s q.k* = logsumexp_j(s q.k_j) over the dropped j for the question's queries,
         ridge lam (relative to the mean diagonal) toward the weighted mean key.
"""

import argparse
import json
import os
import time

import torch

from kvlink.cache import ContextKV, Observe, prefill_observations
from kvlink.eval import fidelity
from kvlink.eval.tasks import squad_examples
from kvlink.models import load_model
from kvlink.prompt import question_rows
from kvlink.select.base import attention_to_context
from kvlink.select.q2c import Q2C

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("n", type=int, nargs="?", default=30, help="questions START..N-1 (START: environment, default 0)")
ap.add_argument("schemes", nargs="?", default="drop,r=0.4;merge,r=0.4,k=mean", help='"scheme;scheme;..."')
ap.add_argument("out", nargs="?", default="screen-merge.json")
ARGS = ap.parse_args()
N = ARGS.n
SCHEMES = ARGS.schemes.split(";")
torch.manual_seed(0)
lm = load_model(None, "cpu", "fp32")
model, tok = lm.model, lm.tokenizer


def summary(k, v, obs, scale, dropped, how, lam):
    """One (kv_heads, 1, D) key and value standing in for the dropped positions of one layer."""
    H, _, D = k.shape
    mass = attention_to_context(obs, k.shape[1], scale)[:, dropped]  # (H, n_dropped)
    w = mass / mass.sum(1, keepdim=True).clamp_min(1e-30)
    kd, vd = k[:, dropped], v[:, dropped]
    v_star = torch.einsum("hn,hnd->hd", w, vd)
    k_bar = torch.einsum("hn,hnd->hd", w, kd)
    if how == "mean":
        return k_bar[:, None], v_star[:, None]
    q = obs.queries.float()
    group = q.shape[0] // H
    qh = q.reshape(H, group * q.shape[1], D)  # the queries of each KV group
    lse = torch.logsumexp(scale * qh @ kd.transpose(1, 2), dim=-1)  # (H, nq)
    a = scale**2 * qh.transpose(1, 2) @ qh  # (H, D, D)
    ridge = lam * a.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(D)
    rhs = scale * (qh.transpose(1, 2) @ lse[..., None])[..., 0] + (ridge @ k_bar[..., None])[..., 0]
    k_star = torch.linalg.solve(a + ridge, rhs)
    return k_star[:, None], v_star[:, None]


def scheme(name, kv, observers, kept_cache):
    opts = dict(p.split("=") for p in name.split(",")[1:])
    r, seen = float(opts["r"]), opts.get("obs", "words")
    obs = observers[seen]
    if (r, seen) not in kept_cache:
        kept_cache[r, seen] = Q2C().keep(obs, r, "layer")
    kept = kept_cache[r, seen]
    keys, values, positions = [], [], []
    for layer in range(kv.num_layers):
        keep = kept[layer]
        k, v = kv.keys[layer], kv.values[layer]
        if name.startswith("drop") or keep.numel() == kv.length:
            keys.append(k[:, keep])
            values.append(v[:, keep])
            positions.append(keep)
            continue
        mask = torch.ones(kv.length, dtype=torch.bool)
        mask[keep] = False
        dropped = mask.nonzero()[:, 0]
        ks, vs = summary(k, v, obs.layers[layer], obs.scale, dropped, opts["k"], float(opts.get("lam", 0.1)))
        at = dropped[-1:]  # the summary sits at the last dropped position (causal for every question token)
        pos = torch.cat([keep, at])
        order = torch.argsort(pos)
        keys.append(torch.cat([k[:, keep], ks], 1)[:, order])
        values.append(torch.cat([v[:, keep], vs], 1)[:, order])
        positions.append(pos[order])
    return ContextKV(keys, values, positions, kv.length)


examples = squad_examples(limit=N)[int(os.environ.get("START", 0)) :]  # START=k: skip the first k
res = {s: {"fid": [], "kl": []} for s in SCHEMES}
t0 = time.time()
for i, ex in enumerate(examples):
    ctx, q = ex.encode(tok)
    start, end = question_rows(tok, ex.question)
    observers = {}
    for seen, rows in (("words", (start, end)), ("all", (0, q.numel())), ("tail", (start, q.numel()))):
        kv, observations = prefill_observations(model, ctx, q, {Observe.QUESTION}, 32, rows)
        observers[seen] = observations[Observe.QUESTION]
    kv = kv.to(dtype=torch.float16).to(dtype=torch.float32)
    ref = fidelity.batched_answers(model, tok, [kv], q, (), 16)
    ref_tokens = ref.tokens[0]
    ref_text = fidelity.answer_text(tok, model, ref_tokens)
    ref_forced = fidelity.batched_answers(model, tok, [kv], q, [ref_tokens], 0).forced[0][0]
    kept_cache = {}
    decs = [scheme(s, kv, observers, kept_cache) for s in SCHEMES]
    out = fidelity.batched_answers(model, tok, decs, q, [ref_tokens], 16)
    for j, s in enumerate(SCHEMES):
        text = fidelity.answer_text(tok, model, out.tokens[j])
        res[s]["fid"].append(fidelity.answer_fidelity(text, ref_text))
        res[s]["kl"].append(fidelity.mean_kl(ref_forced, out.forced[0][j]))
    print(i, f"{time.time() - t0:.0f}s", flush=True)
for s in SCHEMES:
    r = res[s]
    m = lambda x: sum(x) / len(x)  # noqa: E731
    print(f"{s:40s} fid {m(r['fid']):.3f}  kl {m(r['kl']):.4f}")
with open(ARGS.out, "w") as f:
    json.dump(res, f)
