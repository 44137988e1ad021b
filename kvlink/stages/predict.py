"""Predict: only the residual of a cross-layer prediction is quantized (AQUA-KV style; no wire bytes).

Each layer's keys and values are predicted from the tensors the receiver has already decoded
(kvlink.predict.PredictorProfile: K_l from [K^_{l-1}, V^_{l-1}, 1], V_l from [K^_l, V^_{l-1}, 1],
keys before RoPE); the rest of the pipeline (Sink, Clamp, Rotate, Quantize) sees the residual, so a
message has exactly its plain twin's parts and bytes. The profile travels by hash in this stage's
`profile` parameter (never per message): a receiver decodes it only when it holds that profile.

Closed loop: the codec encodes the tensors in order, decoding each one (PredictState) to predict
the next, exactly as the receiver decodes them; so this stage is not stackable and decodes in
order (layer 0 K, layer 0 V, layer 1 K, ...). Keys are un-roped on the way in and re-roped at
their ORIGINAL positions on the way out (the profile holds the model's rotary embedding).

Composes with: no selection, or a selection that keeps ONE position set for all layers
(scope "global"); every K and V pipeline must have it (a prediction crosses layers and kinds);
not with a low-rank latent, nor with question-aware key quantization (the residual is not what
the question's logits see).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvlink.stages.base import Item, Stage, Transform, register

_HASH = re.compile(r"[0-9a-f]{64}")
_USES = "predicts with profile"


class PredictState:
    """What the decoded tensors so far give the next prediction: the latest decoded keys (before RoPE)
    and values, each (H, N, D) float32, at the message's one kept position set `positions` (N,)."""

    def __init__(self, profile: Any, positions: Tensor) -> None:
        self.profile = profile
        self.positions = positions
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.layer = {"k": -1, "v": -1}  # the layer each of k, v holds
        self._cs: dict[str, tuple[Tensor, Tensor]] = {}

    def _cos_sin(self, device: torch.device) -> tuple[Tensor, Tensor]:
        key = str(device)
        if key not in self._cs:
            self._cs[key] = self.profile.rotary.cos_sin(self.positions.to(device))
        return self._cs[key]

    def unrope(self, x: Tensor) -> Tensor:
        return self.profile.rotary.undo(x.float(), self._cos_sin(x.device))  # type: ignore[no-any-return]

    def rope(self, x: Tensor) -> Tensor:
        return self.profile.rotary.apply(x.float(), self._cos_sin(x.device))  # type: ignore[no-any-return]

    def inputs(self, layer: int, kind: str) -> Tensor:
        """The predictor's input rows for (layer, kind): (N, 2F + 1), or (N, F + 1) for layer 0's values."""
        from kvlink.predict import rows

        want = {"k": layer - 1, "v": layer - 1} if kind == "k" else {"k": layer, "v": layer - 1}
        if self.layer != want:
            raise ValueError(
                f"layer {layer} {kind} is predicted from decoded (k, v) of layers {want}, "
                f"have {self.layer}: tensors must be encoded and decoded in order"
            )
        assert self.k is not None
        x = [rows(self.k)] if self.v is None or (layer, kind) == (0, "v") else [rows(self.k), rows(self.v)]
        ones = torch.ones(x[0].shape[0], 1, dtype=x[0].dtype, device=x[0].device)
        return torch.cat([*x, ones], dim=1)

    def predict(self, layer: int, kind: str, weight: Tensor) -> Tensor:
        """The prediction of the (layer, kind) tensor, (H, N, D) float32 (keys before RoPE)."""
        from kvlink.predict import unrows

        x = self.inputs(layer, kind)
        return unrows(x @ weight.to(x.device), self.profile.kv_heads)

    def record(self, layer: int, kind: str, decoded: Tensor) -> None:
        """The decoded (layer, kind) tensor (keys before RoPE), for the next predictions."""
        if kind == "k":
            self.k = decoded
        else:
            self.v = decoded
        self.layer[kind] = layer


# --- also kvlink.stages.pca's: a profile named by hash, a stage in every K and V pipeline -------------------
def bind_profile(named: str, held: str, uses: str) -> str:
    """The profile hash a stage naming `named` ("": the codec's own) codes with in a codec holding `held`
    (ValueError when it names another). uses: what the stage does with it, for the message."""
    if named and named != held:
        raise ValueError(f"recipe {uses} {named!r}, the codec holds {held!r}")
    return held


def check_profile_held(named: str, held: str | None, uses: str) -> None:
    """ValueError unless a codec holding profile `held` (None: none) decodes a message naming `named`."""
    if named != held:
        raise ValueError(f"message {uses} {named!r}, which this codec lacks (it holds {held!r})")


def in_every_pipeline(stage: Stage, recipe: Any, why: str) -> Iterator[tuple[Stage, ...]]:
    """`recipe`'s K pipelines, then its V pipelines, each checked to have `stage` (ValueError at the first
    that lacks it, saying `why` it must be in every one)."""
    for kind in ("k", "v"):
        for pipeline in recipe.k if kind == "k" else recipe.v:
            if stage not in pipeline:
                raise ValueError(
                    f"{stage.name} must be in every K and V pipeline ({why}), a {kind} pipeline lacks it: "
                    f"{[s.name for s in pipeline]}"
                )
            yield pipeline


@register
@dataclass(frozen=True)
class Predict(Transform):
    """Quantize the residual of a cross-layer prediction (kvlink.predict) whose profile hash is `profile`
    ("": the codec's own profile, bound when the codec is made)."""

    name: ClassVar[str] = "predict"
    order: ClassVar[int] = 5  # first: the Sink entries are residuals too (at float16 either way)
    quantized_only: ClassVar[bool] = False  # every K and V tensor feeds the next prediction
    before_formats: ClassVar[bool] = True
    needs_float32: ClassVar[bool] = True
    stackable: ClassVar[bool] = False  # decoded in order, each prediction needing the previous tensors

    profile: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.profile, str) or (self.profile and not _HASH.fullmatch(self.profile)):
            raise ValueError(
                f"predict profile must be a sha256 hex digest or '', got {str(self.profile)[:80]!r}"
            )

    def size_key(self) -> tuple[Any, ...]:
        return ()  # no bytes: the message is its plain twin's size

    def profiles(self) -> tuple[str, ...]:
        return (self.profile,)

    def check_recipe(self, recipe: Any) -> None:
        if recipe.select is not None and recipe.scope != "global":
            raise ValueError(
                f"predict crosses layers: it needs ONE kept position set for all layers, got the "
                f"per-layer selection {recipe.select.token()!r} (use scope 'global')"
            )
        for pipeline in in_every_pipeline(self, recipe, "each tensor feeds the next one's prediction"):
            if any(s.name == "lowrank" for s in pipeline):
                raise ValueError("predict with a low-rank latent: choose one")
        if any(q.question_aware for q in recipe.quantizers("k")):
            raise ValueError("predict with question-aware key quantization: choose one")

    def bind(self, profile_hash: str) -> Predict:
        """This stage naming `profile_hash` (ValueError when it names another profile)."""
        return Predict(bind_profile(self.profile, profile_hash, _USES))

    def check_held(self, held: str | None) -> None:
        """ValueError unless a codec holding predictors `held` (a hash; None: none) decodes this stage."""
        check_profile_held(self.profile, held, _USES)

    def apply(self, item: Item, context: Any) -> None:
        state: PredictState = item.info["predict"]
        weight = state.profile.weight(item.layer, item.kind)
        if weight is None:  # not predicted: the plain twin's tensor (keys after RoPE)
            return
        x = item.x
        assert x is not None
        target = state.unrope(x) if item.kind == "k" else x.float()
        item.x = target - state.predict(item.layer, item.kind, weight)

    def undo_one(self, x: Tensor, item: Item, parts: Mapping[str, bytes], dtype: torch.dtype) -> Tensor:
        state: PredictState = item.info["predict"]
        weight = state.profile.weight(item.layer, item.kind)
        x = x.float()
        if weight is None:
            state.record(item.layer, item.kind, state.unrope(x) if item.kind == "k" else x)
            return x
        decoded = x + state.predict(item.layer, item.kind, weight)
        state.record(item.layer, item.kind, decoded)
        return state.rope(decoded) if item.kind == "k" else decoded

    def token(self) -> str:
        return "xpred"  # the profile is the codec's, like profile-r<n>'s projection

    @classmethod
    def parse_token(cls, text: str) -> Predict | None:
        return cls() if text == "xpred" else None
