"""The stage interface: one step of a message's encoding, one dataclass each, registered by name.

A message's recipe (kvlink.recipe.Recipe) is a `Select` stage (which positions
travel), a pipeline of tensor stages for each layer's K and for its V (e.g.
`Sink(1)`, `Rotate()`, `Quantize("int4", 64, "channel")`), and a `Zstd` stage
over every part. A stage owns everything about itself:

    role          "select" (message), "transform" (before quantization, undone after it:
                  Sink, Rotate, LowRank), "quantize" (the one stage that writes codes), "entropy"
                  (lossless, over every part: Zstd)
    order         where a transform runs in a tensor's pipeline (lower first on the way in,
                  last on the way out)
    params()      its parameters as strings: what the wire carries (proto Stage {name, params})
                  and from_params() takes back, checking them (ValueError quotes the value)
    needs()       the prefill observation it needs (kvlink.cache.Observe; NONE for most)
    capability()  the capability a receiver must advertise to decode it (kvlink.capabilities)
    check()       the checks that need the model's geometry
    check_recipe() the checks against the rest of the recipe (e.g. Predict: one position set)
    profiles()    the calibrated profiles it decodes with, by hash (Predict's predictors)
    size_key()    what of it decides a message's size (the planner's cache key)

and, for a transform, the arithmetic on the way in and back (`apply`, `undo_one`,
`undo_stack`) and what it adds to a tensor's stored shape and parts (`stored`,
`part_sizes`). Names in the config grammar (kvlink.recipe) are written by the
stage classes too (`tokens`).

Adding a stage: docs/stages.md has the recipe (one file, one registry line, one
row of tests/test_stages.py's matrix).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvlink.cache import Observe
from kvlink.errors import NotRegistered
from kvlink.models import Geometry

ROLES: tuple[str, ...] = ("select", "transform", "quantize", "entropy")
MAX_PARAM_CHARS = 256
"""Longest parameter value a stage accepts from the wire."""


@dataclass
class Item:
    """One layer's K or V tensor on its way through its pipeline.

    shape: (kv_heads, n_kept, head_dim), the decoded tensor. x: on the way in, what the next
    stage takes (float32, (H, N', D')); on the way out, the tensor decoded so far. parts: the
    buffers the stages wrote (raw bytes, in the order they were written). stages: this tensor's
    pipeline. info: what a stage leaves for the later ones (e.g. that the keys were rotated).
    """

    layer: int
    kind: str
    shape: tuple[int, int, int]
    stages: tuple[Stage, ...]
    x: Tensor | None = None
    parts: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def transforms(self) -> tuple[Transform, ...]:
        return tuple(s for s in self.stages if isinstance(s, Transform))

    @property
    def quantize(self) -> Any:
        """The tensor's Quantize stage (every pipeline has exactly one)."""
        return next(s for s in self.stages if s.role == "quantize")

    @property
    def stored(self) -> tuple[int, int, int]:
        """Shape of the matrix the quantize stage gets: the transforms' effect on `shape`."""
        shape = self.shape
        for t in self.transforms:
            shape = t.stored(shape)
        return shape


class Stage(ABC):
    """Base of every stage: subclasses are frozen dataclasses that set `name`, `role` (and `order`)."""

    name: ClassVar[str]
    role: ClassVar[str]
    order: ClassVar[int] = 0

    def params(self) -> dict[str, str]:
        """The stage's parameters as strings (defaults included): what travels on the wire."""
        return {f.name: _text(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Stage:
        """The stage of `params` (from the wire: every value is checked; unknown names are refused)."""
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"stage {cls.name!r} has no parameters {unknown}; it has {sorted(known)}")
        values: dict[str, Any] = {}
        for name, text in params.items():
            if len(text) > MAX_PARAM_CHARS:
                raise ValueError(f"stage {cls.name!r} parameter {name!r} has {len(text)} characters")
            values[name] = _parse(text, known[name].type, f"stage {cls.name!r} parameter {name!r}")
        return cls(**values)

    def needs(self) -> Observe:
        """The prefill observation this stage needs (Observe.NONE: none)."""
        return Observe.NONE

    def capability(self) -> str:
        """What a receiver must advertise to decode this stage (kvlink.capabilities)."""
        return self.name

    def check(self, geometry: Geometry) -> None:  # noqa: B027 (most stages need no model checks)
        """Checks that need the model (ValueError quotes the value)."""

    def size_key(self) -> tuple[Any, ...]:
        """What of this stage decides a message's size (the planner caches estimates by it)."""
        return (self.name, *sorted(self.params().items()))

    def check_recipe(self, recipe: Any) -> None:  # noqa: B027 (most stages compose with any recipe)
        """Checks against the whole recipe (kvlink.recipe.Recipe) it is part of (ValueError quotes the value)."""

    def profiles(self) -> tuple[str, ...]:
        """The hashes of the calibrated profiles (other than the low-rank projection's) it decodes with."""
        return ()


class Transform(Stage):
    """A tensor stage before quantization that is undone after it (Sink, Rotate, LowRank)."""

    role: ClassVar[str] = "transform"
    quantized_only: ClassVar[bool] = True
    """A name that gives it to every tensor gives it to the quantized ones only (it serves quantization)."""
    before_formats: ClassVar[bool] = False
    """Its token comes before the formats in a name (low rank), else after them."""
    needs_float32: ClassVar[bool] = False
    """Undone in float32 (the decoded tensor is cast to the cache dtype after this transform)."""
    stackable: ClassVar[bool] = True
    """Tensors alike through it can be dequantized and undone together as one stack."""

    def stored(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The shape this stage hands on, given the (H, N, D) it takes."""
        return shape

    def part_sizes(self, shape: tuple[int, int, int]) -> dict[str, int]:
        """Raw bytes of the parts this stage writes for a tensor it takes at `shape`."""
        return {}

    @abstractmethod
    def apply(self, item: Item, context: Any) -> None:
        """On the way in: transform item.x (float32) and add this stage's parts to item.parts."""

    def undo_one(self, x: Tensor, item: Item, parts: Mapping[str, bytes], dtype: torch.dtype) -> Tensor:
        """On the way out, for one tensor: x (H, N', D') -> what this stage took."""
        return x

    def undo_stack(
        self, x: Tensor, items: list[Item], parts: list[Mapping[str, bytes]], dtype: torch.dtype
    ) -> Tensor:
        """On the way out, for a stack of tensors alike: x (m, H, N', D') -> (m, H, N, D)."""
        return x

    def queries(self, queries: Tensor, item: Item) -> Tensor:
        """The question's queries as seen by the stored tensor (for query-aware quantization)."""
        return queries

    @abstractmethod
    def token(self) -> str:
        """Its token in the config grammar (kvlink.recipe), e.g. sink1; parse_token reads it back."""

    @classmethod
    def parse_token(cls, text: str) -> Transform | None:
        """The stage a token names, or None when it is not this stage's."""
        return None


_REGISTRY: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: register a stage under `cls.name`; a duplicate name raises."""
    if cls.role not in ROLES:
        raise ValueError(f"stage {cls.name!r} has role {cls.role!r}; roles: {ROLES}")
    if cls.name in _REGISTRY:
        raise ValueError(f"stage {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def stage_class(name: str) -> type[Stage]:
    """The stage class registered as `name`; an unknown name lists the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise NotRegistered(f"unknown stage {name!r}; registered: {sorted(_REGISTRY)}") from None


def registered_stages() -> dict[str, type[Stage]]:
    return dict(_REGISTRY)


# --- parameter text ------------------------------------------------------------------------------------------
def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return ",".join(_text(v) for v in value)
    return str(value)


def _parse(text: str, annotation: Any, what: str) -> Any:
    kind = str(annotation)
    try:
        if kind.startswith("int | None"):
            return int(text) if text else None
        if kind.startswith("tuple[int"):
            return tuple(int(v) for v in text.split(",")) if text else ()
        if kind == "int":
            return int(text)
        if kind == "float":
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
        if kind == "bool":
            if text not in ("0", "1"):
                raise ValueError(text)
            return text == "1"
    except ValueError:
        raise ValueError(f"{what}: {text[:64]!r} is not a valid {kind}") from None
    return text
