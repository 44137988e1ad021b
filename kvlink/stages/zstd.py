"""Zstd: every part of the message compressed at `level`, where that makes the part smaller.

The only stage whose size depends on the data: the planner measures it by
encoding. Decompression is capped at each part's declared raw size whatever its
frame claims (kvlink.codec._decompress), so a receiver never inflates more than
the header says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kvlink.stages.base import Stage, register


@register
@dataclass(frozen=True)
class Zstd(Stage):
    """zstd at `level` (1..22) on each part that it shrinks."""

    name: ClassVar[str] = "zstd"
    role: ClassVar[str] = "entropy"

    level: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or not isinstance(self.level, int) or not 1 <= self.level <= 22:
            raise ValueError(f"zstd_level must be in [1, 22], got {self.level!r}")

    def size_key(self) -> tuple[Any, ...]:
        return ("zstd", self.level)

    def compress(self, tensors: list[Any]) -> None:
        """Replace each part of `tensors` (EncodedTensor) by its zstd frame where that is smaller."""
        import zstandard

        from kvlink.codec import Part

        compressor = zstandard.ZstdCompressor(level=self.level)
        for t in tensors:
            for name, part in t.parts.items():
                packed = compressor.compress(part.data)
                if len(packed) < len(part.data):
                    t.parts[name] = Part(packed, part.raw_size, zstd=True)

    def token(self) -> str:
        return f"zstd{self.level}"
