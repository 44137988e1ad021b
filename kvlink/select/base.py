"""The position-selection interface: score context positions, keep the top ceil(r*T).

A selector is one small dataclass in its own module that registers itself by
name. Most selectors only implement `score()` on one layer's observation;
`keep()` turns scores into kept positions per layer (scope "layer") or one
set shared by all layers (scope "global": per-layer scores are normalized to
sum to 1 over the positions not forced, and added; forced positions are kept
anyway, and an attention sink holding most of a deep layer's attention would
otherwise shrink that layer's say). Selectors without scores (StreamingLLM,
Random) override `keep()`.

Kept count rule: n_keep = clamp(ceil(r * T), 1, T), and every returned
tensor is sorted, unique, int64.
"""

from __future__ import annotations

import math
from abc import ABC
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvlink.cache import LayerObservation, Observation, Observe
from kvlink.errors import NotRegistered

SCOPES: tuple[str, ...] = ("global", "layer")


def keep_count(retention: float, length: int) -> int:
    """ceil(r * T), at least 1 and at most T (with a tolerance for float noise in r * T)."""
    if not (0.0 < retention <= 1.0):
        raise ValueError(f"retention must be in (0, 1], got {retention!r}")
    if length < 1:
        raise ValueError(f"context length must be >= 1, got {length!r}")
    return max(1, min(length, math.ceil(retention * length - 1e-9)))


def attention_to_context(obs: LayerObservation, length: int, scale: float, chunk: int = 256) -> Tensor:
    """Attention probability each context position receives, summed over the observed queries.

    Softmax over all keys the query may see (causal by ORIGINAL position),
    then the first `length` columns are kept and the query heads of each KV
    group are summed (GQA). Returns (kv_heads, length), float32.
    Queries are processed in chunks so memory stays O(chunk * n_keys). The
    query heads of a KV group meet their shared keys in one matmul: the keys
    are never repeated per query head (that copy was group x the layer's keys).
    """
    q, k = obs.queries.float(), obs.keys.float()
    q_heads, kv_heads = q.shape[0], k.shape[0]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not split into {kv_heads} KV groups")
    group = q_heads // kv_heads
    n_keys, dim = k.shape[1], k.shape[2]
    grouped = q.view(kv_heads, group, q.shape[1], dim)  # query head h reads KV head h // group
    keys_t = k.transpose(1, 2)  # (Hkv, D, K)
    total = torch.zeros(kv_heads, group, length, dtype=torch.float32, device=q.device)
    for start in range(0, q.shape[1], chunk):
        qc = grouped[:, :, start : start + chunk]  # (Hkv, g, c, D)
        c = qc.shape[2]
        qpos = obs.query_positions[start : start + chunk]
        logits = torch.matmul(qc.reshape(kv_heads, group * c, dim), keys_t) * scale  # (Hkv, g*c, K)
        logits = logits.view(kv_heads, group, c, n_keys)
        visible = obs.key_positions[None, :] <= qpos[:, None]  # (c, K)
        logits = logits.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        total += probs[..., :length].sum(dim=2)
    return total.sum(dim=1)


@dataclass
class Selector(ABC):
    """Base class: subclasses set `name` and `observes` and implement `score()` or `keep()`."""

    name: ClassVar[str]
    observes: ClassVar[Observe] = Observe.NONE

    def score(self, obs: LayerObservation, length: int, scale: float) -> Tensor:
        """Importance of each context position for one layer: (kv_heads, length), higher = keep."""
        raise NotImplementedError(f"{type(self).__name__} does not score positions")

    def forced(self, length: int) -> Tensor:
        """Positions always kept (e.g. an observation window); empty by default."""
        return torch.empty(0, dtype=torch.long)

    def keep(self, observation: Observation, retention: float, scope: str = "global") -> list[Tensor]:
        """Kept positions per layer: a list of num_layers sorted int64 tensors of keep_count(r, T) each.

        With scope "global" every entry is the same tensor.
        """
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        length = observation.length
        n_keep = keep_count(retention, length)
        if observation.kind is not self.observes:
            raise ValueError(
                f"{self.name} needs an observation of kind {self.observes.value!r}, got {observation.kind.value!r}"
            )
        per_layer = [
            self.score(obs, length, observation.scale).sum(dim=0).float().cpu() for obs in observation.layers
        ]
        forced = self.forced(length)
        if scope == "global":
            total = sum(_share(s, forced) for s in per_layer)
            assert isinstance(total, Tensor)
            kept = top_positions(total, n_keep, forced)
            return [kept] * len(per_layer)
        return [top_positions(s, n_keep, forced) for s in per_layer]


def _share(scores: Tensor, forced: Tensor) -> Tensor:
    """One layer's scores as fractions of its total over the positions that are not forced."""
    scores = scores.clone()
    if forced.numel():
        scores[forced] = 0.0
    return scores / scores.sum().clamp_min(1e-30)


def top_positions(scores: Tensor, n_keep: int, forced: Tensor | None = None) -> Tensor:
    """Sorted positions of the n_keep highest scores; `forced` positions win first (ties: lower position)."""
    scores = scores.clone().float()
    if forced is not None and forced.numel():
        scores[forced] = float("inf")
    # stable=True: among equal scores the earlier position wins, so results are deterministic.
    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:n_keep]).values.to(torch.long)


_REGISTRY: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    """Class decorator: register a selector under `cls.name`; a duplicate name raises."""
    name = cls.name
    if name in _REGISTRY:
        raise ValueError(f"selector {name!r} is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def get_selector(name: str, **kwargs: object) -> Selector:
    """Instantiate the selector registered as `name`; an unknown name lists the registered ones."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise NotRegistered(f"unknown selection method {name!r}; registered: {sorted(_REGISTRY)}") from None
    return cls(**kwargs)  # type: ignore[arg-type]


def registered_selectors() -> list[str]:
    return sorted(_REGISTRY)
