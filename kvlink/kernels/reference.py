"""Plain-torch reference of every kernel: the specification the Triton kernels must match.

Each function here has a Triton twin of the same name and signature
(kvlink.kernels.dequant / kvlink.kernels.quant); tests/test_kernels.py checks
that the twin produces the same bytes (packing, codes, scale, zero) and the
same values within a stated tolerance. The layout itself is specified in
kvlink.quant.base; the arithmetic in kvlink.quant.intq and kvlink.quant.nf4.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvlink.quant import QuantizedTensor, QuantSpec, dequantize, quantize


def dequantize_into(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Packed wire layout -> (H, T, D) cache layout in `dtype` (see kvlink.quant.base for the layout)."""
    return dequantize(q, dtype)


def dequantize_expand(
    q: QuantizedTensor, basis: Tensor, mean: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Latent (H, T, r) in wire layout -> latent @ basis (+ mean) as (H, T, D) of `dtype`.

    basis: (H, r, D) (a calibrated (H, D, r) projection P is passed as P.transpose(-1, -2));
    mean: (H, D) or None. Computed in float32, then cast: the unfused path.
    """
    h, _, r = q.shape
    if basis.dim() != 3 or basis.shape[0] != h or basis.shape[1] != r:
        raise ValueError(f"basis must be (H={h}, r={r}, D), got {tuple(basis.shape)}")
    if mean is not None and tuple(mean.shape) != (h, basis.shape[2]):
        raise ValueError(f"mean must be (H={h}, D={basis.shape[2]}), got {tuple(mean.shape)}")
    latent = dequantize(q, torch.float32)  # (H, T, r)
    out = torch.matmul(latent, basis.float())  # (H, T, r) @ (H, r, D) -> (H, T, D)
    if mean is not None:
        out = out + mean.float()[:, None, :]
    return out.to(dtype)


def quantize_pack(x: Tensor, spec: QuantSpec) -> QuantizedTensor:
    """(H, T, D) float -> QuantizedTensor in wire layout (codes packed, scale/zero float16)."""
    return quantize(x, spec)
