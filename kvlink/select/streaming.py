"""StreamingLLM: keep the first `sinks` positions (attention sinks) and the most recent ones.

No scores: the kept set depends only on T and the retention, and is the same
for every layer whatever the scope. If keep_count(r, T) <= sinks, only the
first keep_count positions are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlink.cache import Observation, Observe
from kvlink.select.base import SCOPES, Selector, keep_count, register


@register
@dataclass
class StreamingLLM(Selector):
    """Attention sinks + a recent window filling the rest of the budget."""

    name: ClassVar[str] = "streaming"
    observes: ClassVar[Observe] = Observe.NONE

    sinks: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {self.sinks!r}")

    def forced(self, length: int) -> Tensor:
        return torch.arange(min(self.sinks, length), dtype=torch.long)

    def keep(self, observation: Observation, retention: float, scope: str = "global") -> list[Tensor]:
        """num_layers copies of: positions [0, s) and [T - (n_keep - s), T) with s = min(sinks, n_keep).

        Any observation kind is accepted: only its length and num_layers are read.
        """
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        length = observation.length
        n_keep = keep_count(retention, length)
        if observation.num_layers < 1:
            raise ValueError(f"observation.num_layers must be >= 1, got {observation.num_layers!r}")
        sinks = min(self.sinks, n_keep)
        recent = n_keep - sinks
        kept = torch.cat([torch.arange(sinks), torch.arange(length - recent, length)]).to(torch.long)
        return [kept] * observation.num_layers
