"""Triton receiver kernels: packed wire bytes -> cache layout (H, T, D), one launch per tensor.

`dequantize_into` reads the LSB-first code stream, the float16 scale (and zero)
per group, and writes x_hat = code * scale + zero (INT) or NF4[code] * scale in
the requested dtype. `dequantize_expand` does the same for a low-rank latent
(H, T, r) and multiplies by a basis (H, r, D) (+ mean (H, D)) in the same
program, so the full-size fp32 intermediate of the unfused path never exists.

Layout and arithmetic are specified by `kvlink.quant.base` and by the plain
torch code in `kvlink.kernels.reference`; tests/test_kernels.py holds the two
together. Call these through `kvlink.kernels`, which picks Triton or the
reference.

How the dequantize kernel walks the stream: a *unit* is the smallest run of
whole bytes holding whole codes (1 byte = 1 INT8, 2 INT4/NF4 or 4 INT2 codes;
3 bytes = 8 INT3 codes). Each program loads BLOCK_UNITS consecutive units
(contiguous, coalesced byte loads), widens every unit into a (BLOCK_UNITS,
codes-per-unit) tile with shifts, and stores the tile as one contiguous run
of output elements. When codes-per-unit divides D (always for head_dim 64 and
128) the codes of a unit share one (h, t) row, so group indices are computed
once per unit, not per element.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from kvlink.kernels._triton import HAS_TRITON, tl, triton
from kvlink.quant import WIDTH_AXIS, QuantizedTensor, QuantSpec, packed_size, scale_shape

# (bytes, codes) of one unit of the packed stream, by bit width.
UNITS: dict[int, tuple[int, int]] = {8: (1, 1), 4: (1, 2), 2: (1, 4), 3: (3, 8)}
BLOCK_ELEMS = 2048  # elements per program of the dequantize and pack kernels (H100: 2048 >= 4096 at every T)
EXPAND_BLOCK_T = 64  # tokens per tile of the fused expand kernel (a program does T_TILES tiles)
EXPAND_BLOCK_D = 128  # output channels per program of the fused expand kernel
EXPAND_NUM_WARPS = 4
_MAX_ELEMS = 2**31 - 1  # int32 indexing inside the kernels

FORMAT_INT, FORMAT_NF4, FORMAT_FP16 = 0, 1, 2


@triton.jit
def _group_index(
    u,
    j,
    e,
    mask,
    n_elem,
    T,
    NGT,
    D: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    UNIT_CODES: tl.constexpr,
    CHANNEL: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """(index into scale/zero, its mask) of the codes of units `u` (elements e = u * UNIT_CODES + j).

    Shared by the dequantize and the pack kernels, which walk the stream the same way.
    """
    if ALIGNED:
        # A unit never straddles a row: one (h, t) row and a run of UNIT_CODES channels.
        e0 = u * UNIT_CODES
        row = e0 // D  # h * T + t
        d0 = e0 - row * D
        if CHANNEL:
            h = row // T
            t = row - h * T
            gi = ((h * NGT + t // G) * D + d0)[:, None] + j[None, :]
            gmask = mask
        else:
            # codes per unit divide the group (or the group is the whole row): one scale per unit
            gi = (row * NG + d0 // G)[:, None]  # (units, 1)
            gmask = (e0 < n_elem)[:, None]
    else:
        row = e // D
        d = e - row * D
        if CHANNEL:
            h = row // T
            t = row - h * T
            gi = (h * NGT + t // G) * D + d
        else:
            gi = row * NG + d // G
        gmask = mask
    return gi, gmask


@triton.jit
def _dequant_kernel(
    codes_ptr,
    scale_ptr,
    zero_ptr,
    lut_ptr,
    out_ptr,
    n_elem,
    n_bytes,
    T,
    NGT,
    D: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    BITS: tl.constexpr,
    UNIT_BYTES: tl.constexpr,
    UNIT_CODES: tl.constexpr,
    CHANNEL: tl.constexpr,
    NF4: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_UNITS: tl.constexpr,
):
    pid = tl.program_id(0)
    u = pid * BLOCK_UNITS + tl.arange(0, BLOCK_UNITS)  # unit index
    word = tl.zeros([BLOCK_UNITS], dtype=tl.int32)
    for k in tl.static_range(UNIT_BYTES):
        off = u * UNIT_BYTES + k
        byte = tl.load(codes_ptr + off, mask=off < n_bytes, other=0)
        word = word | (byte.to(tl.int32) << (8 * k))
    j = tl.arange(0, UNIT_CODES)
    code = (word[:, None] >> (j[None, :] * BITS)) & ((1 << BITS) - 1)  # (units, codes per unit)
    e = u[:, None] * UNIT_CODES + j[None, :]  # flat index into (H, T, D)
    mask = e < n_elem

    gi, gmask = _group_index(u, j, e, mask, n_elem, T, NGT, D, G, NG, UNIT_CODES, CHANNEL, ALIGNED)
    scale = tl.load(scale_ptr + gi, mask=gmask, other=1.0).to(tl.float32)
    if NF4:
        level = tl.load(lut_ptr + code, mask=mask, other=0.0)
        val = level * scale
    else:
        zero = tl.load(zero_ptr + gi, mask=gmask, other=0.0).to(tl.float32)
        val = code.to(tl.float32) * scale + zero
    tl.store(out_ptr + e, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_widths_kernel(
    codes_ptr,
    widths_ptr,
    offsets_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    n_elem,
    n_bytes,
    T,
    NG,
    ROW_BITS,
    D: tl.constexpr,
    G: tl.constexpr,
    TOKEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The widths formats (kvlink.quant.widths). Per channel (TOKEN false): element (h, t, i)
    reads w[h, i] bits at bit (h * T + t) * ROW_BITS + offset[h, i]. Per token row (TOKEN):
    w[h, t] bits at bit start[h, t] + i * w[h, t]. Either way within two bytes (w <= 8)."""
    pid = tl.program_id(0)
    e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n_elem
    row = e // D  # h * T + t
    d = e - row * D
    if TOKEN:
        w = tl.load(widths_ptr + row, mask=mask, other=0).to(tl.int32)
        bit = tl.load(offsets_ptr + row, mask=mask, other=0) + d * w
        gi = row * NG + d // G
    else:
        h = row // T
        t = row - h * T
        hd = h * D + d
        w = tl.load(widths_ptr + hd, mask=mask, other=0).to(tl.int32)
        bit = row * ROW_BITS + tl.load(offsets_ptr + hd, mask=mask, other=0)
        gi = (h * NG + t // G) * D + d
    byte = bit >> 3
    lo = tl.load(codes_ptr + byte, mask=mask & (byte < n_bytes), other=0).to(tl.int32)
    hi = tl.load(codes_ptr + byte + 1, mask=mask & (byte + 1 < n_bytes), other=0).to(tl.int32)
    code = ((lo | (hi << 8)) >> (bit & 7).to(tl.int32)) & ((1 << w) - 1)
    scale = tl.load(scale_ptr + gi, mask=mask, other=1.0).to(tl.float32)
    zero = tl.load(zero_ptr + gi, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + e, (code.to(tl.float32) * scale + zero).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_expand_kernel(
    codes_ptr,
    scale_ptr,
    zero_ptr,
    lut_ptr,
    basis_ptr,
    mean_ptr,
    out_ptr,
    T,
    NGT,
    D,
    n_bytes,
    stride_bh,
    stride_br,
    stride_bd,
    stride_mh,
    stride_md,
    R: tl.constexpr,
    RP: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    BITS: tl.constexpr,
    CHANNEL: tl.constexpr,
    FORMAT: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    T_TILES: tl.constexpr,
):
    pid_t = tl.program_id(0)  # T_TILES consecutive tiles of BLOCK_T tokens
    h = tl.program_id(1)
    pid_d = tl.program_id(2)
    k = tl.arange(0, RP)  # latent channel, padded to a power of two >= 16 for tl.dot
    kmask = k < R
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    # The basis block (and mean) is loaded once per program and reused for every token tile.
    bmask = kmask[:, None] & dmask[None, :]
    basis = tl.load(
        basis_ptr + h * stride_bh + k[:, None] * stride_br + dd[None, :] * stride_bd, mask=bmask, other=0.0
    ).to(tl.float32)  # (RP, BLOCK_D)
    if HAS_MEAN:
        mean = tl.load(mean_ptr + h * stride_mh + dd * stride_md, mask=dmask, other=0.0).to(tl.float32)

    for i in range(T_TILES):
        t = (pid_t * T_TILES + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        m = (t < T)[:, None] & kmask[None, :]
        e = (h * T + t)[:, None] * R + k[None, :]  # flat index into the latent (H, T, R)
        # Dequantize the (BLOCK_T, RP) latent tile in registers (fp32).
        if FORMAT == 2:
            lat = tl.load(codes_ptr + e, mask=m, other=0.0).to(tl.float32)  # codes viewed as float16
        else:
            bit = e * BITS
            byte = bit >> 3
            word = tl.load(codes_ptr + byte, mask=m, other=0).to(tl.int32)
            if BITS == 3:  # a 3-bit code may straddle two bytes
                hi = tl.load(codes_ptr + byte + 1, mask=m & (byte + 1 < n_bytes), other=0)
                word = word | (hi.to(tl.int32) << 8)
            code = (word >> (bit & 7)) & ((1 << BITS) - 1)
            if CHANNEL:
                gi = (h * NGT + t // G)[:, None] * R + k[None, :]
            else:
                gi = (h * T + t)[:, None] * NG + (k // G)[None, :]
            scale = tl.load(scale_ptr + gi, mask=m, other=0.0).to(tl.float32)
            if FORMAT == 1:
                lat = tl.load(lut_ptr + code, mask=m, other=0.0) * scale
            else:
                zero = tl.load(zero_ptr + gi, mask=m, other=0.0).to(tl.float32)
                lat = code.to(tl.float32) * scale + zero
            lat = tl.where(m, lat, 0.0)
        acc = tl.dot(lat, basis, input_precision=PRECISION)  # (BLOCK_T, RP) @ (RP, BLOCK_D)
        if HAS_MEAN:
            acc = acc + mean[None, :]
        out_off = (h * T + t)[:, None] * D + dd[None, :]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=(t < T)[:, None] & dmask[None, :])


# --- host side ---------------------------------------------------------------
# Launch parameters depend only on (shape, spec, dtype): they are computed once and
# cached, since per-tensor Python overhead otherwise rivals the kernel time.


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton kernels need the 'triton' package (pip install triton)")


_LUTS: dict[torch.device, Tensor] = {}


def nf4_lut(device: torch.device) -> Tensor:
    """The 16 NF4 levels as float32 on `device` (the reference quantizer's table)."""
    lut = _LUTS.get(device)
    if lut is None:
        from kvlink.quant.nf4 import NF4_LEVELS

        lut = _LUTS[device] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return lut


@functools.lru_cache(maxsize=1024)
def _layout(shape: tuple[int, int, int], spec: QuantSpec) -> tuple[int, int, tuple[int, int, int] | None]:
    """(elements, code bytes, scale shape or None) of a quantized (H, T, D) tensor; validates the size."""
    n = shape[0] * shape[1] * shape[2]
    if n > _MAX_ELEMS:
        raise ValueError(f"tensor of shape {shape} has {n} elements; the kernels index with int32")
    return n, packed_size(n, spec.bits), scale_shape(shape, spec) if spec.has_scale else None


def check_packed(q: QuantizedTensor) -> None:
    """Validate the parts of `q` against its spec and shape before a kernel reads them."""
    _, n_bytes, sshape = _layout(tuple(q.shape), q.spec)  # type: ignore[arg-type]
    codes = q.codes
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != n_bytes:
        raise ValueError(
            f"codes must be uint8 of {n_bytes} bytes for shape {q.shape} and {q.spec}, "
            f"got {codes.dtype} {tuple(codes.shape)}"
        )
    for name, part, needed in (("scale", q.scale, q.spec.has_scale), ("zero", q.zero, q.spec.has_zero)):
        if not needed:
            continue
        if part is None or part.dtype != torch.float16 or part.shape != sshape:
            got = None if part is None else (part.dtype, tuple(part.shape))
            raise ValueError(f"{name} must be float16 of shape {sshape}, got {got}")
        if part.device != codes.device:
            raise ValueError(f"{name} is on {part.device} but codes are on {codes.device}")


def _unit_aligned(d: int, g: int, unit_codes: int, channel: bool) -> bool:
    """Whether every unit of codes lies in one (h, t) row (and, token axis, in one group)."""
    if d % unit_codes:
        return False
    return channel or g >= d or g % unit_codes == 0


@functools.lru_cache(maxsize=1024)
def _dequant_plan(
    shape: tuple[int, int, int], spec: QuantSpec
) -> tuple[tuple[int], tuple[int, ...], dict[str, Any]]:
    """(grid, runtime scalars, constexpr kwargs) of `_dequant_kernel` for one shape and spec."""
    _, t, d = shape
    n, n_bytes, _ = _layout(shape, spec)
    bits, g = spec.bits, spec.group_size
    unit_bytes, unit_codes = UNITS[bits]
    channel = spec.axis == "channel"
    block_units = BLOCK_ELEMS // unit_codes
    grid = (triton.cdiv(triton.cdiv(n, unit_codes), block_units),)
    constexprs = dict(
        D=d,
        G=g,
        NG=triton.cdiv(d, g),
        BITS=bits,
        UNIT_BYTES=unit_bytes,
        UNIT_CODES=unit_codes,
        CHANNEL=channel,
        NF4=spec.format == "nf4",
        ALIGNED=_unit_aligned(d, g, unit_codes, channel),
        BLOCK_UNITS=block_units,
        num_warps=4,
    )
    return grid, (n, n_bytes, t, triton.cdiv(t, g)), constexprs


def dequantize_widths(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A tensor of the widths formats (per channel or per token row) -> (H, T, D) of `dtype`,
    one kernel launch."""
    from kvlink.quant.widths import check_width_tensor, mean_width, token_row_starts, width_offsets

    _require_triton()
    check_width_tensor(q)
    check_packed(q)  # and on one device
    assert q.widths is not None
    _, t, d = q.shape
    out = torch.empty(q.shape, dtype=dtype, device=q.codes.device)
    n = out.numel()
    if n == 0:
        return out
    widths = q.widths.to(device=q.codes.device, dtype=torch.uint8).contiguous()
    token = WIDTH_AXIS[q.spec.format] == "token"
    g = q.spec.group_size
    if token:
        offsets = token_row_starts(widths, d).contiguous()  # int64 stream bit of each row
        n_groups, row_bits = triton.cdiv(d, g), 0
    else:
        offsets = width_offsets(widths).contiguous()  # int64 bit offset in the row
        n_groups, row_bits = triton.cdiv(t, g), d * mean_width(q.spec)
    scale, zero = q.scale.contiguous(), q.zero.contiguous()  # type: ignore[union-attr]
    grid = (triton.cdiv(n, BLOCK_ELEMS),)
    _dequant_widths_kernel[grid](
        q.codes, widths, offsets, scale, zero, out, n, q.codes.numel(), t, n_groups, row_bits,
        D=d, G=g, TOKEN=token, BLOCK=BLOCK_ELEMS, num_warps=4,
    )  # fmt: skip
    return out


def dequantize_into(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Packed wire layout -> (H, T, D) of `dtype` on the codes' device, one kernel launch."""
    if q.spec.format in WIDTH_AXIS:
        return dequantize_widths(q, dtype)
    _require_triton()
    check_packed(q)
    if q.spec.format == "fp16":  # nothing to decode: the codes are the values
        return q.codes.view(torch.float16).view(q.shape).to(dtype, copy=True)
    out = torch.empty(q.shape, dtype=dtype, device=q.codes.device)
    if out.numel() == 0:
        return out
    grid, scalars, constexprs = _dequant_plan(tuple(q.shape), q.spec)  # type: ignore[arg-type]
    scale = q.scale.contiguous()  # type: ignore[union-attr]
    zero = q.zero.contiguous() if q.zero is not None else scale
    lut = nf4_lut(q.codes.device) if q.spec.format == "nf4" else scale
    _dequant_kernel[grid](q.codes, scale, zero, lut, out, *scalars, **constexprs)
    return out


_SM_COUNT: dict[torch.device, int] = {}


def _programs_wanted(device: torch.device) -> int:
    """Programs the fused expand should keep: 4 per SM on a GPU (1 under the interpreter).

    Fewer, longer programs share one basis load and its conversion to the tl.dot
    operand layout over several token tiles; with a (H, r, D) basis that
    conversion is a transpose (TF32 operands must be K-major), which at one tile
    per program cost 1.6x the time on an H100 at T = 32k.
    """
    if device.type != "cuda":
        return 1
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return 4 * _SM_COUNT[device]


@functools.lru_cache(maxsize=1024)
def _expand_plan(
    shape: tuple[int, int, int], spec: QuantSpec, d: int, dtype: torch.dtype, programs: int
) -> tuple[tuple[int, int, int], dict[str, Any]]:
    h, t, r = shape
    g = spec.group_size
    block_d = min(EXPAND_BLOCK_D, max(16, triton.next_power_of_2(d)))
    n_tiles = triton.cdiv(t, EXPAND_BLOCK_T)
    blocks = h * triton.cdiv(d, block_d)
    # Tiles per program: a power of two <= 8, as many as still leaves about `programs` programs.
    t_tiles = 1
    while t_tiles < 8 and n_tiles * blocks >= t_tiles * programs:
        t_tiles *= 2
    grid = (triton.cdiv(n_tiles, t_tiles), h, triton.cdiv(d, block_d))
    form = {"nf4": FORMAT_NF4, "fp16": FORMAT_FP16}.get(spec.format, FORMAT_INT)
    constexprs = dict(
        R=r,
        RP=max(16, triton.next_power_of_2(r)),
        G=g,
        NG=triton.cdiv(r, g),
        BITS=spec.bits,
        CHANNEL=spec.axis == "channel",
        FORMAT=form,
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
        BLOCK_T=EXPAND_BLOCK_T,
        BLOCK_D=block_d,
        T_TILES=t_tiles,
        num_warps=EXPAND_NUM_WARPS,
    )
    return grid, constexprs


def dequantize_expand(
    q: QuantizedTensor, basis: Tensor, mean: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Latent (H, T, r) in wire layout -> latent @ basis (+ mean) as (H, T, D) of `dtype`.

    basis: (H, r, D), any float dtype and strides (pass `P.transpose(-1, -2)` for
    a (H, D, r) projection). mean: (H, D) or None. The latent tile is dequantized
    in registers and multiplied with tl.dot (TF32 inputs for fp16/bf16 output,
    IEEE fp32 for fp32 output); fp32 accumulation.
    """
    _require_triton()
    check_packed(q)
    h, t, r = q.shape
    if basis.dim() != 3 or basis.shape[0] != h or basis.shape[1] != r:
        raise ValueError(f"basis must be (H={h}, r={r}, D), got {tuple(basis.shape)}")
    d = int(basis.shape[2])
    if mean is not None and tuple(mean.shape) != (h, d):
        raise ValueError(f"mean must be (H={h}, D={d}), got {tuple(mean.shape)}")
    device = q.codes.device
    for name, part in (("basis", basis), ("mean", mean)):
        if part is not None and part.device != device:
            raise ValueError(f"{name} is on {part.device} but codes are on {device}")
    if h * t * d > _MAX_ELEMS:
        raise ValueError(f"output of shape {(h, t, d)} has more than {_MAX_ELEMS} elements")
    out = torch.empty((h, t, d), dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    grid, constexprs = _expand_plan(tuple(q.shape), q.spec, d, dtype, _programs_wanted(device))  # type: ignore[arg-type]
    fp16 = q.spec.format == "fp16"
    codes = q.codes.view(torch.float16) if fp16 else q.codes
    scale = q.scale.contiguous() if q.scale is not None else basis
    zero = q.zero.contiguous() if q.zero is not None else scale
    lut = nf4_lut(device) if q.spec.format == "nf4" else scale
    mean_arg = mean if mean is not None else basis
    _dequant_expand_kernel[grid](
        codes,
        scale,
        zero,
        lut,
        basis,
        mean_arg,
        out,
        t,
        triton.cdiv(t, q.spec.group_size),
        d,
        q.codes.numel(),
        basis.stride(0),
        basis.stride(1),
        basis.stride(2),
        mean.stride(0) if mean is not None else 0,
        mean.stride(1) if mean is not None else 0,
        HAS_MEAN=mean is not None,
        **constexprs,
    )
    return out
