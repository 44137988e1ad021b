"""Asymmetric group-wise integer quantization (INT8/4/3/2): the torch reference of the wire layout.

Per group (see kvlink.quant.base for the grouping): zero = min rounded DOWN to
float16, scale = (max - zero) / (2^b - 1) rounded UP to float16, both before the
codes are computed, so the decoder's x_hat = code * scale + zero uses exactly
the values the encoder rounded against. Directed rounding keeps every value
inside [zero, zero + (2^b - 1) * scale]: no code is ever clamped, and the error
is at most scale / 2 even for groups whose values are large against their
spread (a key channel near 300, say), where round-to-nearest zero would clamp.
code = clamp(round((x - zero) / scale), 0, 2^b - 1) in float32 (true division,
round half to even). A group whose float16 scale is 0 (a constant group) gets
scale 1, which keeps its codes at round(x - zero), 0 for any realistic cache value.

This module also holds the grouping and validation helpers shared by the NF4
and FP16 quantizers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlink.quant.base import QuantizedTensor, Quantizer, QuantSpec, packed_size, register, scale_shape
from kvlink.quant.pack import pack_bits, unpack_bits

__all__ = [
    "IntQuantizer",
    "check_input",
    "check_quantized",
    "expand_groups",
    "group_stats_layout",
    "group_view",
    "scale_zero",
]


def check_input(x: Tensor, spec: QuantSpec, formats: Iterable[str]) -> tuple[int, int, int]:
    """Validate a quantizer's input and return its (H, T, D) shape."""
    if spec.format not in formats:
        raise ValueError(f"this quantizer handles formats {tuple(formats)}, got spec format {spec.format!r}")
    if x.dim() != 3:
        raise ValueError(f"expected a (H, T, D) tensor, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"expected a floating-point tensor, got dtype {x.dtype}")
    h, t, d = x.shape
    return (int(h), int(t), int(d))


def check_quantized(q: QuantizedTensor, formats: Iterable[str]) -> None:
    """Validate that a QuantizedTensor's parts have the sizes and shapes its spec and shape imply."""
    spec = q.spec
    if spec.format not in formats:
        raise ValueError(f"this quantizer handles formats {tuple(formats)}, got spec format {spec.format!r}")
    shape = tuple(q.shape)
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"shape must be three non-negative ints (H, T, D), got {q.shape!r}")
    n = shape[0] * shape[1] * shape[2]
    expected = packed_size(n, spec.bits)
    if q.codes.dtype != torch.uint8 or q.codes.dim() != 1 or q.codes.numel() != expected:
        raise ValueError(
            f"codes must be a 1-D uint8 tensor of {expected} bytes for shape {shape} and format {spec.format!r}, "
            f"got dtype {q.codes.dtype} shape {tuple(q.codes.shape)}"
        )
    sshape = scale_shape(q.shape, spec)
    for name, part, needed in (("scale", q.scale, spec.has_scale), ("zero", q.zero, spec.has_zero)):
        if not needed:
            if part is not None:
                raise ValueError(
                    f"format {spec.format!r} has no {name}, got a tensor of shape {tuple(part.shape)}"
                )
        elif part is None:
            raise ValueError(f"format {spec.format!r} needs a {name} of shape {sshape}, got None")
        elif tuple(part.shape) != sshape:
            raise ValueError(f"{name} must have shape {sshape} for shape {shape}, got {tuple(part.shape)}")


def group_view(x: Tensor, spec: QuantSpec) -> Tensor:
    """(H, T, D) -> groups (H, A, ceil(L/G), G) along the grouped axis of length L.

    Token axis: A = T, L = D (groups of channels within each row). Channel axis:
    A = D, L = T (groups of tokens within each column). The last group is padded
    to G by repeating its last value, which changes neither its min, max nor absmax.
    """
    g = spec.group_size
    rows = x if spec.axis == "token" else x.transpose(1, 2)  # (H, A, L)
    length = rows.shape[-1]
    n_groups = math.ceil(length / g)
    pad = n_groups * g - length
    if pad:
        rows = torch.cat([rows, rows[..., -1:].expand(*rows.shape[:-1], pad)], dim=-1)  # (H, A, n_groups*G)
    return rows.reshape(*rows.shape[:-1], n_groups, g)


def group_stats_layout(stats: Tensor, spec: QuantSpec) -> Tensor:
    """Per-group statistics (H, A, n_groups) from `group_view` -> wire layout `scale_shape` (contiguous)."""
    if spec.axis == "token":
        return stats.contiguous()  # (H, T, ceil(D/G))
    return stats.transpose(1, 2).contiguous()  # (H, D, ceil(T/G)) -> (H, ceil(T/G), D)


def expand_groups(s: Tensor, shape: tuple[int, int, int], spec: QuantSpec) -> Tensor:
    """A per-group tensor in wire layout (`scale_shape`) broadcast to one value per element, (H, T, D)."""
    _, t, d = shape
    g = spec.group_size
    if spec.axis == "token":
        return s.repeat_interleave(g, dim=2)[:, :, :d]  # (H, T, ceil(D/G)*G) -> (H, T, D)
    return s.repeat_interleave(g, dim=1)[:, :t, :]  # (H, ceil(T/G)*G, D) -> (H, T, D)


def fp16_round(x: Tensor, down: bool) -> Tensor:
    """float32 -> float16 rounded toward -inf (`down`) or +inf, so the float16 value bounds x."""
    h = x.to(torch.float16)
    if down:
        wrong = h.float() > x
        toward = torch.full_like(h, float("-inf"))
    else:
        wrong = h.float() < x
        toward = torch.full_like(h, float("inf"))
    return torch.where(wrong, torch.nextafter(h, toward), h)


def scale_zero(groups: Tensor, qmax: int | Tensor) -> tuple[Tensor, Tensor]:
    """Float16 (scale, zero) of each group (..., G) -> (...): zero = min rounded down, scale =
    (max - zero) / qmax rounded up (1 for a constant group). qmax: one for all groups, or a
    tensor broadcast to groups[..., 0] (per-channel widths, kvlink.quant.widths)."""
    lo, hi = groups.amin(dim=-1).float(), groups.amax(dim=-1).float()
    zero = fp16_round(lo, down=True)
    # Divide by a tensor: CUDA turns division by a Python scalar into a reciprocal multiply,
    # which would make GPU and CPU senders emit different scale bytes.
    divisor = (
        torch.full_like(hi, qmax) if isinstance(qmax, int) else torch.broadcast_to(qmax, hi.shape).float()
    )
    scale = fp16_round((hi - zero.float()) / divisor, down=False)
    return torch.where(scale == 0, torch.ones_like(scale), scale), zero


@dataclass(frozen=True)
class IntQuantizer(Quantizer):
    """Asymmetric min/max quantization to b-bit unsigned codes with a float16 scale and zero per group."""

    formats: ClassVar[tuple[str, ...]] = ("int8", "int4", "int3", "int2")

    def quantize(self, x: Tensor, spec: QuantSpec) -> QuantizedTensor:
        """x: (H, T, D) float -> packed codes, scale and zero (float16, `scale_shape`)."""
        shape = check_input(x, spec, self.formats)
        qmax = (1 << spec.bits) - 1
        xf = x.float()
        groups = group_view(xf, spec)  # (H, A, n_groups, G)
        scale, zero = scale_zero(groups, qmax)  # (H, A, n_groups)
        scale, zero = group_stats_layout(scale, spec), group_stats_layout(zero, spec)
        s = expand_groups(scale.float(), shape, spec)  # (H, T, D)
        z = expand_groups(zero.float(), shape, spec)  # (H, T, D)
        codes = torch.clamp(torch.round((xf - z) / s), 0, qmax).to(torch.uint8)  # (H, T, D)
        return QuantizedTensor(
            spec=spec, shape=shape, codes=pack_bits(codes, spec.bits), scale=scale, zero=zero
        )

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """x_hat = code * scale + zero in float32, returned as (H, T, D) `dtype` on the codes' device."""
        check_quantized(q, self.formats)
        assert q.scale is not None and q.zero is not None  # checked above; narrows the types
        h, t, d = q.shape
        device = q.codes.device
        codes = unpack_bits(q.codes, q.spec.bits, h * t * d).view(h, t, d)
        s = expand_groups(q.scale.to(device=device, dtype=torch.float32), q.shape, q.spec)  # (H, T, D)
        z = expand_groups(q.zero.to(device=device, dtype=torch.float32), q.shape, q.spec)  # (H, T, D)
        return (codes.float() * s + z).to(dtype)


register(IntQuantizer())
