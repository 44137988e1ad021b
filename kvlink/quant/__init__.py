"""Quantizers (reference torch) and bit packing; importing this package registers every format."""

from kvlink.quant import fp16, intq, nf4, widths  # noqa: F401  (registration side effects)
from kvlink.quant.base import (
    AXES,
    BITS,
    FORMATS,
    SUPPORTED_BITS,
    WIDTH_FORMATS,
    QuantizedTensor,
    Quantizer,
    QuantSpec,
    dequantize,
    format_from_bits,
    get_quantizer,
    packed_size,
    part_sizes,
    quantize,
    registered_formats,
    scale_shape,
)

__all__ = [
    "AXES",
    "BITS",
    "FORMATS",
    "SUPPORTED_BITS",
    "WIDTH_FORMATS",
    "QuantSpec",
    "QuantizedTensor",
    "Quantizer",
    "dequantize",
    "format_from_bits",
    "get_quantizer",
    "packed_size",
    "part_sizes",
    "quantize",
    "registered_formats",
    "scale_shape",
]
