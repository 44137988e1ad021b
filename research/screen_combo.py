"""Prediction + transform coding: AQUA-KV-style cross-layer predictors (research/screen_predict.py) with the
RESIDUAL transform-coded as in KVTC (research/transform.py: PCA of the fit residuals, one step per tensor
from the sensitivity weights, quantized-Laplace rANS), at a byte budget (the rate parameter searched per
message). Every position is sent (cross-layer prediction needs the same positions in every layer).

usage: python research/screen_combo.py N [--offset K] [--name NAME] [--only a,b] [--join RESULTS_NAME]

Candidates `aqua-pca@<budget %>`, with the predictors fitted closed-loop at K<kb>/V<vb> INT noise:
`aqua<kb><vb>-pca@...` (default 22: the noise of ~2-bit residuals). --join copies the baselines (and the
PCA-only candidates) measured on the same questions by another screen into this one's results, for
paired comparisons without measuring them again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import screen_predict as sp  # noqa: E402
from common import PICK, ROOT, Bytes, Context, current_names, fit_kv, lm, rope, run_screen, sensitivity, unrope, write_paired  # noqa: E402, E501
from transform import Basis, ans_bytes, fit_profile, laplace_bits  # noqa: E402

from kvlink.cache import ContextKV  # noqa: E402

CANDIDATES = ("aqua22-pca@25", "aqua22-pca@18.75", "aqua22-pca@12.5", "aqua22-pca@8", "aqua43-pca@25")


def _basis(rows: Tensor) -> Basis:
    x = rows.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / x.shape[0]
    var, vec = torch.linalg.eigh(cov)
    order = var.argsort(descending=True)
    return Basis(mean.float(), vec[:, order].float(), var[order].clamp_min(1e-12).float())


class Model:
    """Predictors, residual bases and tensor weights for one noise level."""

    def __init__(self, bits: tuple[int, int]) -> None:
        self.pred = sp.fit_predictors(bits)
        self.bases = [(_basis(rk), _basis(rv)) for rk, rv in self.pred.residuals]
        self.pred.residuals = []  # free the rows
        s = sensitivity()
        self.weight = fit_profile(fit_kv(), "pre", "sens", True, s.k, s.v).weight  # identity: weights only

    @property
    def nbytes(self) -> int:
        return self.pred.nbytes + sum(k.nbytes + v.nbytes for k, v in self.bases) + 4 * self.weight.numel()


MODELS: dict[tuple[int, int], Model] = {}


def chain(c: Context, m: Model, rate: float, final: bool) -> tuple[list[Tensor], list[Tensor], float]:
    """Code every layer in order (closed loop). Returns decoded keys/values (FP16 sink kept) and payload bytes
    (model code length, or the real rANS size when `final`)."""
    kv, h = c.kv, c.kv.kv_heads
    body = torch.arange(1, kv.length, device=kv.keys[0].device)
    keys, values = [], []
    total = 0.0
    prev_k = prev_v = None
    for layer in range(kv.num_layers):
        k_true = sp._rows(unrope(kv.keys[layer][:, 1:], body))
        v_true = sp._rows(kv.values[layer][:, 1:])
        a, b = m.pred.keys[layer], m.pred.values[layer]
        pred_k = sp._with_one(prev_k, prev_v) @ a if a is not None and prev_k is not None else 0.0
        decoded = []
        for j, (true, basis) in enumerate(((k_true, m.bases[layer][0]), (v_true, m.bases[layer][1]))):
            if j == 1:
                inputs = sp._with_one(decoded[0]) if prev_v is None else sp._with_one(decoded[0], prev_v)
                pred = inputs @ b if b is not None else 0.0
            else:
                pred = pred_k
            step = rate / math.sqrt(float(m.weight[layer, j]))
            y = (true - pred - basis.mean) @ basis.basis
            sym = torch.round(y / step)
            scale = (basis.var / 2).sqrt() / step
            total += ans_bytes(sym, scale) if final else math.ceil(float(laplace_bits(sym, scale).sum()) / 8)
            decoded.append(pred + (sym * step) @ basis.basis.T + basis.mean)
        prev_k, prev_v = decoded
        k_full, v_full = kv.keys[layer].clone(), kv.values[layer].clone()
        k_full[:, 1:] = rope(sp._unrows(decoded[0], h), body)
        v_full[:, 1:] = sp._unrows(decoded[1], h)
        keys.append(k_full)
        values.append(v_full)
    return keys, values, total


def candidate(c: Context, name: str) -> tuple[ContextKV, Bytes]:
    head, budget = name.split("@")
    bits = (int(head[4]), int(head[5]))
    m = MODELS[bits]
    kv = c.kv
    side = 4 + 4 * 2 * kv.num_layers + kv.num_layers * 2 * kv.kv_heads * kv.head_dim * 2  # c, ranges, sink
    target = float(budget) / 100 * c.fp16_bytes - side - c.framing
    lo, hi = math.log(1e-6), math.log(1e3)
    for _ in range(16):
        mid = (lo + hi) / 2
        if chain(c, m, math.exp(mid), False)[2] > target:
            lo = mid
        else:
            hi = mid
    keys, values, payload = chain(c, m, math.exp(hi), True)
    return ContextKV(keys, values, kv.positions, kv.length), Bytes(payload, side)


def join(name: str, other: str) -> None:
    """Copy the other screen's rows (same questions) into this one's results.json, marked by `joined`."""
    path = ROOT / "results" / name / "results.json"
    mine = json.loads(path.read_text())
    theirs = current_names(json.loads((ROOT / "results" / other / "results.json").read_text()))
    if mine["eids"] != theirs["eids"]:
        raise SystemExit(f"{other} measured other questions than {name}: cannot pair")
    for key in theirs["per_question"]:
        if key not in mine["per_question"]:
            mine["per_question"][key] = theirs["per_question"][key]
            mine["summary"][key] = {**theirs["summary"][key], "from": other}
    mine["meta"]["joined"] = other
    path.write_text(json.dumps(mine, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--split", default="calibration", choices=("calibration", "evaluation"),
                    help="evaluation: MEASURE chosen candidates on the first N evaluation questions (no tuning)")
    ap.add_argument("--shard", default="0/1", help="K/N: questions K, K+N, ... (merge_shards.py joins them)")
    ap.add_argument("--task", default="squad", choices=("squad", "long"), help="long: 2k-8k-token contexts")
    ap.add_argument("--name", default="combo")
    ap.add_argument("--only", default=None)
    ap.add_argument("--baselines", default="")
    ap.add_argument("--join", default=None)
    ap.add_argument("--fit-only", action="store_true", help="prefill the fit text into the cache and stop")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(CANDIDATES)
    lm()
    if args.fit_only:  # before sharded runs, so the shards do not all write the cache at once
        fit_kv()
        return 0
    for name in names:
        bits = (int(name[4]), int(name[5]))
        if bits not in MODELS:
            MODELS[bits] = Model(bits)

    def candidates(c: Context) -> dict[str, tuple[ContextKV, Bytes]]:
        return {name: candidate(c, name) for name in names}

    meta = {
        "profile_bytes_fp16": {f"k{b[0]}v{b[1]}": m.nbytes for b, m in MODELS.items()},
        "fit_r2": {f"k{b[0]}v{b[1]}": m.pred.r2 for b, m in MODELS.items()},
    }
    run_screen(args.name, candidates, args.n, [b for b in args.baselines.split(",") if b], args.offset, meta,
               split=args.split, shard=tuple(int(x) for x in args.shard.split("/")), task=args.task)
    if args.shard != "0/1":
        return 0
    if args.join:
        join(args.name, args.join)
    pairs = []
    for n in names:
        budget = n.split("@")[1]
        if budget == "25":
            pairs += [(f"q2c90%/layer+{PICK}", n), ("pre-sens@25", n)]
        if budget == "12.5":
            pairs += [(f"q2c40%/layer+{PICK}", n), ("pre-sens@12.5", n)]
        if budget == "18.75":
            pairs += [("pre-sens@18.75", n)]
    write_paired(args.name, pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
