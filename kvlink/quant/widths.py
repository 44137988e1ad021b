"""INT keys with a bit width per channel (formats 'int4cw', 'int3cw', 'int2cw': mean width 4, 3, 2)
and INT values with a bit width per token row ('int4rw', 'int3rw', 'int2rw').

Uniform INT keys give every channel the same bits, so every channel gets the same
error relative to its range. What the receiver's attention sees is q . k_hat, and
the question's queries weigh the channels very unequally: a channel's share of
the logit error is about E[q_i^2] * range_i^2 / (2^w_i - 1)^2. Given those weights,
the widths w_i that minimize the sum at a fixed mean are found exactly by a dynamic
program (width 1 buys nothing over width 0, so a greedy would not do; see
`allocate_widths`), and the message carries them:
the same codes bytes as the uniform format at the mean width, plus the widths.
On the embedded model this cuts the KL of a K4 cache about 3x on the CPU
screen (bench/results/screen-cpu/run9-kchan-60q).

Layout of a (H, T, D) tensor (channel axis only; extends kvlink.quant.base):

- widths: (H, D) integers in [0, 8], one per KV head and channel; every head's
  widths sum to mean * D. On the wire a 4-bit LSB-first stream (ceil(H*D/2) bytes).
- codes: each (h, t) row is a run of mean * D bits (D * mean / 8 bytes, D a
  multiple of 8): the code of channel i starts at bit sum_{j<i} w[h, j] of the
  row, LSB first; rows in C order of (H, T). The stream has exactly n * mean / 8
  bytes, the size of the uniform format at the mean width.
- scale, zero: float16 per group of G tokens of a channel, (H, ceil(T/G), D),
  by the INT rule of kvlink.quant.intq with qmax = 2^w - 1 of the channel. A
  channel of width 0 has no code bits: zero is its group's midpoint (rounded to
  float16) and scale 1, so x_hat = zero.

Values: formats 'int4rw', 'int3rw' and 'int2rw' give every token row its own width
(token axis). What the receiver's attention makes of a value row is p_t * v_t, and
the question's attention mass p_t is as unequal over tokens as the queries are over
key channels: a row's share of the output error is about p_t * range_t^2 * 4^-w_t.
Widths are allocated from those weights with a floor of mean - 1 (the question is
only a proxy for the answer's attention: no row falls far below the mean), which
keeps the objective convex, so a greedy over the marginal gains is exact.

Layout of a (H, T, D) value tensor (token axis):

- widths: (H, T) integers in [0, 8], every head's summing to mean * T; on the wire
  the same 4-bit stream (ceil(H*T/2) bytes).
- codes: row (h, t) is D codes of w[h, t] bits; rows follow each other in C order
  of (H, T) in one LSB-first stream, so code (h, t, i) starts at bit
  D * S[h, t] + i * w[h, t], S the exclusive prefix sum of the widths in that
  order; exactly n * mean / 8 bytes, the uniform format's size.
- scale, zero: float16 per group of G channels of a row, (H, T, ceil(D/G)), by the
  INT rule with qmax = 2^w - 1 of the row; a row of width 0 is its groups' midpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlink.quant.base import (
    TOKEN_WIDTH_FORMATS,
    WIDTH_AXIS,
    WIDTH_FORMATS,
    QuantizedTensor,
    Quantizer,
    QuantSpec,
    register,
    widths_shape,
)
from kvlink.quant.intq import (
    check_input,
    check_quantized,
    expand_groups,
    group_stats_layout,
    group_view,
    scale_zero,
)
from kvlink.quant.pack import pack_bits, unpack_bits

__all__ = [
    "MAX_WIDTH",
    "TOKEN_WIDTH_FORMATS",
    "WIDTH_FORMATS",
    "TokenWidthQuantizer",
    "WidthQuantizer",
    "allocate_token_widths",
    "allocate_widths",
    "channel_weights",
    "check_width_tensor",
    "check_widths",
    "group_stats",
    "pack_codes",
    "pack_token_codes",
    "pack_widths",
    "quantize_token_widths",
    "quantize_widths",
    "token_weights",
    "unpack_codes",
    "unpack_token_codes",
    "unpack_widths",
    "width_offsets",
]

MAX_WIDTH = 8


def mean_width(spec: QuantSpec) -> int:
    if spec.format not in WIDTH_AXIS:
        raise ValueError(f"format {spec.format!r} has no widths; those are {tuple(WIDTH_AXIS)}")
    return WIDTH_FORMATS.get(spec.format) or TOKEN_WIDTH_FORMATS[spec.format]


def check_widths(widths: Tensor, h: int, d: int, mean: int) -> None:
    """ValueError unless `widths` is (h, d) with entries in [0, 8] and every row summing to mean * d."""
    if tuple(widths.shape) != (h, d):
        raise ValueError(f"widths must be ({h}, {d}), got {tuple(widths.shape)}")
    if widths.dtype.is_floating_point or widths.dtype == torch.bool:
        raise ValueError(f"widths must be integers, got dtype {widths.dtype}")
    if widths.numel() == 0:
        return
    w = widths.long()
    lo, hi = int(w.min()), int(w.max())
    if lo < 0 or hi > MAX_WIDTH:
        raise ValueError(f"widths must lie in [0, {MAX_WIDTH}], got values in [{lo}, {hi}]")
    sums = w.sum(dim=1)
    bad = (sums != mean * d).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(
            f"the widths of head {row} sum to {int(sums[row])} bits, the format needs {mean * d}"
        )


def width_offsets(widths: Tensor) -> Tensor:
    """(H, D) widths -> (H, D) int64 bit offset of each channel's code within its row."""
    w = widths.long()
    return torch.cumsum(w, dim=1) - w


def pack_widths(widths: Tensor) -> Tensor:
    """(H, D) widths -> the 4-bit wire stream (uint8, ceil(H*D/2) bytes)."""
    return pack_bits(widths.to(torch.uint8), 4)


def unpack_widths(packed: Tensor, h: int, d: int) -> Tensor:
    """The 4-bit wire stream -> (H, D) uint8 widths (not validated: see check_widths)."""
    return unpack_bits(packed, 4, h * d).view(h, d)


def _bit_positions(widths: Tensor, t: int, device: torch.device) -> tuple[Tensor, int]:
    """(H, T, D) int64 stream position of each code's first bit, and the bits of one row."""
    h = int(widths.shape[0])
    row_bits = int(widths[0].long().sum()) if h else 0
    rows = torch.arange(h * t, device=device, dtype=torch.int64).view(h, t, 1)
    return rows * row_bits + width_offsets(widths).to(device)[:, None, :], row_bits


def _pack_at(codes: Tensor, bit: Tensor, n_bytes: int) -> Tensor:
    """Codes (any shape) whose first bits lie at `bit` (same shape) -> a stream of n_bytes (uint8).

    Every code lands in at most two bytes (w <= 8) and no two codes share a bit, so adding
    the shifted pieces into the bytes is the same as OR-ing them.
    """
    if n_bytes == 0:
        return torch.zeros(0, dtype=torch.uint8, device=codes.device)
    value = codes.to(torch.int64) << (bit & 7)  # at most 15 bits
    byte = bit >> 3
    out = torch.zeros(
        n_bytes + 2, dtype=torch.int64, device=codes.device
    )  # width-0 codes may point past the end
    out.index_add_(0, byte.reshape(-1), (value & 0xFF).reshape(-1))
    out.index_add_(0, (byte + 1).reshape(-1), (value >> 8).reshape(-1))
    return out[:n_bytes].to(torch.uint8)


def _unpack_at(packed: Tensor, bit: Tensor, width: Tensor) -> Tensor:
    """Inverse of `_pack_at`: the codes of `width` bits (broadcast to `bit`) at `bit` (uint8)."""
    data = torch.cat([packed.to(torch.int64), packed.new_zeros(2, dtype=torch.int64)])
    byte = bit >> 3
    word = data[byte] | (data[byte + 1] << 8)
    return ((word >> (bit & 7)) & ((1 << width.to(torch.int64)) - 1)).to(torch.uint8)


def pack_codes(codes: Tensor, widths: Tensor) -> Tensor:
    """(H, T, D) integer codes, code (h, t, i) < 2^w[h, i] -> the variable-width stream (uint8)."""
    h, t = int(codes.shape[0]), int(codes.shape[1])
    bit, row_bits = _bit_positions(widths, t, codes.device)
    return _pack_at(codes, bit, h * t * row_bits // 8)


def unpack_codes(packed: Tensor, widths: Tensor, t: int) -> Tensor:
    """Inverse of `pack_codes`: (H, T, D) uint8 codes from the stream and the (H, D) widths."""
    h, d = (int(s) for s in widths.shape)
    if h * t * d == 0:
        return torch.zeros(h, t, d, dtype=torch.uint8, device=packed.device)
    bit, _ = _bit_positions(widths, t, packed.device)
    return _unpack_at(packed, bit, widths.to(packed.device)[:, None, :])


def token_row_starts(widths: Tensor, d: int) -> Tensor:
    """(H, T) widths of the token rows -> (H, T) int64 stream bit where each row's codes begin."""
    w = widths.long().reshape(-1)
    return ((torch.cumsum(w, dim=0) - w) * d).view(widths.shape)


def _token_bit_positions(widths: Tensor, d: int, device: torch.device) -> Tensor:
    w = widths.to(device=device, dtype=torch.int64)
    channel = torch.arange(d, device=device, dtype=torch.int64)
    return token_row_starts(w, d)[:, :, None] + channel * w[:, :, None]


def pack_token_codes(codes: Tensor, widths: Tensor) -> Tensor:
    """(H, T, D) integer codes, code (h, t, i) < 2^w[h, t] -> the per-row-width stream (uint8)."""
    d = int(codes.shape[2])
    bit = _token_bit_positions(widths, d, codes.device)
    return _pack_at(codes, bit, int(widths.long().sum()) * d // 8)


def unpack_token_codes(packed: Tensor, widths: Tensor, d: int) -> Tensor:
    """Inverse of `pack_token_codes`: (H, T, D) uint8 codes from the stream and the (H, T) widths."""
    h, t = (int(s) for s in widths.shape)
    if h * t * d == 0:
        return torch.zeros(h, t, d, dtype=torch.uint8, device=packed.device)
    bit = _token_bit_positions(widths, d, packed.device)
    return _unpack_at(packed, bit, widths.to(packed.device)[:, :, None])


def group_stats(groups: Tensor, qmax: Tensor) -> tuple[Tensor, Tensor]:
    """Float16 (scale, zero) of groups (..., G) under per-group qmax (broadcast to groups[..., 0]).

    qmax >= 1: the INT rule (kvlink.quant.intq.scale_zero). qmax 0 (width 0): zero = the
    midpoint, scale 1.
    """
    q = torch.broadcast_to(qmax, groups.shape[:-1])
    scale, zero = scale_zero(groups, q.clamp_min(1))
    flat = q == 0
    mid = ((groups.amin(dim=-1).float() + groups.amax(dim=-1).float()) / 2).to(torch.float16)
    return torch.where(flat, torch.ones_like(scale), scale), torch.where(flat, mid, zero)


def channel_weights(x: Tensor, query_diag: Tensor, group_size: int) -> Tensor:
    """(H, D) float64 weight of each channel's rounding error in the attention logits.

    x: keys (H, T, D) as they will be quantized; query_diag: (H, D) mean (or sum) of q_i^2
    over the queries that read KV head h. Weight = query_diag * mean over the channel's
    groups of G tokens of (max - min)^2, the squared step of the channel at width 0.
    """
    h, t, d = (int(s) for s in x.shape)
    if tuple(query_diag.shape) != (h, d):
        raise ValueError(f"query_diag must be ({h}, {d}), got {tuple(query_diag.shape)}")
    if t == 0:
        return query_diag.double().clone()
    groups = group_view(x.float(), QuantSpec("int8", group_size, "channel"))  # (H, D, n_groups, G)
    span = (groups.amax(dim=-1) - groups.amin(dim=-1)).double()  # (H, D, n_groups)
    return query_diag.double().to(x.device) * (span**2).mean(dim=-1)


def distortion(width: int) -> float:
    """Error variance of min/max quantization at `width` bits, in units of range^2 / 12:
    step = range / (2^w - 1); width 0 (the midpoint) errs as much as width 1."""
    return 1.0 if width == 0 else 1.0 / ((1 << width) - 1) ** 2


def allocate_widths(weights: Tensor, mean: int, max_width: int = MAX_WIDTH) -> Tensor:
    """(H, D) weights -> (H, D) uint8 widths in [0, max_width], each row summing to mean * D,
    that minimize sum_i weights_i * distortion(w_i) exactly.

    A dynamic program over the channels and the bits spent so far (all heads at once:
    D steps of (H, mean * D + 1) tables). A greedy would not do: width 1 buys nothing
    over width 0, so the savings are not convex in the width. Ties go to the smaller
    width of the later channel. A row of zero weights gets the uniform mean.
    """
    if not 0 <= mean <= max_width:
        raise ValueError(f"mean width must be in [0, {max_width}], got {mean!r}")
    h, d = (int(s) for s in weights.shape)
    w = weights.double()
    if not torch.isfinite(w).all() or bool((w < 0).any()):
        raise ValueError("channel weights must be finite and non-negative")
    device = w.device
    total = mean * d
    cost = torch.tensor([distortion(b) for b in range(max_width + 1)], dtype=torch.float64, device=device)
    best = torch.full((h, total + 1), math.inf, dtype=torch.float64, device=device)
    best[:, 0] = 0.0
    reach = min(max_width, total)
    reversed_cost = cost[: reach + 1].flip(0)  # window slot k holds width reach - k
    choices = []
    for i in range(d):
        # windows[h, b, k] = best[h, b - reach + k]: the cost so far when channel i takes reach - k bits
        windows = torch.nn.functional.pad(best, (reach, 0), value=math.inf).unfold(1, reach + 1, 1)
        best, slot = (windows + w[:, i, None, None] * reversed_cost).min(dim=2)  # (H, total + 1)
        choices.append(reach - slot)
    widths = torch.zeros(h, d, dtype=torch.int64, device=device)
    spent = torch.full((h, 1), total, dtype=torch.int64, device=device)
    for i in range(d - 1, -1, -1):
        pick = choices[i].gather(1, spent)  # (H, 1)
        widths[:, i] = pick[:, 0]
        spent = spent - pick
    flat = (w.sum(dim=1) == 0)[:, None]
    return torch.where(flat, torch.full_like(widths, mean), widths).to(torch.uint8)


def quantize_widths(x: Tensor, spec: QuantSpec, widths: Tensor) -> QuantizedTensor:
    """Keys (H, T, D) -> codes, scale and zero in the layout above, channel (h, i) at widths[h, i] bits."""
    return _quantize_with(x, spec, widths, WidthQuantizer.formats)


def _quantize_with(x: Tensor, spec: QuantSpec, widths: Tensor, formats: tuple[str, ...]) -> QuantizedTensor:
    """Either layout: widths (H, A) hold one width per row A of `group_view` (a channel of the
    channel axis, a token of the token axis), which sets the qmax of all that row's groups."""
    shape = check_input(x, spec, formats)
    _check_spec(spec, shape[2])
    check_widths(widths, *widths_shape(shape, spec), mean_width(spec))
    widths = widths.to(device=x.device, dtype=torch.uint8)
    qmax = ((1 << widths.long()) - 1)[:, :, None]  # (H, A, 1) against groups (H, A, n_groups)
    xf = x.float()
    scale, zero = group_stats(group_view(xf, spec), qmax)
    scale, zero = group_stats_layout(scale, spec), group_stats_layout(zero, spec)
    s = expand_groups(scale.float(), shape, spec)
    z = expand_groups(zero.float(), shape, spec)
    token = spec.axis == "token"
    per_element = qmax if token else qmax.transpose(1, 2)  # broadcast to (H, T, D)
    codes = torch.minimum(torch.clamp(torch.round((xf - z) / s), min=0), per_element.float()).long()
    packed = pack_token_codes(codes, widths) if token else pack_codes(codes, widths)
    return QuantizedTensor(spec, shape, packed, scale, zero, widths)


def _check_spec(spec: QuantSpec, d: int) -> None:
    axis = WIDTH_AXIS[spec.format]
    if spec.axis != axis:
        what = "per-channel" if axis == "channel" else "per-token"
        raise ValueError(f"{what} widths ({spec.format!r}) need the {axis} axis, got axis {spec.axis!r}")
    if (d * mean_width(spec)) % 8:
        raise ValueError(f"a row of {d} channels at mean width {mean_width(spec)} is not whole bytes")


def token_weights(x: Tensor, mass: Tensor, group_size: int) -> Tensor:
    """(H, T) float64 weight of each value row's rounding error in the attention outputs.

    x: values (H, T, D) as they will be quantized; mass: (H, T) attention the observed queries
    of KV head h give row t. Weight = mass * mean over the row's groups of G channels of
    (max - min)^2.
    """
    h, t, d = (int(s) for s in x.shape)
    if tuple(mass.shape) != (h, t):
        raise ValueError(f"attention mass must be ({h}, {t}), got {tuple(mass.shape)}")
    if t == 0 or d == 0:
        return mass.double().clone()
    groups = group_view(x.float(), QuantSpec("int8", group_size, "token"))  # (H, T, n_groups, G)
    span = (groups.amax(dim=-1) - groups.amin(dim=-1)).double()
    return mass.double().to(x.device) * (span**2).mean(dim=-1)


def allocate_token_widths(weights: Tensor, mean: int, max_width: int = MAX_WIDTH) -> Tensor:
    """(H, T) weights -> (H, T) uint8 widths in [mean - 1, max_width], each row summing to
    mean * T, that minimize sum_t weights_t * distortion(w_t) exactly.

    On [1, max_width] the distortion is convex, so the best allocation takes the largest
    marginal gains weights_t * (distortion(w) - distortion(w + 1)) over all rows and steps;
    a stable sort makes ties go to the earlier row and step. A head of zero weights gets the
    uniform mean.
    """
    if not 2 <= mean < max_width:
        raise ValueError(f"mean width of token rows must be in [2, {max_width - 1}], got {mean!r}")
    h, t = (int(s) for s in weights.shape)
    w = weights.double()
    if not torch.isfinite(w).all() or bool((w < 0).any()):
        raise ValueError("token weights must be finite and non-negative")
    floor = mean - 1
    steps = max_width - floor
    drop = torch.tensor(
        [distortion(b) - distortion(b + 1) for b in range(floor, max_width)],
        dtype=torch.float64,
        device=w.device,
    )
    gains = (w[:, :, None] * drop).reshape(h, t * steps)  # row-major: (row, step)
    order = torch.sort(gains, dim=1, descending=True, stable=True).indices[:, :t]  # T extra bits per head
    extra = torch.zeros(h, t, dtype=torch.int64, device=w.device)
    extra.scatter_add_(1, order // steps, torch.ones_like(order))
    widths = floor + extra
    flat = (w.sum(dim=1) == 0)[:, None]
    return torch.where(flat, torch.full_like(widths, mean), widths).to(torch.uint8)


def quantize_token_widths(x: Tensor, spec: QuantSpec, widths: Tensor) -> QuantizedTensor:
    """Values (H, T, D) -> codes, scale and zero in the token layout above, row (h, t) at widths[h, t] bits."""
    return _quantize_with(x, spec, widths, TokenWidthQuantizer.formats)


@dataclass(frozen=True)
class _WidthsQuantizer(Quantizer):
    """Either layout: `quantize` alone gives every row of `group_view` (a channel, or a token row)
    the mean width; `dequantize` reads the widths the tensor carries."""

    def quantize(self, x: Tensor, spec: QuantSpec) -> QuantizedTensor:
        shape = check_input(x, spec, self.formats)
        uniform = torch.full(widths_shape(shape, spec), mean_width(spec), dtype=torch.uint8, device=x.device)
        return _quantize_with(x, spec, uniform, self.formats)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        check_width_tensor(q)
        assert q.widths is not None  # checked
        widths = q.widths.to(q.codes.device)
        if WIDTH_AXIS[q.spec.format] == "token":
            codes = unpack_token_codes(q.codes, widths, q.shape[2])
        else:
            codes = unpack_codes(q.codes, widths, q.shape[1])
        assert q.scale is not None and q.zero is not None  # check_width_tensor
        s = expand_groups(q.scale.to(device=codes.device, dtype=torch.float32), q.shape, q.spec)
        z = expand_groups(q.zero.to(device=codes.device, dtype=torch.float32), q.shape, q.spec)
        return (codes.float() * s + z).to(dtype)


@dataclass(frozen=True)
class WidthQuantizer(_WidthsQuantizer):
    """INT keys, a width per channel (`quantize_widths` takes an allocation)."""

    formats: ClassVar[tuple[str, ...]] = tuple(WIDTH_FORMATS)


@dataclass(frozen=True)
class TokenWidthQuantizer(_WidthsQuantizer):
    """INT values, a width per token row (`quantize_token_widths` takes an allocation)."""

    formats: ClassVar[tuple[str, ...]] = tuple(TOKEN_WIDTH_FORMATS)


def check_width_tensor(q: QuantizedTensor) -> None:
    """Validate a tensor of a widths format before any decoder reads it: its codes, scale and
    zero (kvlink.quant.intq.check_quantized), its spec, and widths that sum to the mean."""
    check_quantized(q, tuple(WIDTH_AXIS))
    _check_spec(q.spec, q.shape[2])
    if q.widths is None:
        raise ValueError(f"format {q.spec.format!r} needs the tensor's widths, got None")
    check_widths(q.widths, *widths_shape(q.shape, q.spec), mean_width(q.spec))


register(WidthQuantizer())
register(TokenWidthQuantizer())
