"""The benchmark grid: configs named in the recipe grammar, presets for the published baselines, grid subsets.

Every config is a recipe name (kvlink.recipe: one grammar for the grid, the planner's quality tables,
`kvlink-send --config` and the records), e.g. "q2c50%+kint4c/vint4t-g32", "h2o25%+kint8c/vint4t-g64",
"profile-r32+kint4c/vint4t-g32", "q2c90%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question".
Per-layer allocations ("kmix3.43c/vmix2.57t-g64+bits-<id>") resolve from the model's sensitivity
profile (kvlink.layerbits) at its allocation averages. Aliases name the published recipes:

    seed-q2c75-int4   Q2C 75% + INT4              seed-q2c50-int8   Q2C 50% + INT8
    seed-svd32/64     per-message SVD, rank 32/64 seed-kv-asym      K 8 bits / V 4 bits
    kivi2             2-bit, K per channel, V per token, groups of 32 (our int2; the codec has no
                      full-precision residual window, so KIVI's recent-128 window is not modelled)
    streamingllm50/25 sinks + recent window at 50% / 25%

Presets are lists of names: `reference` (the plain reference of issue 7), `rotation`, `sink`,
`layer-scope`, `beyond`, `query-round`, `layer-bits`, `key-widths` and `value-widths` (issue 7's
techniques), `seeds`, `kivi2`, `streamingllm`, `default` (38 configs: every selector at 50% and
25%, every bit width alone, the seed recipes, KIVI-2, StreamingLLM, SVD and a calibrated projection
at two ranks each, and the combinations that land near the planner's budgets). `grid_names("full")`
is the whole cross product selection x retention x bits x rank.

Running the grid (`run_quality`, `Evaluator`): per example the context is prefilled ONCE with
every observation the selectors need (kvlink.cache.prefill_observations), the full-KV FP16
reference answer and its logits are computed once, kept positions once per Select stage; then per
config: encode_kv, the exact wire size, decode, reconstruction error, and the configs are answered
together in batches (kvlink.eval.fidelity.batched_answers: greedy decoding plus the teacher-forced
reference and gold answers in one batch). One JSON line per (example, config) is appended as it goes,
so a run can resume.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from kvlink import wire
from kvlink.cache import ContextKV, Observation, Observe, Prefill, prefill_observations
from kvlink.codec import Codec, EncodedKV
from kvlink.eval import fidelity
from kvlink.eval.tasks import Example
from kvlink.layerbits import ALLOCATION_AVERAGES, Sensitivity
from kvlink.lowrank import ModelProfile, calibrate_profile
from kvlink.models import Geometry, LoadedModel, cache_dir
from kvlink.prompt import encode_text, question_rows
from kvlink.recipe import Recipe, layer_bits_id
from kvlink.select import registered_selectors
from kvlink.stages import LowRank, Select

if TYPE_CHECKING:
    from kvlink.residual import TransformProfiles

logger = logging.getLogger(__name__)

SELECTORS: tuple[str, ...] = ("q2c", "snapkv", "h2o", "streaming", "random")
RETENTIONS: tuple[int, ...] = (100, 75, 50, 25)
BITS: tuple[str, ...] = ("fp16", "int8", "int4", "int3", "int2", "nf4")
GRIDS: tuple[str, ...] = ("default", "seeds", "full")

ALIASES: dict[str, str] = {
    "reference-fp16": "fp16",
    "full-kv": "fp16",
    "seed-q2c75-int4": "q2c75%+kint4c/vint4t-g32",
    "seed-q2c50-int8": "q2c50%+kint8c/vint8t-g32",
    "seed-svd32": "svd-r32+fp16",
    "seed-svd64": "svd-r64+fp16",
    "seed-kv-asym": "kint8c/vint4t-g32",
    "kivi2": "kint2c/vint2t-g32",
    "streamingllm50": "streaming50%+fp16",
    "streamingllm25": "streaming25%+fp16",
}

PRESETS: dict[str, tuple[str, ...]] = {
    "reference": (
        "fp16",
        "kint8c/vint8t-g32",
        "kint4c/vint4t-g32",
        "kint3c/vint3t-g32",
        "kint2c/vint2t-g32",
        "q2c75%+fp16",
        "q2c50%+fp16",
        "h2o50%+fp16",
        "snapkv50%+fp16",
        "random50%+fp16",
        "q2c75%+kint4c/vint4t-g32",
        "q2c50%+kint4c/vint4t-g32",
    ),
    "rotation": (
        "kint4c/vint4t-g32+rot",
        "kint4c/vint4t-g32+v-rot",
        "kint3c/vint3t-g32+rot",
        "kint3c/vint3t-g32+v-rot",
        "kint2c/vint2t-g32+rot",
        "kint3c/vint3t-g64+rot",
    ),
    "sink": (
        "kint4c/vint4t-g32+sink1",
        "kint3c/vint3t-g32+sink1",
        "kint8c/vint4t-g32+sink1",
        "kint4c/vint3t-g32+sink1",
        "kint4c/vint2t-g32+sink1",
    ),
    "layer-scope": (
        "q2c50%/layer+fp16",
        "q2c25%/layer+fp16",
        "q2c50%/layer+kint4c/vint4t-g32",
    ),
    "query-round": (
        "kint4c/vint4t-g32+sink1+round-query",
        "kint3c/vint3t-g32+sink1+round-query",
        "kint3c/vint3t-g64+sink1",
        "kint3c/vint3t-g64+sink1+round-query",
        "kint4c/vint3t-g32+sink1+round-query",
        "kint3c/vint3t-g32+sink1+rot+round-query",
        "kint2c/vint2t-g32+sink1+rot+round-query",
        "q2c75%/layer+kint4c/vint3t-g32+sink1+round-query",
        "q2c75%/layer+kint3c/vint3t-g32+sink1",
        "q2c75%/layer+kint3c/vint3t-g32+sink1+round-query",
        "q2c50%/layer+kint4c/vint4t-g32+sink1+round-query",
        "q2c25%/layer+kint4c/vint4t-g32+sink1+round-query",
    ),
    "layer-bits": (
        "kint4c/vint3t-g64+sink1",
        "kmix4.07c/vmix2.93t-g64+bits-98855c80+sink1",
        "kint3c/vint3t-g64+sink1",
        "kmix3.43c/vmix2.57t-g64+bits-4b19c4ef+sink1",
        "q2c90%/layer+kmix4.07c/vmix2.93t-g64+bits-98855c80+sink1+round-query",
        "q2c60%/layer+kmix4.07c/vmix2.93t-g64+bits-98855c80+sink1+round-query",
        "q2c40%/layer+kmix4.07c/vmix2.93t-g64+bits-98855c80+sink1+round-query",
    ),
    "key-widths": (
        "q2c90%/layer+kint4c/vint3t-g64+sink1+round-query",
        "q2c90%/layer+kint4c/vint3t-g64+sink1+kwidths-question",
        "q2c90%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question",
        "q2c90%/layer+kint3c/vint4t-g64+sink1+round-query",
        "q2c90%/layer+kint3c/vint4t-g64+sink1+kwidths-question",
        "q2c90%/layer+kint3c/vint4t-g64+sink1+round-query+kwidths-question",
        "kint3c/vint4t-g64+sink1+kwidths-question",
        "q2c65%/layer+kint3c/vint4t-g64+sink1+round-query+kwidths-question",
        "q2c40%/layer+kint3c/vint4t-g64+sink1+round-query+kwidths-question",
    ),
    "value-widths": (
        "q2c90%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question",
        "q2c90%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question",
        "q2c90%/layer+kint3c/vint4t-g64+sink1+round-query+kwidths-question",
        "q2c65%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question",
        "q2c65%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question",
        "q2c40%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question",
        "q2c40%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question",
    ),
    "beyond": (
        "kint4c/vint4t-g32+sink1",
        "kint3c/vint3t-g32+sink1",
        "kint4c/vint3t-g32+sink1",
        "kint4c/vint3t-g32+sink1+v-rot",
        "kint3c/vint3t-g32+sink1+rot",
        "kint2c/vint2t-g32+sink1+rot",
        "kint8c/vint4t-g32+sink1",
        "kint4c/vint2t-g32+sink1",
        "q2c75%/layer+kint4c/vint4t-g32+sink1",
        "q2c50%/layer+kint4c/vint4t-g32+sink1",
        "q2c37.5%/layer+kint4c/vint4t-g32+sink1",
        "q2c25%/layer+kint4c/vint4t-g32+sink1",
        "q2c75%/layer+kint4c/vint3t-g32+sink1",
    ),
    "seeds": (
        "seed-q2c75-int4",
        "seed-q2c50-int8",
        "seed-svd32",
        "seed-svd64",
        "seed-kv-asym",
    ),
    "kivi2": (
        "kivi2",
    ),
    "streamingllm": (
        "streamingllm50",
        "streamingllm25",
    ),
    "default": (
        "fp16",
        "kint8c/vint8t-g32",
        "kint4c/vint4t-g32",
        "kint3c/vint3t-g32",
        "kivi2",
        "knf4c/vnf4t-g32",
        "q2c50%+fp16",
        "q2c25%+fp16",
        "snapkv50%+fp16",
        "snapkv25%+fp16",
        "h2o50%+fp16",
        "h2o25%+fp16",
        "streamingllm50",
        "streamingllm25",
        "random50%+fp16",
        "random25%+fp16",
        "q2c75%+fp16",
        "seed-q2c75-int4",
        "seed-q2c50-int8",
        "seed-kv-asym",
        "q2c50%+kint4c/vint4t-g32",
        "svd-r16+fp16",
        "seed-svd32",
        "profile-r16+fp16",
        "profile-r32+fp16",
        "profile-r32+kint4c/vint4t-g32",
        "q2c25%+kint8c/vint8t-g32",
        "q2c25%+kint4c/vint4t-g32",
        "q2c50%+kint2c/vint2t-g32",
        "q2c25%+kint3c/vint3t-g32",
        "q2c25%+kint2c/vint2t-g32",
        "q2c12.5%+kint4c/vint4t-g32",
        "h2o50%+kint4c/vint4t-g32",
        "h2o25%+kint4c/vint4t-g32",
        "snapkv50%+kint4c/vint4t-g32",
        "streaming50%+kint4c/vint4t-g32",
        "random50%+kint4c/vint4t-g32",
        "q2c50%+profile-r32+kint4c/vint4t-g32",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class GridConfig:
    """One benchmarked configuration: its canonical name, the codec config, and the aliases it was asked by."""

    name: str
    config: Recipe
    aliases: tuple[str, ...] = field(default=(), compare=False)
    budget: float | None = None  # a rate-fitted recipe ('<name>@<budget>%'): the budget its rate is fitted to

    @property
    def family(self) -> str:
        return family(self.config)


def family(recipe: Recipe) -> str:
    """Method family for plots: selection method, low-rank mode and quantization, e.g. 'q2c+quant'."""
    parts = []
    if recipe.select is not None:
        parts.append("streamingllm" if recipe.method == "streaming" else recipe.method)
    modes = {s.mode for s in recipe.stages() if isinstance(s, LowRank)}
    if modes:
        parts.append("proj" if "profile" in modes else "svd")
    if recipe.has("pca"):
        parts.append("xl")  # transform coding: predicted, rotated into components, entropy-coded
    elif recipe.format("k") != "fp16" or recipe.format("v") != "fp16":
        parts.append("rot" if recipe.has("rotate") else "quant")
    return "+".join(parts) or "fp16"


def parse_name(name: str, sensitivity: Sensitivity | None = None) -> Recipe:
    """The recipe a config name (or alias) names; per-layer allocations from `sensitivity` (the model's
    profile) when given, else from the shipped profiles."""
    name = ALIASES.get(name, name)
    resolver = None
    if sensitivity is not None:
        allocations = {layer_bits_id(*a): a for a in map(sensitivity.allocate, ALLOCATION_AVERAGES)}
        resolver = allocations.get
    try:
        return Recipe.from_name(name, resolver)
    except ValueError as exc:
        raise ValueError(f"{exc}; aliases: {sorted(ALIASES)}; presets: {sorted(PRESETS)}") from None


def expand_names(items: Iterable[str]) -> list[str]:
    """Comma-separated names and preset names -> config names (presets expanded, order kept)."""
    out: list[str] = []
    for item in items:
        for name in (n.strip() for n in item.split(",")):
            if not name:
                continue
            if name in PRESETS:
                out.extend(PRESETS[name])
            else:
                out.append(name)
    return out


def full_grid_names(head_dim: int = 64) -> list[str]:
    """The whole cube: selection x retention x bits x rank (full, SVD and projection at D/4 and D/2)."""
    selections = ["", *(f"{s}{r}%" for s in SELECTORS for r in RETENTIONS if r < 100)]
    ranks = ["", *(f"{mode}-r{max(1, head_dim * f // 4)}" for mode in ("svd", "profile") for f in (1, 2))]
    names = []
    for sel, bits, rank in itertools.product(selections, BITS, ranks):
        quant = "fp16" if bits == "fp16" else f"k{bits}c/v{bits}t-g32"
        names.append("+".join(x for x in (sel, rank, quant) if x))
    return names


def grid_names(grid: str, head_dim: int = 64) -> list[str]:
    if grid == "default":
        return list(PRESETS["default"])
    if grid == "seeds":
        return ["fp16", *PRESETS["seeds"], *PRESETS["kivi2"], *PRESETS["streamingllm"], *PRESETS["reference"]]
    if grid == "full":
        return [*full_grid_names(head_dim), *PRESETS["seeds"], *PRESETS["kivi2"]]
    raise ValueError(f"unknown grid {grid!r}; known: {GRIDS}")


def resolve(
    names: Sequence[str], geometry: Geometry | None = None, sensitivity: Sensitivity | None = None
) -> list[GridConfig]:
    """Distinct configs for `names` (aliases and presets resolved; duplicates merged, first name wins).

    Configs that do not fit the model (a rank above head_dim) are dropped with a warning.
    """
    from kvlink.budget import at_rate, fitted_key, rate_fitted, split_fitted

    by_config: dict[tuple[Recipe, float | None], GridConfig] = {}
    for name in expand_names(names):
        canonical = ALIASES.get(name, name)
        base, budget = split_fitted(canonical)
        config = parse_name(base, sensitivity)
        if budget is not None:
            canonical = fitted_key(config, budget)  # ValueError for a recipe with no rate to fit
        elif rate_fitted(config):
            raise ValueError(
                f"config {name!r}: the planner fits its rate to a budget; name one, e.g. {name}@12.5%"
            )
        if geometry is not None:
            try:
                at_rate(config).check(geometry)
            except ValueError as exc:
                logger.warning("skipping config %s: %s", name, exc)
                continue
        known = by_config.get((config, budget))
        if known is None:
            by_config[config, budget] = GridConfig(
                canonical, config, (name,) if name != canonical else (), budget
            )
        elif name != known.name and name not in known.aliases:
            by_config[config, budget] = GridConfig(known.name, config, (*known.aliases, name), budget)
    return list(by_config.values())


def select_configs(
    grid: str | None,
    configs: Sequence[str] = (),
    geometry: Geometry | None = None,
    sensitivity: Sensitivity | None = None,
) -> list[GridConfig]:
    """The configs of a run: the grid's (when given) and the named ones, with the full KV always first."""
    head_dim = geometry.head_dim if geometry is not None else 64
    names = ["fp16"]
    if grid is not None:
        names += grid_names(grid, head_dim)
    names += list(configs)
    return resolve(names, geometry, sensitivity)


def needs_profile(configs: Iterable[GridConfig]) -> int:
    """The largest calibrated-projection rank among `configs` (0 when none needs a profile)."""
    ranks = [
        s.rank for c in configs for s in c.config.stages() if isinstance(s, LowRank) and s.mode == "profile"
    ]
    return max(ranks, default=0)


def selectors_needed(configs: Iterable[GridConfig]) -> list[str]:
    names = sorted({c.config.method for c in configs if c.config.select is not None})
    unknown = set(names) - set(registered_selectors())
    if unknown:
        raise ValueError(f"unknown selectors {sorted(unknown)}")
    return names


# --- running the grid ----------------------------------------------------------------
SESSION_ID = "0" * 32  # fixed ids of uuid4-hex length: the wire size does not vary from run to run
MESSAGE_ID = "1" * 32


@dataclass
class RunSettings:
    """How each (example, config) is measured."""

    max_new_tokens: int = 16
    batch: int = 8  # configs decoded together in one batch
    ppl: bool = True  # held-out perplexity (one more prefill per example)
    ppl_every: int = 1  # ... on every n-th example of the run (by its index), to save time
    ppl_prefix: int = 512  # at most this many context tokens prefilled for the perplexity
    ppl_tokens: int = 64  # at most this many continuation tokens scored
    chunk_bytes: int = 1 << 20  # the sender's chunk size, as in kvlink.budget.plan
    window: int = 32  # SnapKV's observation window (the prefill's capture)

    def __post_init__(self) -> None:
        for name in (
            "max_new_tokens",
            "batch",
            "ppl_every",
            "ppl_prefix",
            "ppl_tokens",
            "chunk_bytes",
            "window",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def wire_bytes(encoded: EncodedKV, fingerprint: str, chunk_bytes: int) -> dict[str, int]:
    """Bytes of `encoded` as on the wire: kvlink.wire.message_wire_size plus the HTTP/2 allowance.

    The same count kvlink.budget.plan holds against a budget: `wire_bytes` = frames + signaling +
    HTTP/2 framing upper bound.
    """
    size = wire.message_wire_size(encoded, SESSION_ID, MESSAGE_ID, fingerprint, chunk_bytes)
    n_frames = 2 + sum(
        max(1, -(-len(p.data) // chunk_bytes)) for t in encoded.tensors for p in t.parts.values()
    )
    allowance = wire.http2_overhead(n_frames, size.frames)
    return {
        **{f"wire_{k}": v for k, v in size.as_dict().items()},
        "http2": allowance,
        "wire_bytes": size.total + allowance,
    }


def bench_profile(lm: LoadedModel, path: str | Path | None = None, texts: int = 16) -> ModelProfile:
    """The calibrated projection the benchmark uses, calibrated once on reserved SQuAD paragraphs and cached.

    Default path: <cache_dir>/profiles/<fingerprint>-bench.safetensors (never the sender's default
    profile, which may have been fitted on other text). r_max = head_dim, so any rank works.
    """
    from kvlink.eval.tasks import calibration_texts
    from kvlink.prompt import context_ids

    path = (
        Path(path) if path is not None else cache_dir() / "profiles" / f"{lm.fingerprint}-bench.safetensors"
    )
    if path.is_file():
        profile = ModelProfile.load(path)
        profile.check_fingerprint(lm.fingerprint)
        return profile.to(lm.device)
    started = time.perf_counter()
    ids = [context_ids(lm.tokenizer, text) for text in calibration_texts(texts)]
    profile = calibrate_profile(lm.model, lm.tokenizer, ids, lm.geometry.head_dim, lm.fingerprint)
    profile.save(path)
    logger.info("calibrated the benchmark profile in %.1f s -> %s", time.perf_counter() - started, path)
    return profile.to(lm.device)


def _profile_for(lm: LoadedModel, config: Recipe, profile: Any) -> Any:
    """The calibrated profile `config` encodes with: under transform coding its predictors and residual
    profile (`profile` when it is a kvlink.residual.TransformProfiles, else
    kvlink.residual.cached_transform_profiles); its cross-layer predictors when it predicts (fitted once
    through its quantization on the calibration split's odd paragraphs and cached:
    kvlink.predict.cached_predictors), else the benchmark's projection `profile`."""
    if config.has("pca"):  # transform coding: the predictors and residual profile, as kvlink-bench profile
        from kvlink.residual import TransformProfiles, cached_transform_profiles

        return profile if isinstance(profile, TransformProfiles) else cached_transform_profiles(lm)
    if config.has("predict"):
        from kvlink.predict import cached_predictors

        return cached_predictors(lm, config)
    return profile


class _Clock:
    """Wall time that waits for the GPU, so stage timings are real."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _observes(config: Recipe) -> Observe:
    return config.select.needs() if config.select is not None else Observe.NONE


def _queries_for(config: Recipe) -> Observe | None:
    """The observation a tensor stage encodes from (question-aware quantization, Pca's question-aware steps):
    the selector's when it has queries, else the question's; None when no tensor stage needs one."""
    if all(s.needs() is Observe.NONE for s in config.stages() if s.role != "select"):
        return None
    kind = _observes(config)
    return kind if kind is not Observe.NONE else Observe.QUESTION


def _kept_key(config: Recipe) -> Select | None:
    return config.select


class Evaluator:
    """Measures every config on one example: prefill once, reference once, kept sets once per selection.

    `evaluate(example, names)` returns one record (a flat dict, JSON-ready) per config asked for.
    """

    def __init__(
        self,
        lm: LoadedModel,
        configs: Sequence[GridConfig],
        settings: RunSettings | None = None,
        profile: ModelProfile | TransformProfiles | None = None,
    ) -> None:
        self.lm = lm
        self.configs = list(configs)
        self.settings = settings or RunSettings()
        self.profile = profile
        if needs_profile(self.configs) and profile is None:
            raise ValueError("configs with a calibrated projection (proj<r>) need a profile (bench_profile)")
        from kvlink.budget import at_rate

        self.profiles = {c.name: _profile_for(lm, c.config, profile) for c in self.configs}
        self.codecs = {  # a rate-fitted config's at its coarsest rate (its kept set); _encode fits the rate
            c.name: Codec(at_rate(c.config), lm.geometry, self.profiles[c.name]) for c in self.configs
        }
        self._ids: tuple[Tensor, Tensor] | None = None  # the last prefilled context's and question's ids
        self.reference = Codec(Recipe(), lm.geometry)
        self.clock = _Clock(lm.device)
        self.select_s: dict[Select | None, float] = {}  # of the last prefilled context
        self.observations: dict[Observe, Observation] = {}  # of the last prefilled context

    # one context: prefill, reference, kept sets, then the configs in batches
    def _prefill(
        self, ctx: Tensor, q: Tensor, configs: Sequence[GridConfig], rows: tuple[int, int] | None = None
    ) -> tuple[ContextKV, dict[Select | None, list[Tensor] | None]]:
        """Prefill once with every observation `configs` need; kept positions per selection.

        `rows`: the question's own tokens, the only Q2C observers (as the sender: kvlink.prompt.question_rows).
        """
        self._ids = (ctx, q)
        kinds = {_observes(c.config) for c in configs} | {Observe.NONE}
        kinds |= {k for k in (_queries_for(c.config) for c in configs) if k is not None}
        kv, observations = prefill_observations(self.lm.model, ctx, q, kinds, self.settings.window, rows)
        self.observations = observations
        kept: dict[Select | None, list[Tensor] | None] = {}
        self.select_s.clear()
        for c in configs:
            key = _kept_key(c.config)
            if key not in kept:
                obs = observations[_observes(c.config)]
                t0 = self.clock()
                kept[key] = self.codecs[c.name].select(Prefill(kv, obs, ctx, q))
                self.select_s[key] = self.clock() - t0
        return kv, kept

    def _decode_ref(self, kv: ContextKV) -> ContextKV:
        lm = self.lm
        return self.reference.decode(self.reference.encode_kv(kv), lm.device, lm.dtype)

    def _encode(
        self, c: GridConfig, kv: ContextKV, kept: list[Tensor] | None, sizes_too: bool
    ) -> tuple[ContextKV, dict[str, Any]]:
        lm, clock = self.lm, self.clock
        codec = self.codecs[c.name]
        rec: dict[str, Any] = {}
        if c.budget is not None:  # the rate the planner fits to the budget for this context
            t0 = clock()
            codec = self._fitted(c, kv)
            rec.update(fit_s=clock() - t0, recipe=codec.recipe.name)
        t0 = clock()
        queries = _queries_for(c.config)
        encoded = codec.encode_kv(kv, kept, None if queries is None else self.observations[queries])
        t1 = clock()
        rec["encode_s"] = t1 - t0
        if sizes_too:
            sizes = encoded.sizes()
            rec.update(
                n_kept=kv.length if kept is None else int(kept[0].numel()),
                fp16_bytes=encoded.fp16_bytes(),
                payload_bytes=sizes.payload,
                metadata_bytes=sizes.metadata,
                scale_bytes=sizes.scales,
                factor_bytes=sizes.factors,
                position_bytes=sizes.positions,
                encoded_bytes=sizes.total,
            )
            rec.update(wire_bytes(encoded, lm.fingerprint, self.settings.chunk_bytes))
            rec["wire_frac"] = rec["wire_bytes"] / rec["fp16_bytes"]
            rec["encoded_frac"] = sizes.total / rec["fp16_bytes"]
        t2 = clock()
        decoded = codec.decode(encoded, lm.device, lm.dtype)
        rec["wire_s"], rec["decode_s"] = t2 - t1, clock() - t2
        return decoded, rec

    def _fitted(self, c: GridConfig, kv: ContextKV) -> Codec:
        """The codec of `c` at the rate kvlink.budget.plan fits to c.budget for `kv` (its framed size
        against the budget, as a sender's)."""
        from kvlink.budget import fit_rate, framed_size

        assert c.budget is not None and self._ids is not None
        lm, profile = self.lm, self.profiles[c.name]

        def framed(encoded: EncodedKV) -> int:
            size, allowance = framed_size(
                encoded, SESSION_ID, MESSAGE_ID, lm.fingerprint, self.settings.chunk_bytes
            )
            return size.total + allowance  # type: ignore[no-any-return]

        obs = self.observations[_queries_for(c.config) or _observes(c.config)]  # what the sender prefills
        prefill = Prefill(kv, obs, *self._ids)
        budget_bytes = math.floor(c.budget * lm.geometry.fp16_bytes(kv.length))  # as plan()
        recipe = fit_rate(c.config, prefill, lm.geometry, profile, budget_bytes, framed)
        return Codec(recipe, lm.geometry, profile)

    def evaluate(
        self, example: Example, names: Iterable[str] | None = None, ppl: bool | None = None
    ) -> list[dict[str, Any]]:
        """Records of `example` for the configs named in `names` (all when None).

        `ppl` (default: the settings') says whether to measure the held-out perplexity;
        without it the records hold ppl = NaN.
        """
        wanted = set(names) if names is not None else None
        todo = [c for c in self.configs if wanted is None or c.name in wanted]
        if not todo:
            return []
        lm, s, clock = self.lm, self.settings, self.clock
        model, tok = lm.model, lm.tokenizer
        started = clock()
        ctx, q = example.encode(tok)
        rows = question_rows(tok, example.question)
        gold = encode_text(tok, example.answers[0]).tolist() if example.answers else []

        kv, kept = self._prefill(ctx, q, todo, rows)
        t_prefill = clock()
        ref_kv = self._decode_ref(kv)
        ref = fidelity.batched_answers(model, tok, [ref_kv], q, [gold], s.max_new_tokens)
        ref_tokens = ref.tokens[0]
        ref_text = fidelity.answer_text(tok, model, ref_tokens)
        ref_forced = fidelity.batched_answers(model, tok, [ref_kv], q, [ref_tokens], 0).forced[0][0]
        ref_f1, ref_em = fidelity.gold_scores(ref_text, example.answers)
        base: dict[str, Any] = {
            "eid": example.eid,
            "task": example.task,
            "split": example.meta.get("split"),
            "T": int(ctx.numel()),
            "question_tokens": int(q.numel()),
            "answers": list(example.answers),
            "ref_answer": ref_text,
            "ref_f1": ref_f1,
            "ref_em": ref_em,
            "ref_nll_gold": fidelity.mean_nll(ref.forced[0][0], gold),
            "ref_needle": fidelity.needle_accuracy(ref_text, example.needle),
        }
        t_ref = clock()

        records: list[dict[str, Any]] = []
        for start in range(0, len(todo), s.batch):
            batch = todo[start : start + s.batch]
            decoded, recs = [], []
            for c in batch:
                dec, rec = self._encode(c, kv, kept[_kept_key(c.config)], sizes_too=True)
                rec["select_s"] = self.select_s[_kept_key(c.config)]  # shared by configs of one selection
                rec.update(fidelity.reconstruction(kv, dec))
                decoded.append(dec)
                recs.append(rec)
            t0 = clock()
            out = fidelity.batched_answers(model, tok, decoded, q, [ref_tokens, gold], s.max_new_tokens)
            answer_s = (clock() - t0) / len(batch)
            for row, (c, rec) in enumerate(zip(batch, recs)):
                text = fidelity.answer_text(tok, model, out.tokens[row])
                f1, em = fidelity.gold_scores(text, example.answers)
                rec.update(
                    config=c.name,
                    answer=text,
                    f1=f1,
                    em=em,
                    fidelity=fidelity.answer_fidelity(text, ref_text),
                    agree=fidelity.agreement(text, ref_text),
                    kl=fidelity.mean_kl(ref_forced, out.forced[0][row]),
                    nll_gold=fidelity.mean_nll(out.forced[1][row], gold),
                    needle=fidelity.needle_accuracy(text, example.needle),
                    answer_s=answer_s,
                )
                records.append({**base, **rec})
            del decoded, out
        t_grid = clock()
        if s.ppl if ppl is None else ppl:
            by_config = self._perplexity(example, q, todo, rows)
            for rec in records:
                rec.update(by_config[rec["config"]])
        else:
            for rec in records:
                rec.update(ppl=float("nan"), ref_ppl=float("nan"))
        finished = clock()
        timings = {
            "prefill_s": t_prefill - started,
            "reference_s": t_ref - t_prefill,
            "configs_s": t_grid - t_ref,
            "ppl_s": finished - t_grid,
            "example_s": finished - started,
        }
        for rec in records:
            rec.update(timings)
        return records

    def _perplexity(
        self, example: Example, q: Tensor, todo: Sequence[GridConfig], rows: tuple[int, int] | None = None
    ) -> dict[str, dict[str, float]]:
        """Per config: ppl (and ref_ppl) of the held-out continuation given the compressed first half."""
        lm, s = self.lm, self.settings
        raw = encode_text(lm.tokenizer, example.context)
        half = min(raw.numel() // 2, s.ppl_prefix)
        cont = raw[half : half + min(s.ppl_tokens, raw.numel() - half)].tolist()
        nan = {"ppl": float("nan"), "ref_ppl": float("nan")}
        if half < 2 or len(cont) < 2:
            return {c.name: dict(nan) for c in todo}
        prefix = raw[:half]
        prompt, targets = torch.tensor(cont[:1]), cont[1:]
        kv, kept = self._prefill(prefix, q, todo, rows)
        ref = fidelity.batched_answers(lm.model, lm.tokenizer, [self._decode_ref(kv)], prompt, [targets], 0)
        ref_ppl = fidelity.perplexity(fidelity.mean_nll(ref.forced[0][0], targets))
        out: dict[str, dict[str, float]] = {}
        for start in range(0, len(todo), s.batch):
            batch = todo[start : start + s.batch]
            decoded = [self._encode(c, kv, kept[_kept_key(c.config)], sizes_too=False)[0] for c in batch]
            forced = fidelity.batched_answers(lm.model, lm.tokenizer, decoded, prompt, [targets], 0).forced[0]
            for row, c in enumerate(batch):
                nll = fidelity.mean_nll(forced[row], targets)
                out[c.name] = {
                    "ppl": fidelity.perplexity(nll),
                    "ref_ppl": ref_ppl,
                    "ppl_tokens": len(targets),
                }
        return out


SAMPLES_GLOB = "samples*.jsonl"


def samples_file(out_dir: str | Path, shard: tuple[int, int] = (0, 1)) -> Path:
    """samples.jsonl, or samples-<k>of<n>.jsonl for shard k of n."""
    k, n = shard
    return Path(out_dir) / ("samples.jsonl" if n == 1 else f"samples-{k}of{n}.jsonl")


def read_done(paths: Path | Sequence[Path]) -> tuple[list[dict[str, Any]], dict[str, set[str]]]:
    """Records of samples JSONL files (torn lines ignored; a pair seen twice counts once) and the
    config names done per example.

    A directory stands for every samples*.jsonl in it (the shards of one run).
    """
    if isinstance(paths, Path):
        paths = sorted(paths.glob(SAMPLES_GLOB)) if paths.is_dir() else [paths]
    records: list[dict[str, Any]] = []
    done: dict[str, set[str]] = {}
    for path in paths:
        if not path.is_file():
            continue
        with path.open() as handle:
            for number, line in enumerate(handle, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s:%d is not JSON (an interrupted write?); ignored", path, number)
                    continue
                seen = done.setdefault(rec["eid"], set())
                if rec["config"] not in seen:
                    seen.add(rec["config"])
                    records.append(rec)
    return records, done


def run_quality(
    lm: LoadedModel,
    examples: Sequence[Example],
    configs: Sequence[GridConfig],
    samples_path: str | Path,
    settings: RunSettings | None = None,
    profile: ModelProfile | TransformProfiles | None = None,
    resume: bool = False,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Evaluate every (example, config) pair, appending one JSON line per pair to `samples_path`.

    With `resume`, pairs already in `samples_path` or in its sibling samples*.jsonl files (the
    shards of the same run) are skipped, and an example whose configs are all done is not even
    prefilled; without it `samples_path` is started afresh. `shard=(k, n)` runs examples
    k, k+n, k+2n, ... only (n processes, one per GPU, each with its own samples file).
    The held-out perplexity is measured on examples whose index is a multiple of
    settings.ppl_every. Returns the records (old ones of all shards, and new) and run
    statistics: examples and pairs done now, seconds per example.
    """
    from tqdm import tqdm

    settings = settings or RunSettings()
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard!r}")
    path = Path(samples_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not resume and path.exists():
        path.unlink()
    siblings = sorted(path.parent.glob(SAMPLES_GLOB))
    if not resume and siblings:
        logger.warning("other samples files in %s will be merged into reports: %s", path.parent, siblings)
    old, done = read_done(siblings) if resume else ([], {})
    evaluator = Evaluator(lm, configs, settings, profile)
    names = [c.name for c in configs]
    pending = [
        (i, ex, [name for name in names if name not in done.get(ex.eid, set())])
        for i, ex in enumerate(examples)
        if i % n == k
    ]
    pending = [(i, ex, todo) for i, ex, todo in pending if todo]
    new: list[dict[str, Any]] = []
    seconds: list[float] = []
    bar = tqdm(pending, desc="examples", unit="ex", disable=not progress, dynamic_ncols=True)
    with path.open("a") as handle:
        for index, example, todo in bar:
            started = time.perf_counter()
            records = evaluator.evaluate(example, todo, ppl=settings.ppl and index % settings.ppl_every == 0)
            for rec in records:
                handle.write(json.dumps(rec, allow_nan=True) + "\n")
            handle.flush()
            new += records
            seconds.append(time.perf_counter() - started)
            bar.set_postfix(task=example.task, T=records[0]["T"] if records else 0, s=f"{seconds[-1]:.2f}")
    stats: dict[str, Any] = {
        "examples_run": len(seconds),
        "pairs_run": len(new),
        "pairs_skipped": sum(len(v) for v in done.values()),
        "seconds_per_example": float(np.mean(seconds)) if seconds else 0.0,
        "seconds_total": float(np.sum(seconds)) if seconds else 0.0,
    }
    if seconds:
        by_task: dict[str, list[float]] = {}
        for rec in new:
            by_task.setdefault(rec["task"], []).append(rec["example_s"])
        stats["seconds_per_example_by_task"] = {
            task: float(np.mean(v)) for task, v in by_task.items()
        }  # each example's time appears once per config: the mean is per example all the same
    return old + new, stats
