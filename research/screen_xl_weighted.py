"""`xl` with question-aware steps per position: soft selection inside the transform coder (issue 24, long contexts).

Selection drops a position or keeps it whole; `xl` codes every position at one step per tensor. Here every
position still travels, but position t's step is the tensor's step times 2^(g_t / 8), with g_t an integer
from the question's attention to t (Q2C scores): g_t = round(8 * gamma * log2(median / s_t)), clipped to
[-G, G] (G = 127). A rarely read position gets a coarse step (its residual rounds to zero: the cross-layer
prediction stands in for it, which a dropped position never has), a read one a fine step. For MSE weighted
by w_t the optimal step goes as w_t^(-1/2): gamma 0.5 is w proportional to the attention a position
receives, gamma 1 to its square (an error of a key or value moves the output by about its attention).
The entropy model follows the step: symbol (t, f) takes the table of component f shifted by g_t (its scale
in steps shrinks by g_t / 8 octaves), so a coarse position's zeros cost almost nothing.

Candidates `xlw<gamma><scope>@<budget %>`: scope l = one g_t per layer and position, computed and counted
as the product's `pca1-q<gamma>` (kvlink.stages.pca.question_shifts; a byte a coded row in K's and in V's
shifts part: 2 L (T - 1) bytes); scope g = one g_t per position for all layers (T - 1 bytes, research only). `xlw0g@<b>` is
`xl` itself (g = 0; no g bytes counted). Bytes: the model code length of the symbols (rANS comes within
0.03% of it on the CPU screens, +2 bytes a lane), the rANS headers and float16 sinks per tensor, 8 bytes of
header, the g bytes, plus the FP16 message's framing (the harness). Profiles as research/check_xl.py.

usage: PYTHONPATH=$PWD python research/screen_xl_weighted.py N [--task long] [--configs xlw0g@10,xlw0.5g@10]
       [--baselines RECIPE,...] [--name NAME] [--shard K/N] [--split calibration] [--pairs BASE:CAND,...]
       [--resume] [--fit-only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_xl import HEADER, profiles
from common import Bytes, Context, lm, run_screen, write_paired

from kvlink import ans, xl
from kvlink.cache import ContextKV
from kvlink.predict import PredictorProfile
from kvlink.residual import ResidualProfile
from kvlink.select.q2c import Q2C
from kvlink.stages.pca import question_shifts

G = 127
SINK = 1


def shifts(c: Context, gamma: float, scope: str) -> Tensor:
    """(L, T) int64 step shifts g (1/8 octaves, coarser when positive), 0 on the sink row: scope l is the
    product's (kvlink.stages.pca.question_shifts, each layer's own scores); scope g one row for every
    layer, from the layers' scores each normalized to sum 1 (as Q2C global ranks)."""
    length = c.kv.length
    g = torch.zeros(c.kv.num_layers, length, dtype=torch.int64)
    if scope == "l":
        positions = c.kv.positions[0]
        for layer in range(c.kv.num_layers):
            g[layer, SINK:] = question_shifts(c.question, layer, positions, SINK, gamma)
        return g
    per_layer = torch.stack(
        [Q2C().score(obs, length, c.question.scale).sum(0).float().cpu() for obs in c.question.layers]
    )
    per_layer = per_layer / per_layer[:, SINK:].sum(1, keepdim=True).clamp_min(1e-30)
    s = per_layer.sum(0, keepdim=True).expand_as(per_layer).clamp_min(1e-12)
    ref = s[:, SINK:].median(dim=1, keepdim=True).values
    g = torch.round(8 * gamma * torch.log2(ref / s)).clamp(-G, G).to(torch.int64)
    g[:, :SINK] = 0
    return g


def chain(
    kv: ContextKV, predictors: PredictorProfile, residual: ResidualProfile, rate: int, g: Tensor
) -> tuple[list[Tensor], list[Tensor], float]:
    """The product's closed loop (kvlink.xl's, with the shifts g[:, sink:]) and the symbols' model code length
    (bits), counted on the symbols' device. Returns the decoded keys (after RoPE), values and the bits."""
    shifts = g[:, SINK:]
    keys, values, symbols, _, _ = xl._chain(
        predictors, residual, rate, kv.positions[0], SINK, kv=kv, shifts=shifts.repeat_interleave(2, dim=0)
    )
    logf = _log_freq(residual, symbols.device)
    tables = torch.from_numpy(xl._tables(residual, rate)).to(symbols.device)  # (2L, F)
    rows_shift = shifts.repeat_interleave(2, dim=0).to(symbols.device)  # K's and V's of each layer
    jt = (tables[:, None, :] - rows_shift[:, :, None]).clamp(0, ans.J_MAX - ans.J_MIN)
    s = symbols.to(torch.int64)
    escaped = s.abs() > ans.MAX_SYMBOL
    idx = torch.where(escaped, ans.ESCAPE, s + ans.MAX_SYMBOL)
    bits = ans.PROB_BITS * idx.numel() - logf[jt, idx].sum(dtype=torch.float64) + 16 * escaped.sum()
    return keys, values, float(bits)


_LOG_FREQ: dict[str, Tensor] = {}


def _log_freq(residual: ResidualProfile, device: torch.device) -> Tensor:
    """log2 of the profile's table frequencies (K, ALPHABET), float64 on `device` (kept per device)."""
    key = f"{residual.hash}:{device}"
    if key not in _LOG_FREQ:
        _LOG_FREQ[key] = torch.from_numpy(np.log2(residual.tables.freq.astype(np.float64))).to(device)
    return _LOG_FREQ[key]


def fit(
    c: Context, predictors: PredictorProfile, residual: ResidualProfile, g: Tensor, target: float
) -> tuple[ContextKV, float]:
    """The finest integer rate whose body (code length + per tensor rANS header and sinks) fits `target`."""
    fixed = 2 * predictors.layers * (ans.HEADER + 2 * SINK * residual.features)
    memo: dict[int, float] = {}  # sizes only: a long context's decoded cache is hundreds of MB a rate

    def size(rate: int) -> float:
        if rate not in memo:
            memo[rate] = chain(c.kv, predictors, residual, rate, g)[2] / 8 + fixed
        return memo[rate]

    rate = xl.search_rate(size, size, target)
    if rate is None:
        raise ValueError(f"no rate fits {target:.0f} bytes")
    keys, values, _ = chain(c.kv, predictors, residual, rate, g)
    return ContextKV(keys, values, c.kv.positions, c.kv.length), size(rate)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("--task", default="long", choices=("squad", "long"))
    ap.add_argument("--split", default="calibration", choices=("calibration", "evaluation"))
    ap.add_argument("--configs", default="xlw0g@10,xlw0.5g@10,xlw1g@10,xlw0.5l@10")
    ap.add_argument("--baselines", default="")
    ap.add_argument("--name", default="xl-weighted")
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--pairs", default="", help="BASE:CANDIDATE,... to pair when the run is whole")
    ap.add_argument("--resume", action="store_true", help="go on after the questions a cut run answered")
    ap.add_argument(
        "--fit-only", action="store_true", help="fit (or load) the profiles and stop: before shards"
    )
    args = ap.parse_args()
    predictors, residual = profiles()
    if args.fit_only:
        return 0
    device = lm().device
    predictors, residual = predictors.to(device), residual.to(device)  # type: ignore[attr-defined]
    configs = [c for c in args.configs.split(",") if c]

    def candidates(c: Context) -> dict[str, tuple[ContextKV, Bytes]]:
        out = {}
        for name in configs:
            head, budget = name.removeprefix("xlw").split("@")
            gamma, scope = float(head[:-1]), head[-1]
            g = (
                shifts(c, gamma, scope)
                if gamma
                else torch.zeros(c.kv.num_layers, c.kv.length, dtype=torch.int64)
            )
            rows_ = c.kv.length - SINK  # the product's shifts parts: a byte a coded row, K's and V's
            side = 0 if not gamma else (rows_ if scope == "g" else 2 * c.kv.num_layers * rows_)
            target = float(budget) / 100 * c.fp16_bytes - c.framing - HEADER - side
            decoded, body = fit(c, predictors, residual, g, target)
            out[name] = (decoded, Bytes(body, HEADER + side))
        return out

    meta = {"predictors": predictors.hash, "residual": residual.hash, "g_max": G, "sink": SINK}
    shard = tuple(int(x) for x in args.shard.split("/"))
    run_screen(args.name, candidates, args.n, [b for b in args.baselines.split(",") if b], 0, meta,
               split=args.split, task=args.task, shard=shard, resume=args.resume)  # fmt: skip
    if shard == (0, 1) and args.pairs:
        write_paired(args.name, [tuple(p.split(":", 1)) for p in args.pairs.split(",")])  # type: ignore[misc]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
