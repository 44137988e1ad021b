"""Triton kernels vs the torch reference (kvlink.kernels.reference), run on CPU under TRITON_INTERPRET=1.

Contract checked here, and stated for GPUs too:
- quantize_pack: codes, scale and zero are byte-for-byte the reference's.
- dequantize_into: |out - ref| <= eps(dtype) * |ref| + 4 * eps(float32) * max|ref|
  (the GPU may fuse code * scale + zero into one FMA: at most 1 float32 ulp
  before the cast to the output dtype).
- dequantize_expand: the same with 2e-3 * max|ref| for float16/bfloat16 output
  (TF32 products on the GPU) and 1e-5 * max|ref| for float32 (IEEE products,
  another summation order).

Triton is a dev dependency: if it does not import, this module fails, it never skips.
Shapes are tiny (the interpreter runs each program in numpy). On a GPU machine the
same checks run compiled: KVLINK_TEST_DEVICE=cuda TRITON_INTERPRET=0 pytest tests/test_kernels.py
"""

from __future__ import annotations

import os

# On CPU (the default, and CI) force the interpreter, before triton and the kernel modules are imported.
os.environ["TRITON_INTERPRET"] = (
    "1" if os.environ.get("KVLINK_TEST_DEVICE", "cpu") == "cpu" else os.environ.get("TRITON_INTERPRET", "0")
)

import itertools

import pytest
import torch
import triton  # noqa: F401  (fail, never skip, when triton is missing)

from kvlink import kernels
from kvlink.kernels import dequant, quant, reference
from kvlink.quant import QuantizedTensor, QuantSpec
from kvlink.quant.nf4 import NF4_LEVELS
from kvlink.quant.pack import unpack_bits

INT_FORMATS = ("int8", "int4", "int3", "int2")
QUANT_FORMATS = (*INT_FORMATS, "nf4")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEVICE = torch.device(os.environ.get("KVLINK_TEST_DEVICE", "cpu"))

# (H, T, D, group): odd T (1, 37, 129, 130), head_dim 64 and 128, groups 32/64/128,
# a group longer than the row, and an odd latent width (D = 20, not a multiple of 8).
SHAPES = (
    (2, 37, 64, 32),
    (1, 129, 128, 128),
    (2, 1, 64, 64),
    (1, 130, 128, 32),
    (2, 37, 20, 32),
    (1, 37, 64, 128),
)


def _cases() -> list[tuple[str, str, tuple[int, int, int, int], torch.dtype]]:
    """Every format x axis x shape once; the input/output dtype rotates so each meets all three."""
    cases = []
    dtypes = itertools.cycle(DTYPES)
    for fmt, axis in itertools.product(QUANT_FORMATS, ("token", "channel")):
        for shape in SHAPES:
            cases.append((fmt, axis, shape, next(dtypes)))
    return cases


CASES = _cases()


def _ids(case: tuple[str, str, tuple[int, int, int, int], torch.dtype]) -> str:
    fmt, axis, (h, t, d, g), dtype = case
    return f"{fmt}-{axis}-{h}x{t}x{d}-g{g}-{str(dtype).removeprefix('torch.')}"


def _input(shape: tuple[int, int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian values with outliers, a constant row and an all-zero row (scale-1 groups)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2.0
    x[..., ::7, :] *= 10.0  # outlier tokens
    x[:, 0, :] = 0.75  # constant over channels: token groups have max == min
    if shape[1] > 2:
        x[:, 2, :] = 0.0
    return x.to(device=DEVICE, dtype=dtype)


def _same_bytes(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def cpu_reference(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """The reference bytes, computed on CPU: the specification on every device.

    (On CUDA, torch divides by a Python scalar through its reciprocal, so the
    reference's own scale = (max - min) / qmax is not IEEE division there.)
    """
    return reference.quantize_pack(x.cpu(), spec)


def to_device(q: QuantizedTensor, device: torch.device) -> QuantizedTensor:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return QuantizedTensor(q.spec, q.shape, q.codes.to(device), move(q.scale), move(q.zero))


def assert_same_packed(mine: QuantizedTensor, ref: QuantizedTensor) -> None:
    assert mine.shape == ref.shape and mine.spec == ref.spec
    for name in ("codes", "scale", "zero"):
        a, b = getattr(mine, name), getattr(ref, name)
        a, b = (None if a is None else a.cpu()), (None if b is None else b.cpu())
        if not _same_bytes(a, b):
            bad = (a.view(torch.uint8) != b.view(torch.uint8)).nonzero()[:5].tolist() if a is not None else a
            raise AssertionError(f"{name} differs from the reference (first differing bytes {bad})")


def assert_values_close(out: torch.Tensor, ref: torch.Tensor, amax_tol: float | None = None) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    amax = float(ref.float().abs().max()) if ref.numel() else 0.0
    atol = (amax_tol if amax_tol is not None else 4 * torch.finfo(torch.float32).eps) * amax
    torch.testing.assert_close(out.float(), ref.float(), rtol=torch.finfo(ref.dtype).eps, atol=atol)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_quantize_pack_bytes_and_dequantize_match_reference(case) -> None:
    fmt, axis, (h, t, d, g), dtype = case
    spec = QuantSpec(fmt, g, axis)
    x = _input((h, t, d), dtype)
    ref_q = to_device(cpu_reference(x, spec), DEVICE)
    assert_same_packed(quant.quantize_pack(x, spec), ref_q)  # single pass where the tiles allow
    assert_same_packed(quant.quantize_pack(x, spec, fused=False), ref_q)  # statistics, then pack
    assert_values_close(dequant.dequantize_into(ref_q, dtype), reference.dequantize_into(ref_q, dtype))


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def test_dequantize_every_output_dtype(fmt: str, dtype: torch.dtype) -> None:
    for axis in ("token", "channel"):
        q = reference.quantize_pack(_input((2, 37, 64), torch.float32, seed=1), QuantSpec(fmt, 32, axis))
        assert_values_close(dequant.dequantize_into(q, dtype), reference.dequantize_into(q, dtype))


def test_rounding_ties_go_to_even() -> None:
    # One group of 16 with min 0 and max 15: scale 1, zero 0, and x = k + 0.5 sits exactly on a tie.
    row = torch.tensor([0.0, 15.0] + [k + 0.5 for k in range(14)], device=DEVICE)  # (16,)
    along_d = row.reshape(1, 1, 16).repeat(1, 3, 4)  # (1, 3, 64): ties within token groups
    along_t = row.reshape(1, 16, 1).repeat(1, 1, 64)  # (1, 16, 64): ties within channel groups
    for x, axis in ((along_d, "token"), (along_t, "channel")):
        spec = QuantSpec("int4", 16, axis)
        q = quant.quantize_pack(x, spec)
        assert_same_packed(q, cpu_reference(x, spec))
        codes = unpack_bits(q.codes, 4, x.numel()).view(x.shape)
        first = codes[0, 0, :16] if axis == "token" else codes[0, :, 0]
        assert first.tolist() == [0, 15, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14]


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
def test_directed_rounding_edges(fmt: str) -> None:
    # Groups of 16 channels: large offset with a small spread (a key channel near 300), tiny
    # values whose zero rounds to -0.0 or whose scale is subnormal in float16, exactly
    # representable min/max (no step), mixed signs, and fp16-boundary magnitudes.
    gen = torch.Generator().manual_seed(5)
    base = torch.rand(8, 16, generator=gen)  # (groups, 16)
    offsets = torch.tensor([300.0, -300.0, 0.0, 1e-9, -1e-9, 0.5, 6e4, -1e-5])[:, None]
    spreads = torch.tensor([0.01, 0.37, 1e-6, 1e-7, 1e-8, 0.25, 5.0, 3e-6])[:, None]
    groups = offsets + spreads * base
    groups[5] = torch.linspace(-0.5, 0.5, 16)  # min/max exactly representable
    x = groups.reshape(1, 2, 64).to(DEVICE)  # (H, T, D)
    spec = QuantSpec(fmt, 16, "token")
    assert_same_packed(quant.quantize_pack(x, spec), cpu_reference(x, spec))


def test_nf4_values_on_midpoints() -> None:
    levels = torch.tensor(NF4_LEVELS)
    mid = (levels[1:] + levels[:-1]) / 2  # (15,): y exactly on a decision boundary
    row = torch.cat([torch.tensor([1.0]), mid, -mid, levels[:-1]])  # absmax 1 -> scale 1
    x = row.reshape(1, 1, -1).repeat(2, 3, 1).to(DEVICE)  # (2, 3, 46)
    spec = QuantSpec("nf4", 64, "token")
    assert_same_packed(quant.quantize_pack(x, spec), cpu_reference(x, spec))


def test_fp16_passthrough() -> None:
    x = _input((2, 37, 64), torch.bfloat16)
    spec = QuantSpec("fp16")
    q = quant.quantize_pack(x, spec)
    assert_same_packed(q, reference.quantize_pack(x, spec))
    for dtype in DTYPES:
        assert torch.equal(dequant.dequantize_into(q, dtype), reference.dequantize_into(q, dtype))


EXPAND_CASES = [
    # fmt, axis, (H, T, r, D), group, with mean, output dtype
    ("int4", "token", (2, 37, 16, 64), 32, False, torch.float16),
    ("int4", "channel", (1, 129, 32, 128), 32, True, torch.float32),
    ("int3", "token", (2, 37, 20, 64), 32, True, torch.bfloat16),
    ("int3", "channel", (1, 37, 24, 64), 64, False, torch.float32),
    ("int2", "channel", (2, 1, 16, 128), 128, True, torch.float16),
    ("int8", "token", (1, 70, 40, 64), 32, False, torch.bfloat16),
    ("nf4", "token", (2, 37, 16, 64), 32, True, torch.float32),
    ("nf4", "channel", (1, 37, 32, 96), 32, False, torch.float16),
    ("fp16", "token", (2, 37, 16, 64), 32, True, torch.float16),
]


@pytest.mark.parametrize("case", EXPAND_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'x'.join(map(str, c[2]))}")
def test_dequantize_expand_matches_unfused_reference(case) -> None:
    fmt, axis, (h, t, r, d), g, with_mean, dtype = case
    gen = torch.Generator().manual_seed(3)
    latent = torch.randn(h, t, r, generator=gen).to(DEVICE) * 3  # (H, T, r)
    q = reference.quantize_pack(latent, QuantSpec(fmt, g, axis))
    if with_mean:  # calibrated profile: projection (H, D, r) used transposed, fp32, plus a mean
        basis = torch.randn(h, d, r, generator=gen).to(DEVICE).transpose(-1, -2)
        mean: torch.Tensor | None = torch.randn(h, d, generator=gen).to(DEVICE)
    else:  # per-message SVD: (H, r, D) float16 basis from the wire
        basis = torch.randn(h, r, d, generator=gen).to(DEVICE, torch.float16)
        mean = None
    out = dequant.dequantize_expand(q, basis, mean, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert_values_close(out, reference.dequantize_expand(q, basis, mean, dtype), amax_tol=tol)


def test_expand_rejects_mismatched_basis() -> None:
    q = reference.quantize_pack(torch.randn(2, 5, 16), QuantSpec("int4", 32, "token"))
    with pytest.raises(ValueError, match="basis must be"):
        dequant.dequantize_expand(q, torch.randn(2, 8, 64))
    with pytest.raises(ValueError, match="mean must be"):
        dequant.dequantize_expand(q, torch.randn(2, 16, 64), torch.randn(2, 32))


def test_dequantize_rejects_bad_parts() -> None:
    q = reference.quantize_pack(torch.randn(1, 5, 64), QuantSpec("int4", 32, "token"))
    short = QuantizedTensor(q.spec, q.shape, q.codes[:-1], q.scale, q.zero)
    with pytest.raises(ValueError, match="codes must be uint8"):
        dequant.dequantize_into(short)
    with pytest.raises(ValueError, match="zero must be float16"):
        dequant.dequantize_into(QuantizedTensor(q.spec, q.shape, q.codes, q.scale, None))


# --- dispatch ------------------------------------------------------------------


def test_import_needs_no_triton_module_loaded_until_first_use() -> None:
    assert kernels.HAS_TRITON
    assert kernels.backend_for(torch.device("cpu")) in ("reference", "triton")


@pytest.mark.parametrize(
    ("mode", "interpret", "device", "expected"),
    [
        (None, "1", "cpu", "reference"),
        ("auto", "1", "cpu", "reference"),
        ("reference", "1", "cuda", "reference"),
        ("triton", "1", "cpu", "triton"),
        ("auto", "0", "cuda", "triton"),
    ],
)
def test_backend_choice(monkeypatch, mode, interpret, device, expected) -> None:
    if mode is None:
        monkeypatch.delenv("KVLINK_KERNELS", raising=False)
    else:
        monkeypatch.setenv("KVLINK_KERNELS", mode)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert kernels.backend_for(torch.device(device)) == expected


def test_backend_errors(monkeypatch) -> None:
    monkeypatch.setenv("KVLINK_KERNELS", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        kernels.backend_for(torch.device("cpu"))
    monkeypatch.setenv("KVLINK_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.backend_for(torch.device("cpu"))


def test_public_functions_dispatch(monkeypatch) -> None:
    x = _input((1, 37, 64), torch.float32)
    spec = QuantSpec("int4", 32, "channel")
    basis = torch.randn(1, 64, 64, device=DEVICE)
    calls: list[str] = []
    for module, name in (
        (dequant, "dequantize_into"),
        (dequant, "dequantize_expand"),
        (quant, "quantize_pack"),
    ):
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kw):
            calls.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(module, name, spy)
    q_ref = to_device(cpu_reference(x, spec), DEVICE)
    results = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("KVLINK_KERNELS", mode)
        results[mode] = (
            kernels.quantize_pack(x, spec),
            kernels.dequantize_into(q_ref, torch.float16),
            kernels.dequantize_expand(q_ref, basis),
        )
    assert calls == ["quantize_pack", "dequantize_into", "dequantize_expand"]  # only under "triton"
    assert_same_packed(results["triton"][0], q_ref)
    assert_values_close(results["triton"][1], results["reference"][1])
    assert_values_close(results["triton"][2], results["reference"][2], amax_tol=1e-5)


# (H, T, D, group, format): per-channel widths (kvlink.quant.widths), odd T, D = 64 / 128 / 16.
WIDTH_CASES = (
    (2, 37, 64, 32, "int4cw"),
    (3, 129, 64, 64, "int3cw"),
    (1, 130, 128, 128, "int2cw"),
    (2, 1, 16, 32, "int3cw"),
)


@pytest.mark.parametrize("case", WIDTH_CASES, ids=lambda c: f"{c[4]}-{c[0]}x{c[1]}x{c[2]}-g{c[3]}")
def test_dequantize_widths_matches_reference(case) -> None:
    from kvlink.quant.widths import WIDTH_FORMATS, quantize_widths

    h, t, d, g, fmt = case
    spec = QuantSpec(fmt, g, "channel")
    x = _input((h, t, d), torch.float32)
    widths = torch.full((h, d), WIDTH_FORMATS[fmt], dtype=torch.int64)
    gen = torch.Generator().manual_seed(t)
    for _ in range(40 * d):  # move bits between random channels: every width from 0 to 8 occurs
        i, j = torch.randint(0, d, (2,), generator=gen).tolist()
        row = int(torch.randint(0, h, (1,), generator=gen))
        if widths[row, i] < 8 and widths[row, j] > 0:
            widths[row, i] += 1
            widths[row, j] -= 1
    assert int(widths.min()) == 0 and int(widths.max()) == 8
    ref_q = quantize_widths(x.cpu(), spec, widths.to(torch.uint8))
    on_device = QuantizedTensor(
        spec, ref_q.shape, ref_q.codes.to(DEVICE), ref_q.scale.to(DEVICE), ref_q.zero.to(DEVICE),  # type: ignore[union-attr]
        ref_q.widths.to(DEVICE),  # type: ignore[union-attr]
    )  # fmt: skip
    want = reference.dequantize_into(on_device, torch.float32)
    for dtype in DTYPES:
        assert_values_close(dequant.dequantize_into(on_device, dtype), want.to(dtype))
    assert_values_close(kernels.dequantize_into(on_device, torch.float16), want.to(torch.float16))
    bad = QuantizedTensor(spec, ref_q.shape, on_device.codes, on_device.scale, on_device.zero, None)
    with pytest.raises(ValueError, match="needs the tensor's widths"):
        dequant.dequantize_into(bad)


# (H, T, D, group, format): per-token-row widths of values, odd T and odd H * T (the 4-bit widths
# stream then ends in half a byte), groups shorter than D.
TOKEN_WIDTH_CASES = (
    (2, 37, 64, 64, "int3rw"),
    (3, 129, 64, 32, "int4rw"),
    (1, 131, 128, 128, "int2rw"),
    (2, 1, 16, 8, "int3rw"),
)


@pytest.mark.parametrize("case", TOKEN_WIDTH_CASES, ids=lambda c: f"{c[4]}-{c[0]}x{c[1]}x{c[2]}-g{c[3]}")
def test_dequantize_token_widths_matches_reference(case) -> None:
    from kvlink.quant.widths import TOKEN_WIDTH_FORMATS, quantize_token_widths

    h, t, d, g, fmt = case
    spec = QuantSpec(fmt, g, "token")
    x = _input((h, t, d), torch.float32)
    mean = TOKEN_WIDTH_FORMATS[fmt]
    widths = torch.full((h, t), mean, dtype=torch.int64)
    gen = torch.Generator().manual_seed(t)
    for _ in range(40 * t):  # move bits between random rows: every width from 0 to 8 occurs when t allows
        i, j = torch.randint(0, t, (2,), generator=gen).tolist()
        row = int(torch.randint(0, h, (1,), generator=gen))
        if widths[row, i] < 8 and widths[row, j] > 0:
            widths[row, i] += 1
            widths[row, j] -= 1
    assert t == 1 or (int(widths.min()) == 0 and int(widths.max()) == 8)
    ref_q = quantize_token_widths(x.cpu(), spec, widths.to(torch.uint8))
    on_device = QuantizedTensor(
        spec, ref_q.shape, ref_q.codes.to(DEVICE), ref_q.scale.to(DEVICE), ref_q.zero.to(DEVICE),  # type: ignore[union-attr]
        ref_q.widths.to(DEVICE),  # type: ignore[union-attr]
    )  # fmt: skip
    want = reference.dequantize_into(on_device, torch.float32)
    assert float((want - x.to(DEVICE)).abs().max()) < float(x.abs().max())  # decodes near x, not garbage
    for dtype in DTYPES:
        assert_values_close(dequant.dequantize_into(on_device, dtype), want.to(dtype))
    assert_values_close(kernels.dequantize_into(on_device, torch.float16), want.to(torch.float16))
