"""Raw little-endian buffers <-> tensors, shared by the stages and the codec."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def tensor_bytes(t: Tensor) -> bytes:
    """The tensor's values as contiguous little-endian bytes (on the host)."""
    return t.detach().contiguous().cpu().numpy().tobytes()


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
    """A tensor of `shape` and `dtype` on `device` from exactly its bytes (ValueError otherwise)."""
    expected = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if len(data) != expected:
        raise ValueError(f"buffer has {len(data)} bytes, shape {shape} of {dtype} needs {expected}")
    t = torch.frombuffer(bytearray(data), dtype=dtype) if expected else torch.empty(0, dtype=dtype)
    return t.reshape(shape).to(device)
