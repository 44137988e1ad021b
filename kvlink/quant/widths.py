"""INT keys with a bit width per channel: formats 'int4w', 'int3w' and 'int2w' (mean width 4, 3, 2).

Uniform INT keys give every channel the same bits, so every channel gets the same
error relative to its range. What the receiver's attention sees is q . k_hat, and
the question's queries weigh the channels very unequally: a channel's share of
the logit error is about E[q_i^2] * range_i^2 * 4^-w_i. Given those weights, the
widths w_i that minimize the sum at a fixed mean are found greedily (the
objective is separable and convex in each w_i), and the message carries them:
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlink.quant.base import (
    WIDTH_FORMATS,
    QuantizedTensor,
    Quantizer,
    QuantSpec,
    register,
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
    "WIDTH_FORMATS",
    "WidthQuantizer",
    "allocate_widths",
    "channel_weights",
    "check_width_tensor",
    "check_widths",
    "group_stats",
    "pack_codes",
    "pack_widths",
    "quantize_widths",
    "unpack_codes",
    "unpack_widths",
    "width_offsets",
]

MAX_WIDTH = 8


def mean_width(spec: QuantSpec) -> int:
    if spec.format not in WIDTH_FORMATS:
        raise ValueError(
            f"format {spec.format!r} has no per-channel widths; those are {tuple(WIDTH_FORMATS)}"
        )
    return WIDTH_FORMATS[spec.format]


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


def pack_codes(codes: Tensor, widths: Tensor) -> Tensor:
    """(H, T, D) integer codes, code (h, t, i) < 2^w[h, i] -> the variable-width stream (uint8).

    Every code lands in at most two bytes (w <= 8); codes of one row never share bits,
    so adding the shifted pieces into the bytes is the same as OR-ing them.
    """
    h, t = int(codes.shape[0]), int(codes.shape[1])
    device = codes.device
    bit, row_bits = _bit_positions(widths, t, device)
    n_bytes = h * t * row_bits // 8
    if n_bytes == 0:
        return torch.zeros(0, dtype=torch.uint8, device=device)
    value = codes.to(torch.int64) << (bit & 7)  # at most 15 bits
    byte = bit >> 3
    out = torch.zeros(
        n_bytes + 2, dtype=torch.int64, device=device
    )  # a last width-0 code points past the end
    out.index_add_(0, byte.reshape(-1), (value & 0xFF).reshape(-1))
    out.index_add_(0, (byte + 1).reshape(-1), (value >> 8).reshape(-1))
    return out[:n_bytes].to(torch.uint8)


def unpack_codes(packed: Tensor, widths: Tensor, t: int) -> Tensor:
    """Inverse of `pack_codes`: (H, T, D) uint8 codes from the stream and the (H, D) widths."""
    h, d = (int(s) for s in widths.shape)
    device = packed.device
    if h * t * d == 0:
        return torch.zeros(h, t, d, dtype=torch.uint8, device=device)
    bit, _ = _bit_positions(widths, t, device)
    data = torch.cat([packed.to(torch.int64), packed.new_zeros(2, dtype=torch.int64)])
    byte = bit >> 3
    word = data[byte] | (data[byte + 1] << 8)
    mask = (1 << widths.to(device=device, dtype=torch.int64)) - 1  # (H, D)
    return ((word >> (bit & 7)) & mask[:, None, :]).to(torch.uint8)


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
    shape = check_input(x, spec, WidthQuantizer.formats)
    h, _, d = shape
    _check_spec(spec, d)
    check_widths(widths, h, d, mean_width(spec))
    widths = widths.to(device=x.device, dtype=torch.uint8)
    qmax = ((1 << widths.long()) - 1)[:, :, None]  # (H, D, 1) against groups (H, D, n_groups)
    xf = x.float()
    scale, zero = group_stats(group_view(xf, spec), qmax)
    scale, zero = group_stats_layout(scale, spec), group_stats_layout(zero, spec)
    s = expand_groups(scale.float(), shape, spec)
    z = expand_groups(zero.float(), shape, spec)
    codes = torch.minimum(torch.clamp(torch.round((xf - z) / s), min=0), qmax.transpose(1, 2).float())
    return QuantizedTensor(spec, shape, pack_codes(codes.long(), widths), scale, zero, widths)


def _check_spec(spec: QuantSpec, d: int) -> None:
    if spec.axis != "channel":
        raise ValueError(f"per-channel widths need the channel axis, got axis {spec.axis!r}")
    if (d * mean_width(spec)) % 8:
        raise ValueError(f"a row of {d} channels at mean width {mean_width(spec)} is not whole bytes")


@dataclass(frozen=True)
class WidthQuantizer(Quantizer):
    """INT keys, a width per channel. `quantize` alone gives every channel the mean width
    (`quantize_widths` takes an allocation); `dequantize` reads the widths the tensor carries."""

    formats: ClassVar[tuple[str, ...]] = tuple(WIDTH_FORMATS)

    def quantize(self, x: Tensor, spec: QuantSpec) -> QuantizedTensor:
        h, _, d = check_input(x, spec, self.formats)
        uniform = torch.full((h, d), mean_width(spec), dtype=torch.uint8, device=x.device)
        return quantize_widths(x, spec, uniform)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        check_width_tensor(q)
        assert q.widths is not None and q.scale is not None and q.zero is not None  # checked
        device = q.codes.device
        codes = unpack_codes(q.codes, q.widths.to(device), q.shape[1])
        s = expand_groups(q.scale.to(device=device, dtype=torch.float32), q.shape, q.spec)
        z = expand_groups(q.zero.to(device=device, dtype=torch.float32), q.shape, q.spec)
        return (codes.float() * s + z).to(dtype)


def check_width_tensor(q: QuantizedTensor) -> None:
    """Validate a per-channel-width tensor before any decoder reads it: its codes, scale and
    zero (kvlink.quant.intq.check_quantized), its spec, and widths that sum to the mean."""
    check_quantized(q, tuple(WIDTH_FORMATS))
    h, _, d = q.shape
    _check_spec(q.spec, d)
    if q.widths is None:
        raise ValueError(f"format {q.spec.format!r} needs the tensor's widths, got None")
    check_widths(q.widths, h, d, mean_width(q.spec))


register(WidthQuantizer())
