"""A message's recipe: which positions travel, each K/V tensor's pipeline of stages, and the entropy stage.

    recipe = Recipe.from_name("q2c90%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question")
    recipe.name                      # the same string back: one grammar, everywhere
    recipe.pipeline("k", layer=3)    # (Sink(n=1), Quantize(format='int4', group=64, axis='channel', ...))
    recipe.needs()                   # Observe.QUESTION: the prefill must observe the question
    recipe.capabilities()            # {'select:q2c', 'sink', 'format:int4cw', 'format:int3', ...}
    build(selector="q2c", retention=0.5, k_bits=4, v_bits=4)   # the built-in stages from keywords

Structure. `select` (a Select stage, or None: every position travels), `k` and
`v`: the pipeline of every layer's K (V) tensor, either one pipeline for all
layers or one per layer (per-layer bit allocations), and `zstd` (or None). A
pipeline is its transforms in their stages' order (Sink, Clamp, LowRank,
Rotate, ...) then exactly one Quantize.

The grammar (`name`, `from_name`): tokens joined by "+", in this order:

    q2c90%/layer            Select: method, retention, "/layer" for a set per layer, @w<window>, @s<seed>
    svd-r32                 transforms: the stage's token (kvlink.stages: sink1, clamp6, rot, svd-r32,
    k-svd-r32               profile-r32) applies to every tensor it serves; with "k-" or "v-" to
                            that kind only
    kint4c/vint3t-g64       Quantize of K and V: format and axis letter (c channel, t token), group
    fp16                    size ("-g64/32" when K and V differ); "fp16" for both at float16
    kmix3.43c/vmix2.57t-g64 per-layer formats, their mean bits; with bits-<id> (kvlink.layerbits)
    round-query             keys rounded for the question's logits
    kwidths-question        a width per key channel / per value row, from the question
    vwidths-question
    zstd3                   Zstd
    ans                     Ans: the rANS stage of transform coding (xpred+fp16+pca1-r0+ans)

The shipped quality tables and sensitivity profiles are keyed by these names;
`migrate_name` turns a name of the grammar before 2026-12 (kvlink 12bfafe and
earlier: kwidths-query, vwidths-attention, rot-kv, svd-r32/32) into today's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvlink.cache import Observe
from kvlink.models import Geometry
from kvlink.quant.formats import INT_WIDTHS, format_spec
from kvlink.stages import (
    Ans,
    LowRank,
    Quantize,
    Rotate,
    Select,
    Sink,
    Stage,
    Transform,
    Zstd,
    registered_stages,
)
from kvlink.stages.base import stage_class

KINDS: tuple[str, ...] = ("k", "v")
AXIS_LETTER = {"channel": "c", "token": "t"}
LETTER_AXIS = {v: k for k, v in AXIS_LETTER.items()}
DEFAULT_AXES = {"k": "channel", "v": "token"}

Pipeline = tuple[Stage, ...]
AllocationResolver = Callable[[str], tuple[tuple[int, ...], tuple[int, ...]] | None]


def layer_bits_id(k_bits: Sequence[int], v_bits: Sequence[int]) -> str:
    """A short stable id of a per-layer allocation (8 hex digits): its `bits-<id>` token."""
    text = ",".join(map(str, k_bits)) + ";" + ",".join(map(str, v_bits))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _canonical(pipeline: Sequence[Stage], kind: str) -> Pipeline:
    """Transforms in stage order then one Quantize; checked against each other."""
    quantizers = [s for s in pipeline if isinstance(s, Quantize)]
    others = [s for s in pipeline if not isinstance(s, Quantize | Transform)]
    if len(quantizers) != 1 or others:
        raise ValueError(
            f"a {kind} pipeline is transforms then one Quantize stage, got {[s.name for s in pipeline]}"
        )
    transforms = sorted((s for s in pipeline if isinstance(s, Transform)), key=lambda s: s.order)
    names = [t.name for t in transforms]
    if len(set(names)) != len(names):
        raise ValueError(f"a {kind} pipeline has a stage twice: {names}")
    if "rotate" in names and "lowrank" in names:
        raise ValueError(f"rotate with lowrank on {kind}: choose one")
    quantizers[0].check_in(kind, tuple(transforms))
    return (*transforms, quantizers[0])


@dataclass(frozen=True)
class Recipe:
    """See the module docstring. k/v: one pipeline for every layer, or one per layer."""

    select: Select | None = None
    k: tuple[Pipeline, ...] = ((Quantize("fp16", 32, "channel"),),)
    v: tuple[Pipeline, ...] = ((Quantize("fp16", 32, "token"),),)
    zstd: Zstd | None = None
    ans: Ans | None = None

    def __post_init__(self) -> None:
        for kind in KINDS:
            layers = getattr(self, kind)
            if not layers:
                raise ValueError(f"recipe has no {kind} pipeline")
            object.__setattr__(self, kind, tuple(_canonical(p, kind) for p in layers))
        if len(self.k) > 1 and len(self.v) > 1 and len(self.k) != len(self.v):
            raise ValueError(f"{len(self.k)} key and {len(self.v)} value pipelines per layer")
        if self.select is not None and not isinstance(self.select, Select):
            raise ValueError(f"select must be a Select stage, got {self.select!r}")
        if self.zstd is not None and not isinstance(self.zstd, Zstd):
            raise ValueError(f"zstd must be a Zstd stage, got {self.zstd!r}")
        if self.ans is not None and not isinstance(self.ans, Ans):
            raise ValueError(f"ans must be an Ans stage, got {self.ans!r}")
        for stage in self.stages():
            stage.check_recipe(self)

    # --- structure ----------------------------------------------------------------------------------------
    def pipeline(self, kind: str, layer: int) -> Pipeline:
        layers = self.k if kind == "k" else self.v
        return layers[0] if len(layers) == 1 else layers[layer]

    def per_layer(self, kind: str) -> bool:
        return len(self.k if kind == "k" else self.v) > 1

    def stages(self) -> Iterator[Stage]:
        """Every distinct stage of the recipe (select first, zstd last)."""
        seen: set[Stage] = set()
        if self.select is not None:
            yield self.select
        for kind in KINDS:
            for pipeline in self.k if kind == "k" else self.v:
                for stage in pipeline:
                    if stage not in seen:
                        seen.add(stage)
                        yield stage
        if self.zstd is not None:
            yield self.zstd
        if self.ans is not None:
            yield self.ans

    def quantizers(self, kind: str) -> list[Quantize]:
        return [p[-1] for p in (self.k if kind == "k" else self.v)]  # type: ignore[misc]

    def format(self, kind: str) -> str:
        """The uniform format of `kind` (the widest, when it varies by layer)."""
        formats = [q.format for q in self.quantizers(kind)]
        return max(formats, key=lambda f: format_spec(f).bits)

    @property
    def retention(self) -> float:
        return self.select.retention if self.select is not None else 1.0

    @property
    def method(self) -> str:
        return self.select.method if self.select is not None else "none"

    @property
    def scope(self) -> str:
        return self.select.scope if self.select is not None else "global"

    @property
    def zstd_level(self) -> int:
        return self.zstd.level if self.zstd is not None else 0

    def has(self, name: str, kind: str | None = None) -> bool:
        """Whether any pipeline (of `kind`) has the stage `name`."""
        kinds = KINDS if kind is None else (kind,)
        return any(s.name == name for k in kinds for p in (self.k if k == "k" else self.v) for s in p)

    # --- what it needs and what decodes it -------------------------------------------------------------------
    def needs(self) -> Observe:
        """The prefill observation this recipe encodes from: its selector's; else the question's when
        a stage uses the question's queries; else none."""
        wanted = {s.needs() for s in self.stages()} - {Observe.NONE}
        select = self.select.needs() if self.select is not None else Observe.NONE
        if select is not Observe.NONE:
            if wanted - {select, Observe.QUESTION}:
                raise ValueError(
                    f"stages need observations {sorted(o.value for o in wanted)}: one prefill gives one"
                )
            return select
        if len(wanted) > 1:
            raise ValueError(
                f"stages need observations {sorted(o.value for o in wanted)}: one prefill gives one"
            )
        return wanted.pop() if wanted else Observe.NONE

    def capabilities(self) -> set[str]:
        """What a receiver must advertise to decode this recipe (kvlink.capabilities)."""
        return {s.capability() for s in self.stages()}

    def check(self, geometry: Geometry) -> None:
        """Checks that need the model (ValueError quotes the value)."""
        for kind in KINDS:
            layers = self.k if kind == "k" else self.v
            if len(layers) > 1 and len(layers) != geometry.num_layers:
                raise ValueError(
                    f"{kind} has {len(layers)} per-layer pipelines, the model has {geometry.num_layers} layers"
                )
        for stage in self.stages():
            stage.check(geometry)

    def size_key(self) -> tuple[Any, ...]:
        """What decides this recipe's size (rotations, seeds, rounding and windows do not: a stage of no
        bytes, whose size key is empty, leaves no trace in it)."""

        def pipelines(layers: tuple[Pipeline, ...]) -> tuple[tuple[Any, ...], ...]:
            return tuple(tuple(key for s in p if (key := tuple(s.size_key()))) for p in layers)

        return (
            self.select.size_key() if self.select is not None else (),
            pipelines(self.k),
            pipelines(self.v),
            self.zstd.size_key() if self.zstd is not None else (),
            self.ans.size_key() if self.ans is not None else (),
        )

    # --- variants ------------------------------------------------------------------------------------------
    def with_zstd(self, level: int | None) -> Recipe:
        return replace(self, zstd=Zstd(level) if level else None)

    def replacing(self, old: Stage, new: Stage) -> Recipe:
        """This recipe with tensor stage `old` replaced by `new` in every pipeline."""

        def swap(layers: tuple[Pipeline, ...]) -> tuple[Pipeline, ...]:
            return tuple(tuple(new if s == old else s for s in p) for p in layers)

        return replace(self, k=swap(self.k), v=swap(self.v))

    def without(self, name: str, kind: str | None = None) -> Recipe:
        """This recipe less every `name` transform (of `kind`), or its Select ("select"), or its question-
        aware quantization ("round": the rounding; "kwidths", "vwidths": the widths of that kind)."""
        if name == "select":
            return replace(self, select=None)
        if name == "layer-scope":
            return replace(self, select=replace(self.select, scope="global")) if self.select else self
        changes: dict[str, Any] = {}
        for k in KINDS if kind is None else (kind,):
            layers = []
            for p in self.k if k == "k" else self.v:
                q: Quantize = p[-1]  # type: ignore[assignment]
                if name == "round":
                    q = replace(q, rounding="nearest")
                elif name in ("kwidths", "vwidths") and name[0] == k:
                    q = replace(q, widths="uniform")
                layers.append((*(s for s in p[:-1] if s.name != name), q))
            changes[k] = tuple(layers)
        return replace(self, **changes)

    def with_transform(self, stage: Transform, kinds: Sequence[str] = KINDS) -> Recipe:
        """This recipe with `stage` in every pipeline of `kinds` that its stage serves."""
        changes: dict[str, Any] = {}
        for k in kinds:
            changes[k] = tuple(
                (*p[:-1], stage, p[-1]) if _serves(stage, p[-1]) else p  # type: ignore[arg-type]
                for p in (self.k if k == "k" else self.v)
            )
        return replace(self, **changes)

    def with_quantize(self, kind: str, **changes: Any) -> Recipe:
        """Every `kind` Quantize stage with `changes` (e.g. rounding="query")."""
        layers = tuple((*p[:-1], replace(p[-1], **changes)) for p in (self.k if kind == "k" else self.v))  # type: ignore[type-var]
        return self.with_layers(kind, layers)

    def with_layers(self, kind: str, layers: tuple[Pipeline, ...]) -> Recipe:
        """This recipe with `kind`'s pipelines replaced."""
        return replace(self, k=layers) if kind == "k" else replace(self, v=layers)

    # --- the grammar ------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """This recipe in the config grammar (see the module docstring); from_name reads it back."""
        return _render(self)

    def __str__(self) -> str:
        return self.name

    @classmethod
    def from_name(cls, name: str, allocations: AllocationResolver | None = None) -> Recipe:
        """The recipe named `name`. allocations: resolves a bits-<id> token to its per-layer bits (default:
        the allocations of the shipped sensitivity profiles, kvlink.layerbits.known_allocation)."""
        return _parse(name, allocations)

    # --- JSON --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Its name, and every stage with its parameters (what a record or a result file keeps)."""

        def stages(layers: tuple[Pipeline, ...]) -> list[list[dict[str, Any]]]:
            return [[{"stage": s.name, **s.params()} for s in p] for p in layers]

        return {
            "name": self.name if _nameable(self) else None,
            "select": {"stage": "select", **self.select.params()} if self.select else None,
            "k": stages(self.k), "v": stages(self.v),
            "zstd": {"stage": "zstd", **self.zstd.params()} if self.zstd else None,
            **({"ans": {"stage": "ans"}} if self.ans is not None else {}),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        def stage(entry: Mapping[str, Any]) -> Stage:
            params = {k: str(v) for k, v in entry.items() if k != "stage"}
            return stage_class(str(entry["stage"])).from_params(params)

        def layers(entries: Sequence[Sequence[Mapping[str, Any]]]) -> tuple[Pipeline, ...]:
            return tuple(tuple(stage(e) for e in p) for p in entries)

        if "k" not in data and "k_bits" in data:  # a kvlink CodecConfig dict of 12bfafe and earlier
            import inspect

            if data.get("hi_layers"):
                raise ValueError(
                    "hi_layers was a prototype that did not pay and is gone: give per-layer bits"
                )
            known = set(inspect.signature(build).parameters)
            return build(**{k: v for k, v in data.items() if k in known})
        return cls(
            select=stage(data["select"]) if data.get("select") else None,  # type: ignore[arg-type]
            k=layers(data["k"]), v=layers(data["v"]),
            zstd=stage(data["zstd"]) if data.get("zstd") else None,  # type: ignore[arg-type]
            ans=stage(data["ans"]) if data.get("ans") else None,  # type: ignore[arg-type]
        )  # fmt: skip


def _serves(stage: Transform, quantize: Quantize) -> bool:
    """Whether `stage` goes into a pipeline quantizing with `quantize` when a name gives it to all."""
    return not getattr(stage, "quantized_only", True) or quantize.format != "fp16"


# --- building from keywords --------------------------------------------------------------------------------------
def build(
    selector: str = "none",
    retention: float = 1.0,
    scope: str = "global",
    k_bits: int | str = 16,
    v_bits: int | str = 16,
    group_size: int = 32,
    k_axis: str = "channel",
    v_axis: str = "token",
    lowrank: str = "none",
    k_rank: int | None = None,
    v_rank: int | None = None,
    zstd_level: int = 0,
    window: int = 32,
    seed: int = 0,
    rotate: str = "none",
    sink: int = 0,
    round_k: str = "nearest",
    k_layer_bits: Sequence[int] = (),
    v_layer_bits: Sequence[int] = (),
    k_widths: str = "uniform",
    v_widths: str = "uniform",
) -> Recipe:
    """A recipe of the built-in stages from keywords (the fields of kvlink's CodecConfig before 2026-12, so
    that configs, result files and quality tables of that time read back). bits: 16, 8, 4, 3, 2, "nf4" or a
    format name; rotate: "none", "k", "v", "kv"; k_widths "query"/"question", v_widths
    "attention"/"question"; k_layer_bits/v_layer_bits: INT bits per layer. A new stage is added to a
    recipe with Recipe.with_transform, not with a keyword here."""
    if selector == "none" and retention != 1.0:
        raise ValueError(f"retention {retention!r} needs a selection method (selector is 'none')")
    select = Select(selector, retention, scope, window, seed) if selector != "none" else None
    if lowrank not in ("none", "svd", "profile"):
        raise ValueError(f"lowrank must be one of ('none', 'svd', 'profile'), got {lowrank!r}")
    if lowrank == "none" and (k_rank is not None or v_rank is not None):
        raise ValueError("k_rank/v_rank need lowrank 'svd' or 'profile'")
    if lowrank != "none" and k_rank is None and v_rank is None:
        raise ValueError(f"lowrank {lowrank!r} needs k_rank and/or v_rank")
    if rotate not in ("none", "k", "v", "kv"):
        raise ValueError(f"rotate must be one of ('none', 'k', 'v', 'kv'), got {rotate!r}")
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"sink must be a non-negative integer, got {sink!r}")
    if round_k not in ("nearest", "query"):
        raise ValueError(f"round_k must be one of ('nearest', 'query'), got {round_k!r}")
    if k_widths not in ("uniform", "query", "question"):
        raise ValueError(f"k_widths must be one of ('uniform', 'question'), got {k_widths!r}")
    if v_widths not in ("uniform", "attention", "question"):
        raise ValueError(f"v_widths must be one of ('uniform', 'question'), got {v_widths!r}")
    bits = {"k": k_bits, "v": v_bits}
    for kind, given in (("k", k_layer_bits), ("v", v_layer_bits)):
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
            raise ValueError(
                f"{kind}_layer_bits must be a sequence of bit widths, one per layer, got {given!r}"
            )
    per_layer = {"k": tuple(k_layer_bits), "v": tuple(v_layer_bits)}
    axes = {"k": k_axis, "v": v_axis}
    ranks = {"k": k_rank, "v": v_rank}
    widths = {"k": k_widths != "uniform", "v": v_widths != "uniform"}
    out: dict[str, tuple[Pipeline, ...]] = {}
    for kind in KINDS:
        for b in per_layer[kind]:
            if isinstance(b, bool) or b not in INT_WIDTHS:
                raise ValueError(f"{kind}_layer_bits entries must be one of {INT_WIDTHS}, got {b!r}")
        if per_layer[kind] and lowrank != "none":
            raise ValueError(f"{kind}_layer_bits with lowrank {lowrank!r}: choose one")
        # Per-layer bits decide the kind's format (its widest); bits[kind] is then ignored, as ever.
        base = format_of(max(per_layer[kind])) if per_layer[kind] else format_of(bits[kind])
        formats = [f"int{b}" for b in per_layer[kind]] or [base]
        if widths[kind]:
            conflict = _widths_conflict(
                kind, formats, axes[kind], rotate, ranks[kind] if lowrank != "none" else None
            )
            if conflict:
                raise ValueError(f"{kind}_widths {k_widths if kind == 'k' else v_widths!r} {conflict}")
        if kind == "k" and round_k == "query":
            if not base.startswith("int") and not per_layer["k"]:
                raise ValueError(f"round_k 'query' needs INT keys, got k_bits {k_bits!r}")
            if lowrank != "none" and k_rank is not None:
                raise ValueError(f"round_k 'query' with lowrank {lowrank!r} on k: choose one")
        layers: list[Pipeline] = []
        for fmt in formats:
            stages: list[Stage] = []
            if sink and base != "fp16":
                stages.append(Sink(sink))
            if lowrank != "none" and ranks[kind] is not None:
                if kind in rotate:
                    raise ValueError(f"rotate {rotate!r} with lowrank {lowrank!r} on {kind}: choose one")
                stages.append(LowRank(lowrank, ranks[kind]))  # type: ignore[arg-type]
            elif rotate != "none" and kind in rotate:
                stages.append(Rotate(seed))
            spec = format_spec(fmt)
            rounding = "query" if kind == "k" and round_k == "query" and spec.family == "int" else "nearest"
            w = "question" if widths[kind] and spec.with_widths(axes[kind]) is not None else "uniform"
            stages.append(Quantize(fmt, group_size, axes[kind], rounding, w))
            layers.append(tuple(stages))
        out[kind] = tuple(layers)
    return Recipe(select, out["k"], out["v"], Zstd(zstd_level) if zstd_level else None)


def format_of(bits: int | str) -> str:
    """A uniform format name from 16, 8, 4, 3, 2, "nf4" or a format name (ValueError quotes the value)."""
    if isinstance(bits, str) and not bits.isdigit():
        try:
            spec = format_spec(bits.lower())
        except ValueError:
            raise ValueError(
                f"bits must be one of (16, 8, 4, 3, 2, 'nf4') or a format name, got {bits!r}"
            ) from None
        if spec.widths:
            raise ValueError(f"bits must be a uniform format, got {bits!r}")
        return spec.name
    mapping = {16: "fp16", 8: "int8", 4: "int4", 3: "int3", 2: "int2"}
    value = int(bits) if isinstance(bits, str) else bits
    if isinstance(value, bool) or value not in mapping:
        raise ValueError(f"bits must be one of (16, 8, 4, 3, 2, 'nf4'), got {bits!r}")
    return mapping[value]


def _widths_conflict(kind: str, formats: list[str], axis: str, rotate: str, rank: int | None) -> str | None:
    """Why a width per line cannot apply to `kind` tensors of these formats (None: it can)."""
    if not any(f in ("int4", "int3", "int2") for f in formats):
        return f"needs INT2/3/4 {'keys' if kind == 'k' else 'values'}, got {formats[0]!r}"
    want = "channel" if kind == "k" else "token"
    if axis != want:
        return f"needs {'keys' if kind == 'k' else 'values'} grouped on the {want} axis, got {axis!r}"
    if kind == "k" and rotate != "none" and "k" in rotate:
        return f"with rotate {rotate!r}: choose one"
    if rank is not None:
        return "with a low-rank latent: choose one"
    return None


# --- the grammar ------------------------------------------------------------------------------------------------
_SELECT = re.compile(
    r"(?P<m>[a-z][a-z0-9_]*?)(?P<pct>\d+(?:\.\d+)?)%(?P<layer>/layer)?(?:@w(?P<w>\d+))?(?:@s(?P<s>\d+))?"
)
_QUANT = re.compile(
    r"k(?P<kf>[a-z0-9]+?|mix[0-9.]+)(?P<ka>[ct])/v(?P<vf>[a-z0-9]+?|mix[0-9.]+)(?P<va>[ct])-g(?P<gk>\d+)(?:/(?P<gv>\d+))?"
)
_MAX_NAME = 512


def _nameable(recipe: Recipe) -> bool:
    try:
        _render(recipe)
    except ValueError:
        return False
    return True


def _render(recipe: Recipe) -> str:
    tokens: list[str] = []
    if recipe.select is not None:
        tokens.append(recipe.select.token())
    transforms = sorted(
        (c for c in registered_stages().values() if issubclass(c, Transform)), key=lambda c: c.order
    )
    for stage_cls in transforms:
        if stage_cls.before_formats:  # type: ignore[attr-defined]
            tokens.extend(_transform_tokens(recipe, stage_cls))
    tokens.extend(_quant_tokens(recipe))
    for stage_cls in transforms:
        if not stage_cls.before_formats:  # type: ignore[attr-defined]
            tokens.extend(_transform_tokens(recipe, stage_cls))
    if any(q.rounding == "query" for q in recipe.quantizers("k")):
        if any(
            q.rounding != "query" and format_spec(q.format).family == "int" for q in recipe.quantizers("k")
        ):
            raise ValueError("rounding 'query' on some INT key layers only has no name")
        tokens.append("round-query")
    for kind in KINDS:
        qs = recipe.quantizers(kind)
        if any(q.widths == "question" for q in qs):
            if any(q.widths != "question" and q.format in ("int4", "int3", "int2") for q in qs):
                raise ValueError(f"{kind} widths on some layers only have no name")
            tokens.append(f"{kind}widths-question")
    if recipe.zstd is not None:
        tokens.append(recipe.zstd.token())
    if recipe.ans is not None:
        tokens.append(recipe.ans.token())
    return "+".join(tokens)


def _transform_tokens(recipe: Recipe, stage_cls: type[Stage]) -> list[str]:
    """The tokens of one transform class: bare when every tensor it serves has the same one, else per kind."""
    found: dict[str, Stage | None] = {}
    for kind in KINDS:
        layers = recipe.k if kind == "k" else recipe.v
        here = {next((s for s in p if type(s) is stage_cls), None) for p in layers if _eligible(stage_cls, p)}
        absent = {
            next((s for s in p if type(s) is stage_cls), None) for p in layers if not _eligible(stage_cls, p)
        }
        if absent - {None}:
            raise ValueError(f"{stage_cls.name} on a float16 {kind} tensor has no name")
        if len(here) > 1:
            raise ValueError(
                f"{stage_cls.name} on some {kind} layers only, or differing by layer, has no name"
            )
        found[kind] = here.pop() if here else None
    stages = [s for s in found.values() if s is not None]
    if not stages:
        return []
    eligible = [
        kind
        for kind in KINDS
        if any(_eligible(stage_cls, p) for p in (recipe.k if kind == "k" else recipe.v))
    ]
    if all(found.get(kind) == stages[0] for kind in eligible) and len(stages) == len(eligible):
        return [stages[0].token()]  # type: ignore[attr-defined]
    return [f"{kind}-{s.token()}" for kind, s in found.items() if s is not None]  # type: ignore[attr-defined]


def _eligible(stage_cls: type[Stage], pipeline: Pipeline) -> bool:
    return not getattr(stage_cls, "quantized_only", True) or pipeline[-1].format != "fp16"  # type: ignore[attr-defined]


def _quant_tokens(recipe: Recipe) -> list[str]:
    qs = {kind: recipe.quantizers(kind) for kind in KINDS}
    groups = {kind: {q.group for q in qs[kind]} for kind in KINDS}
    axes = {kind: {q.axis for q in qs[kind]} for kind in KINDS}
    if any(len(groups[k]) > 1 or len(axes[k]) > 1 for k in KINDS):
        raise ValueError("group sizes or axes that differ by layer have no name")
    formats = {kind: [q.format for q in qs[kind]] for kind in KINDS}
    if all(f == "fp16" for kind in KINDS for f in formats[kind]):
        if any(q.group != 32 or q.axis != DEFAULT_AXES[k] for k in KINDS for q in qs[k]):
            raise ValueError("a float16 recipe with another group or axis has no name")
        return ["fp16"]
    out, mixes = [], {}
    words = {}
    for kind in KINDS:
        if recipe.per_layer(kind):
            bits = [format_spec(f).bits for f in formats[kind]]
            if any(f not in ("int8", "int4", "int3", "int2") for f in formats[kind]):
                raise ValueError(f"per-layer {kind} formats other than INT have no name")
            mixes[kind] = tuple(bits)
            words[kind] = f"mix{sum(bits) / len(bits):.3g}"
        else:
            words[kind] = formats[kind][0]
    gk, gv = next(iter(groups["k"])), next(iter(groups["v"]))
    g = f"{gk}" if gk == gv else f"{gk}/{gv}"
    ka, va = AXIS_LETTER[next(iter(axes["k"]))], AXIS_LETTER[next(iter(axes["v"]))]
    out.append(f"k{words['k']}{ka}/v{words['v']}{va}-g{g}")
    if mixes:
        layers = max(len(recipe.k), len(recipe.v))
        kb = mixes.get("k") or tuple([format_spec(formats["k"][0]).bits] * layers)
        vb = mixes.get("v") or tuple([format_spec(formats["v"][0]).bits] * layers)
        out.append(f"bits-{layer_bits_id(kb, vb)}")
    return out


def _parse(name: str, allocations: AllocationResolver | None) -> Recipe:
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        raise ValueError(f"a recipe name is 1..{_MAX_NAME} characters, got {str(name)[:64]!r}")
    tokens = name.split("+")
    fields: dict[str, Any] = {}
    transforms: list[tuple[str | None, Transform]] = []
    select: Select | None = None
    quant: re.Match[str] | None = None
    fp16 = False
    bits_id = None
    rounding = False
    widths = {"k": False, "v": False}
    zstd: Zstd | None = None
    entropy_ans: Ans | None = None
    for token in tokens:
        try:
            if token == "fp16":
                fp16 = True
            elif (m := _QUANT.fullmatch(token)) is not None:
                quant = m
            elif token.startswith("bits-") and re.fullmatch(r"bits-[0-9a-f]{8}", token):
                bits_id = token[5:]
            elif token == "round-query":
                rounding = True
            elif token in ("kwidths-question", "vwidths-question"):
                widths[token[0]] = True
            elif (m := re.fullmatch(r"zstd(\d+)", token)) is not None:
                zstd = Zstd(int(m[1]))
            elif token == "ans":
                entropy_ans = Ans()
            elif (
                (m := _SELECT.fullmatch(token)) is not None
                and select is None
                and not transforms
                and quant is None
            ):
                select = Select(
                    m["m"], float(m["pct"]) / 100.0, "layer" if m["layer"] else "global",
                    int(m["w"]) if m["w"] else 32, int(m["s"]) if m["s"] else 0,
                )  # fmt: skip
            else:
                kind, body = (token[0], token[2:]) if token[:2] in ("k-", "v-") else (None, token)
                stage = _parse_transform(body)
                if stage is None:
                    raise ValueError(f"recipe name {name[:128]!r}: unknown token {token!r}")
                transforms.append((kind, stage))
        except ValueError as exc:  # a bad value inside a token: say which token
            raise _in_token(exc, name, token) from None
    if fp16 == (quant is not None):
        raise ValueError(
            f"recipe name {name[:128]!r} needs exactly one of fp16 or k<format><axis>/v<format><axis>-g<n>"
        )
    formats: dict[str, list[str]] = {}
    axes, groups = dict(DEFAULT_AXES), {"k": 32, "v": 32}
    if quant is not None:
        axes = {"k": LETTER_AXIS[quant["ka"]], "v": LETTER_AXIS[quant["va"]]}
        groups = {"k": int(quant["gk"]), "v": int(quant["gv"] or quant["gk"])}
        mixed = [kind for kind in KINDS if quant[f"{kind}f"].startswith("mix")]
        allocation = None
        if mixed:
            if bits_id is None:
                raise ValueError(f"recipe name {name[:128]!r}: per-layer formats need a bits-<id> token")
            resolve = allocations or _known_allocation
            allocation = resolve(bits_id)
            if allocation is None:
                raise ValueError(
                    f"recipe name {name[:128]!r}: the per-layer allocation bits-{bits_id} is unknown here; "
                    "measure one with kvlink-bench sensitivity, which prints the names it makes"
                )
        elif bits_id is not None:
            raise ValueError(f"recipe name {name[:128]!r}: bits-{bits_id} without per-layer formats")
        for i, kind in enumerate(KINDS):
            word = quant[f"{kind}f"]
            formats[kind] = (
                [f"int{b}" for b in allocation[i]]
                if allocation is not None and word.startswith("mix")
                else [_format_in(word, name, quant[0])]
            )
    else:
        formats = {"k": ["fp16"], "v": ["fp16"]}
    layers: dict[str, tuple[Pipeline, ...]] = {}
    for kind in KINDS:
        pipelines = []
        for fmt in formats[kind]:
            spec = format_spec(fmt)
            r = "query" if kind == "k" and rounding and spec.family == "int" else "nearest"
            w = "question" if widths[kind] and spec.with_widths(axes[kind]) is not None else "uniform"
            stages: list[Stage] = [Quantize(fmt, groups[kind], axes[kind], r, w)]
            for k, stage in transforms:
                if (k is None or k == kind) and _serves(stage, stages[-1]):  # type: ignore[arg-type]
                    stages.insert(0, stage)
            pipelines.append(tuple(stages))
        layers[kind] = tuple(pipelines)
    del fields
    recipe = Recipe(select, layers["k"], layers["v"], zstd, entropy_ans)
    if rounding and not any(q.rounding == "query" for q in recipe.quantizers("k")):
        raise ValueError(f"recipe name {name[:128]!r}: round-query needs INT keys")
    for kind in KINDS:
        if widths[kind] and not any(q.widths == "question" for q in recipe.quantizers(kind)):
            raise ValueError(f"recipe name {name[:128]!r}: {kind}widths-question needs INT2/3/4 {kind}")
    return recipe


def _in_token(exc: ValueError, name: str, token: str) -> ValueError:
    """`exc`, of its own class, naming the token of recipe name `name` it is about (once)."""
    if repr(token) in str(exc):
        return exc
    return type(exc)(f"recipe name {name[:128]!r}: token {token!r}: {exc}")


def _format_in(word: str, name: str, token: str) -> str:
    try:
        return format_of(word)
    except ValueError as exc:
        raise _in_token(exc, name, token) from None


def _parse_transform(text: str) -> Transform | None:
    for cls in registered_stages().values():
        if issubclass(cls, Transform):
            parsed = cls.parse_token(text)  # type: ignore[attr-defined]
            if parsed is not None:
                return parsed  # type: ignore[no-any-return]
    return None


def _known_allocation(bits_id: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    from kvlink.layerbits import known_allocation

    return known_allocation(bits_id)


# --- names of the grammar before 2026-12 ------------------------------------------------------------------------
_OLD_LOWRANK = re.compile(r"(?P<mode>svd|profile)-r(?P<k>\d+|full)/(?P<v>\d+|full)")


def migrate_name(old: str) -> str:
    """A config name of kvlink 12bfafe and earlier (CodecConfig.label) in today's grammar."""
    out: list[str] = []
    for token in old.split("+"):
        if token == "kwidths-query":
            out.append("kwidths-question")
        elif token == "vwidths-attention":
            out.append("vwidths-question")
        elif token in ("rot-kv", "rot-k", "rot-v"):
            kinds = token[4:]
            out.append("rot" if kinds == "kv" else f"{kinds}-rot")
        elif (m := _OLD_LOWRANK.fullmatch(token)) is not None:
            k, v = m["k"], m["v"]
            if k == v:
                out.append(f"{m['mode']}-r{k}")
            else:
                out.extend(f"{kind}-{m['mode']}-r{r}" for kind, r in (("k", k), ("v", v)) if r != "full")
        else:
            out.append(token)
    return "+".join(out)
