"""Quantizers and bit packing: wire sizes, analytic error bounds, pinned layouts, bad inputs."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor

from kvlink.quant import (
    FORMATS,
    WIDTH_AXIS,
    QuantizedTensor,
    QuantSpec,
    dequantize,
    get_quantizer,
    packed_size,
    part_sizes,
    quantize,
    registered_formats,
    scale_shape,
)
from kvlink.quant.nf4 import NF4_LEVELS
from kvlink.quant.pack import pack_bits, unpack_bits

SHAPES = [(2, 37, 64), (3, 19, 48), (1, 1, 64)]  # T not a multiple of G or of 8; head_dim 64 and 48
GROUP_SIZES = [32, 64, 7]

# Float32 arithmetic slack, relative to the magnitudes involved. Encoder and decoder
# each do a few float32 operations (subtract, divide, round; multiply, add), each with
# relative error <= 2^-24, so 2^-20 of the operand magnitudes is a comfortable cover.
F32_SLACK = 2.0**-20

# One width for a whole tensor. The widths formats (keys per channel, values per token row,
# head_dim a multiple of 8) have their own tests: tests/test_widths.py, tests/test_value_widths.py.
UNIFORM_FORMATS = [f for f in registered_formats() if f not in WIDTH_AXIS]


def _sample(shape: tuple[int, int, int], seed: int = 0) -> Tensor:
    """Channels of different spreads and offsets, plus groups that are constant along either axis."""
    g = torch.Generator().manual_seed(seed)
    _, t, d = shape
    spread = torch.rand(1, 1, d, generator=g) * 4 + 0.1
    offset = torch.randn(1, 1, d, generator=g)
    x = torch.randn(shape, generator=g) * spread + offset  # (H, T, D)
    # A KIVI-like offset channel: its channel-axis groups have a range far below their
    # magnitude, so rounding zero to float16 moves it by more than scale/2 and the clamp
    # term of the INT bound below is exercised, not just stated.
    x[:, :, 1] = 300.0 + 0.5 * torch.randn(shape[0], t, generator=g)
    x[0, 0, :] = 3.0  # constant row: constant token-axis groups
    if t > 1:
        x[0, 1, :] = 0.0  # all-zero row: NF4 absmax 0 -> scale 1
    x[-1, :, 0] = -2.0  # constant column: constant channel-axis groups
    return x


def _groups(
    shape: tuple[int, int, int], spec: QuantSpec
) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(element slice, wire-layout stat slice) of each group column, written out by hand from the spec."""
    _, t, d = shape
    g = spec.group_size
    all_ = slice(None)
    if spec.axis == "token":
        for j, start in enumerate(range(0, d, g)):
            yield (all_, all_, slice(start, start + g)), (all_, all_, slice(j, j + 1))
    else:
        for j, start in enumerate(range(0, t, g)):
            yield (all_, slice(start, start + g), all_), (all_, slice(j, j + 1), all_)


def _reference_stats(x: Tensor, spec: QuantSpec) -> dict[str, Tensor]:
    """min, max, absmax of each group: wire layout (scale_shape) and broadcast per element ('*_full')."""
    shape = (x.shape[0], x.shape[1], x.shape[2])
    dim = 2 if spec.axis == "token" else 1
    out = {name: torch.empty(scale_shape(shape, spec)) for name in ("lo", "hi", "absmax")}
    for elems, stat in _groups(shape, spec):
        block = x[elems]
        out["lo"][stat] = block.amin(dim, keepdim=True)
        out["hi"][stat] = block.amax(dim, keepdim=True)
        out["absmax"][stat] = block.abs().amax(dim, keepdim=True)
    return out


def _broadcast(stat: Tensor, shape: tuple[int, int, int], spec: QuantSpec) -> Tensor:
    """A wire-layout per-group tensor -> one value per element (H, T, D), by hand."""
    full = torch.empty(shape, dtype=stat.dtype)
    for elems, idx in _groups(shape, spec):
        full[elems] = stat[idx]
    return full


def _check_int(x: Tensor, q: QuantizedTensor, x_hat: Tensor) -> None:
    spec, shape = q.spec, q.shape
    qmax = (1 << spec.bits) - 1
    ref = _reference_stats(x, spec)
    # zero = min rounded down to float16; scale = (max - zero) / qmax rounded up.
    want_zero = ref["lo"].to(torch.float16)
    want_zero = torch.where(
        want_zero.float() > ref["lo"],
        torch.nextafter(want_zero, torch.tensor(-1e9, dtype=torch.float16)),
        want_zero,
    )
    scale32 = (ref["hi"] - want_zero.float()) / qmax
    want_scale = scale32.to(torch.float16)
    want_scale = torch.where(
        want_scale.float() < scale32,
        torch.nextafter(want_scale, torch.tensor(1e9, dtype=torch.float16)),
        want_scale,
    )
    want_scale[want_scale == 0] = 1.0
    assert q.scale is not None and q.zero is not None
    assert torch.equal(q.scale, want_scale)
    assert torch.equal(q.zero, want_zero)
    assert (q.zero.float() <= ref["lo"]).all()

    s = _broadcast(q.scale.float(), shape, spec)
    z = _broadcast(q.zero.float(), shape, spec)
    codes = unpack_bits(q.codes, spec.bits, x.numel()).view(shape)
    assert torch.equal(codes, torch.clamp(torch.round((x - z) / s), 0, qmax).to(torch.uint8))

    # Error bound. With z <= lo and z + qmax * s >= hi (directed rounding), every
    # u = (x - z)/s lies in [0, qmax] (up to float32 rounding), so the code is round(u)
    # without clamping and |x_hat - x| = s * |code - u| <= s/2 (+ float32 slack).
    bound = s / 2 + F32_SLACK * (x.abs() + z.abs() + qmax * s)
    assert ((x_hat - x).abs() <= bound).all()


def _check_nf4(x: Tensor, q: QuantizedTensor, x_hat: Tensor) -> None:
    spec, shape = q.spec, q.shape
    ref = _reference_stats(x, spec)
    want_scale = ref["absmax"].to(torch.float16)
    want_scale[want_scale == 0] = 1.0
    assert q.scale is not None and q.zero is None
    assert torch.equal(q.scale, want_scale)

    levels = torch.tensor(NF4_LEVELS)
    s = _broadcast(q.scale.float(), shape, spec)
    y = x / s
    codes = unpack_bits(q.codes, 4, x.numel()).view(shape).long()
    dist = (y[..., None] - levels).abs()  # (H, T, D, 16)
    assert ((y - levels[codes]).abs() <= dist.amin(dim=-1) + 1e-6).all()  # the nearest level

    # Error bound. For |y| <= 1 the nearest level is within half the widest gap h of y,
    # so |x_hat - x| = s * |level - y| <= s * h. Rounding absmax to float16 can make
    # s < absmax, so |y| may exceed 1 slightly; it then saturates at +-1 and
    # |x_hat - x| = |x| - s <= absmax - s. Hence err <= max(s*h, |absmax - s|) + float32 slack.
    half_gap = max(b - a for a, b in itertools.pairwise(NF4_LEVELS)) / 2
    absmax = _broadcast(ref["absmax"], shape, spec)
    bound = torch.maximum(s * half_gap, (absmax - s).abs()) + F32_SLACK * (x.abs() + s)
    assert ((x_hat - x).abs() <= bound).all()


def _check_fp16(x: Tensor, q: QuantizedTensor, x_hat: Tensor) -> None:
    assert q.scale is None and q.zero is None
    # Exactly the little-endian float16 bytes; the round trip is float16 rounding and nothing more.
    want = np.ascontiguousarray(x.to(torch.float16).numpy(), dtype="<f2").tobytes()
    assert q.codes.numpy().tobytes() == want
    assert torch.equal(x_hat, x.to(torch.float16).float())


def test_every_format_is_registered() -> None:
    assert registered_formats() == sorted(FORMATS)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("fmt", UNIFORM_FORMATS)
def test_quantize_matrix(fmt: str, axis: str, group_size: int, shape: tuple[int, int, int]) -> None:
    spec = QuantSpec(format=fmt, group_size=group_size, axis=axis)
    x = _sample(shape, seed=group_size + len(fmt))
    q = quantize(x, spec)

    sizes = part_sizes(shape, spec)
    assert q.shape == shape and q.spec == spec
    assert q.codes.dtype == torch.uint8 and q.codes.dim() == 1
    assert q.codes.numel() == sizes["codes"]
    assert q.nbytes() == sizes
    for part in (q.scale, q.zero):
        if part is not None:
            assert part.dtype == torch.float16
            assert tuple(part.shape) == scale_shape(shape, spec)
    assert (q.scale is not None) == spec.has_scale and (q.zero is not None) == spec.has_zero

    x_hat = dequantize(q)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    if fmt.startswith("int"):
        _check_int(x, q, x_hat)
    elif fmt == "nf4":
        _check_nf4(x, q, x_hat)
    else:
        _check_fp16(x, q, x_hat)


@pytest.mark.parametrize("fmt", UNIFORM_FORMATS)
def test_empty_and_input_dtypes(fmt: str) -> None:
    for shape in [(2, 0, 64), (0, 5, 48)]:
        spec = QuantSpec(format=fmt, group_size=7, axis="channel")
        q = quantize(torch.zeros(shape), spec)
        assert q.nbytes() == part_sizes(shape, spec)
        assert dequantize(q).shape == shape
    # Quantization happens in float32 whatever the input dtype; the output dtype is a final cast.
    x = _sample((2, 19, 48))
    for in_dtype in (torch.float16, torch.bfloat16, torch.float64):
        xi = x.to(in_dtype)
        ref = dequantize(quantize(xi.float(), QuantSpec(format=fmt)))
        for out_dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            x_hat = dequantize(quantize(xi, QuantSpec(format=fmt)), out_dtype)
            assert x_hat.dtype == out_dtype
            assert torch.equal(x_hat, ref.to(out_dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", UNIFORM_FORMATS)
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_cuda_matches_cpu(fmt: str, axis: str) -> None:
    spec = QuantSpec(format=fmt, group_size=7, axis=axis)
    x = _sample((2, 37, 48))
    q_cpu, q_gpu = quantize(x, spec), quantize(x.cuda(), spec)
    assert q_gpu.codes.is_cuda
    assert torch.equal(q_gpu.codes.cpu(), q_cpu.codes)
    x_hat = dequantize(q_gpu, torch.float16)
    assert x_hat.is_cuda and x_hat.dtype == torch.float16
    assert torch.allclose(x_hat.cpu().float(), dequantize(q_cpu), atol=1e-2, rtol=1e-3)


def test_int_error_shrinks_with_bits() -> None:
    x = torch.randn(4, 128, 64, generator=torch.Generator().manual_seed(1))
    mse = {}
    for fmt in ("int2", "int3", "int4", "int8"):
        mse[fmt] = float(((dequantize(quantize(x, QuantSpec(format=fmt))) - x) ** 2).mean())
    assert mse["int8"] < mse["int4"] < mse["int3"] < mse["int2"]
    # Uniform rounding noise is scale^2/12 with scale ~ range/(2^b - 1): (255/3)^2 ~ 7000x less.
    assert mse["int8"] * 1000 < mse["int2"]


@pytest.mark.parametrize("fmt", ["int2", "int4", "int8"])
def test_outlier_channel_prefers_channel_axis(fmt: str) -> None:
    """KIVI: a key channel of large magnitude and spread ruins every token-axis group it sits in.

    Per-channel groups confine it to its own groups (a zero-mean outlier channel would
    gain far less: its per-channel groups still span its whole spread).
    """
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 256, 64, generator=g)  # (H, T, D)
    keys[:, :, 5] = 40.0 + 10.0 * torch.randn(2, 256, generator=g)  # outlier channel: 40x mean, 10x std
    err = {}
    for axis in ("token", "channel"):
        x_hat = dequantize(quantize(keys, QuantSpec(format=fmt, group_size=32, axis=axis)))
        err[axis] = float(((x_hat - keys) ** 2).mean())
    assert err["channel"] * 4 < err["token"]


def test_nf4_levels_follow_the_normal_quantile_construction() -> None:
    offset = 0.9677083
    ndtri = torch.special.ndtri
    positive = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    levels = levels / levels.abs().max()
    assert len(NF4_LEVELS) == 16 and NF4_LEVELS[7] == 0.0 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[-1] == 1.0
    assert torch.allclose(levels, torch.tensor(NF4_LEVELS, dtype=torch.float64), atol=1e-6, rtol=0)


# --- bit packing ------------------------------------------------------------------------------


def _reference_pack(codes: Tensor, bits: int) -> Tensor:
    """Independent packer: explode every code into its bits, LSB first, then regroup by 8."""
    flat = codes.reshape(-1).long()
    stream = ((flat[:, None] >> torch.arange(bits)) & 1).reshape(-1)  # bit b*i + j = bit j of code i
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.view(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 8, 9, 23, 1000, 1001):
        codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (packed_size(n, bits),)
        assert torch.equal(packed, _reference_pack(codes, bits))
        assert torch.equal(unpack_bits(packed, bits, n), codes)
        # trailing bytes beyond the stream are ignored; any integer dtype and shape packs in C order
        assert torch.equal(
            unpack_bits(torch.cat([packed, torch.full((3,), 255, dtype=torch.uint8)]), bits, n), codes
        )
        if n == 1000:
            assert torch.equal(pack_bits(codes.long().view(10, 4, 25), bits), packed)


def test_pack_known_vectors() -> None:
    # 3 bits, codes 1..7,0: stream = 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 = 0x1F58D1.
    # byte 0 = 0b11_010_001 (code 2's low bits 11, code 1 = 010, code 0 = 001) = 0xD1
    # byte 1 = 0b0_101_100_0 (code 5's low bit 0, code 4 = 101, code 3 = 100, code 2's high bit 0) = 0x58
    # byte 2 = 0b000_111_11 (code 7 = 000, code 6 = 111, code 5's high bits 11) = 0x1F
    three = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    assert pack_bits(three, 3).tolist() == [0xD1, 0x58, 0x1F]
    assert pack_bits(three[:3], 3).tolist() == [0xD1, 0x00]  # 9 bits -> 2 bytes, high bits 0
    # 4 bits: low nibble first; the odd last code leaves the high nibble 0.
    assert pack_bits(torch.tensor([1, 2, 3, 4, 5]), 4).tolist() == [0x21, 0x43, 0x05]
    # 2 bits: 1 | 2<<2 | 3<<4 | 0<<6 = 0x39, then 3.
    assert pack_bits(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [0x39, 0x03]
    # 1 bit: 1,0,1,1,0,0,0,0 -> 0b00001101, then 1.
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0x0D, 0x01]
    assert unpack_bits(torch.tensor([0xD1, 0x58, 0x1F], dtype=torch.uint8), 3, 8).tolist() == three.tolist()


@pytest.mark.parametrize(
    "call",
    [
        lambda: pack_bits(torch.tensor([0, 1]), 0),
        lambda: pack_bits(torch.tensor([0, 1]), 9),
        lambda: pack_bits(torch.tensor([0, 1]), True),
        lambda: pack_bits(torch.tensor([0, 8]), 3),
        lambda: pack_bits(torch.tensor([-1, 0]), 3),
        lambda: pack_bits(torch.tensor([0.0, 1.0]), 3),
        lambda: unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 6),  # 6 codes need 3 bytes
        lambda: unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, -1),
        lambda: unpack_bits(torch.zeros(2, dtype=torch.int32), 3, 1),
        lambda: unpack_bits(torch.zeros(2, 2, dtype=torch.uint8), 3, 1),
    ],
)
def test_pack_rejects_bad_input(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


# --- bad quantizer inputs -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"format": "int5"}, {"group_size": 0}, {"group_size": 2.0}, {"axis": "row"}],
)
def test_spec_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="got"):
        QuantSpec(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", UNIFORM_FORMATS)
def test_quantizer_rejects_bad_input(fmt: str) -> None:
    spec = QuantSpec(format=fmt)
    quantizer = get_quantizer(fmt)
    for bad in (torch.zeros(4, 64), torch.zeros(1, 2, 4, 64)):
        with pytest.raises(ValueError, match="H, T, D"):
            quantize(bad, spec)
        with pytest.raises(ValueError, match="H, T, D"):
            quantizer.quantize(bad, spec)
    with pytest.raises(ValueError, match="floating-point"):
        quantizer.quantize(torch.zeros(1, 2, 64, dtype=torch.int32), spec)
    other = "int4" if fmt in ("fp16", "nf4") else "fp16"
    with pytest.raises(ValueError, match="formats"):
        quantizer.quantize(torch.zeros(1, 2, 64), QuantSpec(format=other))

    q = quantize(torch.randn(2, 5, 64), spec)
    truncated = QuantizedTensor(q.spec, q.shape, q.codes[:-1], q.scale, q.zero)
    with pytest.raises(ValueError, match="codes"):
        dequantize(truncated)
    if q.scale is not None:
        wrong = QuantizedTensor(q.spec, q.shape, q.codes, q.scale[:, :1], q.zero)
        with pytest.raises(ValueError, match="scale"):
            dequantize(wrong)
        with pytest.raises(ValueError, match="scale"):
            dequantize(QuantizedTensor(q.spec, q.shape, q.codes, None, q.zero))


def test_unknown_format_lists_registered() -> None:
    with pytest.raises(ValueError, match="registered"):
        get_quantizer("int5")
