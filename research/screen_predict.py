"""AQUA-KV-style screen: calibrated linear predictors of each layer's K/V from what the receiver already
decoded; only the residual is quantized (kvlink's INT quantizers, groups of 64, keys per channel, values per
token, FP16 sink), so a message has exactly the parts and bytes of its plain twin.

usage: python research/screen_predict.py N [--offset K] [--name NAME] [--only a,b]

Predictors (profile data, ridge least squares on the fit paragraphs, keys before RoPE):
    K_l  <- [K_{l-1}, V_{l-1}, 1] @ A_l          (layer 0: no prediction)
    V_l  <- [K_l, V_{l-1}, 1] @ B_l              (layer 0: [K_0, 1])
At decode time the inputs are the DECODED tensors (closed loop: the error of a layer is its own residual's
quantization error, nothing accumulates). Candidates: `plain-<q>` (no predictor: the twin, by this script's
fake quantization) and `aqua-<q>` with <q> in int2, int3, k4v3, k3v2 (K and V bits). The screen also reports,
per layer, the share of each tensor's variance the predictor explains on the screened contexts (R^2).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PICK, ROOT, Bytes, Context, fit_kv, lm, rope, run_screen, unrope, write_paired  # noqa: E402

from kvlink.cache import ContextKV  # noqa: E402
from kvlink.quant import QuantSpec, dequantize, quantize  # noqa: E402

TWINS = {  # kvlink recipes (kvlink.recipe grammar) with the bits of each candidate, groups of 64, FP16 sink
    "int2": "kint2c/vint2t-g64+sink1",
    "int3": "kint3c/vint3t-g64+sink1",
    "k4v3": "kint4c/vint3t-g64+sink1",
    "k3v2": "kint3c/vint2t-g64+sink1",
}
BASELINES = (*TWINS.values(), PICK, f"q2c90%/layer+{PICK}")
CANDIDATES = ("plain-int2", "aqua-int2", "aqua-k3v2", "aqua-int3", "plain-k4v3", "aqua-k4v3")
BITS = {"int2": (2, 2), "int3": (3, 3), "k4v3": (4, 3), "k3v2": (3, 2)}
RIDGE = 1e-3  # relative to the mean diagonal of X^T X


def _rows(x: Tensor) -> Tensor:
    h, n, d = x.shape
    return x.permute(1, 0, 2).reshape(n, h * d)


def _unrows(y: Tensor, h: int) -> Tensor:
    n, f = y.shape
    return y.reshape(n, h, f // h).permute(1, 0, 2)


def _with_one(*xs: Tensor) -> Tensor:
    x = torch.cat(xs, 1)
    return torch.cat([x, torch.ones(x.shape[0], 1, device=x.device)], 1)


def _ridge(x: Tensor, y: Tensor) -> Tensor:
    x, y = x.double(), y.double()  # noqa: the normal equations need float64
    gram = x.T @ x
    gram += RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, x.T @ y).float()


@dataclass
class Predictors:
    """Per layer: A (keys; None: not predicted) and B (values; None: not predicted), and the fit's R^2."""

    keys: list[Tensor | None]
    values: list[Tensor | None]
    r2: dict[str, list[float]]
    residuals: list[tuple[Tensor, Tensor]]  # per layer: the fit's (key, value) residual rows, (N, F), float16

    @property
    def nbytes(self) -> int:  # fp16 profile data
        return 2 * sum(a.numel() for a in [*self.keys, *self.values] if a is not None)


MIN_R2 = 0.02  # a predictor explaining less of its tensor's variance on the fit text is not used


def _r2(target: Tensor, residual: Tensor) -> float:
    return 1 - float(residual.var(0).sum() / target.var(0).sum())


def fit_predictors(bits: tuple[int, int]) -> Predictors:
    """Closed-loop fit: each layer's predictor is fitted on the fit text's DECODED previous tensors (quantized
    as the candidate quantizes them: `bits` for K and V), as the receiver will have them."""
    fit = fit_kv()
    h = fit.keys[0].shape[0]
    keys: list[Tensor | None] = []
    values: list[Tensor | None] = []
    r2: dict[str, list[float]] = {"k": [], "v": []}
    residuals: list[tuple[Tensor, Tensor]] = []
    prev_k = prev_v = None
    for layer in range(len(fit.keys)):
        k, v = _rows(fit.keys_pre[layer]), _rows(fit.values[layer])
        a = None
        if prev_k is not None:
            a = _ridge(_with_one(prev_k, prev_v), k)
            r2["k"].append(_r2(k, k - _with_one(prev_k, prev_v) @ a))
            if r2["k"][-1] < MIN_R2:
                a = None
        else:
            r2["k"].append(0.0)
        pred_k = _with_one(prev_k, prev_v) @ a if a is not None else torch.zeros_like(k)
        k_dec = pred_k + _rows(_quant(_unrows(k - pred_k, h), bits[0], "channel")[0])
        inputs = _with_one(k_dec) if prev_v is None else _with_one(k_dec, prev_v)
        b = _ridge(inputs, v)
        r2["v"].append(_r2(v, v - inputs @ b))
        if r2["v"][-1] < MIN_R2:
            b = None
        pred_v = inputs @ b if b is not None else torch.zeros_like(v)
        v_dec = pred_v + _rows(_quant(_unrows(v - pred_v, h), bits[1], "token")[0])
        keys.append(a)
        values.append(b)
        residuals.append(((k - pred_k).half(), (v - pred_v).half()))
        prev_k, prev_v = k_dec, v_dec
    r2r = {kind: [round(x, 4) for x in xs] for kind, xs in r2.items()}
    return Predictors(keys, values, r2r, residuals)


PRED: dict[tuple[int, int], Predictors] = {}
R2: dict[str, list[list[float]]] = {"k": [], "v": []}  # per context, per layer


def _quant(x: Tensor, bits: int, axis: str) -> tuple[Tensor, int, int]:
    """Fake-quantize x (H, n, D) with kvlink's INT format: (decoded, code bytes, scale+zero bytes)."""
    q = quantize(x, QuantSpec(f"int{bits}", 64, axis))
    sizes = q.nbytes()
    return dequantize(q), sizes["codes"], sizes.get("scale", 0) + sizes.get("zero", 0)


def candidate(c: Context, name: str, r2: bool = False) -> tuple[ContextKV, Bytes]:
    kind, q = name.split("-")
    kb, vb = BITS[q]
    kv, h = c.kv, c.kv.kv_heads
    body = torch.arange(1, kv.length, device=kv.keys[0].device)  # the sink (position 0) travels as FP16
    keys, values = [], []
    payload = side = 0.0
    prev_k = prev_v = None  # decoded, keys before RoPE, (n, F)
    r2k, r2v = [], []
    for layer in range(kv.num_layers):
        k_pre = _rows(unrope(kv.keys[layer][:, 1:], body))
        v = _rows(kv.values[layer][:, 1:])
        pred_k = pred_v = None
        pred = PRED[(kb, vb)] if kind == "aqua" else None
        if pred is not None:
            a = pred.keys[layer]
            pred_k = _with_one(prev_k, prev_v) @ a if a is not None and prev_k is not None else None
        res_k = k_pre - pred_k if pred_k is not None else k_pre
        # Keys: the codec quantizes them after RoPE, per channel; a residual is quantized before it.
        if pred_k is None:
            k_dec_post, codes, meta = _quant(kv.keys[layer][:, 1:], kb, "channel")
            k_dec = _rows(unrope(k_dec_post, body))
        else:
            r_dec, codes, meta = _quant(_unrows(res_k, h), kb, "channel")
            k_dec = pred_k + _rows(r_dec)
        payload += codes
        side += meta
        if pred is not None and pred.values[layer] is not None:
            inputs = _with_one(k_dec) if layer == 0 else _with_one(k_dec, prev_v)
            pred_v = inputs @ pred.values[layer]
        res_v = v - pred_v if pred_v is not None else v
        r_dec, codes, meta = _quant(_unrows(res_v, h), vb, "token")
        v_dec = (pred_v if pred_v is not None else 0) + _rows(r_dec)
        payload += codes
        side += meta
        if r2:
            r2k.append(1 - float(res_k.var(0).sum() / k_pre.var(0).sum()) if pred_k is not None else 0.0)
            r2v.append(1 - float(res_v.var(0).sum() / v.var(0).sum()) if pred_v is not None else 0.0)
        prev_k, prev_v = k_dec, v_dec
        k_full, v_full = kv.keys[layer].clone(), kv.values[layer].clone()
        k_full[:, 1:] = rope(_unrows(k_dec, h), body)
        v_full[:, 1:] = _unrows(v_dec, h)
        keys.append(k_full)
        values.append(v_full)
    if r2:
        R2["k"].append(r2k)
        R2["v"].append(r2v)
    side += kv.num_layers * 2 * h * kv.head_dim * 2  # FP16 sink entries
    return ContextKV(keys, values, kv.positions, kv.length), Bytes(payload, side)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--split", default="calibration", choices=("calibration", "evaluation"),
                    help="evaluation: MEASURE chosen candidates on the first N evaluation questions (no tuning)")
    ap.add_argument("--shard", default="0/1", help="K/N: questions K, K+N, ... (merge_shards.py joins them)")
    ap.add_argument("--task", default="squad", choices=("squad", "long"), help="long: 2k-8k-token contexts")
    ap.add_argument("--name", default="predict")
    ap.add_argument("--only", default=None)
    ap.add_argument("--baselines", default=",".join(BASELINES))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(CANDIDATES)
    lm()
    for name in names:
        bits = BITS[name.split("-")[1]]
        if name.startswith("aqua") and bits not in PRED:
            PRED[bits] = fit_predictors(bits)

    def candidates(c: Context) -> dict[str, tuple[ContextKV, Bytes]]:
        out = {}
        for i, name in enumerate(names):
            out[name] = candidate(c, name, r2=name.startswith("aqua") and i == names.index(
                next(n for n in names if n.startswith("aqua"))))
        return out

    baselines = [b for b in args.baselines.split(",") if b]
    meta = {
        "predictor_bytes_fp16": {f"k{b[0]}v{b[1]}": p.nbytes for b, p in PRED.items()},
        "fit_r2": {f"k{b[0]}v{b[1]}": p.r2 for b, p in PRED.items()},
        "ridge": RIDGE, "min_r2": MIN_R2, "fit_tokens": fit_kv().tokens,
    }  # fmt: skip
    run_screen(args.name, candidates, args.n, baselines, args.offset, meta, split=args.split, shard=tuple(int(x) for x in args.shard.split("/")), task=args.task)
    if args.shard != "0/1":
        return 0
    path = ROOT / "results" / args.name / "results.json"
    data = json.loads(path.read_text())
    if R2["k"]:
        # R^2 with the first aqua candidate's decoded inputs, mean over contexts, per layer
        data["r2"] = {
            kind: [round(sum(col) / len(col), 4) for col in zip(*R2[kind], strict=True)] for kind in ("k", "v")
        }
        print("R^2 keys  :", data["r2"]["k"])
        print("R^2 values:", data["r2"]["v"])
    path.write_text(json.dumps(data, indent=1) + "\n")
    pairs = [(TWINS[n.split("-")[1]], n) for n in names if n.split("-")[1] in TWINS]
    pairs += [(PICK, "aqua-k4v3"), (f"q2c90%/layer+{PICK}", "aqua-k4v3")]
    write_paired(args.name, pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
