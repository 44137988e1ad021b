"""Random: a uniformly random kept set, the baseline every scoring method must beat.

Reproducible: the same seed, T, retention, scope and layer count give the same
sets. Scope "layer" draws one set per layer (in layer order from one
generator); scope "global" draws one set shared by all layers.
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
class RandomSelector(Selector):
    """keep_count(r, T) positions drawn uniformly without replacement (torch.Generator seeded by `seed`)."""

    name: ClassVar[str] = "random"
    observes: ClassVar[Observe] = Observe.NONE

    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    def keep(self, observation: Observation, retention: float, scope: str = "global") -> list[Tensor]:
        """num_layers sorted int64 tensors of keep_count(r, T) positions each.

        Any observation kind is accepted: only its length and num_layers are read.
        """
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        length = observation.length
        n_keep = keep_count(retention, length)
        if observation.num_layers < 1:
            raise ValueError(f"observation.num_layers must be >= 1, got {observation.num_layers!r}")
        generator = torch.Generator().manual_seed(self.seed)

        def draw() -> Tensor:
            return torch.sort(torch.randperm(length, generator=generator)[:n_keep]).values.to(torch.long)

        if scope == "global":
            return [draw()] * observation.num_layers
        return [draw() for _ in range(observation.num_layers)]
