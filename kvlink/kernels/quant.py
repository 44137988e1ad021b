"""Triton sender kernels: (H, T, D) float -> wire layout, byte-for-byte the reference's output.

Two launches per tensor: a statistics kernel writes the float16 scale (and zero)
of every group, then a pack kernel recomputes each element's code against
those float16 values and writes the LSB-first code stream. Bit-exactness with
`kvlink.quant` (intq.py, nf4.py) comes from doing the same float32 operations
in the same order:

- INT: zero = min rounded down to float16, scale = (max - zero) / (2^b - 1)
  rounded up to float16 (round to nearest, then one float16 step where that went
  the wrong way), 1 where that is 0; IEEE division (tl.math.div_rn: Triton's `/`
  is approximate on NVIDIA); code = clamp(round_half_even((x - zero) / scale), 0, 2^b - 1).
- NF4: scale = fp16(absmax), 1 where 0; y = x / scale (IEEE); code = number of
  level midpoints strictly below y (the reference's torch.bucketize), with the
  midpoints computed on the host by the same float32 expression.

The pack kernel walks the stream by units exactly like the dequantize kernel
(see kvlink.kernels.dequant): codes of a unit are shifted into one word, whose
bytes are stored; codes past the end are 0, so the unused high bits of the
last byte are 0.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from kvlink.kernels._triton import HAS_TRITON, tl, triton
from kvlink.kernels.dequant import BLOCK_ELEMS, UNITS, _group_index, _layout, _unit_aligned
from kvlink.quant import QuantizedTensor, QuantSpec

STATS_BLOCK_ELEMS = 4096  # elements loaded per program by the statistics kernels
FUSED_BLOCK_ELEMS = 4096  # elements per program of the single-pass kernels
CHANNEL_BLOCK_D = 64  # channels per program of the channel-axis kernels


@triton.jit
def _round_half_even(v):
    """torch.round on float32 (ties to even), from floor only (no libdevice dependency)."""
    f = tl.floor(v)
    diff = v - f  # exact
    odd = f - 2.0 * tl.floor(f * 0.5)  # 1.0 when f is odd
    up = (diff > 0.5) | ((diff == 0.5) & (odd == 1.0))
    return tl.where(up, f + 1.0, f)


@triton.jit
def _fp16_round(x, DOWN: tl.constexpr):
    """float32 -> float16 rounded toward -inf (DOWN) or +inf: the reference's fp16_round (RNE, then nextafter)."""
    h = x.to(tl.float16)
    hf = h.to(tl.float32)
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    if DOWN:
        wrong = hf > x
        # nextafter(h, -inf): -0 and +0 go to the smallest negative subnormal (0x8001)
        step = tl.where(hf > 0.0, -1, 1)
        moved = tl.where(hf == 0.0, 0x8001, bits + step)
    else:
        wrong = hf < x
        step = tl.where(hf > 0.0, 1, -1)
        moved = tl.where(hf == 0.0, 0x0001, bits + step)
    moved16 = moved.to(tl.int16).to(tl.float16, bitcast=True)  # int32 -> int16 truncates: 0x8001 stays
    return tl.where(wrong, moved16, h)


@triton.jit
def _group_scale_zero(lo, hi, amax, QMAX: tl.constexpr, NF4: tl.constexpr):
    """Per-group statistics -> (scale as float32, never 0; zero as float16, unused for NF4)."""
    if NF4:
        s = amax.to(tl.float16).to(tl.float32)
        zero = s.to(tl.float16)
    else:
        zero = _fp16_round(lo, True)
        rng = hi - zero.to(tl.float32)
        s = _fp16_round(tl.math.div_rn(rng, tl.full(rng.shape, QMAX, tl.float32)), False).to(tl.float32)
    s = tl.where(s == 0.0, 1.0, s)  # constant (or all-zero) group -> scale 1
    return s, zero


@triton.jit
def _finish_stats(lo, hi, amax, scale_ptr, zero_ptr, offs, smask, QMAX: tl.constexpr, NF4: tl.constexpr):
    s, zero = _group_scale_zero(lo, hi, amax, QMAX, NF4)
    tl.store(scale_ptr + offs, s.to(tl.float16), mask=smask)
    if not NF4:
        tl.store(zero_ptr + offs, zero, mask=smask)


@triton.jit
def _codes(x, s, z, mid_ptr, QMAX: tl.constexpr, NF4: tl.constexpr):
    """float32 values and their group's float32 scale/zero (broadcastable to x) -> int32 codes."""
    s = tl.broadcast_to(s, x.shape)  # div_rn does not broadcast
    if NF4:
        y = tl.math.div_rn(x, s)
        code = tl.zeros(x.shape, tl.int32)
        for i in tl.static_range(15):  # number of level midpoints strictly below y
            code += (tl.load(mid_ptr + i) < y).to(tl.int32)
    else:
        v = _round_half_even(tl.math.div_rn(x - z, s))
        code = tl.minimum(tl.maximum(v, 0.0), QMAX * 1.0).to(tl.int32)
    return code


@triton.jit
def _quant_token_kernel(
    x_ptr,
    scale_ptr,
    zero_ptr,
    mid_ptr,
    codes_ptr,
    n_rows,
    D: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    BITS: tl.constexpr,
    UNIT_BYTES: tl.constexpr,
    UNIT_CODES: tl.constexpr,
    QMAX: tl.constexpr,
    NF4: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Single pass, token axis, when G divides D and the unit divides G (powers of two)."""
    GU: tl.constexpr = G // UNIT_CODES  # units per group
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # row = h * T + t
    gi = tl.arange(0, NG)
    ui = tl.arange(0, GU)
    ci = tl.arange(0, UNIT_CODES)
    col = gi[:, None, None] * G + ui[None, :, None] * UNIT_CODES + ci[None, None, :]  # (NG, GU, C)
    rmask = r < n_rows
    x = tl.load(x_ptr + r[:, None, None, None] * D + col[None], mask=rmask[:, None, None, None], other=0.0)
    x = x.to(tl.float32)  # (ROWS, NG, GU, C)
    lo = tl.min(tl.min(x, axis=3), axis=2)  # (ROWS, NG); groups are whole, nothing masked inside
    hi = tl.max(tl.max(x, axis=3), axis=2)
    amax = tl.max(tl.max(tl.abs(x), axis=3), axis=2)
    s, zero = _group_scale_zero(lo, hi, amax, QMAX, NF4)
    soff = r[:, None] * NG + gi[None, :]
    tl.store(scale_ptr + soff, s.to(tl.float16), mask=rmask[:, None])
    if not NF4:
        tl.store(zero_ptr + soff, zero, mask=rmask[:, None])
    code = _codes(x, s[:, :, None, None], zero.to(tl.float32)[:, :, None, None], mid_ptr, QMAX, NF4)
    word = tl.sum(code << (ci * BITS)[None, None, None, :], axis=3)  # (ROWS, NG, GU): disjoint bits
    unit = r[:, None, None] * (D // UNIT_CODES) + (gi[:, None] * GU + ui[None, :])[None]
    for k in tl.static_range(UNIT_BYTES):
        byte = ((word >> (8 * k)) & 0xFF).to(tl.uint8)
        tl.store(codes_ptr + unit * UNIT_BYTES + k, byte, mask=rmask[:, None, None])


@triton.jit
def _quant_channel_kernel(
    x_ptr,
    scale_ptr,
    zero_ptr,
    mid_ptr,
    codes_ptr,
    T,
    NGT,
    D: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    BITS: tl.constexpr,
    UNIT_BYTES: tl.constexpr,
    UNIT_CODES: tl.constexpr,
    QMAX: tl.constexpr,
    NF4: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Single pass, channel axis: one program = one token group x BLOCK_D channels (D % unit == 0)."""
    DU: tl.constexpr = BLOCK_D // UNIT_CODES
    pid = tl.program_id(0)  # h * NGT + token group
    h = pid // NGT
    tg = pid - h * NGT
    j = tl.arange(0, GP)
    t = tg * G + j
    tmask = (j < G) & (t < T)
    du = tl.arange(0, DU)
    ci = tl.arange(0, UNIT_CODES)
    d0 = tl.program_id(1) * BLOCK_D + du * UNIT_CODES  # first channel of each unit
    d = d0[:, None] + ci[None, :]  # (DU, C)
    dmask = d < D
    m = tmask[:, None, None] & dmask[None]  # (GP, DU, C)
    x = tl.load(x_ptr + ((h * T + t) * D)[:, None, None] + d[None], mask=m, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(m, x, float("inf")), axis=0)  # (DU, C)
    hi = tl.max(tl.where(m, x, float("-inf")), axis=0)
    amax = tl.max(tl.where(m, tl.abs(x), 0.0), axis=0)
    lo = tl.where(dmask, lo, 0.0)  # channels past D: keep their (unused) statistics finite
    hi = tl.where(dmask, hi, 0.0)
    s, zero = _group_scale_zero(lo, hi, amax, QMAX, NF4)
    soff = pid * D + d
    tl.store(scale_ptr + soff, s.to(tl.float16), mask=dmask)
    if not NF4:
        tl.store(zero_ptr + soff, zero, mask=dmask)
    code = _codes(x, s[None], zero.to(tl.float32)[None], mid_ptr, QMAX, NF4)
    code = tl.where(m, code, 0)
    word = tl.sum(code << (ci * BITS)[None, None, :], axis=2)  # (GP, DU)
    unit = ((h * T + t) * (D // UNIT_CODES))[:, None] + (d0 // UNIT_CODES)[None, :]
    umask = tmask[:, None] & (d0 < D)[None, :]
    for k in tl.static_range(UNIT_BYTES):
        byte = ((word >> (8 * k)) & 0xFF).to(tl.uint8)
        tl.store(codes_ptr + unit * UNIT_BYTES + k, byte, mask=umask)


@triton.jit
def _stats_token_kernel(
    x_ptr,
    scale_ptr,
    zero_ptr,
    mid_ptr,
    codes_ptr,
    n_groups,
    D: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    GP: tl.constexpr,
    QMAX: tl.constexpr,
    NF4: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
):
    q = tl.program_id(0) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)  # group index = scale offset
    row = q // NG  # h * T + t
    gd = q - row * NG
    j = tl.arange(0, GP)
    d = gd[:, None] * G + j[None, :]  # (groups, GP) channel
    m = (q < n_groups)[:, None] & (j < G)[None, :] & (d < D)
    x = tl.load(x_ptr + row[:, None] * D + d, mask=m, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(m, x, float("inf")), axis=1)
    hi = tl.max(tl.where(m, x, float("-inf")), axis=1)
    amax = tl.max(tl.where(m, tl.abs(x), 0.0), axis=1)
    _finish_stats(lo, hi, amax, scale_ptr, zero_ptr, q, q < n_groups, QMAX, NF4)


@triton.jit
def _stats_channel_kernel(
    x_ptr,
    scale_ptr,
    zero_ptr,
    mid_ptr,
    codes_ptr,
    T,
    NGT,
    D,
    G: tl.constexpr,
    CHUNK: tl.constexpr,
    QMAX: tl.constexpr,
    NF4: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # h * NGT + token group
    h = pid // NGT
    tg = pid - h * NGT
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    lo = tl.full([BLOCK_D], float("inf"), tl.float32)
    hi = tl.full([BLOCK_D], float("-inf"), tl.float32)
    amax = tl.zeros([BLOCK_D], tl.float32)
    for c in tl.static_range(0, G, CHUNK):
        j = c + tl.arange(0, CHUNK)
        t = tg * G + j
        m = ((j < G) & (t < T))[:, None] & dmask[None, :]
        x = tl.load(x_ptr + (h * T + t)[:, None] * D + dd[None, :], mask=m, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(m, x, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(m, x, float("-inf")), axis=0))
        amax = tl.maximum(amax, tl.max(tl.where(m, tl.abs(x), 0.0), axis=0))
    _finish_stats(lo, hi, amax, scale_ptr, zero_ptr, pid * D + dd, dmask, QMAX, NF4)


@triton.jit
def _pack_kernel(
    x_ptr,
    scale_ptr,
    zero_ptr,
    mid_ptr,
    codes_ptr,
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
    u = tl.program_id(0) * BLOCK_UNITS + tl.arange(0, BLOCK_UNITS)  # unit index
    j = tl.arange(0, UNIT_CODES)
    e = u[:, None] * UNIT_CODES + j[None, :]  # flat index into (H, T, D)
    mask = e < n_elem
    x = tl.load(x_ptr + e, mask=mask, other=0.0).to(tl.float32)

    gi, gmask = _group_index(u, j, e, mask, n_elem, T, NGT, D, G, NG, UNIT_CODES, CHANNEL, ALIGNED)
    s = tl.load(scale_ptr + gi, mask=gmask, other=1.0).to(tl.float32)
    if NF4:
        z = s
    else:
        z = tl.load(zero_ptr + gi, mask=gmask, other=0.0).to(tl.float32)
    code = _codes(x, s, z, mid_ptr, (1 << BITS) - 1, NF4)
    code = tl.where(mask, code, 0)
    word = tl.sum(code << (j[None, :] * BITS), axis=1)  # (units,): disjoint bits, so sum == or
    for k in tl.static_range(UNIT_BYTES):
        off = u * UNIT_BYTES + k
        tl.store(codes_ptr + off, ((word >> (8 * k)) & 0xFF).to(tl.uint8), mask=off < n_bytes)


# --- host side ---------------------------------------------------------------
# Every kernel takes (x, scale, zero, NF4 midpoints, codes) first, so a plan (the
# launches for one shape and spec, cached) is a list of (kernel, grid, scalars, constexprs).

_MIDPOINTS: dict[torch.device, Tensor] = {}


def nf4_midpoints(device: torch.device) -> Tensor:
    """The 15 NF4 decision boundaries, float32, computed exactly as the reference does."""
    mid = _MIDPOINTS.get(device)
    if mid is None:
        from kvlink.quant.nf4 import NF4_LEVELS

        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
        mid = _MIDPOINTS[device] = ((levels[1:] + levels[:-1]) / 2).to(device)  # (15,)
    return mid


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


Launch = tuple[Any, tuple[int, ...], tuple[int, ...], dict[str, Any]]


@functools.lru_cache(maxsize=1024)
def _quant_plan(shape: tuple[int, int, int], spec: QuantSpec, fused: bool = True) -> tuple[Launch, ...]:
    """One fused launch where the tile shapes allow it (head_dim 64/128 with the usual groups), else two."""
    h, t, d = shape
    n, n_bytes, _ = _layout(shape, spec)
    bits, g = spec.bits, spec.group_size
    unit_bytes, unit_codes = UNITS[bits]
    nf4, channel = spec.format == "nf4", spec.axis == "channel"
    qmax = (1 << bits) - 1
    ngt = triton.cdiv(t, g)
    grid: tuple[int, ...]
    common = dict(BITS=bits, UNIT_BYTES=unit_bytes, UNIT_CODES=unit_codes, QMAX=qmax, NF4=nf4, num_warps=4)
    if not fused:
        pass
    elif channel:
        block_d = min(CHANNEL_BLOCK_D, triton.next_power_of_2(d))
        gp = triton.next_power_of_2(g)
        if d % unit_codes == 0 and block_d >= unit_codes and gp * block_d <= 2 * FUSED_BLOCK_ELEMS:
            grid = (h * ngt, triton.cdiv(d, block_d))
            if gp * block_d > FUSED_BLOCK_ELEMS:  # a group of 128 tokens: spread the tile over 8 warps
                common["num_warps"] = 8
            return (
                (_quant_channel_kernel, grid, (t, ngt), dict(D=d, G=g, GP=gp, BLOCK_D=block_d, **common)),
            )
    else:
        ge = min(g, d)  # a group longer than the row is the row
        if _pow2(d) and _pow2(ge) and ge % unit_codes == 0:
            rows = max(1, FUSED_BLOCK_ELEMS // d)
            grid = (triton.cdiv(h * t, rows),)
            return ((_quant_token_kernel, grid, (h * t,), dict(D=d, G=ge, NG=d // ge, ROWS=rows, **common)),)
    # General case: statistics, then pack.
    launches: list[Launch] = []
    if channel:
        block_d = min(CHANNEL_BLOCK_D, triton.next_power_of_2(d))
        chunk = min(triton.next_power_of_2(g), max(1, STATS_BLOCK_ELEMS // block_d))
        grid = (h * ngt, triton.cdiv(d, block_d))
        launches.append(
            (
                _stats_channel_kernel,
                grid,
                (t, ngt, d),
                dict(G=g, CHUNK=chunk, QMAX=qmax, NF4=nf4, BLOCK_D=block_d),
            )
        )
    else:
        gp = triton.next_power_of_2(min(g, d))
        n_groups = h * t * triton.cdiv(d, g)
        block_groups = max(1, STATS_BLOCK_ELEMS // gp)
        grid = (triton.cdiv(n_groups, block_groups),)
        constexprs = dict(
            D=d, G=g, NG=triton.cdiv(d, g), GP=gp, QMAX=qmax, NF4=nf4, BLOCK_GROUPS=block_groups
        )
        launches.append((_stats_token_kernel, grid, (n_groups,), constexprs))
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
        NF4=nf4,
        ALIGNED=_unit_aligned(d, g, unit_codes, channel),
        BLOCK_UNITS=block_units,
        num_warps=4,
    )
    launches.append((_pack_kernel, grid, (n, n_bytes, t, ngt), constexprs))
    return tuple(launches)


def quantize_pack(x: Tensor, spec: QuantSpec, fused: bool = True) -> QuantizedTensor:
    """x: (H, T, D) float -> QuantizedTensor whose codes, scale and zero equal the reference's bytes.

    `fused=False` forces the general two-launch path (statistics, then pack); tests use it.
    """
    if not HAS_TRITON:
        raise RuntimeError("the Triton kernels need the 'triton' package (pip install triton)")
    if x.dim() != 3:
        raise ValueError(f"expected a (H, T, D) tensor, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"expected a floating-point tensor, got dtype {x.dtype}")
    shape = (int(x.shape[0]), int(x.shape[1]), int(x.shape[2]))
    n, n_bytes, sshape = _layout(shape, spec)
    if spec.format == "fp16":  # no quantization: a dtype cast is all there is
        half = x.to(torch.float16, copy=True).contiguous()
        return QuantizedTensor(spec=spec, shape=shape, codes=half.reshape(-1).view(torch.uint8))
    x = x.contiguous()
    device = x.device
    scale = torch.empty(sshape, dtype=torch.float16, device=device)  # type: ignore[arg-type]
    zero = None if spec.format == "nf4" else torch.empty(sshape, dtype=torch.float16, device=device)  # type: ignore[arg-type]
    codes = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    if n == 0:
        return QuantizedTensor(spec=spec, shape=shape, codes=codes, scale=scale, zero=zero)
    zero_arg = zero if zero is not None else scale
    mid = nf4_midpoints(device) if spec.format == "nf4" else scale
    for kernel, grid, scalars, constexprs in _quant_plan(shape, spec, fused):
        kernel[grid](x, scale, zero_arg, mid, codes, *scalars, **constexprs)
    return QuantizedTensor(spec=spec, shape=shape, codes=codes, scale=scale, zero=zero)
