"""SnapKV: the last `window` context positions observe the prefix; pooled scores pick the rest.

As in the paper (Li et al., 2024): the attention of the window queries to the
prefix (positions before the window) is summed over the window queries and
over the query heads of each KV group, then smoothed by a 1-D pooling along
positions (kernel `kernel`, stride 1, same padding) so that the neighbours of
an important token are kept with it. The window positions themselves are
always kept.

The window queries come from `prefill(observe=Observe.WINDOW, window=W)`. The
selector uses the last min(window, captured) of them: if the prefill captured
fewer queries than `window`, scoring uses what was captured (the forced
window is still `window` positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlink.cache import LayerObservation, Observe
from kvlink.select.base import Selector, attention_to_context, register

POOLINGS: tuple[str, ...] = ("max", "avg")


@register
@dataclass
class SnapKV(Selector):
    """Score context positions by pooled attention from the last `window` positions."""

    name: ClassVar[str] = "snapkv"
    observes: ClassVar[Observe] = Observe.WINDOW

    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd int >= 1 (same padding), got {self.kernel!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def score(self, obs: LayerObservation, length: int, scale: float) -> Tensor:
        """(kv_heads, length): pooled window attention on the prefix; the window itself scores 0 (forced)."""
        n = min(self.window, int(obs.queries.shape[1]))
        window_obs = LayerObservation(
            obs.queries[:, -n:], obs.query_positions[-n:], obs.keys, obs.key_positions
        )
        attn = attention_to_context(window_obs, length, scale)  # (H, T)
        prefix = max(0, length - self.window)
        scores = torch.zeros_like(attn)
        if prefix == 0:
            return scores
        x = attn[:, :prefix].unsqueeze(1)  # (H, 1, P): pool each head's row on its own
        pad = self.kernel // 2
        if self.pooling == "max":
            pooled = F.max_pool1d(x, self.kernel, stride=1, padding=pad)
        else:
            pooled = F.avg_pool1d(x, self.kernel, stride=1, padding=pad)
        scores[:, :prefix] = pooled.squeeze(1)
        return scores

    def forced(self, length: int) -> Tensor:
        return torch.arange(max(0, length - self.window), length, dtype=torch.long)
