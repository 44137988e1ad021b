"""Cross-layer transform coding of a whole cache (`xl`, issue 24): the codec core, before the stages.

The arithmetic of research/README.md's design note with the product's pieces: every layer's K and V
predicted from what the receiver decoded (kvlink.predict, closed loop through
kvlink.stages.predict.PredictState), the residual rotated into its principal components and rounded
to one step per tensor (kvlink.residual.ResidualProfile), the symbols rANS-coded (kvlink.ans). Every
position travels (cross-layer prediction needs one position set); the first `sink` residual rows of
each tensor travel at float16 (the Predict stage's order: Sink after Predict).

    encode(kv, predictors, residual, rate)  -> Coded (per tensor: sink bytes, rANS stream)
    decode(coded, predictors, residual, positions, length) -> ContextKV
    (shifts=: question-aware steps, (L, N - sink) int shifts of each layer's rows: kvlink.stages.pca; with
    max_symbol= a row whose symbols would pass it is coded coarser, as the stages do for float16, and the
    message carries each tensor's shifts, (2L, N - sink))
    fit_rate(kv, predictors, residual, budget) -> the finest rate index whose message fits `budget` bytes
    search_rate(estimate, exact, budget) -> that search over any size functions (kvlink.budget.fit_rate's too)

The stages kvlink.stages.pca and kvlink.stages.ans carry it in a message (`xpred+fp16+pca1-r<rate>+ans`:
the same streams byte for byte, tests/test_xl_stages.py); this module stays the reference and the
rate search (`fit_rate`) the planner is to use.
The sender's chain and the receiver's decode are the same function (`_chain`), so they agree up to
float rounding; the entropy model depends only on the profile and the rate, never on decoded values, so
such rounding can never desynchronize the coder.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kvlink import ans
from kvlink.cache import ContextKV
from kvlink.predict import KINDS, PredictorProfile, rows, unrows
from kvlink.residual import ResidualProfile
from kvlink.stages.pca import RATES  # the rate indices a message may take
from kvlink.stages.predict import PredictState


@dataclass
class Coded:
    """A coded cache: per tensor (layer 0 K, layer 0 V, layer 1 K, ...) its float16 sink rows
    (sink, F) and its rANS stream of the other rows' symbols."""

    rate: int
    sink: int
    length: int
    n: int  # rows per tensor
    sinks: list[bytes]
    streams: list[bytes]
    # (2L, n - sink) int64: question-aware steps, each tensor's (its int8 shifts part)
    shifts: Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the message body: sinks, streams and shifts (a header adds the rate, sink and lengths)."""
        shifts = 0 if self.shifts is None else self.shifts.numel()  # one byte a row of each tensor
        return sum(map(len, self.sinks)) + sum(map(len, self.streams)) + shifts


def _check(predictors: PredictorProfile, residual: ResidualProfile, rate: int, sink: int) -> None:
    residual.check_for(predictors)
    if rate not in RATES:
        raise ValueError(f"rate must be in [{RATES.start}, {RATES.stop - 1}], got {rate!r}")
    if sink < 0:
        raise ValueError(f"sink must be >= 0, got {sink!r}")


def _chain(
    predictors: PredictorProfile,
    residual: ResidualProfile,
    rate: int,
    positions: Tensor,
    sink: int,
    kv: ContextKV | None = None,
    symbols: Tensor | None = None,
    sinks: list[Tensor] | None = None,
    shifts: Tensor | None = None,
    max_symbol: int | None = None,
) -> tuple[list[Tensor], list[Tensor], Tensor, list[Tensor], Tensor | None]:
    """Code (`kv` given) or decode (`symbols` (2L, N - sink, F) and `sinks` given) every tensor in order,
    row r of tensor i at 2^(shifts[i, r] / 8) times the step when `shifts` (2L, N - sink) is given; coding
    with `max_symbol` too, a row whose symbols would pass it is coded coarser (kvlink.stages.pca.code_rows).
    Returns the decoded keys (after RoPE) and values (H, N, D), the symbols, the float16 sink rows and the
    shifts the rows were coded with (2L, N - sink) (None without shifts)."""
    from kvlink.stages.pca import code_rows

    state = PredictState(predictors, positions)
    heads = predictors.kv_heads
    keys: list[Tensor] = []
    values: list[Tensor] = []
    all_symbols: list[Tensor] = []
    all_sinks: list[Tensor] = []
    used: list[Tensor] = []
    for layer in range(predictors.layers):
        for kind in KINDS:
            i = 2 * layer + KINDS.index(kind)
            w = predictors.weight(layer, kind)
            prediction = state.predict(layer, kind, w) if w is not None else None
            mean, basis = residual.means[(layer, kind)], residual.bases[(layer, kind)]
            base = residual.step(layer, kind, rate)
            step: Tensor | float = base
            if kv is not None:
                x = (kv.keys if kind == "k" else kv.values)[layer].float()
                target = state.unrope(x) if (kind == "k" and w is not None) else x
                r = rows(target if prediction is None else target - prediction)  # (N, F)
                head = r[:sink].half()
                y = (r[sink:] - mean.to(r.device)) @ basis.to(r.device)
                if shifts is None:
                    sym = torch.round(y / base)
                else:  # rows past max_symbol coded coarser, as the stages do for their float16 carrier
                    sym, g = code_rows(y, base, shifts[i], max_symbol)
                    used.append(g)
                    step = _row_steps(base, g, mean.device)
                sym = sym.clamp(-ans.MAX_ESCAPED, ans.MAX_ESCAPED)
            else:
                assert symbols is not None and sinks is not None
                head, sym = sinks[i], symbols[i].float()
                if shifts is not None:
                    used.append(shifts[i])
                    step = _row_steps(base, shifts[i], mean.device)
            body = (sym * _on(step, sym.device)) @ basis.T.to(sym.device) + mean.to(sym.device)
            decoded = unrows(torch.cat([head.float().to(body.device), body]), heads)
            if prediction is not None:
                decoded = decoded + prediction.to(decoded.device)
            if kind == "k":
                state.record(layer, kind, decoded if w is not None else state.unrope(decoded))
                keys.append(state.rope(decoded) if w is not None else decoded)
            else:
                state.record(layer, kind, decoded)
                values.append(decoded)
            all_symbols.append(sym.to(torch.int32))
            all_sinks.append(head)
    return keys, values, torch.stack(all_symbols), all_sinks, torch.stack(used) if used else None


def _row_steps(base: float, shifts: Tensor, device: torch.device) -> Tensor:
    """The tensor's step per row (rows, 1): 2^(shift / 8) times it."""
    from kvlink.stages.pca import row_scales

    return base * row_scales(shifts, device)[:, None]


def _on(step: Tensor | float, device: torch.device) -> Tensor | float:
    return step.to(device) if isinstance(step, Tensor) else step


def _tensor_shifts(shifts: Tensor | None) -> Tensor | None:
    """(2L, rows): each layer's row shifts (L, rows) for its K and its V tensor (the per-tensor shifts)."""
    return None if shifts is None else shifts.repeat_interleave(2, dim=0)


def _host(shifts: Tensor | None) -> np.ndarray | None:
    return None if shifts is None else shifts.cpu().numpy()


def _tables(residual: ResidualProfile, rate: int) -> np.ndarray:
    return np.stack(
        [residual.tables_for(layer, kind, rate) for layer in range(residual.layers) for kind in KINDS]
    )


def encode(
    kv: ContextKV,
    predictors: PredictorProfile,
    residual: ResidualProfile,
    rate: int,
    sink: int = 1,
    shifts: Tensor | None = None,
    max_symbol: int | None = None,
) -> Coded:
    """Code `kv` (every position of one context, the same in every layer) at rate index `rate` (and with
    question-aware steps: `shifts` (L, N - sink), each tensor's rows moved coarser where their symbols would
    pass `max_symbol` when given, as the stages do for their float16 carrier)."""
    _check(predictors, residual, rate, sink)
    positions = kv.positions[0]
    if any(not torch.equal(p, positions) for p in kv.positions) or kv.num_layers != predictors.layers:
        raise ValueError("xl codes one position set for every layer of the predictors' model")
    n = int(positions.numel())
    if n <= sink:
        raise ValueError(f"xl needs more than the {sink} sink rows, got {n} positions")
    _check_shifts(shifts, predictors.layers, n - sink)
    _, _, symbols, sinks, used = _chain(
        predictors,
        residual,
        rate,
        positions,
        sink,
        kv=kv,
        shifts=_tensor_shifts(shifts),
        max_symbol=max_symbol,
    )
    streams = ans.encode(
        symbols.cpu().numpy(),
        _tables(residual, rate),
        residual.tables,
        _host(used),
        device=str(symbols.device),
    )
    raw_sinks = [s.cpu().numpy().astype("<f2").tobytes() for s in sinks]
    return Coded(rate, sink, kv.length, n, raw_sinks, streams, None if used is None else used.cpu())


def _check_shifts(shifts: Tensor | None, count: int, rows_: int, what: str = "layers") -> None:
    if shifts is not None and tuple(shifts.shape) != (count, rows_):
        raise ValueError(
            f"shifts must be ({what}, rows after the sink) = {(count, rows_)}, got {tuple(shifts.shape)}"
        )


def decode(
    coded: Coded,
    predictors: PredictorProfile,
    residual: ResidualProfile,
    positions: Tensor,
    device: str = "cpu",
) -> ContextKV:
    """The cache `coded` carries, at `positions` (N,) (the sender's), keys after RoPE."""
    _check(predictors, residual, coded.rate, coded.sink)
    f = residual.features
    if int(positions.numel()) != coded.n or len(coded.streams) != 2 * residual.layers:
        raise ValueError(f"coded message of {coded.n} rows and {len(coded.streams)} tensors does not fit")
    for i, s in enumerate(coded.sinks):
        if len(s) != 2 * coded.sink * f:
            raise ValueError(f"tensor {i}: sink part of {len(s)} bytes, expected {2 * coded.sink * f}")
    _check_shifts(coded.shifts, 2 * residual.layers, coded.n - coded.sink, "tensors")
    symbols = ans.decode(
        coded.streams,
        coded.n - coded.sink,
        _tables(residual, coded.rate),
        residual.tables,
        device,
        _host(coded.shifts),
    )
    sym = torch.from_numpy(symbols).to(device)
    sinks = [
        torch.from_numpy(np.frombuffer(s, "<f2").reshape(coded.sink, f).copy()).to(device)
        for s in coded.sinks
    ]
    keys, values, _, _, _ = _chain(
        predictors,
        residual,
        coded.rate,
        positions.to(device),
        coded.sink,
        symbols=sym,
        sinks=sinks,
        shifts=coded.shifts,
    )
    return ContextKV(keys, values, [positions.to(device)] * residual.layers, coded.length)


def estimated_bytes(
    kv: ContextKV,
    predictors: PredictorProfile,
    residual: ResidualProfile,
    rate: int,
    sink: int = 1,
    max_symbol: int | None = None,
    shifts: Tensor | None = None,
) -> float:
    """The message body's bytes at `rate` from the entropy model's code length (no rANS pass); infinite when
    a symbol's magnitude exceeds `max_symbol` (the stages' float16 carrier: kvlink.stages.pca.FP16_EXACT),
    which with question-aware `shifts` only a row already at the coarsest shift can (`encode`'s rows)."""
    _check(predictors, residual, rate, sink)
    _, _, symbols, _, used = _chain(
        predictors,
        residual,
        rate,
        kv.positions[0],
        sink,
        kv=kv,
        shifts=_tensor_shifts(shifts),
        max_symbol=max_symbol,
    )
    if max_symbol is not None and symbols.numel() and int(symbols.abs().max()) > max_symbol:
        return math.inf
    bits = residual.tables.code_bits(symbols, _tables(residual, rate), _host(used))
    tensors = 2 * residual.layers
    side = 0 if used is None else used.numel()
    return bits / 8 + tensors * (ans.HEADER + 2 * sink * residual.features) + side


def search_rate(
    estimate: Callable[[int], float],
    exact: Callable[[int], float],
    budget: float,
    rates: range = RATES,
    under: float | None = None,
) -> int | None:
    """The finest rate index of `rates` (consecutive; a size falls as the index rises, an infinite size
    never fits) whose `exact` size fits `budget`: a bisection on `estimate` (cheap: the entropy model's code
    length), then a settling on exact sizes around it, coarser while the size exceeds the budget, then finer
    while one step finer fits. None when even the coarsest rate's estimate exceeds the budget; the coarsest
    when its exact size does. `exact` is called at most once a rate, and was called for the rate returned.
    `under`: how far an exact size falls below its estimate (`exact_under`); a finer rate whose estimate
    exceeds the budget by more is taken not to fit, and its exact size is not asked for."""
    estimate = functools.cache(estimate)
    lo, hi = rates.start, rates.stop - 1  # bytes fall as the rate index rises
    if estimate(hi) > budget:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate(mid) > budget:
            lo = mid
        else:
            hi = mid
    # The estimate is the code length; a stream differs by its header and up to two bytes a lane: settle on
    # exact sizes around it.
    size = functools.cache(exact)
    rate = hi
    while size(rate) > budget and rate < rates.stop - 1:
        rate += 1
    while rate > rates.start:
        if under is not None and estimate(rate - 1) - under > budget:
            break  # its exact size is above the budget too
        if size(rate - 1) > budget:
            break
        rate -= 1
    return rate


def exact_under(tensors: int, budget: float) -> float:
    """How far a message's exact size near `budget` bytes falls below its estimate (the code length, every
    stream's header and the framing measured at the coarsest rate), with room to spare: a stream ends up to
    two bytes a lane short of its code length (the final states hold the rest; tests/test_ans.py), rANS comes
    within 0.03% of the code length on real caches (research/README.md), and finer rates' parts only add
    framing. Allowed: those bytes and 0.5% of the budget, a quarter of what one rate step changes a
    message's size by (~2%). Were it ever exceeded, a plan would stop one step short of the finest rate
    that fits, never over the budget."""
    return tensors * 2 * ans.LANES + 0.005 * budget


def fit_rate(
    kv: ContextKV,
    predictors: PredictorProfile,
    residual: ResidualProfile,
    budget: int,
    sink: int = 1,
    shifts: Tensor | None = None,
) -> Coded:
    """The finest rate whose message body fits `budget` bytes (`search_rate` on the model code length, then
    exact: the coded message is returned). ValueError when even the coarsest's code length does not fit;
    where that estimate fits but the exact stream (headers, a lane's last word) does not, the coarsest is
    returned over `budget`: check `Coded.nbytes`."""
    coded: dict[int, Coded] = {}

    def exact(rate: int) -> float:
        coded[rate] = encode(kv, predictors, residual, rate, sink, shifts)
        return coded[rate].nbytes

    def estimate(rate: int) -> float:
        return estimated_bytes(kv, predictors, residual, rate, sink, shifts=shifts)

    rate = search_rate(estimate, exact, budget)
    if rate is None:
        raise ValueError(f"no rate fits {budget} bytes (the coarsest needs more)")
    return coded[rate]
