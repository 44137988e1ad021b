"""CPU screen (issue 7): the KL each layer's K or V alone causes at BITS (kvlink's INT quantizer through
research/fake_quant.py, groups of 64, fp16 sink, every other tensor at FP16), teacher-forced on the greedy
full-KV answer of N held-out questions (the reserved last article). The product's measurement is
`kvlink-bench sensitivity` (kvlink.eval.sensitivity: the real codec, the other tensors at INT8).

usage: python research/screen_sensitivity.py N BITS OUT.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_quant import BITS, fake_quant

from kvlink.cache import ContextKV, prefill
from kvlink.eval import fidelity
from kvlink.eval.tasks import reserved_contexts, squad_examples
from kvlink.models import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, help="the first N answerable questions on the reserved article")
    ap.add_argument("bits", type=int, nargs="?", default=2, choices=BITS)
    ap.add_argument("out", nargs="?", default="sensitivity.json", help="output JSON [[K per layer], [V per layer]]")
    args = ap.parse_args()
    lm = load_model(None, "cpu", "fp32")
    model, tok = lm.model, lm.tokenizer
    res = set(reserved_contexts())
    exs = [e for e in squad_examples() if e.context in res][: args.n]
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
            for layer in range(L):
                keys, values = list(kv.keys), list(kv.values)
                t = keys if which == 0 else values
                x = t[layer].clone()
                x[:, 1:] = fake_quant(t[layer][:, 1:], args.bits, 64, "channel" if which == 0 else "token")
                t[layer] = x
                variants.append(ContextKV(keys, values, kv.positions, kv.length))
        out = fidelity.batched_answers(model, tok, [kv, *variants], q, [ref], 0).forced[0]
        for j in range(2 * L):
            kl.view(-1)[j] += fidelity.mean_kl(out[0], out[1 + j]) / len(exs)
        print(i, f"{time.time() - t0:.0f}s", flush=True)
    for which in (0, 1):
        print("KV"[which], " ".join(f"{v:.4f}" for v in kl[which].tolist()))
    with open(args.out, "w") as f:  # was open("sys.argv[3]"): every run wrote a file of that literal name
        json.dump(kl.tolist(), f)


if __name__ == "__main__":
    main()
