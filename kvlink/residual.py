"""The residual profile of transform coding: PCA bases, scales and entropy tables of predicted tensors.

Issue 24's `xl` design (research/README.md, "Design note"): each layer's K and V are predicted from
what the receiver decoded (kvlink.predict), the residual is rotated into its principal components,
rounded to one step per tensor and rANS-coded (kvlink.ans) under a quantized Laplace per component.
A `ResidualProfile` is what both sides must hold for that, calibrated once per model and named by
the sha256 of its file; it belongs to one predictor profile (`predictors`, its hash). With F =
kv_heads * head_dim, per (layer l, kind) it holds

    mean   (F,)     the residual's mean on the fit text (keys before RoPE, as the predictors see them)
    basis  (F, F)   orthonormal columns, the residual's principal components by decreasing variance
    scale  (F,)     integer scale index j0 = round(8 log2 sqrt(var / 2)): the Laplace scale of each
                    component, in 1/8 octaves of one unit
    weight          integer o = round(4 log2 w), w = (KL of the tensor alone at INT2) / (its INT2
                    squared error): how much a unit of this tensor's error costs the answer

and for the whole model the frequency tables (kvlink.ans.laplace_tables, shipped as data so that no
receiver derives a table from floats). A message at rate index E (1/32 octaves) codes tensor (l, kind)
with step 2^(E / 32 - o / 8), i.e. steps inversely proportional to sqrt(w) as rate-distortion theory asks
when the error is weighted by w, and codes component f with table clip(j0[f] - round(E / 4) + o)
(`tables_for`: the table of the nearest 1/8 octave).

File: ONE safetensors file, float32 tensors (integers stored exactly), canonical bytes
(kvlink.lowrank's serializer):

    layer.{l}.{k|v}.mean (F,) / .basis (F, F) / .scale (F,)
    weight (L, 2)
    tables (256, kvlink.ans.ALPHABET)

and string metadata: format, version, fingerprint, predictors, layers, kv_heads, head_dim, tokens,
texts. Fitting (`fit_residuals`): the predictors' closed loop (kvlink.predict.fit_predictors' order,
through the recipe they were fitted for), residual sums in float64, eigendecomposition per tensor.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from kvlink import ans
from kvlink.lowrank import CanonicalFile, _canonical_bytes, _int_metadata, read_canonical
from kvlink.predict import KINDS, PredictorProfile, rows

logger = logging.getLogger(__name__)

RESIDUAL_FORMAT = "kvlink.residual"
RESIDUAL_VERSION = "1"
RATE_STEPS = 32
"""A message's rate index moves its steps by 1/RATE_STEPS of an octave (a budget is filled to ~1%)."""
_PER_TABLE = RATE_STEPS // ans.SCALE_STEPS
MIN_VARIANCE = 1e-12
"""A component's variance floor (a component the fit text never moves still gets a table)."""


@dataclass
class ResidualProfile(CanonicalFile):
    """Per (layer, kind) the residual's mean, basis and scale indices; per tensor a weight index; the
    entropy tables. See the module docstring. Treat as immutable: `hash` is computed once."""

    what: ClassVar[str] = "residual profile"

    fingerprint: str
    predictors: str
    layers: int
    kv_heads: int
    head_dim: int
    means: dict[tuple[int, str], Tensor]
    bases: dict[tuple[int, str], Tensor]
    scales: dict[tuple[int, str], Tensor]
    weight: Tensor
    tables: ans.Tables
    tokens: int = 0
    texts: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise ValueError(f"fingerprint must be a non-empty string, got {self.fingerprint!r}")
        if not isinstance(self.predictors, str) or len(self.predictors) != 64:
            raise ValueError(f"predictors must be a predictor profile's sha256 hex, got {self.predictors!r}")
        for name in ("layers", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        f = self.features
        want = {(layer, kind) for layer in range(self.layers) for kind in KINDS}
        for what, table, shape in (("mean", self.means, (f,)), ("basis", self.bases, (f, f)),
                                   ("scale", self.scales, (f,))):  # fmt: skip
            if set(table) != want:
                missing = sorted(want - set(table))[:2]
                raise ValueError(f"residual profile needs a {what} per layer and kind, missing {missing}")
            for (layer, kind), t in table.items():
                if tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"layer.{layer}.{kind}.{what} is {tuple(t.shape)}, expected {shape} of finite values"
                    )
        for (layer, kind), s in self.scales.items():
            if not bool((s == s.round()).all()) or not bool(((s >= -1024) & (s <= 1024)).all()):
                raise ValueError(f"layer.{layer}.{kind}.scale must hold integers in [-1024, 1024]")
        if tuple(self.weight.shape) != (self.layers, 2) or not bool(
            (self.weight == self.weight.round()).all()
        ):
            raise ValueError(f"weight must be ({self.layers}, 2) integers, got {tuple(self.weight.shape)}")
        if len(self.tables) != ans.J_MAX - ans.J_MIN + 1:
            raise ValueError(f"tables must hold {ans.J_MAX - ans.J_MIN + 1} rows, got {len(self.tables)}")

    @property
    def features(self) -> int:
        return self.kv_heads * self.head_dim

    def step(self, layer: int, kind: str, rate: int) -> float:
        """The quantization step of tensor (layer, kind) at rate index `rate` (1/RATE_STEPS octaves)."""
        o = int(self.weight[layer, KINDS.index(kind)])
        return 2.0 ** (rate / RATE_STEPS - o / ans.SCALE_STEPS)

    def tables_for(self, layer: int, kind: str, rate: int) -> np.ndarray:
        """(F,) each component's table index (into `tables`) at rate index `rate`: the table of the scale
        nearest the component's, in steps (integer arithmetic only)."""
        o = int(self.weight[layer, KINDS.index(kind)])
        coarse = (rate + _PER_TABLE // 2) // _PER_TABLE  # the rate in the tables' 1/8 octaves
        j = self.scales[(layer, kind)].to(torch.int64).cpu().numpy() - coarse + o
        return np.clip(j, ans.J_MIN, ans.J_MAX) - ans.J_MIN  # type: ignore[no-any-return]

    def check_fingerprint(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise ValueError(
                f"residual profile was fitted for model {self.fingerprint[:12]!r}, not for {fingerprint[:12]!r}"
            )

    def to(self, device: torch.device | str) -> ResidualProfile:
        """The same profile (same hash) with its means and bases on `device`."""
        moved = replace(
            self,
            means={k: t.to(device) for k, t in self.means.items()},
            bases={k: t.to(device) for k, t in self.bases.items()},
        )
        moved.__dict__["hash"] = self.hash
        return moved

    def check_geometry(self, geometry: Any) -> None:
        """ValueError unless this profile was fitted for a model of `geometry`'s layers, heads and dims."""
        mine = (self.layers, self.kv_heads, self.head_dim)
        theirs = (geometry.num_layers, geometry.kv_heads, geometry.head_dim)
        if mine != theirs:
            raise ValueError(
                f"residual profile is for (layers, kv_heads, head_dim) {mine}, the model has {theirs}"
            )

    def check_for(self, predictors: PredictorProfile) -> None:
        """ValueError unless this profile was fitted on the residuals of `predictors`."""
        if predictors.hash != self.predictors:
            raise ValueError(
                f"residual profile belongs to predictors {self.predictors[:12]!r}, not {predictors.hash[:12]!r}"
            )

    # --- file ----------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {
            "format": RESIDUAL_FORMAT, "version": RESIDUAL_VERSION, "fingerprint": self.fingerprint,
            "predictors": self.predictors, "layers": str(self.layers), "kv_heads": str(self.kv_heads),
            "head_dim": str(self.head_dim), "tokens": str(self.tokens), "texts": str(self.texts),
        }  # fmt: skip

    def to_bytes(self) -> bytes:
        """The canonical file bytes: the same profile always gives the same bytes."""
        tensors: list[tuple[str, Tensor]] = []
        for layer in range(self.layers):
            for kind in KINDS:
                key = (layer, kind)
                tensors += [(f"layer.{layer}.{kind}.mean", self.means[key]),
                            (f"layer.{layer}.{kind}.basis", self.bases[key]),
                            (f"layer.{layer}.{kind}.scale", self.scales[key])]  # fmt: skip
        tensors += [
            ("weight", self.weight),
            ("tables", torch.from_numpy(self.tables.freq.astype(np.float32))),
        ]
        return _canonical_bytes(tensors, self.metadata())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> ResidualProfile:
        """Parse and validate profile bytes; any problem raises ValueError naming it."""
        raw, metadata = read_canonical(data, source, "residual profile", RESIDUAL_FORMAT, RESIDUAL_VERSION)
        layers = _int_metadata(metadata, "layers", 1)
        parts = ("mean", "basis", "scale")
        allowed = {"weight", "tables"} | {
            f"layer.{i}.{k}.{p}" for i in range(layers) for k in KINDS for p in parts
        }
        extra = sorted(set(raw) - allowed)
        if extra or "weight" not in raw or "tables" not in raw:
            raise ValueError(f"{source}: unexpected tensors {extra[:4]} or no weight/tables")
        table: dict[str, dict[tuple[int, str], Tensor]] = {p: {} for p in parts}
        for name, t in raw.items():
            if name.startswith("layer."):
                _, layer, kind, part = name.split(".")
                table[part][(int(layer), kind)] = t
        freq = raw["tables"]
        try:
            if not bool((freq == freq.round()).all()) or bool((freq < 0).any()):
                raise ValueError("tables must hold non-negative integers")
            return cls(
                str(metadata.get("fingerprint", "")), str(metadata.get("predictors", "")), layers,
                _int_metadata(metadata, "kv_heads", 1), _int_metadata(metadata, "head_dim", 1),
                table["mean"], table["basis"], table["scale"], raw["weight"],
                ans.Tables(freq.numpy().astype(np.uint32)),
                _int_metadata(metadata, "tokens", 0), _int_metadata(metadata, "texts", 0),
            )  # fmt: skip
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> ResidualProfile:
        profile = cls.from_bytes(Path(path).read_bytes(), source=str(path))
        logger.info("loaded residual profile %s from %s", profile.hash[:12], path)
        return profile


@dataclass(frozen=True)
class TransformProfiles:
    """What transform coding (Predict + Pca) decodes with: the predictors and the residual profile fitted
    on their residuals. Held and passed as one profile (kvlink-serve --profile, kvlink-send --profile, a
    Codec's `profile`); `hashes` are the two the message's stages name."""

    predictors: PredictorProfile
    residual: ResidualProfile

    def __post_init__(self) -> None:
        self.residual.check_for(self.predictors)

    @property
    def hash(self) -> str:
        return self.residual.hash

    @property
    def hashes(self) -> tuple[str, str]:
        return (self.predictors.hash, self.residual.hash)

    def check_fingerprint(self, fingerprint: str) -> None:
        self.predictors.check_fingerprint(fingerprint)
        self.residual.check_fingerprint(fingerprint)

    def to(self, device: torch.device | str) -> TransformProfiles:
        return TransformProfiles(self.predictors.to(device), self.residual.to(device))


def pair_profiles(profiles: Sequence[Any]) -> list[Any]:
    """`profiles` with each residual profile joined to the predictors it was fitted on (TransformProfiles),
    those predictors kept on their own too; ValueError naming a residual profile whose predictors are not
    among them."""
    predictors = {p.hash: p for p in profiles if isinstance(p, PredictorProfile)}
    out = [p for p in profiles if not isinstance(p, ResidualProfile)]
    for p in profiles:
        if isinstance(p, ResidualProfile):
            if p.predictors not in predictors:
                raise ValueError(
                    f"residual profile {p.hash[:12]} was fitted on predictors {p.predictors[:12]}: give that "
                    "predictor profile too"
                )
            out.append(TransformProfiles(predictors[p.predictors], p))
    return out


XL_FIT = "xpred+kint2c/vint2t-g64+sink1"
"""The recipe transform coding's predictors are fitted through (the closed loop at INT2, as screened)."""


def residual_path(fingerprint: str, predictors_hash: str) -> Path:
    """Where the residual profile of the model with `fingerprint` on the predictors `predictors_hash` is
    cached: <cache_dir>/profiles/<fingerprint>-residual-<12 hex of the predictors' hash>.safetensors."""
    from kvlink.lowrank import default_profile_path

    base = default_profile_path(fingerprint)
    return base.with_name(f"{fingerprint}-residual-{predictors_hash[:12]}.safetensors")


def cached_transform_profiles(lm: Any, texts: int | None = None) -> TransformProfiles:
    """The predictors and residual profile transform coding (`xpred+fp16+pca...+ans`) uses on `lm`: loaded
    from the cache or fitted on the calibration split's odd paragraphs (`texts` of them; all when None)
    and saved there. The residual's step weights come from the model's sensitivity profile (ValueError
    when it has none: `kvlink-bench sensitivity` measures one)."""
    from kvlink.layerbits import Sensitivity
    from kvlink.predict import cached_predictors, fit_texts
    from kvlink.prompt import context_ids
    from kvlink.recipe import Recipe

    recipe = Recipe.from_name(XL_FIT)
    predictors = cached_predictors(lm, recipe, texts)
    path = residual_path(lm.fingerprint, predictors.hash)
    if path.is_file():
        residual = ResidualProfile.load(path)
        residual.check_fingerprint(lm.fingerprint)
    else:
        sensitivity = Sensitivity.for_model(lm.fingerprint, lm.name)
        if sensitivity is None:
            raise ValueError(
                f"transform coding weighs each tensor by its measured sensitivity, and {lm.name} has no "
                f"sensitivity profile: measure one first (kvlink-bench sensitivity --model {lm.name})"
            )
        ids = [context_ids(lm.tokenizer, t).to(lm.device) for t in fit_texts(texts)]
        residual = fit_residuals(lm.model, ids, predictors, recipe, sensitivity)
        residual.save(path)
    return TransformProfiles(predictors, residual.to(lm.device))


# --- fitting ---------------------------------------------------------------------------------------------
def _int2_mse(x: Tensor, kind: str) -> float:
    """Mean squared error of `x` (H, N, D) under INT2 in groups of 64 (keys per channel, values per token):
    the error the sensitivity profile's KL was measured with."""
    from kvlink.quant import QuantSpec, dequantize, quantize

    spec = QuantSpec("int2", 64, "channel" if kind == "k" else "token")
    x = x.float().cpu()
    return float(((dequantize(quantize(x, spec)) - x) ** 2).mean())


def fit_residuals(
    model: Any,
    texts: Sequence[Tensor],
    predictors: PredictorProfile,
    recipe: Any,
    sensitivity: Any,
) -> ResidualProfile:
    """The residual profile of `predictors` on `model`, fitted on `texts` (token-id tensors, each
    prefilled alone) through `recipe` (the recipe the predictors were fitted through, with its
    Predict stage: each prediction is made from the tensors as the codec decodes them under it).
    `sensitivity` (kvlink.layerbits.Sensitivity) gives each tensor's KL at INT2. Sink entries are
    left out of the sums (they travel at float16). Deterministic on a given device and thread count."""
    from kvlink.cache import prefill
    from kvlink.codec import Codec
    from kvlink.models import geometry_of
    from kvlink.predict import _sink_of, _target
    from kvlink.stages.predict import PredictState

    geometry = geometry_of(model.config)
    predictors.check_geometry(geometry)
    if sensitivity.num_layers != geometry.num_layers:
        raise ValueError(f"sensitivity has {sensitivity.num_layers} layers, the model {geometry.num_layers}")
    if not texts:
        raise ValueError("fit_residuals needs at least one text")
    started = time.perf_counter()
    codec = Codec(recipe, geometry, predictors)
    kvs = [prefill(model, ids.reshape(-1).long()).kv.to(dtype=torch.float32) for ids in texts]
    states = [PredictState(predictors, kv.positions[0]) for kv in kvs]
    skip = {kind: _sink_of(recipe, kind) for kind in KINDS}
    f = predictors.features
    means: dict[tuple[int, str], Tensor] = {}
    bases: dict[tuple[int, str], Tensor] = {}
    scales: dict[tuple[int, str], Tensor] = {}
    weight = torch.zeros(geometry.num_layers, 2)
    for layer in range(geometry.num_layers):
        for j, kind in enumerate(KINDS):
            on = kvs[0].keys[0].device
            total = torch.zeros(f, dtype=torch.float64, device=on)
            outer = torch.zeros(f, f, dtype=torch.float64, device=on)
            count, mse = 0, 0.0
            w = predictors.weight(layer, kind)
            for kv, state in zip(kvs, states, strict=True):
                tensor = kv.keys[layer] if kind == "k" else kv.values[layer]
                if w is None:  # not predicted: the Predict stage hands on the tensor as cached
                    y = rows(tensor.float())  # (N, F)
                else:  # keys before RoPE, less their prediction
                    y = rows(_target(kv, layer, kind, state) - state.predict(layer, kind, w))
                y = y[skip[kind] :].double()
                total += y.sum(0)
                outer += y.T @ y
                count += int(y.shape[0])
                mse += _int2_mse(tensor, kind) * tensor.numel()
            mean = total / max(count, 1)
            cov = outer / max(count, 1) - torch.outer(mean, mean)
            var, vec = torch.linalg.eigh(cov)
            order = var.argsort(descending=True)
            var = var[order].clamp_min(MIN_VARIANCE)
            means[(layer, kind)] = mean.float().cpu()
            bases[(layer, kind)] = vec[:, order].float().cpu()
            scales[(layer, kind)] = torch.round(ans.SCALE_STEPS * torch.log2((var / 2).sqrt())).float().cpu()
            kl = (sensitivity.k if kind == "k" else sensitivity.v)[layer]
            elements = sum((kv.keys[layer] if kind == "k" else kv.values[layer]).numel() for kv in kvs)
            weight[layer, j] = round(4 * math.log2(max(kl, 1e-7) / max(mse / elements, 1e-30)))
            for kv, state in zip(kvs, states, strict=True):
                codec.encode_one(kv, layer, kind, state)  # decodes it into `state`, as the receiver will
    profile = ResidualProfile(
        predictors.fingerprint, predictors.hash, geometry.num_layers, geometry.kv_heads, geometry.head_dim,
        means, bases, scales, weight, ans.laplace_tables(), sum(kv.length for kv in kvs), len(texts),
    )  # fmt: skip
    logger.info("fitted residual profile %s in %.1f s", profile.hash[:12], time.perf_counter() - started)
    return profile
