"""Kernel dispatch: Triton on CUDA tensors, the torch reference otherwise.

Primitives (receiver side unless noted):

- `dequantize_into(q, dtype)`: packed wire layout -> cache layout (H, T, D).
- `dequantize_expand(q, basis, mean=None, dtype)`: quantized low-rank latent
  (H, T, r) -> latent @ basis (H, r, D) (+ mean (H, D)) as (H, T, D), fused.
- `quantize_pack(x, spec)` (sender): (H, T, D) -> QuantizedTensor, byte-for-byte
  the reference quantizer's output.

`kvlink.kernels.reference` is the plain torch specification of each;
`kvlink.kernels.dequant` and `kvlink.kernels.quant` hold the Triton kernels.
Importing this package never needs a GPU or Triton: the kernel modules are
imported on first use (which is also when TRITON_INTERPRET is read).

Backend choice, per call, from the environment variable KVLINK_KERNELS:
`auto` (default) uses Triton when the tensor is on CUDA and triton imports,
the reference otherwise; `reference` forces the reference; `triton` forces
Triton (on CPU this needs TRITON_INTERPRET=1, Triton's interpreter).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from kvlink.kernels import reference
from kvlink.quant import WIDTH_AXIS, QuantizedTensor, QuantSpec

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "backend_for",
    "dequantize_expand",
    "dequantize_into",
    "quantize_pack",
]

HAS_TRITON: bool = importlib.util.find_spec("triton") is not None
BACKENDS: tuple[str, ...] = ("auto", "reference", "triton")
ENV_VAR = "KVLINK_KERNELS"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def backend_for(device: torch.device) -> str:
    """'triton' or 'reference' for work on `device`, honouring KVLINK_KERNELS."""
    mode = os.environ.get(ENV_VAR)
    if mode is None or mode == "auto":  # the common case first: this runs once per tensor
        return "triton" if HAS_TRITON and device.type == "cuda" else "reference"
    mode = mode.strip().lower() or "auto"
    if mode not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {mode!r}")
    if mode == "reference":
        return "reference"
    if mode == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed (pip install triton)")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"{ENV_VAR}=triton with a tensor on {device.type!r} needs TRITON_INTERPRET=1 "
                "(set it before kvlink.kernels first runs a kernel)"
            )
        return "triton"
    return "triton" if HAS_TRITON and device.type == "cuda" else "reference"


def _require_kernel(fmt: str, what: str) -> None:
    """ValueError unless a Triton kernel exists for `fmt` (FormatSpec.kernel, kvlink.quant.formats): a
    format without one is refused on the Triton path, never run through another format's kernel."""
    from kvlink.quant.formats import format_spec

    if not format_spec(fmt).kernel:
        raise ValueError(
            f"no Triton {what} kernel for format {fmt!r}: run it with {ENV_VAR}=reference (the torch reference)"
        )


def dequantize_into(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dequantize a packed tensor into cache layout (H, T, D) of `dtype`, on the codes' device."""
    if backend_for(q.codes.device) == "triton":
        from kvlink.kernels import dequant

        _require_kernel(q.spec.format, "dequantize")
        return dequant.dequantize_into(q, dtype)
    return reference.dequantize_into(q, dtype)


def dequantize_expand(
    q: QuantizedTensor, basis: Tensor, mean: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Quantized latent (H, T, r) -> latent @ basis (H, r, D) (+ mean (H, D)) as (H, T, D) of `dtype`.

    For a per-message SVD pass the (H, r, D) basis; for a calibrated projection
    P (H, D, r) pass P.transpose(-1, -2) and its mean. The Triton path never
    materializes the full-size float32 intermediate; its products use TF32
    inputs when `dtype` is float16/bfloat16 and IEEE float32 when it is float32.
    """
    if backend_for(q.codes.device) == "triton":
        from kvlink.kernels import dequant

        _require_kernel(q.spec.format, "dequantize")
        return dequant.dequantize_expand(q, basis, mean, dtype)
    return reference.dequantize_expand(q, basis, mean, dtype)


def quantize_pack(x: Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize and pack a (H, T, D) tensor into wire layout (sender side); same bytes on every backend.

    The widths formats take the reference path (their widths come from an allocation:
    kvlink.quant.widths.quantize_widths / quantize_token_widths); without one every channel or
    row gets the mean width.
    """
    if backend_for(x.device) == "triton" and spec.format not in WIDTH_AXIS:
        from kvlink.kernels import quant

        _require_kernel(spec.format, "quantize")
        return quant.quantize_pack(x, spec)
    return reference.quantize_pack(x, spec)
