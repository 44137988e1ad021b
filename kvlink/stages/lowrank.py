"""LowRank: only a rank-r latent of a tensor is quantized and travels.

mode "svd": a per-message SVD of each (layer, head) matrix; the (H, r, D) basis
travels at float16 (the `basis` part, counted as factors). mode "profile": a
projection calibrated once per model (kvlink.lowrank.ModelProfile) that both
sides hold and identify by hash; only the latent travels. The receiver expands
the latent in the same kernel that dequantizes it (kvlink.kernels.dequantize_expand).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvlink.errors import NotRegistered
from kvlink.models import Geometry
from kvlink.stages.base import Item, Transform, register
from kvlink.stages.tensors import from_bytes, tensor_bytes

MODES: tuple[str, ...] = ("svd", "profile")


@register
@dataclass(frozen=True)
class LowRank(Transform):
    """Quantize a rank-`rank` latent instead of the tensor (per-message SVD, or a calibrated profile)."""

    name: ClassVar[str] = "lowrank"
    order: ClassVar[int] = 20
    quantized_only: ClassVar[bool] = False
    before_formats: ClassVar[bool] = True
    stackable: ClassVar[bool] = False  # expanded with its own basis, one tensor at a time

    mode: str = "svd"
    rank: int = 32

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise NotRegistered(f"lowrank must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")

    def capability(self) -> str:
        return f"lowrank:{self.mode}"

    def check(self, geometry: Geometry) -> None:
        if self.rank > geometry.head_dim:
            raise ValueError(f"rank {self.rank!r} exceeds head_dim {geometry.head_dim}")

    def stored(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return (shape[0], shape[1], self.rank)

    def part_sizes(self, shape: tuple[int, int, int]) -> dict[str, int]:
        return {"basis": shape[0] * self.rank * shape[2] * 2} if self.mode == "svd" else {}

    def apply(self, item: Item, context: Any) -> None:
        from kvlink import lowrank
        from kvlink.codec import Part

        x = item.x
        assert x is not None
        if self.mode == "svd":
            item.x, basis = lowrank.svd_factors(x, self.rank)  # (H, N, r), (H, r, D)
            raw = tensor_bytes(basis.to(torch.float16))
            item.parts["basis"] = Part(raw, len(raw))
        else:
            item.x = context.profile.project(x, item.layer, item.kind, self.rank)
        item.info["lowrank"] = self.mode

    def expand(
        self, q: Any, item: Item, parts: dict[str, bytes], device: Any, dtype: torch.dtype, profile: Any
    ) -> Tensor:
        """Dequantize the latent and expand it in one pass: (H, N, r) -> (H, N, D)."""
        from kvlink.kernels import dequantize_expand

        h, _, d = item.shape
        if self.mode == "svd":
            basis = from_bytes(parts["basis"], torch.float16, (h, self.rank, d), device)
            return dequantize_expand(q, basis, None, dtype)  # latent (H, N, r) @ basis (H, r, D), fused
        basis, mean = profile.expand_factors(item.layer, item.kind, self.rank, device)
        return dequantize_expand(q, basis, mean, dtype)

    def undo_one(self, x: Tensor, item: Item, parts: Any, dtype: torch.dtype) -> Tensor:
        return x  # expanded already, with the dequantization

    def token(self) -> str:
        return f"{self.mode}-r{self.rank}"

    @classmethod
    def parse_token(cls, text: str) -> LowRank | None:
        m = re.fullmatch(r"(svd|profile)-r(\d+)", text)
        return cls(m[1], int(m[2])) if m else None
