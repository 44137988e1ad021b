"""H2O (heavy hitters): keep the positions that accumulate the most attention over the context.

Every context position is scored by the attention probability it receives
from all context queries (causally: position j is seen by the queries at
j, j+1, ..., T-1), summed over those queries and over the query heads of its
KV group. The score is question-agnostic, and early positions are seen by
more queries, so it favours them (as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlink.cache import LayerObservation, Observe
from kvlink.select.base import Selector, attention_to_context, register


@register
@dataclass
class H2O(Selector):
    """Accumulated attention from every context query; `recent` last positions are always kept."""

    name: ClassVar[str] = "h2o"
    observes: ClassVar[Observe] = Observe.ALL

    recent: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.recent, int) or self.recent < 0:
            raise ValueError(f"recent must be an int >= 0, got {self.recent!r}")

    def score(self, obs: LayerObservation, length: int, scale: float) -> Tensor:
        """(kv_heads, length): attention each position receives, summed over all context queries."""
        return attention_to_context(obs, length, scale)

    def forced(self, length: int) -> Tensor:
        return torch.arange(max(0, length - self.recent), length, dtype=torch.long)
