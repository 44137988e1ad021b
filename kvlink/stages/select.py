"""Select: which context positions travel (a registered selector keeps ceil(retention * T) of them).

    Select("q2c", 0.9, "layer")      # Q2C scores, 90% kept, a set per layer
    Select("snapkv", 0.5, window=64) # the last 64 positions observe the rest

The message-level stage of a recipe (kvlink.recipe): the kept sets travel in the
header (kvlink.positions), one shared by all layers (scope "global") or one per
layer ("layer"). No Select stage: every position travels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvlink.cache import Observe, Prefill
from kvlink.select import SCOPES, get_selector, registered_selectors
from kvlink.stages.base import Stage, register

DEFAULT_WINDOW = 32


@register
@dataclass(frozen=True)
class Select(Stage):
    """Keep `retention` of the context positions by `method` (per layer or one global set). window: the
    observation window of a windowed method (SnapKV); seed: of a seeded one (Random)."""

    name: ClassVar[str] = "select"
    role: ClassVar[str] = "select"

    method: str = "q2c"
    retention: float = 1.0
    scope: str = "global"
    window: int = DEFAULT_WINDOW
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in registered_selectors():
            raise ValueError(
                f"unknown selection method {self.method!r}; registered: {registered_selectors()}"
            )
        if isinstance(self.retention, bool) or not (0.0 < float(self.retention) <= 1.0):
            raise ValueError(f"retention must be in (0, 1], got {self.retention!r}")
        object.__setattr__(self, "retention", float(self.retention))
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        for name in ("window", "seed"):
            value = getattr(self, name)
            low = 1 if name == "window" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def _selector(self) -> Any:
        kwargs: dict[str, Any] = {}
        if self.method == "random":
            kwargs["seed"] = self.seed
        if self.method == "snapkv":
            kwargs["window"] = self.window
        return get_selector(self.method, **kwargs)

    def needs(self) -> Observe:
        return self._selector().observes  # type: ignore[no-any-return]

    def capability(self) -> str:
        return f"select:{self.method}"

    def size_key(self) -> tuple[Any, ...]:
        return ("select", self.retention, self.scope)

    def keep(self, prefill: Prefill) -> list[Tensor]:
        """Kept positions per layer (sorted int64; the same tensor in every layer under scope "global")."""
        selector = self._selector()
        if selector.observes is not Observe.NONE and prefill.observation.kind is not selector.observes:
            raise ValueError(
                f"selector {self.method!r} needs a prefill with observe={selector.observes.value!r}, "
                f"got {prefill.observation.kind.value!r}"
            )
        return selector.keep(prefill.observation, self.retention, self.scope)  # type: ignore[no-any-return]

    def scores(self, prefill: Prefill) -> Tensor:
        """Importance of each context position, (T,): every layer's scores as shares of that layer's
        total, summed over the layers (what scope "global" ranks by, forced positions aside)."""
        selector = self._selector()
        obs = prefill.observation
        total = torch.zeros(obs.length)
        for layer in obs.layers:
            s = selector.score(layer, obs.length, obs.scale).sum(dim=0).float().cpu()
            total += s / s.sum().clamp_min(1e-30)
        return total

    def token(self) -> str:
        """Its name in the config grammar: q2c90%, q2c90%/layer, snapkv50%@w64, random50%@s3."""
        out = f"{self.method}{self.retention * 100:g}%" + ("/layer" if self.scope == "layer" else "")
        if self.window != DEFAULT_WINDOW:
            out += f"@w{self.window}"
        if self.seed:
            out += f"@s{self.seed}"
        return out
