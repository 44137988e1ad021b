"""Rotate: a randomized Hadamard rotation of a tensor along head_dim before quantization (no wire bytes).

Spreads outlier channels over all channels so that groups see flatter ranges;
the receiver rotates back (kvlink.rotation: signs from (seed, layer, kind), so
nothing travels). Needs a power-of-two head_dim; not with a low-rank latent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvlink.models import Geometry
from kvlink.rotation import check_dim, hadamard, rotate, signs, unrotate
from kvlink.stages.base import Item, Transform, register


@register
@dataclass(frozen=True)
class Rotate(Transform):
    """x -> (x * signs) @ H / sqrt(D), signs seeded by (seed, layer, kind)."""

    name: ClassVar[str] = "rotate"
    order: ClassVar[int] = 30
    quantized_only: ClassVar[bool] = False
    needs_float32: ClassVar[bool] = True

    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"rotation seed must be an integer >= 0, got {self.seed!r}")

    def check(self, geometry: Geometry) -> None:
        check_dim(geometry.head_dim)

    def size_key(self) -> tuple[Any, ...]:
        return ()  # no bytes

    def apply(self, item: Item, context: Any) -> None:
        item.x = rotate(item.x, self.seed, item.layer, item.kind)  # type: ignore[arg-type]
        item.info["rotated"] = True

    def queries(self, queries: Tensor, item: Item) -> Tensor:
        # Logits are invariant under one orthogonal map applied to queries and keys alike.
        return rotate(queries, self.seed, item.layer, item.kind)

    def undo_one(self, x: Tensor, item: Item, parts: Mapping[str, bytes], dtype: torch.dtype) -> Tensor:
        return unrotate(x, self.seed, item.layer, item.kind)

    def undo_stack(
        self, x: Tensor, items: list[Item], parts: list[Mapping[str, bytes]], dtype: torch.dtype
    ) -> Tensor:
        d = x.shape[-1]  # (m, H, N, D) @ H/sqrt(D), times each member's signs
        s = torch.stack([signs(self.seed, it.layer, it.kind, d, x.device) for it in items])
        return (x @ hadamard(d, x.device)) * s[:, None, None, :]

    def token(self) -> str:
        return "rot" + (f"@s{self.seed}" if self.seed else "")

    @classmethod
    def parse_token(cls, text: str) -> Rotate | None:
        m = re.fullmatch(r"rot(?:@s(\d+))?", text)
        return cls(int(m[1]) if m[1] else 0) if m else None
