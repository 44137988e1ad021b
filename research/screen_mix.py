"""CPU screen (issue 7): bits per layer and per K/V from measured sensitivity vs uniform K4/V3 or INT3,
fake-quantized by kvlink's INT quantizer (research/fake_quant.py) in groups of 64 with an fp16 sink, under
per-layer Q2C selection.

Sensitivity: a JSON [[K per layer], [V per layer]] of the KL each tensor alone causes at 2 bits, measured on
held-out questions (research/screen_sensitivity.py), or a kvlink profile (`kvlink-bench sensitivity`,
kvlink/data/sensitivity/). Allocation: kvlink.layerbits.Sensitivity.allocate (every tensor starts at 2 bits;
the upgrade with the largest predicted KL drop per added bit goes next, predicted KL at b bits =
KL2 * 4^-(b - 2), through the widths 2/3/4/8, until the average reaches the target). The run8 screen also
allowed 5- and 6-bit steps (`layerR-mix3.5`, `layer100-mix3`); kvlink has no INT5/INT6, so those schemes
are gone (research/README.md).

usage: python research/screen_mix.py N SENSITIVITY.json OUT.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_quant import fake_quant
from screen_heads import head_sets

from kvlink.cache import ContextKV, Observe, prefill_observations
from kvlink.eval import fidelity
from kvlink.eval.tasks import squad_examples
from kvlink.layerbits import Sensitivity
from kvlink.models import load_model
from kvlink.prompt import question_rows
from kvlink.select.base import keep_count
from kvlink.select.q2c import Q2C


def load_sensitivity(path):
    """A screen's [[K per layer], [V per layer]] at 2 bits, or a kvlink profile file."""
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict):
        return Sensitivity.load(path)
    return Sensitivity("screen", data[0], data[1], bits=2, source=str(path))


def build(kv, sets, kbits, vbits):
    keys, values, positions = [], [], []
    for layer, idx in enumerate(sets):
        k = torch.gather(kv.keys[layer], 1, idx[..., None].expand(-1, -1, kv.head_dim))
        v = torch.gather(kv.values[layer], 1, idx[..., None].expand(-1, -1, kv.head_dim))
        for x, b, axis in ((k, kbits[layer], "channel"), (v, vbits[layer], "token")):
            x[:, 1:] = fake_quant(x[:, 1:].clone(), b, 64, axis)
        keys.append(k)
        values.append(v)
        positions.append(idx[0])
    return ContextKV(keys, values, positions, kv.length)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, help="the first N answerable SQuAD questions")
    ap.add_argument("sensitivity", help="[[K per layer], [V per layer]] at 2 bits, or a kvlink profile")
    ap.add_argument("out", help="output JSON")
    args = ap.parse_args()
    n, out_path = args.n, args.out
    sens = load_sensitivity(args.sensitivity)
    L = sens.num_layers
    schemes = {}
    for r in (0.4, 0.9, 1.0):
        schemes[f"layer{int(r * 100)}-k4v3"] = (r, [4] * L, [3] * L)
        schemes[f"layer{int(r * 100)}-mix3.5-2348"] = (r, *sens.allocate(3.5))
    schemes["layer100-int3"] = (1.0, [3] * L, [3] * L)
    schemes["layer100-mix3-2348"] = (1.0, *sens.allocate(3.0))
    for name, (_, kb, vb) in schemes.items():
        print(name, "K", kb, "V", vb)
    torch.manual_seed(0)
    lm = load_model(None, "cpu", "fp32")
    model, tok = lm.model, lm.tokenizer
    res = {n: {"fid": [], "kl": []} for n in schemes}
    t0 = time.time()
    for i, ex in enumerate(squad_examples(limit=n)):
        ctx, q = ex.encode(tok)
        kv, obs = prefill_observations(model, ctx, q, {Observe.QUESTION}, 32, question_rows(tok, ex.question))
        o = obs[Observe.QUESTION]
        kv = kv.to(dtype=torch.float16).to(dtype=torch.float32)
        T, H = kv.length, kv.kv_heads
        scores = [Q2C().score(lo, T, o.scale).float().sum(0, keepdim=True) for lo in o.layers]
        ref_tokens = fidelity.batched_answers(model, tok, [kv], q, (), 16).tokens[0]
        ref_text = fidelity.answer_text(tok, model, ref_tokens)
        ref_forced = fidelity.batched_answers(model, tok, [kv], q, [ref_tokens], 0).forced[0][0]
        decs = []
        for r, kb, vb in schemes.values():
            sets = [head_sets(s, keep_count(r, T)).expand(H, -1) for s in scores]
            decs.append(build(kv, sets, kb, vb))
        out = fidelity.batched_answers(model, tok, decs, q, [ref_tokens], 16)
        for j, name in enumerate(schemes):
            text = fidelity.answer_text(tok, model, out.tokens[j])
            res[name]["fid"].append(fidelity.answer_fidelity(text, ref_text))
            res[name]["kl"].append(fidelity.mean_kl(ref_forced, out.forced[0][j]))
        print(i, f"{time.time() - t0:.0f}s", flush=True)
    for name, r in res.items():
        print(f"{name:24s} fid {sum(r['fid']) / len(r['fid']):.3f}  kl {sum(r['kl']) / len(r['kl']):.4f}")
    with open(out_path, "w") as f:
        json.dump({"schemes": {k: [v[0], v[1], v[2]] for k, v in schemes.items()}, "results": res}, f)


if __name__ == "__main__":
    main()
