"""Cross-layer predictors (AQUA-KV style): each layer's K and V predicted from what the receiver decoded.

A `PredictorProfile` is model data calibrated once per model and held by both sides, identified by
the sha256 of its file (like kvlink.lowrank.ModelProfile). With F = kv_heads * head_dim, a tensor's
rows are its (N, F) matrix (`rows`), keys BEFORE rotary embedding, and per layer l:

    K_l  ~  [K^_{l-1}, V^_{l-1}, 1] @ A_l     A_l ((2F + 1), F); layer 0: no predictor
    V_l  ~  [K^_l,     V^_{l-1}, 1] @ B_l     B_l ((2F + 1), F); layer 0: [K^_0, 1], (F + 1, F)

where X^ is the DECODED tensor (what the receiver has), so the sender predicts from exactly what the
receiver will predict from (closed loop: an error does not carry to the next layer). A predictor that
explains less than `min_r2` of its tensor's variance on the fit text is left out: that tensor travels
as its plain twin's (keys after RoPE). The stage that uses it is kvlink.stages.predict.Predict.

The profile also holds the model's rotary embedding (`Rotary`: inverse frequencies and scaling), so a
receiver un-ropes and re-ropes keys at their original positions from the profile alone.

File: ONE safetensors file, float32 tensors, canonical bytes (kvlink.lowrank's serializer)

    rotary.inv_freq   (head_dim / 2,)
    layer.{l}.k.weight ((2F + 1), F)         present only where the keys are predicted (l >= 1)
    layer.{l}.v.weight ((F + 1) or (2F + 1), F)

and string metadata: format, version, fingerprint, layers, kv_heads, head_dim, rotary_scaling,
tokens, texts, ridge, min_r2, fitted_for (the recipe whose quantization the closed loop fitted through).

Fitting (`fit_predictors`): ridge least squares in float64, layer by layer, on the calibration
split's odd paragraphs (`fit_texts`), each target's inputs being the previous tensors as the codec
encodes and decodes them under `fitted_for` (research/screen_predict.py found open-loop fits amplify
quantization noise). Deterministic: the same model and texts give the same bytes, hence the same hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvlink.lowrank import CanonicalFile, _canonical_bytes, _int_metadata, read_canonical

logger = logging.getLogger(__name__)

PREDICTOR_FORMAT = "kvlink.predictors"
PREDICTOR_VERSION = "1"
RIDGE = 1e-3
"""Ridge strength, relative to the mean diagonal of X^T X (the screen's)."""
MIN_R2 = 0.02
"""A predictor explaining less of its tensor's variance on the fit text is left out (the screen's)."""
KINDS: tuple[str, ...] = ("k", "v")


# --- rows of a tensor ------------------------------------------------------------------------------------
def rows(x: Tensor) -> Tensor:
    """(H, N, D) -> (N, H * D): one row per position, heads side by side."""
    h, n, d = x.shape
    return x.permute(1, 0, 2).reshape(n, h * d)


def unrows(y: Tensor, heads: int) -> Tensor:
    """(N, H * D) -> (H, N, D)."""
    n, f = y.shape
    return y.reshape(n, heads, f // heads).permute(1, 0, 2)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass(frozen=True, eq=False)
class Rotary:
    """A model's rotary embedding as transformers' Llama/Qwen2/Mistral apply it: for position p,
    cos/sin of p * inv_freq (each frequency twice, halves rotated), times `scaling`."""

    inv_freq: Tensor  # (head_dim / 2,) float32
    scaling: float = 1.0

    @classmethod
    def of_model(cls, model: Any) -> Rotary:
        """The rotary embedding of a transformers decoder (`model.model.rotary_emb`); ValueError if none."""
        emb = getattr(getattr(model, "model", model), "rotary_emb", None)
        inv_freq = getattr(emb, "inv_freq", None)
        if not isinstance(inv_freq, Tensor):
            raise ValueError(f"{type(model).__name__} has no model.rotary_emb.inv_freq: predictors need RoPE")
        return cls(
            inv_freq.detach().to("cpu", torch.float32).clone(), float(getattr(emb, "attention_scaling", 1.0))
        )

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) at `positions` (n,), each (n, head_dim) float32 on positions' device, unscaled."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, D)
        return emb.cos(), emb.sin()

    def apply(self, x: Tensor, cs: tuple[Tensor, Tensor]) -> Tensor:
        """Keys before RoPE (H, n, D) -> after it, with `cs` = cos_sin(positions)."""
        cos, sin = cs
        return (x * cos + _rotate_half(x) * sin) * self.scaling

    def undo(self, x: Tensor, cs: tuple[Tensor, Tensor]) -> Tensor:
        """Keys after RoPE (H, n, D) -> before it (the inverse of `apply`)."""
        cos, sin = cs
        return (x * cos - _rotate_half(x) * sin) / self.scaling


@dataclass(frozen=True, eq=False)
class PredictorProfile(CanonicalFile):
    """Per (layer, kind) a predictor weight (see the module docstring) or none; the model's RoPE.

    weights[(l, kind)]: float32 ((2F + 1) or (F + 1), F); absent: that tensor is not predicted.
    Treat a profile as immutable: `hash` is computed once.
    """

    what: ClassVar[str] = "predictor profile"

    fingerprint: str
    layers: int
    kv_heads: int
    head_dim: int
    rotary: Rotary
    weights: dict[tuple[int, str], Tensor]
    tokens: int = 0
    texts: int = 0
    ridge: float = RIDGE
    min_r2: float = MIN_R2
    fitted_for: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise ValueError(f"fingerprint must be a non-empty string, got {self.fingerprint!r}")
        for name in ("layers", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim % 2 or tuple(self.rotary.inv_freq.shape) != (self.head_dim // 2,):
            raise ValueError(
                f"rotary inv_freq has shape {tuple(self.rotary.inv_freq.shape)}, head_dim {self.head_dim} "
                f"needs ({self.head_dim // 2},): predictors support full rotary embeddings only"
            )
        if not (self.rotary.scaling > 0 and torch.isfinite(self.rotary.inv_freq).all()):
            raise ValueError(
                f"rotary scaling must be > 0 and frequencies finite, got {self.rotary.scaling!r}"
            )
        f = self.features
        for key, w in self.weights.items():
            layer, kind = key
            if kind not in KINDS or not 0 <= layer < self.layers or (layer, kind) == (0, "k"):
                raise ValueError(f"no predictor can exist for layer {layer!r} {kind!r}")
            shape = (self.inputs(layer, kind), f)
            if tuple(w.shape) != shape or w.dtype != torch.float32:
                raise ValueError(
                    f"layer.{layer}.{kind}.weight is {tuple(w.shape)} {w.dtype}, expected {shape} float32"
                )
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"layer.{layer}.{kind}.weight holds non-finite values")

    @property
    def features(self) -> int:
        """F = kv_heads * head_dim: the width of one row of a tensor."""
        return self.kv_heads * self.head_dim

    def inputs(self, layer: int, kind: str) -> int:
        """Rows of the (layer, kind) weight: 2F + 1, or F + 1 for layer 0's values."""
        return (self.features if (layer, kind) == (0, "v") else 2 * self.features) + 1

    def weight(self, layer: int, kind: str) -> Tensor | None:
        return self.weights.get((layer, kind))

    def check_geometry(self, geometry: Any) -> None:
        """ValueError unless this profile was fitted for a model of `geometry`'s layers, heads and dims."""
        mine = (self.layers, self.kv_heads, self.head_dim)
        theirs = (geometry.num_layers, geometry.kv_heads, geometry.head_dim)
        if mine != theirs:
            raise ValueError(
                f"predictor profile is for (layers, kv_heads, head_dim) {mine}, the model has {theirs}"
            )

    def check_fingerprint(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise ValueError(
                f"predictor profile was fitted for model {self.fingerprint[:12]!r}, "
                f"not for {fingerprint[:12]!r}"
            )

    def to(self, device: torch.device | str) -> PredictorProfile:
        """The same profile (same hash) with its weights on `device`."""
        moved = PredictorProfile(
            self.fingerprint, self.layers, self.kv_heads, self.head_dim,
            Rotary(self.rotary.inv_freq.to(device), self.rotary.scaling),
            {key: w.to(device) for key, w in self.weights.items()},
            self.tokens, self.texts, self.ridge, self.min_r2, self.fitted_for,
        )  # fmt: skip
        if "hash" in self.__dict__:
            moved.__dict__["hash"] = self.__dict__["hash"]
        return moved

    # --- file ------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {
            "format": PREDICTOR_FORMAT, "version": PREDICTOR_VERSION, "fingerprint": self.fingerprint,
            "layers": str(self.layers), "kv_heads": str(self.kv_heads), "head_dim": str(self.head_dim),
            "rotary_scaling": repr(float(self.rotary.scaling)), "tokens": str(self.tokens),
            "texts": str(self.texts), "ridge": repr(float(self.ridge)), "min_r2": repr(float(self.min_r2)),
            "fitted_for": self.fitted_for,
        }  # fmt: skip

    def to_bytes(self) -> bytes:
        """The canonical file bytes: the same profile always gives the same bytes."""
        tensors: list[tuple[str, Tensor]] = [("rotary.inv_freq", self.rotary.inv_freq)]
        for layer in range(self.layers):
            for kind in KINDS:
                w = self.weights.get((layer, kind))
                if w is not None:
                    tensors.append((f"layer.{layer}.{kind}.weight", w))
        return _canonical_bytes(tensors, self.metadata())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> PredictorProfile:
        """Parse and validate profile bytes; any problem raises ValueError naming it."""
        raw, metadata = read_canonical(data, source, "predictor profile", PREDICTOR_FORMAT, PREDICTOR_VERSION)
        layers = _int_metadata(metadata, "layers", 1)
        allowed = {"rotary.inv_freq"} | {f"layer.{i}.{k}.weight" for i in range(layers) for k in KINDS}
        extra = sorted(set(raw) - allowed)
        if extra or "rotary.inv_freq" not in raw:
            raise ValueError(f"{source}: unexpected tensors {extra[:4]} or no rotary.inv_freq")
        weights = {
            (int(name.split(".")[1]), name.split(".")[2]): t
            for name, t in raw.items()
            if name.startswith("layer.")
        }
        try:
            return cls(
                str(metadata.get("fingerprint", "")), layers, _int_metadata(metadata, "kv_heads", 1),
                _int_metadata(metadata, "head_dim", 2),
                Rotary(raw["rotary.inv_freq"], float(metadata.get("rotary_scaling", "1.0"))), weights,
                _int_metadata(metadata, "tokens", 0), _int_metadata(metadata, "texts", 0),
                float(metadata.get("ridge", RIDGE)), float(metadata.get("min_r2", MIN_R2)),
                str(metadata.get("fitted_for", "")),
            )  # fmt: skip
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> PredictorProfile:
        """Read a profile file; its hash is that of its canonical bytes."""
        profile = cls.from_bytes(Path(path).read_bytes(), source=str(path))
        logger.info("loaded predictor profile %s from %s", profile.hash[:12], path)
        return profile


def is_predictor_file(path: str | Path) -> bool:
    """Whether `path` is a predictor profile (by its metadata's format), without loading its tensors."""
    return file_format(path) == PREDICTOR_FORMAT


def file_format(path: str | Path) -> str | None:
    """The metadata format of the profile file `path` (None when it has none), without loading its tensors."""
    with Path(path).open("rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            return None
        (size,) = struct.unpack("<Q", head)
        if size > 1 << 20:
            return None
        try:
            header = json.loads(handle.read(size))
        except ValueError:
            return None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        return None
    fmt = header["__metadata__"].get("format")
    return fmt if isinstance(fmt, str) else None


def load_profile(path: str | Path) -> Any:
    """The calibrated profile in `path`, by its format: a low-rank projection (kvlink.lowrank.ModelProfile),
    predictors (PredictorProfile) or a residual profile (kvlink.residual.ResidualProfile)."""
    from kvlink.lowrank import ModelProfile
    from kvlink.residual import RESIDUAL_FORMAT, ResidualProfile

    fmt = file_format(path)
    if fmt == PREDICTOR_FORMAT:
        return PredictorProfile.load(path)
    if fmt == RESIDUAL_FORMAT:
        return ResidualProfile.load(path)
    return ModelProfile.load(path)


# --- fitting ---------------------------------------------------------------------------------------------
def fit_texts(limit: int | None = None) -> list[str]:
    """The calibration split's paragraphs with ODD index inside their article (file order): the text the
    predictors are fitted on (research/common.py's fit_texts; the even ones are the screens' questions)."""
    from kvlink.eval.splits import calibration_examples

    index: dict[str, int] = {}
    counters: dict[str, int] = {}
    for qa in calibration_examples(answerable_only=False):
        if qa.context not in index:
            index[qa.context] = counters.get(qa.title, 0)
            counters[qa.title] = index[qa.context] + 1
    texts = [p for p, i in index.items() if i % 2 == 1]
    return texts[:limit] if limit is not None else texts


def _ridge(gram: Tensor, cross: Tensor, ridge: float) -> Tensor:
    """Solve (X^T X + ridge * mean(diag) I) W = X^T Y in float64; W as float32."""
    g = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(g, cross).to(torch.float32)


def fit_predictors(
    model: Any,
    texts: Sequence[Tensor],
    recipe: Any,
    fingerprint: str,
    ridge: float = RIDGE,
    min_r2: float = MIN_R2,
) -> PredictorProfile:
    """Fit the predictors of `model` on `texts` (token-id tensors, each prefilled alone), closed loop
    through `recipe` (a kvlink.recipe.Recipe with a Predict stage and no selection: each layer's inputs
    are the previous tensors as kvlink.codec.Codec encodes and decodes them under it).

    Per (layer, kind) the normal equations X^T X, X^T Y are summed in float64 over every text's rows
    but its Sink entries (kept at float16, they are outliers a fit should not chase); the solve is
    ridge-regularised (`ridge` times the mean diagonal). A predictor whose R^2 on the fit rows is
    below `min_r2` is left out. Deterministic on a given device and thread count.
    """
    from kvlink.cache import prefill
    from kvlink.codec import Codec
    from kvlink.models import geometry_of
    from kvlink.stages.predict import PredictState

    geometry = geometry_of(model.config)
    if recipe.select is not None:
        raise ValueError(f"fit predictors through a recipe without selection, got {recipe.name!r}")
    if not texts:
        raise ValueError("fit_predictors needs at least one text")
    rotary = Rotary.of_model(model)
    h, f = geometry.kv_heads, geometry.kv_heads * geometry.head_dim
    weights: dict[tuple[int, str], Tensor] = {}
    # The profile being fitted: its weights dict fills layer by layer (the codec reads it as it goes).
    partial = PredictorProfile(fingerprint, geometry.num_layers, h, geometry.head_dim, rotary, weights)
    codec = Codec(recipe, geometry, partial)
    started = time.perf_counter()
    kvs = []
    for ids in texts:
        kv = prefill(model, ids.reshape(-1).long()).kv
        kvs.append(kv.to(dtype=torch.float32))
    states = [PredictState(partial, kv.positions[0]) for kv in kvs]
    tokens = sum(kv.length for kv in kvs)
    skip = {kind: _sink_of(recipe, kind) for kind in KINDS}
    for layer in range(geometry.num_layers):
        for kind in KINDS:
            if (layer, kind) != (0, "k"):
                n_in = partial.inputs(layer, kind)
                on = kvs[0].keys[0].device  # the prefill's: a model on CUDA fits there
                gram = torch.zeros(n_in, n_in, dtype=torch.float64, device=on)
                cross = torch.zeros(n_in, f, dtype=torch.float64, device=on)
                ysum = torch.zeros(f, dtype=torch.float64, device=on)
                ysq = torch.zeros(f, dtype=torch.float64, device=on)
                count = 0
                for kv, state in zip(kvs, states, strict=True):
                    x = state.inputs(layer, kind)[skip[kind] :].double()  # (N', n_in)
                    y = rows(_target(kv, layer, kind, state))[skip[kind] :].double()  # (N', F)
                    gram += x.T @ x
                    cross += x.T @ y
                    ysum += y.sum(0)
                    ysq += (y * y).sum(0)
                    count += int(y.shape[0])
                w = _ridge(gram, cross, ridge)
                # R^2 from the sums: residual energy = sum(y^2) - 2 w.cross + w^T gram w, per feature
                w64 = w.double()
                res = ysq - 2 * (w64 * cross).sum(0) + (w64 * (gram @ w64)).sum(0)
                var = ysq - ysum * ysum / max(count, 1)
                r2 = 1.0 - float(res.sum() / var.sum().clamp_min(1e-30))
                if r2 >= min_r2:
                    weights[(layer, kind)] = w
                logger.debug("layer %d %s: R^2 %.4f", layer, kind, r2)
            for kv, state in zip(kvs, states, strict=True):
                codec.encode_one(kv, layer, kind, state)  # decodes it into `state`, as the receiver will
        logger.info(
            "predictors: layer %d/%d fitted, %.1f s",
            layer + 1,
            geometry.num_layers,
            time.perf_counter() - started,
        )
    profile = PredictorProfile(
        fingerprint, geometry.num_layers, h, geometry.head_dim, rotary, dict(weights),
        tokens, len(texts), ridge, min_r2, recipe.name,
    )  # fmt: skip
    logger.info(
        "fitted predictor profile %s on %d tokens in %.1f s",
        profile.hash[:12],
        tokens,
        time.perf_counter() - started,
    )
    return profile


def _sink_of(recipe: Any, kind: str) -> int:
    return max((getattr(s, "n", 0) for s in recipe.pipeline(kind, 0) if s.name == "sink"), default=0)


def _target(kv: Any, layer: int, kind: str, state: Any) -> Tensor:
    """What the (layer, kind) predictor predicts: keys before RoPE, values."""
    if kind == "k":
        return state.unrope(kv.keys[layer].float())
    return kv.values[layer].float()


def predictor_path(fingerprint: str, recipe_name: str) -> Path:
    """Where the predictors of the model with `fingerprint`, fitted through `recipe_name`, are cached:
    <cache_dir>/profiles/<fingerprint>-xpred-<8 hex of the recipe name>.safetensors."""
    from kvlink.lowrank import default_profile_path

    base = default_profile_path(fingerprint)
    tag = hashlib.sha256(recipe_name.encode()).hexdigest()[:8]
    return base.with_name(f"{fingerprint}-xpred-{tag}.safetensors")


def fit_recipe(recipe: Any) -> Any:
    """The recipe the predictors of `recipe` are fitted through: its pipelines, no selection, no zstd,
    no question-aware quantization (a fit has no question)."""
    from dataclasses import replace

    plain = replace(recipe, select=None, zstd=None)
    return plain.without("round").without("kwidths").without("vwidths")


def cached_predictors(lm: Any, recipe: Any, texts: int | None = None) -> PredictorProfile:
    """The predictors `recipe` encodes with on `lm` (a kvlink.models.LoadedModel): loaded from the cache
    (predictor_path) or fitted on the calibration split's odd paragraphs (`texts` of them; all when
    None) and saved there. Deterministic on one device and thread count: give the receiver this file."""
    from kvlink.prompt import context_ids

    if recipe.has("pca"):
        raise ValueError(
            f"{recipe.name!r} is transform coding: its predictors come with a residual profile "
            "(kvlink.residual.cached_transform_profiles)"
        )
    fit = fit_recipe(recipe)
    path = predictor_path(lm.fingerprint, fit.name)
    if path.is_file():
        profile = PredictorProfile.load(path)
        profile.check_fingerprint(lm.fingerprint)
        return profile.to(lm.device)
    ids = [context_ids(lm.tokenizer, t).to(lm.device) for t in fit_texts(texts)]
    profile = fit_predictors(lm.model, ids, fit, lm.fingerprint)
    profile.save(path)
    return profile.to(lm.device)
