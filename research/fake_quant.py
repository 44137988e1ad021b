"""Fake quantization for the issue-7 screens: a tensor through kvlink's INT quantizer and back.

The screens used to carry their own min/max quantizer. They now call the codec's (kvlink.quant, the
reference the wire layout is specified by), so a screen measures what a kvlink message decodes to.
What changed against the old copies (research/README.md has the measurement): the group's zero is its
min rounded down to float16 and its scale rounded up to float16 before the codes are computed (the old
copies kept both in float32); a constant group gets scale 1 (was 1e-8). INT5 and INT6, which the old
copies allowed, are not kvlink formats and are refused.
"""

from __future__ import annotations

from torch import Tensor

from kvlink.quant import QuantSpec, dequantize, quantize

BITS: tuple[int, ...] = (8, 4, 3, 2)
"""The INT widths kvlink quantizes (formats int8, int4, int3, int2)."""


def fake_quant(x: Tensor, bits: int, group: int, axis: str) -> Tensor:
    """x (H, T, D) -> what kvlink decodes from it at INT`bits`, in x's dtype.

    axis "channel": groups of `group` tokens of a channel (keys); "token": groups of `group` channels
    of a token row (values).
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of kvlink's INT widths {BITS}, got {bits!r}")
    return dequantize(quantize(x, QuantSpec(f"int{bits}", group, axis))).to(x.dtype)
