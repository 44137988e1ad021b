"""kvlink.ans: the interleaved rANS coder round-trips exactly, costs its model's code length, and
refuses every stream it cannot decode exactly (never reading outside it)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvlink import ans

MODEL = ans.laplace_tables()


def _laplace(seed: int, b: int, n: int, f: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.2, 60.0, size=(b, f))
    sym = np.round(rng.laplace(0.0, scale[:, None, :], size=(b, n, f))).astype(np.int64)
    tab = np.clip(np.round(ans.SCALE_STEPS * np.log2(scale)).astype(int), ans.J_MIN, ans.J_MAX) - ans.J_MIN
    return sym, tab


@pytest.mark.parametrize(("b", "n", "f"), [(3, 37, 24), (1, 1, 1), (2, 5, 33), (4, 64, 64), (2, 0, 8)])
def test_streams_decode_to_the_symbols_they_code(b: int, n: int, f: int) -> None:
    sym, tab = _laplace(b * 1000 + n + f, b, n, f)
    if sym.size:
        sym.flat[0] = 1000  # escaped values, both signs and the extremes
        sym.flat[-1] = -ans.MAX_ESCAPED
        sym.flat[len(sym.flat) // 2] = ans.MAX_SYMBOL  # the largest value coded directly
    streams = ans.encode(sym, tab, MODEL)
    assert len(streams) == b
    out = ans.decode(streams, n, tab, MODEL)
    assert out.dtype == np.int32 and out.shape == (b, n, f)
    np.testing.assert_array_equal(out, sym)


def test_a_stream_costs_its_models_code_length() -> None:
    sym, tab = _laplace(7, 6, 200, 192)
    streams = ans.encode(sym, tab, MODEL)
    bits = MODEL.code_bits(sym, tab)
    total = sum(len(s) for s in streams)
    # header per tensor, and at most two bytes a lane of slack in the final states
    assert (
        bits / 8 - 2 * ans.LANES * len(streams) <= total - ans.HEADER * len(streams) <= bits / 8 * 1.002 + 8
    )
    # each stream alone: its own model cost
    one = ans.encode(sym[:1], tab[:1], MODEL)[0]
    assert one == streams[0]


def test_a_sharper_table_codes_fewer_bytes() -> None:
    rng = np.random.default_rng(1)
    sym = np.round(rng.laplace(0.0, 1.0, size=(1, 400, 32))).astype(np.int64)
    matched = np.full((1, 32), -ans.J_MIN)  # scale 1
    wide = np.full((1, 32), 40 - ans.J_MIN)  # scale 2^5
    assert len(ans.encode(sym, matched, MODEL)[0]) < 0.8 * len(ans.encode(sym, wide, MODEL)[0])


def test_tables_are_distributions_with_every_symbol_possible() -> None:
    assert MODEL.freq.shape == (ans.J_MAX - ans.J_MIN + 1, ans.ALPHABET)
    assert (MODEL.freq >= 1).all()
    assert (MODEL.freq.astype(np.int64).sum(1) == ans.TOTAL).all()
    narrow, wide = MODEL.freq[0], MODEL.freq[-1]
    assert narrow[ans.MAX_SYMBOL] > 0.99 * ans.TOTAL  # scale 2^-16: nearly always 0
    assert wide[ans.ESCAPE] > 0.9 * ans.TOTAL  # scale 2^15.9: nearly always beyond 255
    with pytest.raises(ValueError, match="sum to"):
        ans.Tables(np.ones((2, ans.ALPHABET), dtype=np.uint32))
    with pytest.raises(ValueError, match="positive finite"):
        ans.laplace_frequencies(0.0)


def test_the_encoder_refuses_what_it_cannot_code() -> None:
    sym = np.zeros((1, 2, 4), dtype=np.int64)
    tab = np.zeros((1, 4), dtype=np.int64)
    sym[0, 0, 0] = ans.MAX_ESCAPED + 1
    with pytest.raises(ValueError, match="within"):
        ans.encode(sym, tab, MODEL)
    with pytest.raises(ValueError, match="table indices"):
        ans.encode(np.zeros((1, 2, 4)), np.full((1, 4), len(MODEL)), MODEL)
    with pytest.raises(ValueError, match=r"\(B, F\)"):
        ans.encode(np.zeros((1, 2, 4)), np.zeros((1, 3)), MODEL)


def _streams() -> tuple[list[bytes], np.ndarray, np.ndarray]:
    sym, tab = _laplace(3, 3, 40, 32)
    sym[1, 4, 5] = 700
    return ans.encode(sym, tab, MODEL), sym, tab


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda s: s[: ans.HEADER - 1], "shorter than its"),
        (lambda s: s[:-2], "escaped values"),
        (lambda s: s + b"\0\0", "escaped values|left unread"),
        (lambda s: (10**6).to_bytes(4, "little") + s[4:], "do not fit"),
        (
            lambda s: (int.from_bytes(s[:4], "little") - 1).to_bytes(4, "little") + s[4:-2],
            "words|initial state",
        ),
        (lambda s: s[:4] + (5).to_bytes(4, "little") + s[8:], "starts below"),
        (lambda s: s[:200] + bytes([s[200] ^ 0x10]) + s[201:], "words|initial state|escaped"),
        (lambda s: s[:-2] + (3).to_bytes(2, "little", signed=True), "not canonical"),
    ],
)
def test_a_damaged_stream_is_refused_naming_it(mangle: object, message: str) -> None:
    streams, _, tab = _streams()
    damaged = list(streams)
    damaged[1] = mangle(streams[1])  # type: ignore[operator]
    with pytest.raises(ans.AnsError, match=f"stream 1: .*({message})"):
        ans.decode(damaged, 40, tab, MODEL)


def test_every_single_bit_flip_is_refused_or_decodes_other_symbols_without_reading_outside() -> None:
    sym, tab = _laplace(5, 1, 12, 32)
    stream = ans.encode(sym, tab, MODEL)[0]
    refused = 0
    for bit in range(8 * len(stream)):
        bad = bytearray(stream)
        bad[bit // 8] ^= 1 << (bit % 8)
        try:
            out = ans.decode([bytes(bad)], 12, tab, MODEL)
        except ans.AnsError:
            refused += 1
        else:
            assert out.shape == sym.shape  # a flip the coder cannot see: the checksums' job
    assert refused > 0.9 * 8 * len(stream)


DEVICE = os.environ.get("KVLINK_TEST_DEVICE", "cpu")


@pytest.mark.parametrize(("b", "n", "f"), [(2, 9, 40), (1, 3, 7), (3, 4, 64)])
def test_the_kernel_decodes_what_the_reference_decodes(
    monkeypatch: pytest.MonkeyPatch, b: int, n: int, f: int
) -> None:
    monkeypatch.setenv("KVLINK_KERNELS", "triton")
    sym, tab = _laplace(11 + n, b, n, f)
    sym.flat[0] = -4000
    streams = ans.encode(sym, tab, MODEL)
    np.testing.assert_array_equal(ans.decode(streams, n, tab, MODEL, device=DEVICE), sym)


@pytest.mark.parametrize("at", [ans.HEADER + 5, ans.HEADER - 3, -1])
def test_the_kernel_refuses_what_the_reference_refuses(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    sym, tab = _laplace(13, 2, 6, 32)
    streams = ans.encode(sym, tab, MODEL)
    bad = bytearray(streams[1])
    bad[at] ^= 0x41
    damaged = [streams[0], bytes(bad)]
    with pytest.raises(ans.AnsError) as reference:
        ans.decode(damaged, 6, tab, MODEL)
    monkeypatch.setenv("KVLINK_KERNELS", "triton")
    with pytest.raises(ans.AnsError) as kernel:
        ans.decode(damaged, 6, tab, MODEL, device=DEVICE)
    assert str(kernel.value) == str(reference.value)


def test_a_cuda_receiver_decodes_with_the_kernel_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Measured equal to the reference on an H200 (bench/results/ans-decode-h200): the kernel by default on
    CUDA, as every kvlink kernel; the CPU keeps numpy; KVLINK_KERNELS=reference forces numpy anywhere."""
    from kvlink.kernels import HAS_TRITON

    monkeypatch.delenv("KVLINK_KERNELS", raising=False)
    assert ans._backend("cuda") == ("triton" if HAS_TRITON else "reference")
    assert ans._backend("cpu") == "reference"
    monkeypatch.setenv("KVLINK_KERNELS", "auto")
    assert ans._backend("cuda:1") == ("triton" if HAS_TRITON else "reference")
    monkeypatch.setenv("KVLINK_KERNELS", "reference")
    assert ans._backend("cuda") == "reference"


def _shifted(seed: int, b: int, n: int, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symbols whose rows are coded 2^(shift/8) times coarser: row r's scale divided by that."""
    rng = np.random.default_rng(seed)
    shifts = rng.integers(-ans.MAX_SHIFT, ans.MAX_SHIFT + 1, size=(b, n))
    shifts[:, : min(n, 3)] = [ans.MAX_SHIFT, -ans.MAX_SHIFT, 0][: min(n, 3)]  # both extremes, and none
    scale = rng.uniform(0.5, 60.0, size=(b, f))
    row_scale = scale[:, None, :] * 2.0 ** (-shifts[:, :, None] / ans.SCALE_STEPS)
    sym = np.clip(np.round(rng.laplace(0.0, row_scale)), -ans.MAX_ESCAPED, ans.MAX_ESCAPED).astype(np.int64)
    tab = np.clip(np.round(ans.SCALE_STEPS * np.log2(scale)).astype(int), ans.J_MIN, ans.J_MAX) - ans.J_MIN
    return sym, tab, shifts


@pytest.mark.parametrize(("b", "n", "f"), [(3, 37, 24), (1, 1, 1), (2, 5, 33), (2, 0, 8)])
def test_shifted_rows_decode_to_the_symbols_they_code(b: int, n: int, f: int) -> None:
    sym, tab, shifts = _shifted(b * 7 + n + f, b, n, f)
    if sym.size:
        sym.flat[0] = -3000  # an escape under the sharpest table of all (shift +127)
    streams = ans.encode(sym, tab, MODEL, shifts)
    np.testing.assert_array_equal(ans.decode(streams, n, tab, MODEL, shifts=shifts), sym)
    if n >= 5:  # the shifts are part of the code: without them the streams are other symbols, or refused
        try:
            wrong = ans.decode(streams, n, tab, MODEL)
        except ans.AnsError:
            return
        assert not np.array_equal(wrong, sym)


def test_a_shift_is_its_rows_table_moved_and_costs_that_tables_code_length() -> None:
    sym, tab, shifts = _shifted(5, 2, 300, 40)
    streams = ans.encode(sym, tab, MODEL, shifts)
    bits = MODEL.code_bits(sym, tab, shifts)
    total = sum(len(s) for s in streams) - ans.HEADER * len(streams)
    assert bits / 8 - 2 * ans.LANES * len(streams) <= total <= bits / 8 * 1.002 + 8
    # one row alone under its moved tables codes as that row does among the others' shifts
    r = 17
    moved = np.clip(tab - shifts[:, r : r + 1], 0, len(MODEL) - 1)
    assert MODEL.code_bits(sym[:, r : r + 1], moved) == pytest.approx(
        MODEL.code_bits(sym[:, r : r + 1], tab, shifts[:, r : r + 1])
    )
    # matched shifts pay: the same symbols coded without them cost more
    assert total < 0.9 * (sum(len(s) for s in ans.encode(sym, tab, MODEL)) - ans.HEADER * len(streams))


def test_shifts_out_of_shape_or_range_are_refused() -> None:
    sym, tab, shifts = _shifted(3, 2, 6, 8)
    streams = ans.encode(sym, tab, MODEL, shifts)
    for bad, what in (
        (shifts[:, :5], "shifts must be integers"),
        (shifts.astype(float), "shifts must be integers"),
        (np.full_like(shifts, ans.MAX_SHIFT + 1), "within"),
    ):
        with pytest.raises(ValueError, match=what):
            ans.encode(sym, tab, MODEL, bad)
        with pytest.raises(ValueError, match=what):
            ans.decode(streams, 6, tab, MODEL, shifts=bad)


@pytest.mark.parametrize(("b", "n", "f"), [(2, 9, 40), (1, 3, 7)])
def test_the_kernel_decodes_shifted_rows_as_the_reference(
    monkeypatch: pytest.MonkeyPatch, b: int, n: int, f: int
) -> None:
    monkeypatch.setenv("KVLINK_KERNELS", "triton")
    sym, tab, shifts = _shifted(19 + n, b, n, f)
    streams = ans.encode(sym, tab, MODEL, shifts)
    np.testing.assert_array_equal(ans.decode(streams, n, tab, MODEL, device=DEVICE, shifts=shifts), sym)


@pytest.mark.parametrize(
    ("b", "n", "f", "shifted"), [(3, 37, 24, False), (1, 1, 1, False), (2, 5, 33, True), (2, 9, 40, True)]
)
def test_the_kernel_encodes_the_references_bytes(
    monkeypatch: pytest.MonkeyPatch, b: int, n: int, f: int, shifted: bool
) -> None:
    """The encoder kernel writes the reference's streams byte for byte: the last step's idle lanes (N * F
    not a multiple of LANES), escapes of both signs, both shift extremes."""
    if shifted:
        sym, tab, shifts = _shifted(23 + n, b, n, f)
    else:
        (sym, tab), shifts = _laplace(29 + n, b, n, f), None
    sym.flat[0] = ans.MAX_ESCAPED
    sym.flat[-1] = -ans.MAX_SYMBOL - 1  # the first escaped magnitude
    reference = ans.encode(sym, tab, MODEL, shifts)
    monkeypatch.setenv("KVLINK_KERNELS", "triton")
    assert ans.encode(sym, tab, MODEL, shifts, device=DEVICE) == reference
    np.testing.assert_array_equal(ans.decode(reference, n, tab, MODEL, shifts=shifts), sym)


def test_a_code_length_is_each_symbols_cost_under_its_moved_table() -> None:
    """Tables.code_bits counts every symbol under its component's table moved by its row's shift and kept
    within the tables (both ends reached), escapes at the escape's cost: the counts of a symbol-by-symbol
    walk, for integer and float symbols (the planner's closed loop rounds in float), with shifts and without."""
    sym, tab, shifts = _shifted(47, 3, 40, 24)
    sym.flat[3], sym.flat[7] = 4000, -ans.MAX_SYMBOL - 1  # escapes
    k = len(MODEL)
    tab[0, :2] = 0, k - 1  # rows 0 and 1 shift by +MAX_SHIFT and -MAX_SHIFT: past both ends
    for s in (None, shifts):
        keys = []
        for (b, r, c), value in np.ndenumerate(sym):
            table = min(max(int(tab[b, c]) - (0 if s is None else int(s[b, r])), 0), k - 1)
            index = ans.ESCAPE if abs(value) > ans.MAX_SYMBOL else int(value) + ans.MAX_SYMBOL
            keys.append(table * ans.ALPHABET + index)
        walked = float(np.bincount(np.array(keys), minlength=k * ans.ALPHABET) @ MODEL._cost)
        assert MODEL.code_bits(sym, tab, s) == walked
        assert MODEL.code_bits(sym.astype(np.float32), tab, s) == walked
    assert any(tab[b, c] - shifts[b, r] < 0 for b, r, c in np.ndindex(*sym.shape)) and any(
        tab[b, c] - shifts[b, r] > k - 1 for b, r, c in np.ndindex(*sym.shape)
    )


def test_a_code_length_counted_on_a_device_is_the_hosts() -> None:
    """Tables.code_bits of symbols in a torch tensor off the CPU histograms them where they are: the same
    bits as numpy's (the same counts, the same dot), with shifts and without, escapes included."""
    import torch

    sym, tab, shifts = _shifted(31, 3, 50, 24)
    sym.flat[5] = 4000
    for s in (None, shifts):
        host = MODEL.code_bits(sym, tab, s)
        counted = MODEL._code_bits_torch(torch.from_numpy(sym).to(torch.int32), tab, s)
        assert counted == host
        assert MODEL.code_bits(torch.from_numpy(sym), tab, s) == host
    assert MODEL._code_bits_torch(torch.from_numpy(sym), tab, shifts) != pytest.approx(
        MODEL.code_bits(sym, tab), rel=1e-3
    )  # the shifts are counted
