"""The budget planner: the best expected-quality codec config whose EXACT wire size fits.

`--budget 18.75%` is a fraction of the FP16 size of the full context KV
(2 x layers x kv_heads x head_dim x T x 2 bytes) and bounds ALL bytes of the
message: payload, positions, scales/zeros, low-rank factors, protobuf framing
and gRPC prefixes (exact, from kvlink.wire), plus HTTP/2 framing and the
receiver's acks and receipt (upper bounds). (The budget counts every byte.)

Search: every recipe of retention, K/V format, group size (and rank when low
rank is asked for), with the built-in stages the receiver decodes, is sized
analytically in microseconds; candidates are ranked by expected quality from a
`QualityTable` (measured by `kvlink-bench calibrate`, or the built-in default
below, keyed by recipe name: kvlink.recipe, and by context length where it was
measured per length bucket: LENGTH_EDGES); the best ones are then really
encoded, zstd tried where it could pay, and the first whose exact size fits
wins. An unsatisfiable budget raises `BudgetError` naming the smallest
achievable fraction.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvlink import wire
from kvlink.cache import Observe, Prefill
from kvlink.capabilities import CapabilityError, decodes, missing
from kvlink.codec import Codec, EncodedKV
from kvlink.layerbits import ALLOCATION_AVERAGES, Sensitivity
from kvlink.models import Geometry, calibration_name, model_slug
from kvlink.quant import TOKEN_WIDTH_FORMATS, WIDTH_FORMATS
from kvlink.quant.formats import format_spec
from kvlink.recipe import Recipe, build, format_of, migrate_name
from kvlink.select import SCOPES, get_selector
from kvlink.stages import LowRank, Pca, Quantize, Select, Sink
from kvlink.stages.pca import RATES
from kvlink.stages.select import DEFAULT_WINDOW

ROTATIONS: tuple[str, ...] = ("none", "k", "v", "kv")
ROUNDINGS: tuple[str, ...] = ("nearest", "query")
KEY_WIDTHS: tuple[str, ...] = ("uniform", "question")
VALUE_WIDTHS: tuple[str, ...] = ("uniform", "question")

logger = logging.getLogger(__name__)

RETENTIONS: tuple[float, ...] = (
    1.0,
    0.9,
    0.8,
    0.75,
    0.7,
    0.65,
    0.6,
    0.5,
    0.4,
    0.35,
    0.3,
    0.25,
    0.2,
    0.15,
    0.125,
    0.1,
    0.075,
    0.05,
    0.03,
    0.02,
    0.01,
)
BIT_CHOICES: tuple[int | str, ...] = (16, 8, 4, "nf4", 3, 2)
GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
ROTATE_CHOICES: tuple[str, ...] = ("none", "v", "kv")
"""Rotations the planner weighs for quantized configs (kvlink.rotation); a rotated config it has
no measurement of ranks just below the same config unrotated, so only a measured table picks one."""
SINK_CHOICES: tuple[int, ...] = (0, 1)
"""fp16 sink entries the planner weighs for quantized configs (the Sink stage); like a rotation,
an unmeasured one ranks just below the same config without, so only a measured table picks one."""
MIX_AVERAGES: tuple[float, ...] = ALLOCATION_AVERAGES
"""Mean bits per entry of the per-layer allocations the planner weighs when the model has a
sensitivity profile (kvlink.layerbits); only a measured table picks one (no prior guesses them)."""
RANK_FRACTIONS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)
ZSTD_LEVEL = 3
MAX_ENCODE_TRIES = 8
MAX_ZSTD_TRIES = 3
ZSTD_REACH = 1.25
ZSTD_SPREAD = 0.06
"""After a zstd try missed the budget, another is made only for a candidate that needs at most this much
more saving (of its plain estimate) than that try got, and never for codes as wide in a message as large:
zstd saved 2.3% of INT4 messages and 8.1% of INT2 ones (bench/results/entropy-cpu.json), the spread between
code widths. Each try encodes and compresses a whole message, which grows with the context: three tries that
could not fit took 80% of the planner's 9 s at 32k tokens of a 2-layer 8B stand-in on the CPU."""
"""zstd is tried on candidates whose plain estimate is at most this many times the budget; quality
is looked up only for those (the others can never be sent)."""


def parse_budget(text: str | float) -> float:
    """'18.75%' or '0.1875' (or a float) -> 0.1875; anything outside (0, 1] raises ValueError."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ValueError(
            f"budget must be a percentage like '18.75%' or a fraction like 0.1875, got {text!r}"
        ) from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"budget must be in (0, 100%], got {text!r}")
    return value


class BudgetError(ValueError):
    """No configuration fits the budget; `smallest_fraction` is the least any allowed config needs."""

    def __init__(self, budget: float, smallest_fraction: float, detail: str = "") -> None:
        self.budget = budget
        self.smallest_fraction = smallest_fraction
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"budget {budget * 100:.4g}% of FP16 cannot be met: the smallest achievable message is "
            f"{smallest_fraction * 100:.4g}% of FP16{extra}"
        )


@dataclass(frozen=True)
class Constraints:
    """What the user pinned; None leaves the planner free on that axis."""

    method: str | None = None
    k_bits: int | str | None = None
    v_bits: int | str | None = None
    retention: float | None = None
    lowrank: str | None = None
    rank: int | None = None
    zstd: bool | None = None
    group_size: int | None = None
    scope: str | None = None
    rotate: str | None = None
    sink: int | None = None
    round_k: str | None = None  # None: query-aware rounding wherever the quality table measured it better
    k_widths: str | None = None  # None: per-channel key widths wherever the quality table measured them
    # better; "question": on every config they apply to (unrotated INT2/3/4 keys); "uniform": never
    v_widths: str | None = None  # likewise for per-row value widths ("question": INT2/3/4 values)
    layer_bits: bool = True  # bits per layer from the model's sensitivity profile, where measured better
    capabilities: frozenset[str] | None = None  # what the receiver decodes (its Welcome); None: everything
    recipe: Recipe | None = (
        None  # send exactly this recipe (kvlink-send --config); the other fields then unused
    )

    def __post_init__(self) -> None:
        if self.method is not None and self.method != "none":
            get_selector(self.method)  # raises listing the registered methods
        old_names = {"k_widths": "query", "v_widths": "attention"}  # the names of before 2026-12 still read
        for name, old in old_names.items():
            if getattr(self, name) == old:
                object.__setattr__(self, name, "question")
        for bits in (self.k_bits, self.v_bits):
            if bits is not None:
                format_of(bits)
        if self.retention is not None and not (0.0 < self.retention <= 1.0):
            raise ValueError(f"retention must be in (0, 1], got {self.retention!r}")
        if self.lowrank not in (None, "none", "svd"):
            raise ValueError(f"the planner searches lowrank 'none' or 'svd', got {self.lowrank!r}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank!r}")
        if self.rotate is not None and self.rotate not in ROTATIONS:
            raise ValueError(f"rotate must be one of {ROTATIONS}, got {self.rotate!r}")
        if self.sink is not None and (isinstance(self.sink, bool) or self.sink < 0):
            raise ValueError(f"sink must be a non-negative integer, got {self.sink!r}")
        if self.round_k is not None and self.round_k not in ROUNDINGS:
            raise ValueError(f"round_k must be one of {ROUNDINGS}, got {self.round_k!r}")
        if self.k_widths is not None and self.k_widths not in KEY_WIDTHS:
            raise ValueError(f"k_widths must be one of {KEY_WIDTHS}, got {self.k_widths!r}")
        if self.v_widths is not None and self.v_widths not in VALUE_WIDTHS:
            raise ValueError(f"v_widths must be one of {VALUE_WIDTHS}, got {self.v_widths!r}")
        lacking = self.lacking(self.capabilities)
        if lacking:
            raise CapabilityError(lacking, "the receiver")

    def required(self) -> list[tuple[str, str]]:
        """(capability, what it is for) of every option pinned here: what a receiver must decode."""
        needed: list[tuple[str, str]] = []
        if self.recipe is not None:
            needed += [(cap, cap) for cap in sorted(self.recipe.capabilities())]
        if self.rotate not in (None, "none"):
            needed.append(("rotate", f"rotation {self.rotate!r} (--rotate)"))
        if self.sink:
            needed.append(("sink", "fp16 sink entries (--sink)"))
        for bits in (self.k_bits, self.v_bits):
            if bits is not None:
                needed.append((f"format:{format_of(bits)}", format_of(bits)))
        if self.k_widths == "question":
            needed += [
                (f"format:{f}", "per-channel key widths (--key-widths question)") for f in WIDTH_FORMATS
            ]
        if self.v_widths == "question":
            what = "per-row value widths (--value-widths question)"
            needed += [(f"format:{f}", what) for f in TOKEN_WIDTH_FORMATS]
        return needed

    def lacking(self, capabilities: frozenset[str] | None) -> list[str]:
        """What the pinned options need that a receiver decoding `capabilities` lacks (None: nothing)."""
        if capabilities is None:
            return []
        return sorted({what for cap, what in self.required() if cap not in capabilities})

    def decodes(self, fmt: str) -> bool:
        """Whether the receiver decodes quantization format `fmt`."""
        return decodes(self.capabilities, f"format:{fmt}")

    def queries_ruled_out(self) -> bool:
        """Whether nothing the planner may send needs the question's queries (no selection counted)."""
        return self.round_k == "nearest" and self.k_widths == "uniform" and self.v_widths == "uniform"

    def queries_pinned(self) -> bool:
        return self.round_k == "query" or self.k_widths == "question" or self.v_widths == "question"


def observe_for(constraints: Constraints | None) -> Observe:
    """The prefill observation the planner's selection method needs (Q2C by default); a pinned recipe's
    own (Recipe.needs).

    Without selection the question is still observed unless query-aware rounding and per-channel
    key widths are both ruled out.
    """
    if constraints is not None and constraints.recipe is not None:
        return constraints.recipe.needs()
    method = (constraints.method if constraints else None) or "q2c"
    if method == "none":
        return (
            Observe.QUESTION if (constraints is None or not constraints.queries_ruled_out()) else Observe.NONE
        )
    observes = get_selector(method).observes
    return (
        Observe.QUESTION
        if observes is Observe.NONE and constraints and constraints.queries_pinned()
        else observes
    )


def window_for(constraints: Constraints | None) -> int:
    """How many of the last context positions the prefill observes for a windowed selector (SnapKV): a
    pinned recipe's window when it is wider than the default, so that it scores from all of them."""
    select = constraints.recipe.select if constraints is not None and constraints.recipe is not None else None
    return max(DEFAULT_WINDOW, select.window) if select is not None else DEFAULT_WINDOW


def quality_key(recipe: Recipe) -> str:
    """Key of a recipe in a quality table: its name without lossless stages (zstd)."""
    return (recipe.with_zstd(None) if recipe.zstd is not None else recipe).name


def _shape(recipe: Recipe) -> tuple[Any, ...]:
    """What `recipe` shares with every twin a quality lookup tries for it (less sink entries, per-layer sets,
    rotation, question-aware rounding or widths; kvlink.budget's twins): its selection method and share
    kept, and the formats and groups of its K and V quantizers (as sets: layers alike or not)."""
    return (
        recipe.method,
        recipe.retention,
        frozenset((q.format, q.group) for q in recipe.quantizers("k")),
        frozenset((q.format, q.group) for q in recipe.quantizers("v")),
    )


def rate_fitted(recipe: Recipe) -> bool:
    """Whether the planner fits `recipe`'s rate to each budget (a Pca stage without one): its quality
    then depends on the budget, and a table measures it per budget (fitted_key)."""
    return any(isinstance(s, Pca) and s.rate is None for s in recipe.stages())


def at_rate(recipe: Recipe, rate: int | None = None) -> Recipe:
    """`recipe` with the rate the planner fits set to `rate` (default the coarsest, kvlink.stages.pca.RATES):
    what a codec encodes; a recipe without a rate to fit is returned unchanged."""
    pca = next((s for s in recipe.stages() if isinstance(s, Pca) and s.rate is None), None)
    return recipe if pca is None else recipe.replacing(pca, pca.at(RATES.stop - 1 if rate is None else rate))


_FITTED = re.compile(r"(?P<name>.+)@(?P<pct>\d+(?:\.\d+)?)%")


def fitted_key(recipe: Recipe, budget: float) -> str:
    """Key of `recipe` measured with its rate fitted to `budget` (a fraction of FP16): '<name>@<budget>%',
    e.g. 'xpred+fp16+pca1+ans@12.5%' (the name a quality run measures it by, too). ValueError for a
    recipe whose rate is not left to the planner."""
    if not rate_fitted(recipe):
        raise ValueError(
            f"recipe {recipe.name!r} has no rate for a budget to fit (only a pca stage without one has)"
        )
    return f"{quality_key(recipe)}@{100 * parse_budget(budget):.6g}%"


def parse_fitted(key: str) -> tuple[str, float] | None:
    """('<name>', budget fraction) of a fitted_key, None for any other key."""
    m = _FITTED.fullmatch(key)
    return None if m is None else (m["name"], float(m["pct"]) / 100.0)


def split_fitted(name: str) -> tuple[str, float | None]:
    """('<name>', budget fraction) of a fitted_key; (name, None) for any other config name or key."""
    fitted = parse_fitted(name)
    return (name, None) if fitted is None else fitted


# Default expected quality (answer fidelity vs full KV, 0..1). Priors from the seed findings
# (INT8 nearly free, INT4 mild, INT3 worse, INT2 catastrophic; Q2C > H2O > SnapKV > Random),
# scaled to what a 135M model measured (issue 7's reference table). `kvlink-bench calibrate`
# replaces these with measured values for a model.
_BITS_QUALITY = {"fp16": 1.0, "int8": 0.985, "int4": 0.80, "nf4": 0.82, "int3": 0.60, "int2": 0.23}
_Q2C_RETENTION = ((1.0, 1.0), (0.75, 0.80), (0.5, 0.66), (0.25, 0.48), (0.1, 0.30), (0.05, 0.2), (0.01, 0.05))
_METHOD_LOSS = {"q2c": 1.0, "h2o": 1.16, "snapkv": 1.26, "streaming": 1.45, "random": 1.8}


def _interp(points: tuple[tuple[float, float], ...], x: float) -> float:
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


GRAMMAR = 2
"""Version of the recipe names a table is keyed by (kvlink.recipe); tables without it are migrated."""

UNMEASURED_ROTATION = 0.999
"""Expected quality of an unmeasured rotated (or sink, or per-layer-set) config, relative to its plain twin."""


def default_quality(recipe: Recipe, head_dim: int = 64) -> float:
    """The built-in prior: product of a selection, a K/V precision and a rank factor."""
    q_sel = 1.0
    if recipe.select is not None and recipe.retention < 1.0:
        loss = 1.0 - _interp(_Q2C_RETENTION, recipe.retention)
        q_sel = max(0.0, 1.0 - loss * _METHOD_LOSS.get(recipe.method, 2.0))
    group = recipe.quantizers("k")[0].group
    group_penalty = 1.0 + 0.35 * math.log2(max(group, 1) / 32)
    per_tensor = []
    for fmt in (recipe.format("k"), recipe.format("v")):
        base = _BITS_QUALITY[fmt]
        per_tensor.append(1.0 if fmt == "fp16" else max(0.0, 1.0 - (1.0 - base) * group_penalty))
    q_bits = math.sqrt(per_tensor[0] * per_tensor[1])
    q_rank = 1.0
    for kind in ("k", "v"):
        lowrank = next((s for s in recipe.pipeline(kind, 0) if isinstance(s, LowRank)), None)
        if lowrank is not None:
            q_rank *= min(1.0, (lowrank.rank / head_dim) ** 0.5)
    return q_sel * q_bits * q_rank


SHIPPED_QUALITY_DIR = Path(__file__).parent / "data" / "quality"
"""Quality tables measured by this project and shipped with the package, by model name."""


def shipped_quality_path(model_name: str) -> Path:
    """The shipped table of `model_name` (e.g. smollm2-135m-instruct): data/quality/<name>.json."""
    return SHIPPED_QUALITY_DIR / f"{model_slug(model_name)}.json"


def default_quality_path(fingerprint: str) -> Path:
    """Where `kvlink-bench calibrate` writes a model's QualityTable: <cache_dir>/quality/<fingerprint>.json."""
    from kvlink.models import cache_dir

    return cache_dir() / "quality" / f"{fingerprint}.json"


LENGTH_EDGES: tuple[int, ...] = (0, 1024, 4096, 16384)
"""Where the context-length buckets of a calibrated quality table start, in tokens; each runs to the next
edge, the last to any length. [0, 1k) holds SQuAD's paragraphs (~200 tokens), [1k, 4k) and [4k, 16k) the
long and needle tasks (2k-8k tokens, kvlink.eval.tasks), [16k, ...) contexts longer than any task measures.
Edges grow 4x: what a config loses changes with the length (a retention keeps 4x more positions of a 4x
longer context), not with a few hundred tokens more or less."""


def length_bucket(tokens: int) -> tuple[int, int | None]:
    """(lo, hi) of the LENGTH_EDGES bucket holding a context of `tokens` tokens: lo <= tokens < hi (None:
    no end)."""
    if tokens < 0:
        raise ValueError(f"a context length is a non-negative number of tokens, got {tokens!r}")
    lo = max(edge for edge in LENGTH_EDGES if edge <= tokens)
    higher = [edge for edge in LENGTH_EDGES if edge > tokens]
    return lo, (min(higher) if higher else None)


@dataclass
class LengthBucket:
    """Measured quality per config key over the contexts of lo <= tokens < hi (hi None: no end)."""

    lo: int
    hi: int | None
    entries: dict[str, float] = field(default_factory=dict)
    n: int = 0  # examples behind its best-measured entry (the most of any key)

    def __post_init__(self) -> None:
        if isinstance(self.lo, bool) or self.lo < 0:
            raise ValueError(f"a length bucket starts at a non-negative number of tokens, got {self.lo!r}")
        if self.hi is not None and self.hi <= self.lo:
            raise ValueError(f"a length bucket ends after it starts, got [{self.lo!r}, {self.hi!r})")

    def to_dict(self) -> dict[str, Any]:
        return {"min_tokens": self.lo, "max_tokens": self.hi, "n": self.n, "entries": self.entries}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LengthBucket:
        hi = data["max_tokens"]
        return cls(
            lo=int(data["min_tokens"]),
            hi=None if hi is None else int(hi),
            entries={str(k): float(v) for k, v in data["entries"].items()},
            n=int(data.get("n", 0)),
        )


@dataclass
class QualityTable:
    """Expected quality per config key, per context length: measured entries first, the default prior
    otherwise.

    A flat table (no `buckets`; every table before 2026-12, and what calibrate writes from contexts of one
    length bucket) holds one quality per key for every length. A bucketed one holds a quality per key in
    each LengthBucket it measured, and in `entries` the mean over every length (what a reader without
    buckets uses). A lookup at T tokens takes the key from the bucket holding T; where that bucket lacks
    it, from the nearest shorter bucket that measured it; from `entries` only when no bucket measured it
    at all. Never from a longer bucket: selection keeps more of what matters the longer the context (on
    the embedded model the same config keeps 0.87 of the answer at 2k-8k tokens and 0.70 on SQuAD's
    ~200), so a config measured only on long contexts would be overrated on short ones; measured only on
    shorter ones it is rated low, which costs a pick, not a promise. Only when no such bucket nor
    `entries` holds the key itself are its twins looked up (the same way), then the prior (`expected`).
    Without T (tokens=None) only `entries` answer. A recipe whose rate the planner fits to the budget
    (transform coding) is keyed per budget, '<name>@<budget>%' (fitted_key), and answered only by `fitted`.

    Lookups are memoized: fill `entries` and `buckets` before the first `expected` call.
    """

    model: str = "default"
    entries: dict[str, float] = field(default_factory=dict)
    source: str = "built-in prior"
    fingerprints: tuple[str, ...] = ()  # the model fingerprints it was measured for
    buckets: tuple[LengthBucket, ...] = ()  # by context length, shortest first; none: a flat table
    metric: str = "fidelity"  # the sample metric its entries are means of (kvlink-bench calibrate --quality)
    _memo: dict[tuple[Recipe, int, tuple[int, ...] | None], float] = field(
        default_factory=dict, repr=False, compare=False
    )
    _orders: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)
    _keys: frozenset[str] | None = field(default=None, repr=False, compare=False)  # of every bucket
    _shapes: frozenset[tuple[Any, ...]] | None = field(default=None, repr=False, compare=False)
    _shapes_known: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.buckets = tuple(sorted(self.buckets, key=lambda b: b.lo))
        for a, b in itertools.pairwise(self.buckets):
            if a.hi is None or a.hi > b.lo:
                raise ValueError(
                    f"length buckets overlap: [{a.lo}, {a.hi}) and [{b.lo}, {b.hi}) (hi None: no end)"
                )

    def _order(self, tokens: int | None) -> tuple[int, ...] | None:
        """The buckets a lookup at `tokens` tries, by index: the one holding it (if any), then the shorter
        ones, nearest first; None without `tokens` or without buckets (then `entries` answer)."""
        if tokens is None or not self.buckets:
            return None
        order = self._orders.get(tokens)
        if order is None:
            at_or_below = [i for i, b in enumerate(self.buckets) if b.lo <= tokens]
            order = self._orders[tokens] = tuple(reversed(at_or_below))
        return order

    def _measured(self, key: str, order: tuple[int, ...] | None) -> float | None:
        if order is not None:
            for i in order:
                value = self.buckets[i].entries.get(key)
                if value is not None:
                    return value
            if self._keys is None:
                self._keys = frozenset(k for b in self.buckets for k in b.entries)
            if key in self._keys:  # measured, but only on contexts longer than this one
                return None
        return self.entries.get(key)

    def might_measure(self, recipe: Recipe) -> bool:
        """False only when no entry of the table (any bucket, any length) can be `recipe` or one of the twins
        a lookup tries for it (`expected`'s and the planner's): those keep its selection method and share
        kept and each quantizer's format and group, so no entry sharing them means nothing to find. Lets
        the planner skip building and naming the twins of the thousands of configs no table measured."""
        if not self._shapes_known:
            keys = {k for b in self.buckets for k in b.entries} | set(self.entries)
            try:
                self._shapes = frozenset(_shape(Recipe.from_name(k)) for k in keys if parse_fitted(k) is None)
            except (KeyError, ValueError):  # a key this kvlink cannot read: never rule anything out
                self._shapes = None
            self._shapes_known = True
        return self._shapes is None or _shape(recipe) in self._shapes

    def measured(self, recipe: Recipe, tokens: int | None = None) -> float | None:
        """The measured quality of exactly `recipe` for a context of `tokens` tokens (the class docstring
        says which bucket answers), None when nothing measured it."""
        return self._measured(quality_key(recipe), self._order(tokens))

    def _holding(self, tokens: int | None) -> LengthBucket | None:
        if tokens is None:
            return None
        return next((b for b in self.buckets if b.lo <= tokens and (b.hi is None or tokens < b.hi)), None)

    def fitted(self, recipe: Recipe, budget: float, tokens: int | None) -> tuple[float, float] | None:
        """(quality, the budget it was measured at) of `recipe` with its rate fitted to `budget` (fitted_key),
        for a context of `tokens` tokens: the entry measured at the largest budget at or below `budget`, in
        the length bucket holding `tokens` only; None when that bucket measured it at no such budget.

        Stricter than `measured`, on purpose: the planner fits the rate to the budget it is given, which
        spends at least the bytes of the measured one (so the quality is at least as high), and a rate
        fitted on one length says nothing of another: on the embedded model `xl` beats selection by 0.09-0.16
        on SQuAD's ~200 tokens and only ties it at 2k-8k (docs/results.md). A flat table holds none."""
        bucket = self._holding(tokens)
        if bucket is None:
            return None
        name, best = quality_key(recipe), None
        for key, value in bucket.entries.items():
            parsed = parse_fitted(key)
            if parsed is None or parsed[0] != name or parsed[1] > budget + 1e-12:
                continue  # another recipe, or measured at more bytes than the budget gives
            if best is None or parsed[1] > best[1]:
                best = (value, parsed[1])
        return best

    def fitted_recipes(self, tokens: int | None) -> list[Recipe]:
        """The rate-fitted recipes measured (at some budget) in the length bucket holding `tokens`."""
        bucket = self._holding(tokens)
        names = {p[0] for p in map(parse_fitted, bucket.entries) if p is not None} if bucket else set()
        return [Recipe.from_name(name) for name in sorted(names)]

    def expected(self, recipe: Recipe, head_dim: int = 64, *, tokens: int | None = None) -> float:
        """The measured quality of `recipe` for a context of `tokens` tokens (None: any length); else that
        of its closest measured plain twin (the same recipe without sink entries, with one global kept
        set, unrotated, rounded to nearest, uniform widths) times UNMEASURED_ROTATION per difference;
        else the built-in prior."""
        order = self._order(tokens)
        memo = self._memo.get((recipe, head_dim, order))
        if memo is None:
            memo = self._memo[(recipe, head_dim, order)] = self._expected(recipe, head_dim, order)
        return memo

    def _expected(self, recipe: Recipe, head_dim: int, order: tuple[int, ...] | None) -> float:
        # The twins: the recipe less some of these; the closest measured one (fewest dropped) answers.
        drops: list[Callable[[Recipe], Recipe]] = []
        if recipe.has("sink"):
            drops.append(lambda r: r.without("sink"))
        if recipe.scope != "global":
            drops.append(lambda r: r.without("layer-scope"))
        if recipe.has("rotate"):
            drops.append(lambda r: r.without("rotate"))
        if any(q.rounding != "nearest" for q in recipe.quantizers("k")):
            drops.append(lambda r: r.without("round"))
        if any(q.widths != "uniform" for q in recipe.quantizers("k")):
            drops.append(lambda r: r.without("kwidths"))
        if any(q.widths != "uniform" for q in recipe.quantizers("v")):
            drops.append(lambda r: r.without("vwidths"))
        if not self.might_measure(recipe):  # no twin can be measured: the prior, as the loop would end
            return UNMEASURED_ROTATION ** len(drops) * default_quality(recipe, head_dim)
        for n in range(len(drops) + 1):
            for chosen in itertools.combinations(drops, n):
                twin = recipe
                for drop in chosen:
                    twin = drop(twin)
                value = self._measured(quality_key(twin), order)
                if value is not None:
                    return UNMEASURED_ROTATION**n * value
        return UNMEASURED_ROTATION ** len(drops) * default_quality(recipe, head_dim)

    def is_measured(self, recipe: Recipe) -> bool:
        """Whether `recipe` itself was measured, at any length."""
        key = quality_key(recipe)
        return key in self.entries or any(key in b.entries for b in self.buckets)

    def save(self, path: str | Path) -> None:
        doc: dict[str, Any] = {
            "model": self.model,
            "source": self.source,
            "grammar": GRAMMAR,
            "entries": self.entries,
        }
        if self.fingerprints:
            doc["fingerprints"] = list(self.fingerprints)
        if self.buckets:  # a flat table's file is as before buckets existed
            doc["buckets"] = [b.to_dict() for b in self.buckets]
        if self.metric != "fidelity":  # a fidelity table's file is as before the metric was named
            doc["metric"] = self.metric
        Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True))

    @classmethod
    def for_model(cls, fingerprint: str, model_name: str = "") -> QualityTable:
        """The model's measured table, else the built-in prior.

        First the table `kvlink-bench calibrate` wrote on this machine for this exact
        fingerprint; then the table shipped with kvlink (measured by this project,
        `bench/results/`) for the model the fingerprint names (kvlink.models.calibration_name:
        a local copy under any path is found), else for `model_name`, which stands for the
        same weights under any library version, whose fingerprint may differ.
        """
        shipped = calibration_name(fingerprint, model_name)
        for path in (
            default_quality_path(fingerprint),
            shipped_quality_path(shipped) if shipped else None,
        ):
            if path is not None and path.is_file():
                table = cls.load(path)
                logger.info(
                    "planner uses the measured quality table %s (%d configs)", path, len(table.entries)
                )
                return table
        return cls()

    @classmethod
    def load(cls, path: str | Path) -> QualityTable:
        """A table written by save(), flat or with "buckets"; one keyed by the names of before 2026-12
        (no "grammar") is migrated on reading (kvlink.recipe.migrate_name)."""
        try:
            data = json.loads(Path(path).read_text())
            entries = {str(k): float(v) for k, v in data["entries"].items()}
            fingerprints = tuple(str(f) for f in data.get("fingerprints", ()))
            buckets = [LengthBucket.from_dict(b) for b in data.get("buckets", ())]
            if data.get("grammar") != GRAMMAR:
                entries = {migrate_name(k): v for k, v in entries.items()}
                for b in buckets:
                    b.entries = {migrate_name(k): v for k, v in b.entries.items()}
            return cls(
                model=str(data.get("model", "unknown")),
                entries=entries,
                source=str(path),
                fingerprints=fingerprints,
                buckets=tuple(buckets),
                metric=str(data.get("metric", "fidelity")),
            )
        except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read quality table {str(path)!r}: {exc}") from None


@dataclass
class Candidate:
    """One recipe the planner weighed."""

    recipe: Recipe
    estimated_bytes: int
    fraction: float
    expected_quality: float  # NaN: not looked up, its estimate is beyond ZSTD_REACH x the budget
    fits: bool
    note: str = ""


@dataclass
class Plan:
    """The chosen recipe, its encoded message and its exact size against the budget."""

    recipe: Recipe
    encoded: EncodedKV
    wire: wire.WireSize
    allowance: int  # HTTP/2 framing upper bound (signaling is inside wire.total)
    total_bytes: int
    budget_bytes: int
    fp16_bytes: int
    candidates: list[Candidate]
    session_id: str = ""
    message_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.total_bytes / self.fp16_bytes


def framed_size(
    encoded: EncodedKV, session_id: str, message_id: str, fingerprint: str, chunk_bytes: int
) -> tuple[wire.WireSize, int]:
    """`encoded`'s exact size as kvlink.wire.to_frames sends it, and the HTTP/2 allowance around it (upper
    bound, signals included: an ack per layer, the receipt, a possible nack): what a budget holds."""
    size = wire.message_wire_size(encoded, session_id, message_id, fingerprint, chunk_bytes)
    n_frames = 2 + sum(
        max(1, -(-len(p.data) // chunk_bytes)) for t in encoded.tensors for p in t.parts.values()
    )
    n_signals = encoded.geometry.num_layers + 2
    return size, wire.http2_overhead(n_frames, size.frames, n_signals=n_signals)


def fixed_plan(
    read: Prefill,
    geometry: Geometry,
    fingerprint: str,
    recipe: Recipe,
    session_id: str,
    message_id: str,
    chunk_bytes: int = 1 << 20,
    profile: Any | None = None,
) -> Plan:
    """A Plan of exactly `recipe` (no search, no budget: its budget is its own size): selected, encoded
    and sized as `plan` sizes the recipe it picks. profile: the calibrated projection a
    LowRank("profile") stage needs (kvlink.lowrank.ModelProfile)."""
    started = time.perf_counter()
    codec = Codec(recipe, geometry, profile)
    t0 = time.perf_counter()
    kept = codec.select(read)
    select_s = time.perf_counter() - t0
    encoded = codec.encode_kv(read.kv, kept, read.observation)
    encoded.timings["select_s"] = select_s
    size, allowance = framed_size(encoded, session_id, message_id, fingerprint, chunk_bytes)
    total = size.total + allowance
    timings = {"search_s": 0.0, "plan_s": time.perf_counter() - started}
    return Plan(
        recipe, encoded, size, allowance, total, total, geometry.fp16_bytes(read.kv.length), [], session_id,
        message_id, timings,
    )  # fmt: skip


def plannable(recipe: Recipe) -> bool:
    """Whether the planner's search space (candidate_recipes without constraints) holds `recipe`'s
    shape: a measured recipe outside it can be in a quality table but never be planned. Low-rank
    ranks depend on head_dim and per-layer bits on the profile, so those are not checked here."""
    uniform = not (recipe.per_layer("k") or recipe.per_layer("v"))
    bits = {"fp16": 16, "int8": 8, "int4": 4, "nf4": "nf4", "int3": 3, "int2": 2}
    formats = (recipe.format("k"), recipe.format("v"))
    groups = {q.group for kind in ("k", "v") for q in recipe.quantizers(kind)}
    axes = (recipe.quantizers("k")[0].axis, recipe.quantizers("v")[0].axis)
    sinks = {s.n for s in recipe.stages() if isinstance(s, Sink)}
    transforms = {s.name for s in recipe.stages() if s.role == "transform"}
    lowranks = {s.mode for s in recipe.stages() if isinstance(s, LowRank)}
    widths = any(q.widths != "uniform" for kind in ("k", "v") for q in recipe.quantizers(kind))
    rotated = "".join(kind for kind in ("k", "v") if recipe.has("rotate", kind)) or "none"
    return (
        (recipe.select is None or recipe.retention in RETENTIONS)
        and (not uniform or all(bits.get(f) in BIT_CHOICES for f in formats))
        and (groups <= set(GROUP_SIZES) or set(formats) == {"fp16"})
        and transforms <= {"sink", "rotate", "lowrank"}
        and sinks <= set(SINK_CHOICES)
        and rotated in ROTATE_CHOICES
        and lowranks <= {"svd"}
        and (not widths or not lowranks)
        and axes == ("channel", "token")
    )


def _rank_options(head_dim: int, constraints: Constraints) -> list[int | None]:
    if constraints.lowrank != "svd":
        return [None]
    if constraints.rank is not None:
        return [constraints.rank]
    return [*sorted({max(1, int(head_dim * f)) for f in RANK_FRACTIONS}, reverse=True)]


def candidate_recipes(
    geometry: Geometry, constraints: Constraints | None = None, sensitivity: Sensitivity | None = None
) -> list[Recipe]:
    """Every recipe of the search space allowed by `constraints` (deduplicated), only of stages the
    receiver decodes (constraints.capabilities).

    With a `sensitivity` profile of the model, also the per-layer allocations at MIX_AVERAGES
    mean bits (unrotated, no low rank), unless bits are pinned or `constraints.layer_bits` is off.
    The space depends on nothing else, so a process keeps the last four it built, by (geometry,
    constraints, sensitivity): a sender's later plans take it from memory (25,871 recipes, about 21 MB,
    for the embedded model).
    """
    return list(_candidates(astuple(geometry), constraints or Constraints(), sensitivity))


@functools.lru_cache(maxsize=4)  # about 21 MB a space of the embedded model's geometry
def _candidates(
    shape: tuple[Any, ...], c: Constraints, sensitivity: Sensitivity | None
) -> tuple[Recipe, ...]:
    geometry = Geometry(*shape)  # its fields, in order: a key lru_cache can hash
    if c.recipe is not None:
        lacking = missing(c.recipe, c.capabilities)
        if lacking:
            raise ValueError(f"the receiver does not decode {', '.join(lacking)} of recipe {c.recipe.name!r}")
        return (c.recipe,)
    method = c.method or "q2c"
    retentions = [c.retention] if c.retention is not None else list(RETENTIONS)
    if method == "none":
        retentions = [1.0]
    k_bits = [c.k_bits] if c.k_bits is not None else [b for b in BIT_CHOICES if c.decodes(format_of(b))]
    v_bits = [c.v_bits] if c.v_bits is not None else [b for b in BIT_CHOICES if c.decodes(format_of(b))]
    groups = [c.group_size] if c.group_size is not None else list(GROUP_SIZES)
    ranks = _rank_options(geometry.head_dim, c)
    rotations = (
        [c.rotate] if c.rotate is not None
        else [r for r in ROTATE_CHOICES if r == "none" or decodes(c.capabilities, "rotate")]
    )  # fmt: skip
    if geometry.head_dim & (geometry.head_dim - 1):
        rotations = [r for r in rotations if r == "none"]  # Hadamard sizes are powers of two
    sinks = (
        [c.sink]
        if c.sink is not None
        else [n for n in SINK_CHOICES if not n or decodes(c.capabilities, "sink")]
    )
    scopes = [c.scope] if c.scope is not None else list(SCOPES)
    seen: set[Recipe] = set()
    out: list[Recipe] = []

    def add(recipe: Recipe) -> None:
        recipe = _pinned_widths(recipe, c)
        if recipe not in seen and not missing(recipe, c.capabilities):
            seen.add(recipe)
            out.append(recipe)

    axes = (retentions, k_bits, v_bits, groups, ranks, rotations, sinks, scopes)
    for r, kb, vb, g, rank, rot, sink, scope in itertools.product(*axes):
        both_fp16 = format_of(kb) == format_of(vb) == "fp16"
        if rot != "none" and (both_fp16 or rank is not None):
            continue  # rotation only serves quantization, and not of a low-rank latent
        if sink and both_fp16:
            continue  # sink entries only serve quantization
        add(
            build(
                selector="none" if (r == 1.0 or method == "none") else method,
                retention=r if method != "none" else 1.0,
                scope=scope if (r < 1.0 and method != "none") else "global",
                k_bits=kb, v_bits=vb,
                group_size=32 if both_fp16 else g,
                lowrank="svd" if rank is not None else "none",
                k_rank=rank, v_rank=rank, rotate=rot, sink=sink,
                round_k="query" if c.round_k == "query" and format_of(kb).startswith("int") else "nearest",
            )
        )  # fmt: skip
    mixes = _mixes(geometry, c, sensitivity)
    for (k_mix, v_mix), r, g, sink, scope in itertools.product(mixes, retentions, groups, sinks, scopes):
        selected = r < 1.0 and method != "none"
        add(
            build(
                selector=method if selected else "none", retention=r if selected else 1.0,
                scope=scope if selected else "global", group_size=g, sink=sink,
                k_layer_bits=k_mix, v_layer_bits=v_mix, round_k="query" if c.round_k == "query" else "nearest",
            )
        )  # fmt: skip
    return tuple(out)


def _mixes(
    geometry: Geometry, c: Constraints, sensitivity: Sensitivity | None
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The per-layer allocations the planner weighs: none without a matching profile or when ruled out."""
    if sensitivity is None or not c.layer_bits or sensitivity.num_layers != geometry.num_layers:
        return []
    if c.k_bits is not None or c.v_bits is not None or c.lowrank == "svd" or c.rotate not in (None, "none"):
        return []
    mixes = [sensitivity.allocate(average) for average in MIX_AVERAGES]
    return [m for m in mixes if all(c.decodes(f"int{b}") for b in {*m[0], *m[1]})]


def _pinned_widths(recipe: Recipe, c: Constraints) -> Recipe:
    """`recipe` with the key / value widths the constraints pin, wherever they apply."""
    if c.k_widths == "question":
        recipe = with_widths(recipe, "k") or recipe
    if c.v_widths == "question":
        recipe = with_widths(recipe, "v") or recipe
    return recipe


def with_rounding(recipe: Recipe) -> Recipe | None:
    """`recipe` with its INT keys rounded for the question's logits (None: no INT key, or low rank)."""
    if recipe.has("lowrank", "k") or not any(q.format.startswith("int") for q in recipe.quantizers("k")):
        return None
    return _each_quantizer(recipe, "k", lambda q: q.format.startswith("int"), rounding="query")


def with_widths(recipe: Recipe, kind: str) -> Recipe | None:
    """`recipe` with a width per key channel / value row wherever its `kind` tensors are INT2/3/4 on their
    axis (keys channel, values token), unrotated keys, no low rank (None: nowhere)."""
    axis = "channel" if kind == "k" else "token"
    qs = recipe.quantizers(kind)
    if (
        not any(q.format in ("int4", "int3", "int2") for q in qs)
        or any(q.axis != axis for q in qs)
        or recipe.has("lowrank", kind)
        or (kind == "k" and recipe.has("rotate", "k"))
    ):
        return None
    return _each_quantizer(recipe, kind, lambda q: q.format in ("int4", "int3", "int2"), widths="question")


def _each_quantizer(recipe: Recipe, kind: str, where: Callable[[Quantize], bool], **changes: Any) -> Recipe:
    from dataclasses import replace

    layers = tuple(
        (*p[:-1], replace(p[-1], **changes)) if where(p[-1]) else p  # type: ignore[arg-type, type-var]
        for p in (recipe.k if kind == "k" else recipe.v)
    )
    return recipe.with_layers(kind, layers)


def _measured_best(
    quality: QualityTable,
    recipe: Recipe,
    expected: float | None,
    free: tuple[bool, bool, bool],
    tokens: int | None = None,
) -> tuple[Recipe, float] | None:
    """The best of `recipe` (at `expected`, None when unknown) and its question-aware twins the table
    measured for a context of `tokens` tokens (QualityTable.measured): keys rounded for the question's
    logits (free: same bytes), per-channel key widths (4 bits per channel and head more) and per-row
    value widths (4 bits per row and head more), alone or together, each only where `free` (rounding,
    key widths, value widths) allows. None when nothing is known."""
    if not quality.might_measure(recipe):  # none of its twins can be measured: what the search would end on
        return None if expected is None else (recipe, expected)
    free_rounding, free_widths, free_vwidths = free
    options: list[Callable[[Recipe], Recipe | None]] = []
    keys = recipe.quantizers("k")
    if free_rounding and all(q.rounding == "nearest" and q.format.startswith("int") for q in keys):
        options.append(with_rounding)
    if (
        free_widths
        and all(q.widths == "uniform" for q in recipe.quantizers("k"))
        and with_widths(recipe, "k")
    ):
        options.append(lambda r: with_widths(r, "k"))
    if (
        free_vwidths
        and all(q.widths == "uniform" for q in recipe.quantizers("v"))
        and with_widths(recipe, "v")
    ):
        options.append(lambda r: with_widths(r, "v"))
    best_value, best = expected, recipe
    for n in range(1, len(options) + 1):
        for chosen in itertools.combinations(options, n):
            twin: Recipe | None = recipe
            for option in chosen:
                twin = option(twin) if twin is not None else None
            if twin is None:
                continue
            measured = quality.measured(twin, tokens)
            if measured is not None and (best_value is None or measured > best_value):
                best_value, best = measured, twin
    if best_value is None:
        return None
    return best, best_value


def transform_coding_free(c: Constraints) -> bool:
    """Whether nothing `c` pins rules transform coding out (kvlink.xl: its selection, quantizer, sink rows and
    entropy coder are its own, so any pinned choice of those, or zstd, is one it cannot honour)."""
    return (
        c.recipe is None
        and c.method in (None, "none")
        and c.retention in (None, 1.0)
        and c.k_bits is None
        and c.v_bits is None
        and c.lowrank in (None, "none")
        and c.rank is None
        and c.group_size is None
        and c.rotate in (None, "none")
        and c.sink is None
        and c.round_k is None
        and c.k_widths is None
        and c.v_widths is None
        and c.zstd is not True
    )


def _transform_coded(
    quality: QualityTable,
    profile: Any,
    constraints: Constraints,
    budget: float,
    tokens: int,
    observed: Observe = Observe.QUESTION,
) -> list[tuple[Recipe, float]]:
    """The rate-fitted recipes (rate still unset) the planner weighs for this message, with the quality
    the table expects of each: those the table measured at this context length at or below `budget`
    (QualityTable.fitted), when the sender holds their profiles (`profile`, a
    kvlink.residual.TransformProfiles: the caller passes one only when the receiver holds it too),
    nothing pinned rules them out, the receiver decodes their stages and the prefill observed what they
    need (`observed`: question-aware steps read the question's attention)."""
    from kvlink.residual import TransformProfiles

    if not isinstance(profile, TransformProfiles) or not transform_coding_free(constraints):
        return []
    out = []
    for recipe in quality.fitted_recipes(tokens):
        found = quality.fitted(recipe, budget, tokens)
        needs = recipe.needs()
        if needs is not Observe.NONE and needs is not observed:
            continue
        if found is not None and not missing(recipe, constraints.capabilities):
            out.append((recipe, found[0]))
    return out


def _rank(c: Candidate) -> tuple[bool, float, int]:
    """Sort key: the best expected quality first, then the smaller message; the unreachable last."""
    unknown = math.isnan(c.expected_quality)
    return (unknown, 0.0 if unknown else -c.expected_quality, c.estimated_bytes)


def fit_rate(
    recipe: Recipe,
    prefill: Prefill,
    geometry: Geometry,
    profile: Any,
    budget_bytes: int,
    framed: Callable[[EncodedKV], int],
) -> Recipe:
    """`recipe` (with a Pca stage) at the finest rate index whose message, `framed` (its wire bytes), fits
    `budget_bytes`; at the coarsest rate when none does (the planner then reports it unreachable). The
    search (kvlink.xl.search_rate) runs on the entropy model's code length (kvlink.xl.estimated_bytes, no
    rANS pass) plus the framing measured once, then settles on exact sizes (a size falls as the rate index
    rises). Every message it encodes passes through `framed`, the one at the returned rate included (the
    planner keeps that one to send)."""
    from kvlink import xl
    from kvlink.residual import TransformProfiles
    from kvlink.stages.pca import FP16_EXACT, question_shifts

    if not isinstance(profile, TransformProfiles):
        raise ValueError(
            f"recipe {recipe.name!r} codes with a residual profile: pass it with its predictors (profile=, a "
            "kvlink.residual.TransformProfiles)"
        )
    pca = next(s for s in recipe.stages() if isinstance(s, Pca))
    coarsest = RATES.stop - 1
    first = Codec(at_rate(recipe, coarsest), geometry, profile)
    kept = first.select(prefill)
    kv = prefill.kv.select(kept) if kept is not None else prefill.kv

    def exact(rate: int) -> float:
        try:
            return framed(
                Codec(at_rate(recipe, rate), geometry, profile).encode_kv(
                    prefill.kv, kept, prefill.observation
                )
            )
        except ValueError:  # too fine for the float16 symbols (Pca refuses it): never a pick
            return math.inf

    encoded = first.encode_kv(prefill.kv, kept, prefill.observation)
    body = sum(
        len(p.data)
        for t in encoded.tensors
        for name, p in t.parts.items()
        if name in ("codes", "sink", "shifts")
    )
    overhead = framed(encoded) - body  # positions, framing: the same at any rate
    shifts = None
    if pca.question:  # question-aware steps: the same shifts at every rate
        positions = kv.positions[0]
        shifts = torch.stack(
            [
                question_shifts(prefill.observation, layer, positions, pca.sink, pca.question)
                for layer in range(kv.num_layers)
            ]
        )

    def estimate(rate: int) -> float:
        est = xl.estimated_bytes(
            kv, profile.predictors, profile.residual, rate, pca.sink, FP16_EXACT, shifts=shifts
        )
        return est + overhead

    under = xl.exact_under(len(encoded.tensors), budget_bytes)
    rate = xl.search_rate(
        estimate, exact, budget_bytes, RATES, under
    )  # the estimate is infinite where too fine
    return at_rate(recipe, rate)  # None (none fits): the coarsest


def _estimate(codec: Codec, length: int) -> int:
    """Upper bound of the wire bytes of `codec`'s message before encoding."""
    sizes = codec.predicted_sizes(length)
    g = codec.geometry
    recipe = codec.recipe
    n_tensors = 2 * g.num_layers
    svd = any(isinstance(s, LowRank) and s.mode == "svd" for s in recipe.stages())
    parts_per_tensor = 3 + (1 if svd else 0) + (1 if recipe.has("sink") else 0)
    widths_parts = sum(
        g.num_layers for kind in ("k", "v") if any(q.widths != "uniform" for q in recipe.quantizers(kind))
    )
    n_parts = n_tensors * parts_per_tensor + widths_parts
    # Frames: a header with one payload-table entry per part (~40 bytes each), one chunk frame per
    # part (~24 bytes of tags, ids and CRC), the trailer, acks and the receipt; then HTTP/2.
    framing = HEADER_ALLOWANCE + n_parts * (40 + 24)
    signaling = g.num_layers * 16 + wire.RECEIPT_ALLOWANCE
    frames = sizes.total + framing
    n_signals = g.num_layers + 2
    return frames + signaling + wire.http2_overhead(n_parts + 2, frames, n_signals=n_signals)


HEADER_ALLOWANCE = 1024
"""Header bytes the estimate counts besides the payload table (ids, fingerprint, geometry, the recipe)."""


def plan(
    prefill: Prefill,
    geometry: Geometry,
    fingerprint: str,
    budget: float,
    *,
    constraints: Constraints | None = None,
    quality: QualityTable | None = None,
    sensitivity: Sensitivity | None = None,
    model_name: str = "",
    session_id: str = "",
    message_id: str = "",
    chunk_bytes: int = 1 << 20,
    profile: Any | None = None,
) -> Plan:
    """Choose, encode and size the best config for `budget` (a fraction of the full FP16 KV).

    quality: expected quality per config (default: QualityTable.for_model(fingerprint,
    model_name)), looked up at this context's length (its T positions, which the message carries).
    sensitivity: the profile per-layer bits are allocated from (default:
    Sensitivity.for_model(fingerprint, model_name)); those configs are weighed only where `quality`
    measured them. The ids are part of the framed size; empty ones are replaced by fresh uuid4 hex strings
    (read them back from `Plan.session_id` / `Plan.message_id` and send with those). profile: the
    calibrated profile a pinned recipe needs (kvlink.lowrank.ModelProfile for LowRank("profile"),
    kvlink.predict.PredictorProfile for Predict, kvlink.residual.TransformProfiles for Pca). Given a
    TransformProfiles that the receiver holds too, the planner also weighs transform coding where `quality`
    measured it at this length at or below `budget` (QualityTable.fitted), its rate fitted to the budget.
    """
    budget = parse_budget(budget)
    session_id = session_id or uuid.uuid4().hex
    message_id = message_id or uuid.uuid4().hex
    started = time.perf_counter()
    constraints = constraints or Constraints()
    quality = quality or QualityTable.for_model(fingerprint, model_name)
    if sensitivity is None and constraints.layer_bits:
        sensitivity = Sensitivity.for_model(fingerprint, model_name)
    length = prefill.kv.length
    fp16 = geometry.fp16_bytes(length)
    budget_bytes = math.floor(budget * fp16)

    candidates: list[Candidate] = []
    estimates: dict[tuple[Any, ...], int] = {}
    observed = len(prefill.observation.layers) == geometry.num_layers
    free = (
        constraints.round_k is None and observed,
        constraints.k_widths is None and observed and all(constraints.decodes(f) for f in WIDTH_FORMATS),
        constraints.v_widths is None
        and observed
        and all(constraints.decodes(f) for f in TOKEN_WIDTH_FORMATS),
    )

    # Transform coding's messages as they were encoded to size them (by recipe name, rate included): the one
    # at the fitted rate is sized and sent as it is, not encoded twice more (one encode took 16 s of a 131-s
    # plan of a 6.5k-token context on a CPU). Of a rate fit's messages only the one at the rate it settles on
    # is kept, if it fits (a message is a tenth of the context's FP16 KV at a 10% budget).
    coded: dict[str, EncodedKV] = {}

    def encoded_once(codec: Codec) -> EncodedKV:
        encoded = coded.get(codec.recipe.name)
        if encoded is None:
            encoded = codec.encode_kv(prefill.kv, codec.select(prefill), prefill.observation)
            coded[codec.recipe.name] = encoded
        return encoded

    def estimate(recipe: Recipe) -> int:
        size_key = recipe.size_key()
        est = estimates.get(size_key)
        if est is None:
            codec = Codec(recipe, geometry, profile)
            if recipe.ans is not None:  # transform coding's size is the data's: measured by encoding
                size, allowance = framed_size(
                    encoded_once(codec), session_id, message_id, fingerprint, chunk_bytes
                )
                est = size.total + allowance
            else:
                est = _estimate(codec, length)
            estimates[size_key] = est
        return est

    def framed(encoded: EncodedKV) -> int:
        size, allowance = framed_size(encoded, session_id, message_id, fingerprint, chunk_bytes)
        total: int = size.total + allowance
        if encoded.recipe.ans is not None and total <= budget_bytes:
            coded[encoded.recipe.name] = encoded
        return total

    def fitted(recipe: Recipe) -> Recipe:
        before = set(coded)
        recipe = fit_rate(recipe, prefill, geometry, profile, budget_bytes, framed)
        for name in set(coded) - before - {recipe.name}:
            del coded[name]
        return recipe

    for recipe in candidate_recipes(geometry, constraints, sensitivity):
        pca = next((s for s in recipe.stages() if isinstance(s, Pca)), None)
        if pca is not None and pca.rate is None:  # transform coding: the finest rate that fits the budget
            recipe = fitted(recipe)
        if recipe.per_layer("k") or recipe.per_layer("v"):  # no prior for an allocation: only a measurement
            base = quality.measured(recipe, length)
            best = _measured_best(quality, recipe, base, free, length)
            if best is None:
                continue
            recipe, expected = best
            est = estimate(recipe)
            expected = expected if est <= budget_bytes * ZSTD_REACH else math.nan
            candidates.append(Candidate(recipe, est, est / fp16, expected, est <= budget_bytes))
            continue
        est = estimate(recipe)
        if est <= budget_bytes * ZSTD_REACH:
            expected = quality.expected(recipe, geometry.head_dim, tokens=length)
            # Twins are taken only where the table measured them better (never from a prior).
            best = _measured_best(quality, recipe, expected, free, length)
            assert best is not None
            recipe, expected = best
            est = estimate(recipe)
        else:
            expected = math.nan
        candidates.append(Candidate(recipe, est, est / fp16, expected, est <= budget_bytes))
    seen = prefill.observation.kind if observed else Observe.NONE
    for recipe, expected in _transform_coded(quality, profile, constraints, budget, length, seen):
        recipe = fitted(recipe)
        est = estimate(recipe)
        candidates.append(Candidate(recipe, est, est / fp16, expected, est <= budget_bytes))
    smallest = min(candidates, key=lambda c: c.estimated_bytes)
    # Best quality first; among equals, the smaller message; the unreachable ones last.
    candidates.sort(key=_rank)
    search_s = time.perf_counter() - started

    kept_cache: dict[Select | None, list[Tensor] | None] = {}
    select_s: dict[Select | None, float] = {}
    plain_tries = zstd_tries = 0
    zstd_saved: float | None = None  # the most a zstd try that missed saved against its plain estimate
    zstd_failed: dict[tuple[int, int], float] = {}  # (K, V bits) -> the smallest estimate zstd did not fit
    allow_plain = constraints.zstd is not True
    allow_zstd = constraints.zstd is not False
    for cand in candidates:
        variants: list[Recipe] = []
        if cand.fits and allow_plain and plain_tries < MAX_ENCODE_TRIES:
            variants.append(cand.recipe)
            plain_tries += 1
        # zstd only shrinks parts: worth a try for a better candidate whose plain estimate is close, unless
        # an earlier try on this message says it cannot fit: codes as wide in a message at least as large
        # did not, or it needs a saving well beyond the best a try got (ZSTD_SPREAD).
        need = 1.0 - budget_bytes / cand.estimated_bytes
        widths = (format_spec(cand.recipe.format("k")).bits, format_spec(cand.recipe.format("v")).bits)
        hopeless = cand.estimated_bytes >= zstd_failed.get(widths, math.inf) or (
            zstd_saved is not None and need > zstd_saved + ZSTD_SPREAD
        )
        if (
            allow_zstd
            and cand.recipe.ans is None  # rANS already codes its parts: one entropy stage
            and zstd_tries < MAX_ZSTD_TRIES
            and cand.estimated_bytes <= budget_bytes * ZSTD_REACH
        ):
            if hopeless:
                cand.note = f"zstd not tried: needs {need:.1%}, tries saved at most {zstd_saved or 0.0:.1%}"
            else:
                variants.append(cand.recipe.with_zstd(ZSTD_LEVEL))
                zstd_tries += 1
        for recipe in variants:
            key = recipe.select
            encoded = coded.get(recipe.name)
            if encoded is not None:  # encoded while its rate was fitted (or sized): these very bytes
                encode_s = encoded.timings.get("encode_s", 0.0)
            else:
                codec = Codec(recipe, geometry, profile)
                if key not in kept_cache:
                    t_sel = time.perf_counter()
                    kept_cache[key] = codec.select(prefill)
                    select_s[key] = time.perf_counter() - t_sel
                t0 = time.perf_counter()
                encoded = codec.encode_kv(prefill.kv, kept_cache[key], prefill.observation)
                encode_s = time.perf_counter() - t0
            size, allowance = framed_size(encoded, session_id, message_id, fingerprint, chunk_bytes)
            total = size.total + allowance
            cand.note = f"{recipe.name}: {total:,} B ({total / fp16:.2%})"
            if recipe.zstd_level and total > budget_bytes:
                saved = 1.0 - total / cand.estimated_bytes
                zstd_saved = saved if zstd_saved is None else max(saved, zstd_saved)
                zstd_failed[widths] = min(cand.estimated_bytes, zstd_failed.get(widths, math.inf))
            logger.debug("tried %s: %d bytes (budget %d)", recipe.name, total, budget_bytes)
            if total <= budget_bytes:
                encoded.timings["encode_s"] = encode_s
                encoded.timings["select_s"] = select_s.get(key, 0.0)
                timings = {"search_s": search_s, "plan_s": time.perf_counter() - started}
                return Plan(
                    recipe,
                    encoded,
                    size,
                    allowance,
                    total,
                    budget_bytes,
                    fp16,
                    candidates,
                    session_id,
                    message_id,
                    timings,
                )
        if plain_tries >= MAX_ENCODE_TRIES:
            break
    raise BudgetError(budget, smallest.fraction, f"with {smallest.recipe.name}")
