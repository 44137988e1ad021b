"""FP16 passthrough: no quantization; the codes are the float16 values' bytes.

codes = x.to(float16) in C order of (H, T, D), two bytes per element,
little-endian (torch's native byte order on every platform it ships for).
Group size and axis are ignored; there is no scale or zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlink.quant.base import QuantizedTensor, Quantizer, QuantSpec, register
from kvlink.quant.intq import check_input, check_quantized

__all__ = ["FP16Passthrough"]


@dataclass(frozen=True)
class FP16Passthrough(Quantizer):
    """float16 bytes as the codes part, so FP16 travels through the same packed-tensor path."""

    formats: ClassVar[tuple[str, ...]] = ("fp16",)

    def quantize(self, x: Tensor, spec: QuantSpec) -> QuantizedTensor:
        """x: (H, T, D) float -> codes uint8 (2*H*T*D,), a copy that never aliases x."""
        shape = check_input(x, spec, self.formats)
        half = x.to(torch.float16, copy=True).contiguous()  # (H, T, D)
        return QuantizedTensor(spec=spec, shape=shape, codes=half.reshape(-1).view(torch.uint8))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """codes -> (H, T, D) `dtype` on the codes' device (a new tensor)."""
        check_quantized(q, self.formats)
        half = q.codes.contiguous().view(torch.float16).view(q.shape)  # (H, T, D)
        return half.to(dtype, copy=True)


register(FP16Passthrough())
