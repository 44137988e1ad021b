"""The quantizer interface and the wire layout every implementation (torch or Triton) must produce.

Layout of one quantized tensor x of shape (H, T, D) (kv_heads, seq_len, head_dim;
for a low-rank latent D is the rank):

- Groups. `axis="token"`: each (h, t) row of D values is cut into ceil(D/G)
  groups of G consecutive channels (the last may be shorter).
  `axis="channel"`: each (h, d) column of T values is cut into ceil(T/G)
  groups of G consecutive tokens (the last may be shorter).
- Scale (and zero) per group, float16, shaped (H, T, ceil(D/G)) for the token
  axis and (H, ceil(T/G), D) for the channel axis, C order.
- Codes: one unsigned integer per element, in the C order of (H, T, D) for
  both axes, packed as an LSB-first bit stream: element i occupies bits
  [b*i, b*i + b) of the little-endian byte string. So INT4 is two per byte
  (low nibble first), INT2 four per byte, INT3 eight values in three bytes;
  the stream is ceil(n*b/8) bytes, the unused high bits of the last byte 0.
- INT formats (asymmetric): zero = min rounded DOWN to float16, scale =
  (max - zero) / (2^b - 1) rounded UP to float16 (so no value is ever clamped);
  code = clamp(round((x - zero) / scale), 0, 2^b - 1) in float32;
  x_hat = code * scale + zero; |x - x_hat| <= scale / 2. A constant group has scale 1.
- NF4: scale = absmax of the group (float16; 1 for an all-zero group), no
  zero; code = index of the nearest NF4 level to x / scale; x_hat = NF4[code] * scale.
- FP16: no quantization; the codes are the float16 values' bytes (little-endian).
- INT4CW/INT3CW/INT2CW (keys, channel axis): INT with a bit width per channel, mean 4/3/2,
  and a 'widths' part; INT4RW/INT3RW/INT2RW (values, token axis): a bit width per token
  row; see kvlink.quant.widths. kvlink.quant.formats lists every format (FormatSpec).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlink.quant.formats import format_spec, registered_format_specs

# Tables of the format registry (kvlink.quant.formats), for the code that dispatches on them.
WIDTH_FORMATS: dict[str, int] = {
    n: f.bits for n, f in registered_format_specs().items() if f.widths == "channel"
}
"""Formats with a width per channel (keys): name -> mean width."""
TOKEN_WIDTH_FORMATS: dict[str, int] = {
    n: f.bits for n, f in registered_format_specs().items() if f.widths == "token"
}
"""Formats with a width per token row (values): name -> mean width."""
FORMATS: tuple[str, ...] = tuple(registered_format_specs())
BITS: dict[str, int] = {n: f.bits for n, f in registered_format_specs().items()}
WIDTH_AXIS: dict[str, str] = {n: f.widths for n, f in registered_format_specs().items() if f.widths}
AXES: tuple[str, ...] = ("token", "channel")
SUPPORTED_BITS: tuple[int | str, ...] = (16, 8, 4, 3, 2, "nf4")


def format_from_bits(bits: int | str) -> str:
    """Map a user-facing bit width (16, 8, 4, 3, 2 or "nf4") to a format name."""
    if isinstance(bits, str):
        key = bits.lower()
        if key in FORMATS:
            return key
        if key.isdigit():
            bits = int(key)
        else:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    mapping = {16: "fp16", 8: "int8", 4: "int4", 3: "int3", 2: "int2"}
    if isinstance(bits, bool) or bits not in mapping:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return mapping[bits]


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: format, group size and grouping axis."""

    format: str = "fp16"
    group_size: int = 32
    axis: str = "token"

    def __post_init__(self) -> None:
        formats = registered_format_specs()  # the registry, not FORMATS: a format may register later
        if self.format not in formats:
            raise ValueError(f"format must be one of {tuple(formats)}, got {self.format!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")

    @property
    def bits(self) -> int:
        return format_spec(self.format).bits

    @property
    def has_scale(self) -> bool:
        return format_spec(self.format).has_scale

    @property
    def has_zero(self) -> bool:
        return format_spec(self.format).has_zero


def packed_size(n: int, bits: int) -> int:
    """Bytes of a dense LSB-first stream of n codes of `bits` bits."""
    return (n * bits + 7) // 8


def scale_shape(shape: tuple[int, int, int], spec: QuantSpec) -> tuple[int, int, int]:
    """Shape of the per-group scale (and zero) tensor for a (H, T, D) tensor."""
    h, t, d = shape
    g = spec.group_size
    return (h, t, math.ceil(d / g)) if spec.axis == "token" else (h, math.ceil(t / g), d)


def widths_shape(shape: tuple[int, int, int], spec: QuantSpec) -> tuple[int, int]:
    """(H, D) for a width per channel, (H, T) for a width per token row."""
    h, t, d = shape
    return (h, t) if WIDTH_AXIS[spec.format] == "token" else (h, d)


def part_sizes(shape: tuple[int, int, int], spec: QuantSpec) -> dict[str, int]:
    """Exact bytes of each part ('codes', 'scale', 'zero') of a quantized (H, T, D) tensor."""
    n = shape[0] * shape[1] * shape[2]
    sizes = {"codes": packed_size(n, spec.bits)}
    if spec.format in WIDTH_AXIS:
        sizes["widths"] = packed_size(math.prod(widths_shape(shape, spec)), 4)
    if spec.has_scale:
        s = scale_shape(shape, spec)
        sizes["scale"] = 2 * s[0] * s[1] * s[2]
        if spec.has_zero:
            sizes["zero"] = sizes["scale"]
    return sizes


@dataclass
class QuantizedTensor:
    """A quantized (H, T, D) tensor in wire layout (see the module docstring).

    codes: uint8 (n_bytes,); scale, zero: float16 of `scale_shape`, or None;
    widths: uint8 bits per channel (H, D) for the WIDTH_FORMATS, per token row (H, T) for the
    TOKEN_WIDTH_FORMATS, else None.
    """

    spec: QuantSpec
    shape: tuple[int, int, int]
    codes: Tensor
    scale: Tensor | None = None
    zero: Tensor | None = None
    widths: Tensor | None = None

    def nbytes(self) -> dict[str, int]:
        out = {"codes": int(self.codes.numel())}
        if self.widths is not None:
            out["widths"] = packed_size(int(self.widths.numel()), 4)
        if self.scale is not None:
            out["scale"] = int(self.scale.numel()) * 2
        if self.zero is not None:
            out["zero"] = int(self.zero.numel()) * 2
        return out


class Quantizer(ABC):
    """Reference (torch) quantizer for a family of formats. Registered by format name."""

    formats: ClassVar[tuple[str, ...]]

    @abstractmethod
    def quantize(self, x: Tensor, spec: QuantSpec) -> QuantizedTensor:
        """x: (H, T, D) float -> QuantizedTensor in wire layout."""

    @abstractmethod
    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """QuantizedTensor -> (H, T, D) tensor of `dtype` on the codes' device."""


_REGISTRY: dict[str, Quantizer] = {}


def register(quantizer: Quantizer) -> Quantizer:
    """Register `quantizer` for each of its formats; a duplicate format raises."""
    for fmt in quantizer.formats:
        if fmt in _REGISTRY:
            raise ValueError(f"quantizer for format {fmt!r} is already registered")
        _REGISTRY[fmt] = quantizer
    return quantizer


def get_quantizer(fmt: str) -> Quantizer:
    """The quantizer registered for `fmt`; an unknown name lists the registered ones."""
    try:
        return _REGISTRY[fmt]
    except KeyError:
        raise ValueError(f"no quantizer for format {fmt!r}; registered: {sorted(_REGISTRY)}") from None


def registered_formats() -> list[str]:
    return sorted(_REGISTRY)


def quantize(x: Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize a (H, T, D) tensor with the reference implementation of `spec.format`."""
    if x.dim() != 3:
        raise ValueError(f"expected a (H, T, D) tensor, got shape {tuple(x.shape)}")
    return get_quantizer(spec.format).quantize(x, spec)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference dequantization back to (H, T, D)."""
    return get_quantizer(q.spec.format).dequantize(q, dtype)
