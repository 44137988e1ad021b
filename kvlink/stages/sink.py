"""Sink: the first `n` kept entries of a tensor travel at float16, outside its quantization groups.

Attention sinks: a few positions (the first ones) hold huge key channels that
would set the scale of a whole per-channel group; kept aside at fp16 they cost
H x n x D x 2 bytes (the `sink` part, counted as payload) and the groups see
only the rest. A recipe puts it in front of a quantized tensor's pipeline only
(an fp16 tensor has nothing to protect).

The sink part (how many rows, the shape left, its bytes and layout) is written once, in the functions
below, for this stage and for kvlink.stages.pca (which keeps its residual's first rows the same way).
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


def sink_count(sink: int, n: int) -> int:
    """How many of a tensor's `n` kept rows its first `sink` are (fewer when fewer are kept)."""
    return min(sink, n)


def sink_stored(sink: int, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(H, N, D) -> (H, N - s, D): what the rest of the pipeline takes when the first s rows travel aside."""
    h, n, d = shape
    return (h, n - sink_count(sink, n), d)


def sink_part_sizes(sink: int, shape: tuple[int, int, int]) -> dict[str, int]:
    """The sink part of an (H, N, D) tensor: H x s x D float16."""
    h, n, d = shape
    return {"sink": h * sink_count(sink, n) * d * 2}


def put_sink(item: Item, head: Tensor) -> None:
    """`head`, the tensor's first s rows (H, s, D), as `item`'s sink part: float16, (H, s, D) row-major."""
    from kvlink.codec import Part

    raw = tensor_bytes(head.to(torch.float16))
    item.parts["sink"] = Part(raw, len(raw))


def sink_rows(data: bytes, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
    """The float16 rows of a sink part, (H, s, D) (or (M, H, s, D): M tensors' parts joined)."""
    return from_bytes(data, torch.float16, shape, device)


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
        return sink_count(self.n, n_kept)

    def stored(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return sink_stored(self.n, shape)

    def part_sizes(self, shape: tuple[int, int, int]) -> dict[str, int]:
        return sink_part_sizes(self.n, shape)

    def apply(self, item: Item, context: Any) -> None:
        x = item.x
        assert x is not None
        s = self.count(int(x.shape[1]))
        put_sink(item, x[:, :s])
        item.info["sink"] = s
        item.x = x[:, s:]

    def undo_one(self, x: Tensor, item: Item, parts: Mapping[str, bytes], dtype: torch.dtype) -> Tensor:
        h, n, d = item.shape
        head = sink_rows(parts["sink"], (h, self.count(n), d), x.device)
        return torch.cat([head.to(dtype), x], dim=1)

    def undo_stack(
        self, x: Tensor, items: list[Item], parts: list[Mapping[str, bytes]], dtype: torch.dtype
    ) -> Tensor:
        m, h, n, d = x.shape
        s = self.count(items[0].shape[1])
        full = torch.empty((m, h, s + n, d), dtype=dtype, device=x.device)
        joined = b"".join(p["sink"] for p in parts)
        full[:, :, :s] = sink_rows(joined, (m, h, s, d), x.device)
        full[:, :, s:] = x
        return full

    def token(self) -> str:
        return f"sink{self.n}"

    @classmethod
    def parse_token(cls, text: str) -> Sink | None:
        m = re.fullmatch(r"sink(\d+)", text)
        return cls(int(m[1])) if m else None
