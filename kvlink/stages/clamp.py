"""Clamp: values beyond `sigmas` standard deviations of their channel are clipped before quantization.

The worked example of docs/stages.md: a transform with one parameter, no wire
bytes and nothing to undo. A key channel with a few huge entries gets a group
range set by them, and every other entry of the group loses precision; clipped
to mean +- sigmas x std of its (head, channel) over the kept tokens, the range
is what most entries need. The clipped values are what the receiver gets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvlink.stages.base import Item, Transform, register


@register
@dataclass(frozen=True)
class Clamp(Transform):
    """Clip each (head, channel) to mean +- `sigmas` x std over its tokens."""

    name: ClassVar[str] = "clamp"
    order: ClassVar[int] = 15  # after Sink (sink entries keep their values), before Rotate and LowRank

    sigmas: float = 6.0

    def __post_init__(self) -> None:
        if isinstance(self.sigmas, bool) or not isinstance(self.sigmas, int | float) or not self.sigmas > 0:
            raise ValueError(f"clamp sigmas must be a number > 0, got {self.sigmas!r}")
        object.__setattr__(self, "sigmas", float(self.sigmas))

    def size_key(self) -> tuple[Any, ...]:
        return ()  # no bytes

    def apply(self, item: Item, context: Any) -> None:
        x = item.x
        assert x is not None
        if x.shape[1] < 2:
            return  # one token: nothing to measure a spread on
        mean = x.mean(dim=1, keepdim=True)  # (H, 1, D)
        std = x.std(dim=1, keepdim=True)
        item.x = torch.clamp(x, mean - self.sigmas * std, mean + self.sigmas * std)

    def token(self) -> str:
        return f"clamp{self.sigmas:g}"

    @classmethod
    def parse_token(cls, text: str) -> Clamp | None:
        m = re.fullmatch(r"clamp(\d+(?:\.\d+)?)", text)
        return cls(float(m[1])) if m else None
