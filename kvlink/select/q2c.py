"""Q2C: keep the context positions the question attends to (the task-aware method).

The question is run after the context (at positions T, T+1, ...); each context
position is scored by the attention probability it receives from the question
tokens, summed over question tokens and over the query heads of its KV group.
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
class Q2C(Selector):
    """Score context positions by the question's attention to them.

    keep_first: the first positions are always kept (attention sinks: the
    softmax parks probability mass there, and dropping them shifts every score).
    """

    name: ClassVar[str] = "q2c"
    observes: ClassVar[Observe] = Observe.QUESTION

    keep_first: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.keep_first, int) or self.keep_first < 0:
            raise ValueError(f"keep_first must be an int >= 0, got {self.keep_first!r}")

    def score(self, obs: LayerObservation, length: int, scale: float) -> Tensor:
        """(kv_heads, length): attention each context position receives from the question tokens."""
        return attention_to_context(obs, length, scale)

    def forced(self, length: int) -> Tensor:
        return torch.arange(min(self.keep_first, length), dtype=torch.long)
