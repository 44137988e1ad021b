"""Triton rANS (kvlink.ans): one program per tensor, one thread per lane.

Encode: the specification is `kvlink.ans._encode_lanes` (numpy). The lanes walk the steps from the
last to the first, each coding its symbol under its table (a component's, moved by its row's shift)
and writing the low 16 bits of its state first when the state is at or above the symbol's frequency
<< 16; the words come back in the decoder's order (step by step, lane 0 first) by keeping the ones
written, and the stream is assembled by `kvlink.ans.encode` as for the reference.

Decode: the specification is `kvlink.ans._decode_lanes` (numpy); this kernel returns the same three
things, symbol indices (B, N * F), the lanes' final states (B, LANES) and the words each tensor read
(B,), and `kvlink.ans` runs the same checks on them (words read, final states, escapes). Each step,
the lanes find their slots' symbols by bisection over their tables' cumulative frequencies (a
component's table, moved by its row's shift when the tensor has shifts), update
their states, and those that fall below LOWER read the next words in lane order (a prefix sum over
the lanes). A lane never reads past its tensor's words (masked loads; the host refuses the stream).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvlink.kernels._triton import tl, triton

if TYPE_CHECKING:
    from kvlink.ans import Tables, _Streams


@triton.jit
def _ans_encode_kernel(
    sym_ptr,  # int32 (B, total): the symbols, row by row
    tables_ptr,  # int32 (B, F): each component's table
    shifts_ptr,  # int32 (B, N): each row's shift of its tables (read only when SHIFTED)
    cum_ptr,  # int32 (K, ALPHABET + 1)
    freq_ptr,  # int32 (K, ALPHABET)
    words_ptr,  # int32 (B, total): the word a symbol's step wrote first, -1 where none
    final_ptr,  # int64 (B, LANES): the states after coding (where decoding starts)
    total,  # N * F symbols per tensor
    F,
    N,
    K,  # tables in the model
    steps,
    SHIFTED: tl.constexpr,
    LANES: tl.constexpr,
    ALPHABET: tl.constexpr,
    MAX_SYMBOL: tl.constexpr,
    PROB_BITS: tl.constexpr,
    LOWER: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, LANES)
    x = tl.full((LANES,), LOWER, dtype=tl.int64)
    for i in range(steps):
        n = (steps - 1 - i) * LANES + lane  # the decoder reads step 0 first
        act = n < total
        s = tl.load(sym_ptr + b * total + n, mask=act, other=0)
        idx = tl.where((s > MAX_SYMBOL) | (s < -MAX_SYMBOL), ALPHABET - 1, s + MAX_SYMBOL)
        k = tl.load(tables_ptr + b * F + n % F, mask=act, other=0)
        if SHIFTED:
            shift = tl.load(shifts_ptr + b * N + n // F, mask=act, other=0)
            k = tl.minimum(tl.maximum(k - shift, 0), K - 1)
        f = tl.load(freq_ptr + k * ALPHABET + idx, mask=act, other=1).to(tl.int64)
        c = tl.load(cum_ptr + k * (ALPHABET + 1) + idx, mask=act, other=0).to(tl.int64)
        out = (x >= (f << 16)) & act
        tl.store(words_ptr + b * total + n, tl.where(out, x & 0xFFFF, -1).to(tl.int32), mask=act)
        x = tl.where(out, x >> 16, x)
        x = tl.where(act, ((x // f) << PROB_BITS) + x % f + c, x)
    tl.store(final_ptr + b * LANES + lane, x)


def encode_lanes(
    symbols: np.ndarray,
    tables: np.ndarray,
    shifts: np.ndarray | None,
    model: Tables,
    device: str | torch.device,
) -> tuple[list[np.ndarray], np.ndarray]:
    """`kvlink.ans._encode_lanes` on `device` (CUDA, or the CPU under TRITON_INTERPRET=1): each tensor's
    words (uint16) in the decoder's order and the final states (B, LANES) uint32, from int32 symbols
    (B, N, F) already checked by `kvlink.ans.encode`."""
    from kvlink.ans import ALPHABET, LANES, LOWER, MAX_SYMBOL, PROB_BITS

    dev = torch.device(device)
    b, n, f = symbols.shape
    total = n * f

    def put(a: np.ndarray, dtype: torch.dtype) -> Any:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=dtype)

    words = torch.empty((b, total), dtype=torch.int32, device=dev)
    final = torch.empty((b, LANES), dtype=torch.int64, device=dev)
    _ans_encode_kernel[(b,)](
        put(symbols.reshape(b, total), torch.int32),
        put(tables.astype(np.int32), torch.int32),
        put(np.zeros(1) if shifts is None else shifts.astype(np.int32), torch.int32),
        put(model.cum.astype(np.int32), torch.int32),
        put(model.freq.astype(np.int32), torch.int32),
        words,
        final,
        total,
        max(f, 1),
        max(n, 1),
        len(model),
        -(-total // LANES),
        SHIFTED=shifts is not None,
        LANES=LANES,
        ALPHABET=ALPHABET,
        MAX_SYMBOL=MAX_SYMBOL,
        PROB_BITS=PROB_BITS,
        LOWER=LOWER,
    )
    written = words >= 0
    counts = written.sum(1).cpu().numpy()
    pooled = words[written].cpu().numpy().astype(np.uint16)  # row-major: tensor by tensor, in their order
    ends = np.cumsum(counts)
    states = final.cpu().numpy().astype(np.uint32)
    return [pooled[e - c : e] for c, e in zip(counts, ends, strict=True)], states


@triton.jit
def _ans_decode_kernel(
    words_ptr,  # int32 (sum of n_words + 1,): every tensor's 16-bit words, pooled
    offsets_ptr,  # int64 (B,): where each tensor's words start in the pool
    n_words_ptr,  # int64 (B,)
    states_ptr,  # int64 (B, LANES): where decoding starts
    tables_ptr,  # int32 (B, F): each component's table
    shifts_ptr,  # int32 (B, N): each row's shift of its tables (read only when SHIFTED)
    cum_ptr,  # int32 (K, ALPHABET + 1)
    freq_ptr,  # int32 (K, ALPHABET)
    out_ptr,  # int16 (B, total): symbol indices
    final_ptr,  # int64 (B, LANES)
    read_ptr,  # int64 (B,)
    total,  # N * F symbols per tensor
    F,
    N,
    K,  # tables in the model
    steps,
    SHIFTED: tl.constexpr,
    LANES: tl.constexpr,
    ALPHABET: tl.constexpr,
    SEARCH: tl.constexpr,
    LOWER: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # b * total may pass 2^31 (a long message of a large model)
    lane = tl.arange(0, LANES)
    x = tl.load(states_ptr + b * LANES + lane)
    base = tl.load(offsets_ptr + b)
    limit = tl.load(n_words_ptr + b)
    read = tl.zeros((LANES,), dtype=tl.int64)  # the same in every lane: words read so far
    for t in range(steps):
        n = t * LANES + lane
        act = n < total
        k = tl.load(tables_ptr + b * F + n % F, mask=act, other=0)
        if SHIFTED:
            shift = tl.load(shifts_ptr + b * N + n // F, mask=act, other=0)
            k = tl.minimum(tl.maximum(k - shift, 0), K - 1)
        slot = x & 0xFFFF
        lo = tl.zeros((LANES,), dtype=tl.int32)
        hi = tl.full((LANES,), ALPHABET, dtype=tl.int32)
        for _ in tl.static_range(SEARCH):
            mid = (lo + hi) >> 1
            go = tl.load(cum_ptr + k * (ALPHABET + 1) + mid).to(tl.int64) <= slot
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        f = tl.load(freq_ptr + k * ALPHABET + lo).to(tl.int64)
        c = tl.load(cum_ptr + k * (ALPHABET + 1) + lo).to(tl.int64)
        x = tl.where(act, f * (x >> 16) + slot - c, x)
        tl.store(out_ptr + b * total + n, lo.to(tl.int16), mask=act)
        need = (x < LOWER) & act
        pos = read + tl.cumsum(need.to(tl.int64), 0) - 1
        ok = need & (pos < limit)
        w = tl.load(words_ptr + base + pos, mask=ok, other=0).to(tl.int64)
        x = tl.where(need, (x << 16) | w, x)
        read = read + tl.sum(need.to(tl.int64), 0)
    tl.store(final_ptr + b * LANES + lane, x)
    tl.store(read_ptr + b + lane * 0, read, mask=lane == 0)


def decode_lanes(
    parsed: _Streams,
    tables: np.ndarray,
    n: int,
    model: Tables,
    device: str | torch.device,
    shifts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`kvlink.ans._decode_lanes` on `device` (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    from kvlink.ans import ALPHABET, LANES, LOWER, SEARCH_STEPS

    dev = torch.device(device)
    b, f = tables.shape
    total = n * f
    steps = -(-total // LANES)

    def put(a: np.ndarray, dtype: torch.dtype) -> Any:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=dtype)

    out = torch.zeros((b, max(total, 1)), dtype=torch.int16, device=dev)
    final = torch.zeros((b, LANES), dtype=torch.int64, device=dev)
    read = torch.zeros(b, dtype=torch.int64, device=dev)
    if b:
        _ans_decode_kernel[(b,)](
            put(parsed.pool.astype(np.int32), torch.int32),
            put(parsed.offsets, torch.int64),
            put(parsed.n_words, torch.int64),
            put(parsed.states.astype(np.int64), torch.int64),
            put(tables.astype(np.int32), torch.int32),
            put(np.zeros(1) if shifts is None else shifts.astype(np.int32), torch.int32),
            put(model.cum.astype(np.int32), torch.int32),
            put(model.freq.astype(np.int32), torch.int32),
            out,
            final,
            read,
            total,
            max(f, 1),
            max(n, 1),
            len(model),
            steps,
            SHIFTED=shifts is not None,
            LANES=LANES,
            ALPHABET=ALPHABET,
            SEARCH=SEARCH_STEPS,
            LOWER=LOWER,
        )
    idx = out.cpu().numpy().astype(np.int64)[:, :total]
    return idx, final.cpu().numpy().astype(np.uint64), read.cpu().numpy()
