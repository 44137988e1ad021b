"""Sink: the first `n` kept entries of a tensor travel at float16, outside its quantization groups.

Attention sinks: a few positions (the first ones) hold huge key channels that
would set the scale of a whole per-channel group; kept aside at fp16 they cost
H x n x D x 2 bytes (the `sink` part, counted as payload) and the groups see
only the rest. A recipe puts it in front of a quantized tensor's pipeline only
(an fp16 tensor has nothing to protect).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvlink.stages.base import Item, Transform, register
from kvlink.stages.tensors import from_bytes, tensor_bytes


@register
@dataclass(frozen=True)
class Sink(Transform):
    """The first `n` kept entries at float16 (fewer when fewer are kept)."""

    name: ClassVar[str] = "sink"
    order: ClassVar[int] = 10

    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"sink entries must be an integer >= 1, got {self.n!r}")

    def count(self, n_kept: int) -> int:
        return min(self.n, n_kept)

    def stored(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        h, n, d = shape
        return (h, n - self.count(n), d)

    def part_sizes(self, shape: tuple[int, int, int]) -> dict[str, int]:
        h, n, d = shape
        return {"sink": h * self.count(n) * d * 2}

    def apply(self, item: Item, context: Any) -> None:
        x = item.x
        assert x is not None
        s = self.count(int(x.shape[1]))
        from kvlink.codec import Part

        raw = tensor_bytes(x[:, :s].to(torch.float16))
        item.parts["sink"] = Part(raw, len(raw))
        item.info["sink"] = s
        item.x = x[:, s:]

    def undo_one(self, x: Tensor, item: Item, parts: Mapping[str, bytes], dtype: torch.dtype) -> Tensor:
        h, n, d = item.shape
        s = self.count(n)
        head = from_bytes(parts["sink"], torch.float16, (h, s, d), x.device)
        return torch.cat([head.to(dtype), x], dim=1)

    def undo_stack(
        self, x: Tensor, items: list[Item], parts: list[Mapping[str, bytes]], dtype: torch.dtype
    ) -> Tensor:
        m, h, n, d = x.shape
        s = self.count(items[0].shape[1])
        full = torch.empty((m, h, s + n, d), dtype=dtype, device=x.device)
        joined = b"".join(p["sink"] for p in parts)
        full[:, :, :s] = from_bytes(joined, torch.float16, (m, h, s, d), x.device)
        full[:, :, s:] = x
        return full

    def token(self) -> str:
        return f"sink{self.n}"

    @classmethod
    def parse_token(cls, text: str) -> Sink | None:
        m = re.fullmatch(r"sink(\d+)", text)
        return cls(int(m[1])) if m else None
