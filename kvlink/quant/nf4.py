"""NF4 (4-bit NormalFloat, QLoRA) group-wise quantization: the torch reference of the wire layout.

Per group: scale = absmax, rounded to float16 (1 when that is 0: an all-zero
group, or one whose absmax underflows float16); y = x / scale in float32;
code = index of the nearest NF4 level to y, computed as the number of level
midpoints strictly below y (so a y exactly on a midpoint takes the lower
level, and |y| > 1 saturates at the end levels). x_hat = NF4_LEVELS[code] * scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlink.quant.base import QuantizedTensor, Quantizer, QuantSpec, register
from kvlink.quant.intq import check_input, check_quantized, expand_groups, group_stats_layout, group_view
from kvlink.quant.pack import pack_bits, unpack_bits

__all__ = ["NF4_LEVELS", "NF4Quantizer"]

# The 16 NF4 levels of QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' table), ascending.
# Construction: with offset p = 0.9677083 (the mean of 1 - 1/(2*15) and 1 - 1/(2*16)),
# 8 positive levels Phi^-1(linspace(p, 0.5, 9)[:-1]), 7 negative levels
# -Phi^-1(linspace(p, 0.5, 8)[:-1]) and an exact 0, divided by the largest
# magnitude so they span [-1, 1]. These are the published float32 values; the
# float64 construction agrees to 1.1e-7 (tests/test_quant.py checks it).
NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def _levels(device: torch.device) -> Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)  # (16,)


@dataclass(frozen=True)
class NF4Quantizer(Quantizer):
    """Absmax-scaled 4-bit codes into the NF4 codebook, one float16 scale per group, no zero."""

    formats: ClassVar[tuple[str, ...]] = ("nf4",)

    def quantize(self, x: Tensor, spec: QuantSpec) -> QuantizedTensor:
        """x: (H, T, D) float -> packed 4-bit codes and scale (float16, `scale_shape`)."""
        shape = check_input(x, spec, self.formats)
        xf = x.float()
        absmax = group_view(xf, spec).abs().amax(dim=-1)  # (H, A, n_groups)
        scale = absmax.to(torch.float16)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero group -> scale 1
        scale = group_stats_layout(scale, spec)
        y = xf / expand_groups(scale.float(), shape, spec)  # (H, T, D), in [-1, 1] up to float16 rounding
        levels = _levels(x.device)
        midpoints = (levels[1:] + levels[:-1]) / 2  # (15,) float32
        codes = torch.bucketize(y, midpoints)  # (H, T, D): #{i : midpoints[i] < y}
        return QuantizedTensor(spec=spec, shape=shape, codes=pack_bits(codes, 4), scale=scale)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """x_hat = NF4_LEVELS[code] * scale in float32, returned as (H, T, D) `dtype` on the codes' device."""
        check_quantized(q, self.formats)
        assert q.scale is not None  # checked above; narrows the type
        h, t, d = q.shape
        device = q.codes.device
        codes = unpack_bits(q.codes, 4, h * t * d).view(h, t, d).long()
        s = expand_groups(q.scale.to(device=device, dtype=torch.float32), q.shape, q.spec)  # (H, T, D)
        return (_levels(device)[codes] * s).to(dtype)


register(NF4Quantizer())
