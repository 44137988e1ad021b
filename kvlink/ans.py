"""Interleaved rANS: lossless coding of integer symbols under fixed frequency tables.

The entropy coder of issue 24's transform-coding design (research/README.md, "Design note: a
cross-layer transform-coding stage"): transform coefficients, rounded to a step, are coded with a
quantized Laplace distribution per component, whose table a profile fixes. The tables are data (a
`Tables` of integer frequencies), never recomputed from floats on the receiver, so sender and
receiver agree bit for bit whatever their hardware.

A tensor of symbols (N, F) is flattened row by row; symbol n goes to lane n % LANES at step
n // LANES, so LANES states decode side by side (one thread each in a kernel). Each symbol has
the table of its component (column), given per tensor, moved by its row's shift when the tensor has
shifts (one integer a row: table index clip(table[f] - shift[row], 0, K - 1), a row whose step is
2^(shift / SCALE_STEPS) times coarser). Symbols outside [-MAX_SYMBOL, MAX_SYMBOL] are coded as
ESCAPE and their values follow the words, as int16.

Stream of one tensor (little-endian):

    u32       n_words
    u32 x 32  the lanes' states after encoding (where decoding starts)
    u16 x n_words   renormalization words, in the order the decoder reads them: step by step,
                    lane 0 first
    i16 x n_escapes the escaped values, in symbol order (n_escapes: the ESCAPE symbols decoded)

States live in [2^16, 2^32), probabilities in 1/2^16, words are 16 bits: one symbol moves at most
one word. Decoding checks what a hostile stream could bend: sizes against the part before reading,
every lane back at the initial state and every word read at the end (a coder integrity check on top
of the message checksums), escapes canonical (outside the directly coded range) and their count
exact. Nothing is read outside the stream, whatever it holds.

numpy here is the reference, vectorized over lanes and tensors (a message's tensors are coded in one
call); the GPU kernels (kvlink.kernels.ans, an encoder and a decoder) have it as their specification.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

PROB_BITS = 16
TOTAL = 1 << PROB_BITS
LOWER = 1 << 16
"""States are in [LOWER, LOWER << 16); the encoder starts (and the decoder must end) at LOWER."""
LANES = 32
MAX_SYMBOL = 255
ALPHABET = 2 * MAX_SYMBOL + 2
ESCAPE = ALPHABET - 1
MAX_ESCAPED = 32767
HEADER = 4 + 4 * LANES
SCALE_STEPS = 8
"""Laplace tables are 1/SCALE_STEPS of an octave apart: table j has scale 2^(j / SCALE_STEPS) steps."""
J_MIN, J_MAX = -128, 127
MAX_SHIFT = 127
"""A row's shift (in tables, 1/SCALE_STEPS octaves) is within +-MAX_SHIFT: one signed byte."""
SEARCH_STEPS = math.ceil(math.log2(ALPHABET))
"""Bisection steps that find a slot's symbol among ALPHABET."""


class AnsError(ValueError):
    """A stream that does not decode: its message quotes what is wrong."""


def laplace_frequencies(scale: float) -> np.ndarray:
    """Integer frequencies (ALPHABET,) of a zero-mean Laplace of `scale` (in steps) rounded to the
    integers: symbols -MAX_SYMBOL..MAX_SYMBOL, then ESCAPE (the mass beyond). Each >= 1, sum TOTAL."""
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    k = np.abs(np.arange(-MAX_SYMBOL, MAX_SYMBOL + 1, dtype=np.float64))
    inv = 1.0 / scale
    # P(0) = 1 - e^(-1/2s); P(k) = e^(-(|k| - 1/2)/s) (1 - e^(-1/s)) / 2
    p = np.where(
        k == 0, -np.expm1(-0.5 * inv), 0.5 * np.exp(-(np.maximum(k, 1) - 0.5) * inv) * -np.expm1(-inv)
    )
    tail = math.exp(-(MAX_SYMBOL + 0.5) * inv)  # both tails together
    p = np.append(p, tail)
    freq = np.floor(p / p.sum() * (TOTAL - ALPHABET)).astype(np.int64) + 1
    freq[MAX_SYMBOL] += TOTAL - int(freq.sum())  # the rest to the mode (symbol 0)
    return freq.astype(np.uint32)


def laplace_tables() -> Tables:
    """The table of every scale index j in [J_MIN, J_MAX] (row j - J_MIN): what a profile ships."""
    return Tables(np.stack([laplace_frequencies(2.0 ** (j / SCALE_STEPS)) for j in range(J_MIN, J_MAX + 1)]))


@dataclass(frozen=True)
class Tables:
    """Frequency tables (K, ALPHABET): row k is a distribution over the symbols and ESCAPE."""

    freq: np.ndarray

    def __post_init__(self) -> None:
        f = np.asarray(self.freq)
        if f.ndim != 2 or f.shape[1] != ALPHABET or f.shape[0] < 1:
            raise ValueError(f"tables must be (K, {ALPHABET}), got shape {f.shape}")
        if (f < 1).any() or (f.astype(np.int64).sum(1) != TOTAL).any():
            bad = int(np.flatnonzero((f < 1).any(1) | (f.astype(np.int64).sum(1) != TOTAL))[0])
            raise ValueError(f"table {bad}: frequencies must be >= 1 and sum to {TOTAL}")
        object.__setattr__(self, "freq", f.astype(np.uint32))
        cum = np.zeros((f.shape[0], ALPHABET + 1), dtype=np.uint32)
        np.cumsum(f, axis=1, out=cum[:, 1:])
        object.__setattr__(self, "_cum", cum)
        # Bits each (table, symbol) costs, escapes' 16 raw bits included: a code length is a histogram's dot
        cost = PROB_BITS - np.log2(f.astype(np.float64))
        cost[:, ESCAPE] += 16
        object.__setattr__(self, "_cost", cost.ravel())

    @property
    def cum(self) -> np.ndarray:
        """(K, ALPHABET + 1): cum[k, s] = the frequencies of table k below symbol s."""
        return self._cum  # type: ignore[attr-defined, no-any-return]

    def __len__(self) -> int:
        return int(self.freq.shape[0])

    def code_bits(
        self, symbols: np.ndarray | Tensor, tables: np.ndarray, shifts: np.ndarray | None = None
    ) -> float:
        """The model's code length (bits) of (B, N, F) symbols under per-component tables (B, F) (and
        per-row `shifts` (B, N)), escapes' 16 bits included: a stream is this / 8 plus its header and at
        most 2 bytes a lane. Symbols in a torch tensor off the CPU are counted where they are."""
        if not isinstance(symbols, np.ndarray) and symbols.device.type != "cpu":
            return self._code_bits_torch(symbols, tables, shifts)
        if not isinstance(symbols, np.ndarray):
            symbols = symbols.numpy()
        key = _symbol_keys(_symbol_index(symbols), tables, shifts, len(self))
        counts = np.bincount(key.ravel(), minlength=len(self) * ALPHABET)  # how often each (table, symbol)
        return float(counts @ self._cost)  # type: ignore[attr-defined]

    def _code_bits_torch(self, symbols: Tensor, tables: np.ndarray, shifts: np.ndarray | None) -> float:
        """`code_bits` of a torch tensor, histogrammed on its device: the host's counts, so its very bits."""
        import torch

        dev = symbols.device
        b, n, f = symbols.shape
        k = len(self)
        table = torch.from_numpy(np.asarray(tables, dtype=np.int64)).to(device=dev, dtype=torch.int32)
        if tuple(table.shape) != (b, f):
            raise ValueError(f"tables must be (B, F) = {(b, f)}, got {tuple(table.shape)}")
        if shifts is None:
            tab = table[:, None, :]
        else:
            shift = torch.from_numpy(_check_shifts(shifts, b, n)).to(device=dev, dtype=torch.int32)
            tab = (table[:, None, :] - shift[:, :, None]).clamp_(0, k - 1)
        idx = torch.where(symbols.abs() > MAX_SYMBOL, ESCAPE, symbols + MAX_SYMBOL).to(torch.int32)
        counts = torch.bincount((tab * ALPHABET + idx).reshape(-1), minlength=k * ALPHABET)
        return float(counts.cpu().numpy() @ self._cost)  # type: ignore[attr-defined]


def _symbol_index(symbols: np.ndarray) -> np.ndarray:
    """int32 index of each symbol in a table's alphabet (ESCAPE beyond +-MAX_SYMBOL)."""
    s = np.asarray(symbols)
    if s.dtype != np.int32:
        s = s.astype(np.int64).clip(-MAX_ESCAPED - 1, MAX_ESCAPED + 1).astype(np.int32)
    idx = s + np.int32(MAX_SYMBOL)
    idx[np.abs(s) > MAX_SYMBOL] = ESCAPE
    return idx


def _symbol_keys(idx: np.ndarray, tables: np.ndarray, shifts: np.ndarray | None, n_tables: int) -> np.ndarray:
    """(B, N, F) int32 table x ALPHABET + symbol index of each symbol of `idx` (its alphabet index), under
    per-component `tables` (B, F) moved by per-row `shifts` (B, N): one int32 array, built in place (a long
    message's index is ~10^8 entries, and int64 temporaries doubled the planner's code-length time)."""
    b, n, f = idx.shape
    t = np.asarray(tables, dtype=np.int64)
    if t.shape != (b, f):
        raise ValueError(f"tables must be (B, F) = {(b, f)}, got {t.shape}")
    t32 = t.astype(np.int32)
    if shifts is None:
        key = t32[:, None, :] * np.int32(ALPHABET) + idx
    else:
        key = t32[:, None, :] - _check_shifts(shifts, b, n).astype(np.int32)[:, :, None]
        np.clip(key, 0, n_tables - 1, out=key)
        key *= np.int32(ALPHABET)
        key += idx
    return key


def _check_shifts(shifts: np.ndarray, b: int, n: int) -> np.ndarray:
    s = np.asarray(shifts)
    if s.shape != (b, n) or not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"shifts must be integers (B, N) = {(b, n)}, got {s.dtype} {s.shape}")
    if s.size and int(np.abs(s.astype(np.int64)).max()) > MAX_SHIFT:
        raise ValueError(f"shifts must be within +-{MAX_SHIFT}, got {int(np.abs(s.astype(np.int64)).max())}")
    return s.astype(np.int64)


def _check_tables(tables: np.ndarray, n_tables: int) -> np.ndarray:
    t = np.asarray(tables, dtype=np.int64)
    if t.size and (t.min() < 0 or t.max() >= n_tables):
        raise ValueError(f"table indices must be in [0, {n_tables}), got {int(t.min())}..{int(t.max())}")
    return t


def _lanes(n: int, f: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Steps S, the component and the row of each (step, lane) (S, LANES) and which are symbols."""
    total = n * f
    steps = -(-total // LANES)
    flat = np.arange(steps * LANES).reshape(steps, LANES)
    active = flat < total
    return steps, np.where(active, flat % max(f, 1), 0), np.where(active, flat // max(f, 1), 0), active


def _lane_tables(
    tab: np.ndarray, shifts: np.ndarray | None, component: np.ndarray, row: np.ndarray, n_tables: int
) -> np.ndarray:
    """(B, S, LANES): the table of each tensor's symbol at each (step, lane)."""
    lane_tab = tab[:, component]
    if shifts is None:
        return lane_tab
    return np.clip(lane_tab - shifts[:, row], 0, n_tables - 1)  # type: ignore[no-any-return]


def encode(
    symbols: np.ndarray,
    tables: np.ndarray,
    model: Tables,
    shifts: np.ndarray | None = None,
    device: str | None = None,
) -> list[bytes]:
    """Code each tensor of `symbols` (B, N, F) integers under its components' tables (B, F) (indices
    into `model`), moved per row by `shifts` (B, N) when given: B streams. ValueError for a symbol
    beyond +-MAX_ESCAPED, a table out of range or a shift beyond +-MAX_SHIFT. `device` "cuda..." codes
    with the Triton kernel (kvlink.kernels.ans) unless KVLINK_KERNELS=reference: the same bytes."""
    sym = np.asarray(symbols, dtype=np.int64)
    if sym.ndim != 3:
        raise ValueError(f"symbols must be (B, N, F), got shape {sym.shape}")
    b, n, f = sym.shape
    if sym.size and int(np.abs(sym).max()) > MAX_ESCAPED:
        raise ValueError(f"symbols must be within +-{MAX_ESCAPED}, got {int(np.abs(sym).max())}")
    tab = _check_tables(tables, len(model))
    if tab.shape != (b, f):
        raise ValueError(f"tables must be (B, F) = {(b, f)}, got {tab.shape}")
    shift = None if shifts is None else _check_shifts(shifts, b, n)
    if sym.size and device is not None and _backend(device) == "triton":
        from kvlink.kernels.ans import encode_lanes

        words, states = encode_lanes(sym.astype(np.int32), tab, shift, model, device)
    else:
        words, states = _encode_lanes(sym, tab, shift, model)
    streams = []
    flat_sym = sym.reshape(b, n * f)
    for i in range(b):
        escaped = flat_sym[i][np.abs(flat_sym[i]) > MAX_SYMBOL]
        streams.append(
            np.array([words[i].size], dtype="<u4").tobytes()
            + states[i].astype("<u4").tobytes()
            + words[i].astype("<u2").tobytes()
            + escaped.astype("<i2").tobytes()
        )
    return streams


def _encode_lanes(
    sym: np.ndarray, tab: np.ndarray, shift: np.ndarray | None, model: Tables
) -> tuple[list[np.ndarray], np.ndarray]:
    """The reference: each tensor's words in the order the decoder reads them, and the lanes' final
    states (B, LANES) uint32."""
    b, n, f = sym.shape
    total = n * f
    steps, component, row, active = _lanes(n, f)
    # Step-major (S, B, LANES), so each step's rows are contiguous, and int32 indices (tables x ALPHABET
    # stays far below 2^31). uint32 states are exact: a state is below 2^32, a frequency below 2^16, and
    # after renormalization x < f << 16, so (x // f) << 16 stays below 2^32.
    symbol = np.zeros((b, steps * LANES), dtype=np.int32)
    symbol[:, :total] = _symbol_index(sym.reshape(b, total))
    # (S, B, LANES), in int32 (a long message has ~10^8 symbols)
    table = _lane_tables(
        tab.astype(np.int32), None if shift is None else shift.astype(np.int32), component, row, len(model)
    ).transpose(1, 0, 2)
    at = table * ALPHABET + symbol.reshape(b, steps, LANES).transpose(1, 0, 2)
    freq = np.take(model.freq, at)  # uint32, as the tables hold them
    start = np.take(model.cum, at + table)  # cum rows are ALPHABET + 1 long
    limit = freq << np.uint32(16)  # a state at or above it moves one word out first
    x = np.full((b, LANES), LOWER, dtype=np.uint32)
    words = np.zeros((steps, b, LANES), dtype=np.uint16)
    emitted = np.zeros((steps, b, LANES), dtype=bool)
    for t in range(steps - 1, -1, -1):  # the decoder reads step 0 first
        act = active[t]
        out = x >= limit[t]
        if t == steps - 1:  # only the last step has lanes without a symbol
            out &= act
        words[t] = x  # the low 16 bits
        emitted[t] = out
        np.right_shift(x, np.uint32(16), out=x, where=out)
        q, r = np.divmod(x, freq[t])
        coded = (q << np.uint32(PROB_BITS)) + r + start[t]
        x = coded if t < steps - 1 else np.where(act, coded, x)
    # (S, LANES) order: step by step, lane 0 first
    return [words[:, i][emitted[:, i]] for i in range(b)], x


@dataclass
class _Streams:
    """B streams' headers read and checked: words pooled (one pad word after them), states (B, LANES)."""

    pool: np.ndarray
    offsets: np.ndarray
    n_words: np.ndarray
    states: np.ndarray


def _parse(streams: Sequence[bytes], steps: int) -> _Streams:
    b = len(streams)
    states = np.zeros((b, LANES), dtype=np.uint64)
    n_words = np.zeros(b, dtype=np.int64)
    bodies = []
    for i, s in enumerate(streams):
        if len(s) < HEADER:
            raise AnsError(f"stream {i}: {len(s)} bytes, shorter than its {HEADER}-byte header")
        n_words[i] = int(np.frombuffer(s, "<u4", 1)[0])
        if HEADER + 2 * n_words[i] > len(s):
            raise AnsError(f"stream {i}: {n_words[i]} words do not fit its {len(s)} bytes")
        if n_words[i] > steps * LANES:
            raise AnsError(
                f"stream {i}: {n_words[i]} words for {steps * LANES} symbols (one word each at most)"
            )
        states[i] = np.frombuffer(s, "<u4", LANES, 4)
        bodies.append(np.frombuffer(s, "<u2", int(n_words[i]), HEADER))
    if (states < LOWER).any():
        bad = int(np.flatnonzero((states < LOWER).any(1))[0])
        raise AnsError(f"stream {bad}: a lane starts below {LOWER}, outside the coder's states")
    offsets = np.concatenate([[0], np.cumsum(n_words)[:-1]]).astype(np.int64)
    pool = np.concatenate([*bodies, np.zeros(1, dtype=np.uint16)])
    return _Streams(pool, offsets, n_words, states)


def decode(
    streams: Sequence[bytes],
    n: int,
    tables: np.ndarray,
    model: Tables,
    device: str | None = None,
    shifts: np.ndarray | None = None,
) -> np.ndarray:
    """The (B, N, F) int32 symbols of B streams (as `encode` wrote them) of N rows under per-component
    tables (B, F) and per-row `shifts` (B, N) when the streams were coded with them. AnsError (naming
    the tensor) for any stream that does not decode exactly. `device` "cuda..." decodes with the Triton
    kernel (kvlink.kernels.ans) unless KVLINK_KERNELS=reference."""
    tab = _check_tables(tables, len(model))
    if tab.ndim != 2 or tab.shape[0] != len(streams):
        raise ValueError(f"tables must be (B, F) with B = {len(streams)} streams, got {tab.shape}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    shift = None if shifts is None else _check_shifts(shifts, len(streams), n)
    f = tab.shape[1]
    steps = -(-n * f // LANES)
    parsed = _parse(streams, steps)
    if device is not None and _backend(device) == "triton":
        from kvlink.kernels.ans import decode_lanes

        idx, final, read = decode_lanes(parsed, tab, n, model, device, shift)
    else:
        idx, final, read = _decode_lanes(parsed, tab, n, model, shift)
    return _finish(streams, parsed, idx, final, read, n, f)


def _backend(device: str) -> str:
    """'triton' on CUDA (KVLINK_KERNELS as for every kernel: `reference` forces numpy), else the reference.
    The kernel decodes what the reference decodes and refuses what it refuses, on an H200 as under Triton's
    interpreter (bench/results/ans-decode-h200: 2.3M-134M symbols, 40 damaged messages), 25-49x faster."""
    import torch

    from kvlink.kernels import backend_for

    return backend_for(torch.device(device))


def _decode_lanes(
    parsed: _Streams, tab: np.ndarray, n: int, model: Tables, shifts: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference: symbol indices (B, N * F), final states (B, LANES), words read (B,)."""
    b, f = tab.shape
    steps, component, row, active = _lanes(n, f)
    lane_tab = _lane_tables(tab, shifts, component, row, len(model))  # (B, S, LANES)
    x = parsed.states.copy()
    pool = parsed.pool.astype(np.uint64)
    limit = parsed.offsets + parsed.n_words  # a lane may not read past its own tensor's words
    read = np.zeros(b, dtype=np.int64)
    cum = model.cum.astype(np.int64)
    freq_all = model.freq.astype(np.uint64)
    out = np.zeros((b, steps, LANES), dtype=np.int64)
    mask16 = np.uint64(0xFFFF)
    for t in range(steps):
        act = active[t]
        k = lane_tab[:, t]  # (B, LANES)
        slot = (x & mask16).astype(np.int64)
        lo = np.zeros((b, LANES), dtype=np.int64)
        hi = np.full((b, LANES), ALPHABET, dtype=np.int64)
        for _ in range(SEARCH_STEPS):  # the symbol s with cum[k, s] <= slot < cum[k, s + 1]
            mid = (lo + hi) >> 1
            go = cum[k, mid] <= slot
            lo = np.where(go, mid, lo)
            hi = np.where(go, hi, mid)
        x_new = freq_all[k, lo] * (x >> np.uint64(PROB_BITS)) + (slot - cum[k, lo]).astype(np.uint64)
        x = np.where(act, x_new, x)
        out[:, t] = lo
        need = (x < LOWER) & act
        pos = parsed.offsets[:, None] + read[:, None] + np.cumsum(need, axis=1) - 1
        ok = need & (pos < limit[:, None])
        word = pool[np.where(ok, pos, len(pool) - 1)]
        x = np.where(need, (x << np.uint64(16)) | word, x)
        read += need.sum(1)
    return out.reshape(b, steps * LANES)[:, : n * f], x, read


def _finish(
    streams: Sequence[bytes],
    parsed: _Streams,
    idx: np.ndarray,
    final: np.ndarray,
    read: np.ndarray,
    n: int,
    f: int,
) -> np.ndarray:
    """The checks after decoding (words read, final states, escapes) and the escaped values put in."""
    n_words = parsed.n_words
    if (read > n_words).any():
        bad = int(np.flatnonzero(read > n_words)[0])
        raise AnsError(f"stream {bad}: decoding needs {read[bad]} words, the stream has {n_words[bad]}")
    if (read < n_words).any():
        bad = int(np.flatnonzero(read < n_words)[0])
        raise AnsError(f"stream {bad}: {n_words[bad] - read[bad]} of its {n_words[bad]} words left unread")
    if (final != LOWER).any():
        bad = int(np.flatnonzero((final != LOWER).any(1))[0])
        raise AnsError(f"stream {bad}: a lane does not end at the coder's initial state (corrupt stream)")
    symbols = idx.astype(np.int64) - MAX_SYMBOL
    for i, s in enumerate(streams):
        where = np.flatnonzero(idx[i] == ESCAPE)
        start = HEADER + 2 * int(n_words[i])
        if len(s) != start + 2 * where.size:
            raise AnsError(
                f"stream {i}: {where.size} escaped values take {2 * where.size} bytes after the words, "
                f"the stream has {len(s) - start}"
            )
        values = np.frombuffer(s, "<i2", where.size, start).astype(np.int64)
        if (np.abs(values) <= MAX_SYMBOL).any():
            raise AnsError(f"stream {i}: an escaped value within +-{MAX_SYMBOL} (not canonical)")
        symbols[i, where] = values
    return symbols.reshape(len(streams), n, f).astype(np.int32)


def stream_bytes(n_words: int, n_escapes: int) -> int:
    """Bytes of one tensor's stream."""
    return HEADER + 2 * n_words + 2 * n_escapes
