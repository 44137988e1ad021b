"""The codec: a config, a context KV cache in, encoded tensors out, and back.

    config = CodecConfig(selector="q2c", retention=0.5, k_bits=4, v_bits=4)
    codec = Codec(config, geometry)
    encoded = codec.encode(prefill)          # EncodedKV: raw little-endian parts per tensor
    kv = codec.decode(encoded)               # ContextKV with the ORIGINAL positions

Pipeline per layer and per K/V: keep the selected positions -> set the first
`sink` of them aside at fp16 (attention sinks) -> optional low rank
(per-message SVD, or a calibrated projection both sides hold) -> quantize
(INT8/4/3/2, NF4, or FP16) -> optional zstd per part. The size of every part
is known before any byte is written (`Codec.predicted_sizes`); zstd, which
depends on the data, is the only stage whose size is measured.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from kvlink import positions as pos_codec
from kvlink.cache import ContextKV, Observation, Observe, Prefill
from kvlink.models import Geometry
from kvlink.quant import (
    AXES,
    TOKEN_WIDTH_FORMATS,
    WIDTH_FORMATS,
    QuantizedTensor,
    QuantSpec,
    format_from_bits,
    part_sizes,
    widths_shape,
)
from kvlink.quant.aware import query_hessian, round_query_aware, saliency
from kvlink.quant.pack import pack_bits
from kvlink.quant.widths import (
    allocate_token_widths,
    allocate_widths,
    channel_weights,
    pack_codes,
    pack_widths,
    quantize_token_widths,
    quantize_widths,
    token_weights,
    unpack_widths,
)
from kvlink.rotation import ROTATIONS, check_dim, hadamard, rotate, rotates, signs, unrotate
from kvlink.select import SCOPES, get_selector, keep_count, registered_selectors
from kvlink.select.base import attention_to_context

logger = logging.getLogger(__name__)

LOWRANK_MODES: tuple[str, ...] = ("none", "svd", "profile")
KINDS: tuple[str, ...] = ("k", "v")
PAYLOAD_PARTS = frozenset({"codes", "sink"})
METADATA_PARTS = frozenset({"scale", "zero", "basis", "widths"})
ROUNDINGS: tuple[str, ...] = ("nearest", "query")
KEY_WIDTHS: tuple[str, ...] = ("uniform", "query")
WIDTH_OF: dict[str, str] = {"int4": "int4w", "int3": "int3w", "int2": "int2w"}  # uniform -> per-channel
VALUE_WIDTHS: tuple[str, ...] = ("uniform", "attention")
TOKEN_WIDTH_OF: dict[str, str] = {"int4": "int4t", "int3": "int3t", "int2": "int2t"}  # uniform -> per-row
LAYER_BITS: tuple[int, ...] = (8, 4, 3, 2)  # the INT widths a per-layer allocation may give a tensor
ROUND_BATCH_ELEMENTS = 1 << 25  # key entries rounded in one batched call (~256 MiB of float64 work)


def _mean(values: tuple[int, ...]) -> float:
    return sum(values) / len(values)


def layer_bits_id(k_bits: tuple[int, ...], v_bits: tuple[int, ...]) -> str:
    """A short stable id of a per-layer allocation (8 hex digits), for labels and quality-table keys."""
    text = ",".join(map(str, k_bits)) + ";" + ",".join(map(str, v_bits))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class CodecConfig:
    """Every knob of the compression cube. Validated on construction (ValueError quotes the value).

    selector/retention: which positions travel ("none" keeps all; retention in (0, 1]).
    scope: "global" (one kept set for all layers) or "layer" (a set per layer).
    k_bits/v_bits: 16, 8, 4, 3, 2 or "nf4". group_size and k_axis/v_axis: quantization groups.
    lowrank: "none", "svd" (per message) or "profile" (calibrated projection); k_rank/v_rank.
    zstd_level: 0 (off) or 1..22, applied per part only where it makes the part smaller.
    rotate: "none", "k", "v" or "kv": a randomized Hadamard rotation along head_dim before
    quantization (kvlink.rotation; no wire bytes; not combined with low rank on that tensor).
    hi_layers/hi_bits: the first `hi_layers` layers quantize K and V at `hi_bits` instead (early
    layers are the most sensitive); fp16 tensors stay fp16. Each tensor's spec travels with it.
    sink: the first `sink` kept entries of every quantized tensor travel at fp16 and stay out of
    its quantization groups (attention sinks: a few huge key channels that would otherwise set
    the scale of a whole per-channel group).
    round_k: "nearest" or "query": INT keys rounded for the question's attention logits instead of
    to their nearest level (kvlink.quant.aware; the sender needs the prefill's observed queries;
    same layout and bytes, nothing for the receiver to support).
    k_layer_bits/v_layer_bits: INT bits (8, 4, 3 or 2) of each layer's K (V) tensor, one per layer,
    e.g. allocated from a measured sensitivity profile (kvlink.layerbits); empty = k_bits (v_bits)
    in every layer. When given, k_bits (v_bits) is set to their largest entry (one canonical form).
    k_widths: "uniform" or "query": INT2/3/4 keys get a bit width per channel, allocated from the
    question's queries at the tensor's bits as the mean (kvlink.quant.widths; formats int4w/int3w/
    int2w, the same codes bytes plus 4 bits per channel and head; INT8 tensors stay uniform; the
    sender needs the prefill's observed queries, the receiver must decode the format).
    v_widths: "uniform" or "attention": INT2/3/4 values get a bit width per token row, allocated
    from the attention the question's queries give each row (mean = the tensor's bits, no row
    below mean - 1; formats int4t/int3t/int2t: the same codes bytes plus 4 bits per row and head;
    needs the values grouped per token, the observed queries, and a receiver of the format).
    """

    selector: str = "none"
    retention: float = 1.0
    scope: str = "global"
    k_bits: int | str = 16
    v_bits: int | str = 16
    group_size: int = 32
    k_axis: str = "channel"
    v_axis: str = "token"
    lowrank: str = "none"
    k_rank: int | None = None
    v_rank: int | None = None
    zstd_level: int = 0
    window: int = 32
    seed: int = 0
    rotate: str = "none"
    hi_layers: int = 0
    hi_bits: int | str = 8
    sink: int = 0
    round_k: str = "nearest"
    k_layer_bits: tuple[int, ...] = ()
    v_layer_bits: tuple[int, ...] = ()
    k_widths: str = "uniform"
    v_widths: str = "uniform"

    def __post_init__(self) -> None:
        for kind in KINDS:
            self._check_layer_bits(kind)
        if self.selector != "none" and self.selector not in registered_selectors():
            raise ValueError(
                f"unknown selection method {self.selector!r}; registered: {['none', *registered_selectors()]}"
            )
        if isinstance(self.retention, bool) or not (0.0 < float(self.retention) <= 1.0):
            raise ValueError(f"retention must be in (0, 1], got {self.retention!r}")
        if self.selector == "none" and self.retention != 1.0:
            raise ValueError(f"retention {self.retention!r} needs a selection method (selector is 'none')")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        format_from_bits(self.k_bits)
        format_from_bits(self.v_bits)
        for axis in (self.k_axis, self.v_axis):
            if axis not in AXES:
                raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.lowrank not in LOWRANK_MODES:
            raise ValueError(f"lowrank must be one of {LOWRANK_MODES}, got {self.lowrank!r}")
        for name in ("k_rank", "v_rank"):
            rank = getattr(self, name)
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {rank!r}")
        if self.lowrank == "none" and (self.k_rank is not None or self.v_rank is not None):
            raise ValueError("k_rank/v_rank need lowrank 'svd' or 'profile'")
        if self.lowrank != "none" and self.k_rank is None and self.v_rank is None:
            raise ValueError(f"lowrank {self.lowrank!r} needs k_rank and/or v_rank")
        if not (0 <= self.zstd_level <= 22):
            raise ValueError(f"zstd_level must be in [0, 22], got {self.zstd_level!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window!r}")
        if isinstance(self.hi_layers, bool) or not isinstance(self.hi_layers, int) or self.hi_layers < 0:
            raise ValueError(f"hi_layers must be a non-negative integer, got {self.hi_layers!r}")
        format_from_bits(self.hi_bits)
        if not self.hi_layers:
            object.__setattr__(self, "hi_bits", 8)  # irrelevant then: one canonical form
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"sink must be a non-negative integer, got {self.sink!r}")
        if self.round_k not in ROUNDINGS:
            raise ValueError(f"round_k must be one of {ROUNDINGS}, got {self.round_k!r}")
        if self.round_k == "query":
            if not self.k_format.startswith("int"):
                raise ValueError(f"round_k 'query' needs INT keys, got k_bits {self.k_bits!r}")
            if self.lowrank != "none" and self.k_rank is not None:
                raise ValueError(f"round_k 'query' with lowrank {self.lowrank!r} on k: choose one")
        if self.k_widths not in KEY_WIDTHS:
            raise ValueError(f"k_widths must be one of {KEY_WIDTHS}, got {self.k_widths!r}")
        if self.k_widths != "uniform":
            conflict = self.widths_conflict()
            if conflict:
                raise ValueError(f"k_widths {self.k_widths!r} {conflict}")
        if self.v_widths not in VALUE_WIDTHS:
            raise ValueError(f"v_widths must be one of {VALUE_WIDTHS}, got {self.v_widths!r}")
        if self.v_widths != "uniform":
            conflict = self.value_widths_conflict()
            if conflict:
                raise ValueError(f"v_widths {self.v_widths!r} {conflict}")
        if self.rotate not in ROTATIONS:
            raise ValueError(f"rotate must be one of {ROTATIONS}, got {self.rotate!r}")
        for kind in KINDS:
            if rotates(self.rotate, kind) and self.lowrank != "none" and self.rank(kind) is not None:
                raise ValueError(
                    f"rotate {self.rotate!r} with lowrank {self.lowrank!r} on {kind}: choose one"
                )

    def widths_conflict(self) -> str | None:
        """Why per-channel key widths cannot apply to this config's keys (None: they can)."""
        if not {self.k_format, *(format_from_bits(b) for b in self.k_layer_bits)} & set(WIDTH_OF):
            return f"needs INT2/3/4 keys, got k_bits {self.k_bits!r}"
        if self.k_axis != "channel":
            return f"needs keys grouped on the channel axis, got {self.k_axis!r}"
        if rotates(self.rotate, "k"):
            return f"with rotate {self.rotate!r}: choose one"
        if self.lowrank != "none" and self.k_rank is not None:
            return f"with lowrank {self.lowrank!r} on k: choose one"
        return None

    def value_widths_conflict(self) -> str | None:
        """Why per-token value widths cannot apply to this config's values (None: they can)."""
        if not {self.v_format, *(format_from_bits(b) for b in self.v_layer_bits)} & set(TOKEN_WIDTH_OF):
            return f"needs INT2/3/4 values, got v_bits {self.v_bits!r}"
        if self.v_axis != "token":
            return f"needs values grouped on the token axis, got {self.v_axis!r}"
        if self.lowrank != "none" and self.v_rank is not None:
            return f"with lowrank {self.lowrank!r} on v: choose one"
        return None

    def _check_layer_bits(self, kind: str) -> None:
        """Validate and canonicalize `{kind}_layer_bits` (a tuple; `{kind}_bits` becomes its largest entry)."""
        name = f"{kind}_layer_bits"
        bits = getattr(self, name)
        if isinstance(bits, (str, bytes)) or not hasattr(bits, "__iter__"):
            raise ValueError(f"{name} must be a sequence of bit widths, got {bits!r}")
        bits = tuple(bits)
        for b in bits:
            if isinstance(b, bool) or b not in LAYER_BITS:
                raise ValueError(f"{name} entries must be one of {LAYER_BITS}, got {b!r}")
        object.__setattr__(self, name, bits)
        if not bits:
            return
        if self.hi_layers:
            raise ValueError(f"{name} and hi_layers both set the bits of layers: choose one")
        if self.lowrank != "none":
            raise ValueError(f"{name} with lowrank {self.lowrank!r}: choose one")
        object.__setattr__(self, f"{kind}_bits", max(bits))

    def layer_bits(self, kind: str) -> tuple[int, ...]:
        return self.k_layer_bits if kind == "k" else self.v_layer_bits

    @cached_property
    def k_format(self) -> str:
        return format_from_bits(self.k_bits)

    @cached_property
    def v_format(self) -> str:
        return format_from_bits(self.v_bits)

    def spec(self, kind: str, layer: int | None = None) -> QuantSpec:
        """The quantization of `kind` tensors (of `layer`: hi_bits for the first hi_layers layers)."""
        fmt, axis = (self.k_format, self.k_axis) if kind == "k" else (self.v_format, self.v_axis)
        if layer is not None and layer < self.hi_layers and fmt != "fp16":
            fmt = format_from_bits(self.hi_bits)
        per_layer = self.layer_bits(kind)
        if layer is not None and per_layer:
            fmt = format_from_bits(per_layer[layer])
        if kind == "k" and self.k_widths != "uniform":
            fmt = WIDTH_OF.get(fmt, fmt)
        if kind == "v" and self.v_widths != "uniform":
            fmt = TOKEN_WIDTH_OF.get(fmt, fmt)
        return QuantSpec(fmt, self.group_size, axis)

    def rank(self, kind: str) -> int | None:
        return self.k_rank if kind == "k" else self.v_rank

    def sink_count(self, kind: str, n_kept: int) -> int:
        """Entries of a `kind` tensor of `n_kept` that travel at fp16 as its sink part (none for fp16)."""
        if not self.sink:
            return 0
        return 0 if (self.k_format if kind == "k" else self.v_format) == "fp16" else min(self.sink, n_kept)

    def validate_for(self, geometry: Geometry) -> None:
        """Checks that need the model: ranks must not exceed head_dim; rotation needs a power-of-two one."""
        for kind in KINDS:
            rank = self.rank(kind)
            if rank is not None and rank > geometry.head_dim:
                raise ValueError(f"{kind}_rank {rank!r} exceeds head_dim {geometry.head_dim}")
        if self.rotate != "none":
            check_dim(geometry.head_dim)
        for name in ("k_widths", "v_widths"):
            if getattr(self, name) != "uniform" and geometry.head_dim % 8:
                raise ValueError(
                    f"{name} {getattr(self, name)!r} needs head_dim a multiple of 8, got {geometry.head_dim}"
                )
        if self.hi_layers > geometry.num_layers:
            raise ValueError(f"hi_layers {self.hi_layers} exceeds the model's {geometry.num_layers} layers")
        for kind in KINDS:
            per_layer = self.layer_bits(kind)
            if per_layer and len(per_layer) != geometry.num_layers:
                raise ValueError(
                    f"{kind}_layer_bits has {len(per_layer)} entries, the model has {geometry.num_layers} layers"
                )

    @property
    def label(self) -> str:
        """A short human-readable name, e.g. 'q2c50%+k4c/v4t-g32'."""
        parts = []
        if self.selector != "none":
            parts.append(
                f"{self.selector}{self.retention * 100:g}%" + ("/layer" if self.scope == "layer" else "")
            )
        if self.lowrank != "none":
            parts.append(f"{self.lowrank}-r{self.k_rank or 'full'}/{self.v_rank or 'full'}")
        kf, vf = self.k_format, self.v_format
        if self.k_layer_bits:
            kf = f"mix{_mean(self.k_layer_bits):.3g}"
        if self.v_layer_bits:
            vf = f"mix{_mean(self.v_layer_bits):.3g}"
        if kf == vf == "fp16":
            parts.append("fp16")
        else:
            parts.append(f"k{kf}{self.k_axis[0]}/v{vf}{self.v_axis[0]}-g{self.group_size}")
        if self.k_layer_bits or self.v_layer_bits:
            parts.append(f"bits-{layer_bits_id(self.k_layer_bits, self.v_layer_bits)}")
        if self.hi_layers:
            parts.append(f"hi{self.hi_layers}@{format_from_bits(self.hi_bits)}")
        if self.sink:
            parts.append(f"sink{self.sink}")
        if self.rotate != "none":
            parts.append(f"rot-{self.rotate}")
        if self.round_k != "nearest":
            parts.append(f"round-{self.round_k}")
        if self.k_widths != "uniform":
            parts.append(f"kwidths-{self.k_widths}")
        if self.v_widths != "uniform":
            parts.append(f"vwidths-{self.v_widths}")
        if self.zstd_level:
            parts.append(f"zstd{self.zstd_level}")
        return "+".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for kind in KINDS:  # JSON-friendly; from_dict turns them back into tuples
            out[f"{kind}_layer_bits"] = list(out[f"{kind}_layer_bits"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodecConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown codec config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def with_(self, **changes: Any) -> CodecConfig:
        return replace(self, **changes)


@dataclass
class Part:
    """One buffer of an encoded tensor: raw little-endian bytes, zstd-compressed when that paid."""

    data: bytes
    raw_size: int
    zstd: bool = False


@dataclass
class EncodedTensor:
    """One layer's K or V: shape (kv_heads, n_kept, head_dim) once decoded.

    `stored` is the quantized matrix's shape: (H, n_kept - s, head_dim), or
    the latent (H, n_kept - s, rank) under low rank, where the first s entries
    travel at fp16 (CodecConfig.sink). Parts: codes, scale, zero (quantization),
    basis (per-message SVD: (H, rank, head_dim) float16), sink ((H, s, head_dim)
    float16).
    """

    layer: int
    kind: str
    shape: tuple[int, int, int]
    stored: tuple[int, int, int]
    spec: QuantSpec
    lowrank: str
    parts: dict[str, Part]

    @property
    def sink(self) -> int:
        """Entries that travel at fp16 ahead of the quantized ones."""
        return self.shape[1] - self.stored[1]

    def part_sizes(self) -> dict[str, int]:
        """Exact raw bytes of every part this tensor must carry (before zstd)."""
        h, _, d = self.shape
        sizes = part_sizes(self.stored, self.spec)
        if self.lowrank == "svd":
            sizes["basis"] = h * self.stored[2] * d * 2
        if self.sink:
            sizes["sink"] = h * self.sink * d * 2
        return sizes

    def nbytes(self) -> int:
        return sum(len(p.data) for p in self.parts.values())


@dataclass
class _Prepared:
    """A K or V tensor ready to quantize: `stored` (H, N, D or rank) and the parts made on the way."""

    layer: int
    kind: str
    shape: tuple[int, int, int]
    stored: Tensor
    spec: QuantSpec
    mode: str
    parts: dict[str, Part]

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        return (int(self.stored.shape[0]), int(self.stored.shape[1]), int(self.stored.shape[2]))


@dataclass
class Sizes:
    """Bytes of an encoded message by category (wire framing is added by kvlink.wire)."""

    payload: int = 0  # quantized codes and fp16 sink entries
    scales: int = 0  # scale + zero per group, per-channel widths
    factors: int = 0  # low-rank bases sent with the message
    positions: int = 0  # kept-position sets

    @property
    def metadata(self) -> int:
        return self.scales + self.factors + self.positions

    @property
    def total(self) -> int:
        return self.payload + self.metadata

    def as_dict(self) -> dict[str, int]:
        return {
            "payload": self.payload,
            "scales": self.scales,
            "factors": self.factors,
            "positions": self.positions,
            "metadata": self.metadata,
            "total": self.total,
        }


@dataclass
class EncodedKV:
    """A whole encoded context: geometry, original length T, kept positions and 2 x layers tensors.

    positions: one (encoding, bytes, count) per layer, or a single one shared by all layers.
    tensors: ordered layer 0 K, layer 0 V, layer 1 K, ...
    """

    config: CodecConfig
    geometry: Geometry
    length: int
    positions: list[tuple[str, bytes, int]]
    tensors: list[EncodedTensor]
    profile_hash: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def shared_positions(self) -> bool:
        return len(self.positions) == 1

    def sizes(self) -> Sizes:
        s = Sizes(positions=sum(len(p[1]) for p in self.positions))
        for t in self.tensors:
            for name, part in t.parts.items():
                n = len(part.data)
                if name in PAYLOAD_PARTS:
                    s.payload += n
                elif name == "basis":
                    s.factors += n
                else:
                    s.scales += n
        return s

    def fp16_bytes(self) -> int:
        return self.geometry.fp16_bytes(self.length)


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().contiguous().cpu().numpy().tobytes()


def _from_bytes(
    data: bytes, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device | str
) -> Tensor:
    expected = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if len(data) != expected:
        raise ValueError(f"buffer has {len(data)} bytes, shape {shape} of {dtype} needs {expected}")
    t = torch.frombuffer(bytearray(data), dtype=dtype) if expected else torch.empty(0, dtype=dtype)
    return t.reshape(shape).to(device)


class Codec:
    """Encode a prefilled context under a CodecConfig and decode it back (reference path)."""

    def __init__(self, config: CodecConfig, geometry: Geometry, profile: Any | None = None) -> None:
        config.validate_for(geometry)
        if config.lowrank == "profile":
            if profile is None:
                raise ValueError(
                    "lowrank 'profile' needs a calibrated model profile (kvlink.lowrank.ModelProfile)"
                )
            for kind in KINDS:
                rank = config.rank(kind)
                if rank is not None and rank > profile.r_max:
                    raise ValueError(f"{kind}_rank {rank!r} exceeds the profile's r_max {profile.r_max}")
        self.config = config
        self.geometry = geometry
        self.profile = profile

    # --- sizes -------------------------------------------------------------
    def stored_shape(self, kind: str, n_kept: int) -> tuple[int, int, int]:
        """Shape of the quantized matrix of a `kind` tensor with `n_kept` entries (sink entries excluded)."""
        g = self.geometry
        rank = self.config.rank(kind) if self.config.lowrank != "none" else None
        n = n_kept - self.config.sink_count(kind, n_kept)
        return (g.kv_heads, n, rank if rank is not None else g.head_dim)

    def predicted_sizes(self, length: int, kept: list[Tensor] | None = None) -> Sizes:
        """Exact sizes before zstd. Without `kept`, position bytes use the bitmap upper bound."""
        cfg, g = self.config, self.geometry
        n_kept = keep_count(cfg.retention, length) if cfg.selector != "none" else length
        sizes = Sizes()
        for kind in KINDS:
            stored = self.stored_shape(kind, n_kept)
            sizes.payload += g.num_layers * g.kv_heads * (n_kept - stored[1]) * g.head_dim * 2
            specs: dict[QuantSpec, int] = {}  # spec -> how many layers use it
            if cfg.hi_layers or cfg.layer_bits(kind):
                for layer in range(g.num_layers):
                    spec = cfg.spec(kind, layer)
                    specs[spec] = specs.get(spec, 0) + 1
            else:  # one spec for every layer (the planner sizes thousands of these)
                specs[cfg.spec(kind, 0)] = g.num_layers
            for spec, layers in specs.items():
                for name, n in part_sizes(stored, spec).items():
                    if name == "codes":
                        sizes.payload += n * layers
                    else:
                        sizes.scales += n * layers
            if cfg.lowrank == "svd" and cfg.rank(kind) is not None:
                sizes.factors += g.num_layers * g.kv_heads * stored[2] * g.head_dim * 2
        if cfg.selector != "none":
            if kept is not None:
                unique = kept[:1] if cfg.scope == "global" else kept
                sizes.positions = sum(pos_codec.encoded_size(p, length) for p in unique)
            else:
                sets = 1 if cfg.scope == "global" else g.num_layers
                sizes.positions = sets * (length + 7) // 8
        return sizes

    # --- encode ------------------------------------------------------------
    def select(self, prefill: Prefill) -> list[Tensor] | None:
        """Kept positions per layer, or None when everything is kept."""
        cfg = self.config
        if cfg.selector == "none":
            return None
        kwargs: dict[str, Any] = {}
        if cfg.selector == "random":
            kwargs["seed"] = cfg.seed
        selector = get_selector(cfg.selector, **kwargs)
        if selector.observes is not Observe.NONE and prefill.observation.kind is not selector.observes:
            raise ValueError(
                f"selector {cfg.selector!r} needs a prefill with observe={selector.observes.value!r}, "
                f"got {prefill.observation.kind.value!r}"
            )
        return selector.keep(prefill.observation, cfg.retention, cfg.scope)

    def encode(self, prefill: Prefill) -> EncodedKV:
        """Select, reduce, quantize and pack a prefilled context."""
        started = time.perf_counter()
        kept = self.select(prefill)
        select_s = time.perf_counter() - started
        encoded = self.encode_kv(prefill.kv, kept, prefill.observation)
        encoded.timings["select_s"] = select_s
        return encoded

    def encode_kv(
        self, kv: ContextKV, kept: list[Tensor] | None = None, observation: Observation | None = None
    ) -> EncodedKV:
        """Encode `kv` keeping `kept[l]` positions of each layer (all when None).

        `observation`: the prefill's observed queries, needed by round_k "query" and k_widths
        "query" (any kind with queries).
        """
        cfg, g = self.config, self.geometry
        if self._needs_queries and (observation is None or len(observation.layers) != g.num_layers):
            got = (
                "none"
                if observation is None
                else f"{observation.kind.value!r} with {len(observation.layers)} layers"
            )
            what = (
                "round_k 'query'"
                if cfg.round_k == "query"
                else f"k_widths {cfg.k_widths!r}"
                if cfg.k_widths != "uniform"
                else f"v_widths {cfg.v_widths!r}"
            )
            raise ValueError(
                f"{what} needs the observed queries of all {g.num_layers} layers "
                f"(a prefill with observe='question'), got {got}"
            )
        if (kv.num_layers, kv.kv_heads, kv.head_dim) != (g.num_layers, g.kv_heads, g.head_dim):
            raise ValueError(
                f"KV cache geometry (layers={kv.num_layers}, kv_heads={kv.kv_heads}, head_dim={kv.head_dim}) "
                f"does not match the codec's {g}"
            )
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if kept is not None:
            kv = kv.select(kept)
        positions: list[tuple[str, bytes, int]] = []
        if cfg.selector != "none":
            sets = kv.positions[:1] if cfg.scope == "global" else kv.positions
            for p in sets:
                enc, data = pos_codec.encode_positions(p, kv.length)
                positions.append((enc, data, int(p.numel())))
        tq = time.perf_counter()
        aware = self._query_keys(kv, observation) if self._keys_need_queries else {}
        attended = self._attended_values(kv, observation) if cfg.v_widths != "uniform" else {}
        tensors: list[EncodedTensor] = []
        for layer in range(kv.num_layers):
            if layer in aware:
                tensors.append(self._finish(*aware.pop(layer)))
            else:
                tensors.append(self._encode_tensor(layer, "k", kv.keys[layer].float()))
            if layer in attended:
                tensors.append(self._finish(*attended.pop(layer)))
            else:
                tensors.append(self._encode_tensor(layer, "v", kv.values[layer].float()))
        timings["quantize_s"] = time.perf_counter() - tq
        timings["encode_s"] = time.perf_counter() - t0
        if cfg.zstd_level:
            tz = time.perf_counter()
            _compress(tensors, cfg.zstd_level)
            timings["zstd_s"] = time.perf_counter() - tz
        profile_hash = self.profile.hash if cfg.lowrank == "profile" and self.profile is not None else None
        return EncodedKV(cfg, g, kv.length, positions, tensors, profile_hash, timings)

    def _encode_tensor(self, layer: int, kind: str, x: Tensor) -> EncodedTensor:
        """One layer's K or V (H, n_kept, D), rounded to nearest."""
        return self._finish(self._prepare(layer, kind, x))

    def _prepare(self, layer: int, kind: str, x: Tensor) -> _Prepared:
        """Sink entries set aside, then the matrix to quantize: x, its rotation, or its low-rank latent."""
        cfg = self.config
        rank = cfg.rank(kind) if cfg.lowrank != "none" else None
        parts: dict[str, Part] = {}
        shape = (int(x.shape[0]), int(x.shape[1]), int(x.shape[2]))
        sink = cfg.sink_count(kind, shape[1])
        if sink:
            raw = _tensor_bytes(x[:, :sink].to(torch.float16))
            parts["sink"] = Part(raw, len(raw))
            x = x[:, sink:]
        stored = x
        mode = "none"
        if rank is not None:
            from kvlink import lowrank

            if cfg.lowrank == "svd":
                stored, basis = lowrank.svd_factors(x, rank)  # (H, N, r), (H, r, D)
                raw = _tensor_bytes(basis.to(torch.float16))
                parts["basis"] = Part(raw, len(raw))
            else:
                stored = self.profile.project(x, layer, kind, rank)  # type: ignore[union-attr]
            mode = cfg.lowrank
        elif rotates(cfg.rotate, kind):
            stored = rotate(x, cfg.seed, layer, kind)
        return _Prepared(layer, kind, shape, stored, cfg.spec(kind, layer), mode, parts)

    @property
    def _needs_queries(self) -> bool:
        return self._keys_need_queries or self.config.v_widths != "uniform"

    @property
    def _keys_need_queries(self) -> bool:
        return self.config.round_k == "query" or self.config.k_widths != "uniform"

    def _attended_values(
        self, kv: ContextKV, observation: Observation | None
    ) -> dict[int, tuple[_Prepared, QuantizedTensor]]:
        """Values of the per-token-width formats, each row's width allocated from the attention the
        observed queries give its position (kvlink.quant.widths.allocate_token_widths)."""
        assert observation is not None  # encode_kv checked it
        out: dict[int, tuple[_Prepared, QuantizedTensor]] = {}
        for layer in range(kv.num_layers):
            p = self._prepare(layer, "v", kv.values[layer].float())
            if p.spec.format not in TOKEN_WIDTH_FORMATS:
                continue  # an INT8 layer of a per-layer allocation
            sink = p.shape[1] - p.stored_shape[1]
            mass = attention_to_context(observation.layers[layer], observation.length, observation.scale)
            kept = kv.positions[layer][sink:].to(mass.device)
            weights = token_weights(p.stored, mass[:, kept].to(p.stored.device), p.spec.group_size)
            widths = allocate_token_widths(weights, TOKEN_WIDTH_FORMATS[p.spec.format])
            out[layer] = (p, quantize_token_widths(p.stored, p.spec, widths))
        return out

    def _query_keys(
        self, kv: ContextKV, observation: Observation | None
    ) -> dict[int, tuple[_Prepared, QuantizedTensor]]:
        """Keys quantized with the observed queries: per-channel widths allocated from them
        (k_widths "query") and/or rounded for their logits (round_k "query").

        The Hessian of a layer is that of its observed queries, rotated like its keys when they
        are. Rounding works in batches of one spec and shape of at most ROUND_BATCH_ELEMENTS
        entries (it works in float64).
        """
        cfg = self.config
        assert observation is not None  # encode_kv checked it
        prepared: list[tuple[_Prepared, Tensor]] = []
        for layer in range(kv.num_layers):
            p = self._prepare(layer, "k", kv.keys[layer].float())
            if not p.spec.format.startswith("int"):
                continue  # an fp16 first layer of a hi_layers config
            if cfg.round_k != "query" and p.spec.format not in WIDTH_FORMATS:
                continue  # an INT8 layer of a per-layer allocation: nothing query-aware to do
            queries = observation.layers[layer].queries.to(p.stored.device)
            if rotates(cfg.rotate, "k"):  # logits are invariant under one orthogonal map on both sides
                queries = rotate(queries, cfg.seed, layer, "k")
            prepared.append((p, query_hessian(queries, int(p.stored.shape[0]))))
        widths = self._allocate(prepared)
        batches: dict[tuple[QuantSpec, tuple[int, ...]], list[tuple[_Prepared, Tensor, Tensor | None]]] = {}
        out: dict[int, tuple[_Prepared, QuantizedTensor]] = {}
        for p, hessian in prepared:
            w = widths.get(p.layer)
            if cfg.round_k != "query":
                assert w is not None
                out[p.layer] = (p, quantize_widths(p.stored, p.spec, w))
            else:
                batches.setdefault((p.spec, tuple(p.stored.shape)), []).append((p, hessian, w))
        for (spec, shape), items in batches.items():
            h = shape[0]
            step = max(1, ROUND_BATCH_ELEMENTS // max(1, math.prod(shape)))
            for start in range(0, len(items), step):
                chunk = items[start : start + step]
                x = torch.cat([p.stored for p, _, _ in chunk])  # (layers * H, N, D)
                hessian = torch.cat([hs for _, hs, _ in chunk])  # (layers * H, D, D)
                stacked = torch.cat([w for _, _, w in chunk]) if spec.format in WIDTH_FORMATS else None  # type: ignore[misc]
                codes, scale, zero = round_query_aware(x, spec, hessian, widths=stacked)
                for i, (p, _, w) in enumerate(chunk):
                    rows = slice(i * h, (i + 1) * h)
                    packed = pack_bits(codes[rows], spec.bits) if w is None else pack_codes(codes[rows], w)
                    out[p.layer] = (
                        p,
                        QuantizedTensor(spec, p.stored_shape, packed, scale[rows], zero[rows], w),
                    )
        return out

    def _allocate(self, prepared: list[tuple[_Prepared, Tensor]]) -> dict[int, Tensor]:
        """Per-channel widths of every key tensor of a per-channel format, by layer: one allocation
        per mean width for all such layers' heads together (the rows are independent)."""
        compensated = self.config.round_k == "query"
        by_mean: dict[int, list[tuple[int, Tensor]]] = {}
        for p, hessian in prepared:
            if p.spec.format in WIDTH_FORMATS:
                weights = channel_weights(p.stored, saliency(hessian, compensated), p.spec.group_size)
                by_mean.setdefault(WIDTH_FORMATS[p.spec.format], []).append((p.layer, weights))
        out: dict[int, Tensor] = {}
        for mean, items in by_mean.items():
            widths = allocate_widths(torch.cat([w for _, w in items]), mean)
            start = 0
            for layer, weights in items:
                out[layer] = widths[start : start + weights.shape[0]]
                start += weights.shape[0]
        return out

    def _finish(self, prep: _Prepared, q: QuantizedTensor | None = None) -> EncodedTensor:
        """Quantize (unless `q` was rounded already) and collect the parts."""
        if q is None:  # Triton on a CUDA tensor, the reference elsewhere: the same bytes either way
            from kvlink.kernels import quantize_pack

            q = quantize_pack(prep.stored, prep.spec)
        parts = dict(prep.parts)
        widths = pack_widths(q.widths) if q.widths is not None else None
        for name, tensor in (("codes", q.codes), ("scale", q.scale), ("zero", q.zero), ("widths", widths)):
            if tensor is not None:
                raw = _tensor_bytes(tensor)
                parts[name] = Part(raw, len(raw))
        return EncodedTensor(
            prep.layer, prep.kind, prep.shape, prep.stored_shape, prep.spec, prep.mode, parts
        )

    # --- decode ------------------------------------------------------------
    def decode(
        self, encoded: EncodedKV, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> ContextKV:
        """Rebuild a ContextKV (kept entries at their original positions) from an EncodedKV."""

        g = encoded.geometry
        if len(encoded.tensors) != 2 * g.num_layers:
            raise ValueError(
                f"expected {2 * g.num_layers} tensors (K and V per layer), got {len(encoded.tensors)}"
            )
        if encoded.config.lowrank == "profile" and (
            self.profile is None or self.profile.hash != encoded.profile_hash
        ):
            raise ValueError(
                f"message was projected with profile {encoded.profile_hash!r}, which this codec lacks"
            )
        if encoded.positions:
            sets = [pos_codec.decode_positions(e, d, encoded.length, c) for e, d, c in encoded.positions]
            if len(sets) == 1:
                sets = sets * g.num_layers
            if len(sets) != g.num_layers:
                raise ValueError(f"{len(sets)} position sets for {g.num_layers} layers")
        else:
            sets = [torch.arange(encoded.length)] * g.num_layers
        for t in encoded.tensors:
            if t.shape[1] != sets[t.layer].numel():
                raise ValueError(
                    f"layer {t.layer} {t.kind}: {t.shape[1]} entries but {sets[t.layer].numel()} positions"
                )
            sink = encoded.config.sink_count(t.kind, t.shape[1])
            if t.sink != sink:
                raise ValueError(
                    f"layer {t.layer} {t.kind}: {t.sink} fp16 sink entries, the config asks for {sink}"
                )
        decoded = self._decode_tensors(encoded.tensors, device, dtype, encoded.config)
        keys = [x for t, x in zip(encoded.tensors, decoded, strict=True) if t.kind == "k"]
        values = [x for t, x in zip(encoded.tensors, decoded, strict=True) if t.kind == "v"]
        return ContextKV(keys, values, [s.to(device) for s in sets], encoded.length)

    def _decode_tensors(
        self,
        tensors: list[EncodedTensor],
        device: torch.device | str,
        dtype: torch.dtype,
        config: CodecConfig | None = None,
    ) -> list[Tensor]:
        """Every tensor of a message -> (H, N, D) of `dtype` on `device`, in the order given.

        Tensors quantized alike (same spec and stored shape, no low rank) are
        decoded together: their packed streams, laid end to end, are the packed
        stream of the (n*H, N, D) stack when each one ends on a byte boundary,
        so one host-to-device copy per part and one dequantize launch serve them
        all (the whole message, for a uniform config). The rest go one by one.
        Rotated tensors are dequantized in float32 and rotated back, as a stack too.
        fp16 sink entries go in front of the dequantized ones: for a stack, one copy
        of its joined sink parts and one of its dequantized entries into the result.
        """
        from kvlink.kernels import dequantize_into

        parts = [self._checked_parts(t) for t in tensors]
        out: list[Tensor | None] = [None] * len(tensors)
        config = config or self.config
        groups: dict[tuple[QuantSpec, tuple[int, int, int], bool, int], list[int]] = {}
        for i, t in enumerate(tensors):
            n = t.stored[0] * t.stored[1] * t.stored[2]
            rotated = t.lowrank == "none" and rotates(config.rotate, t.kind)
            whole = (n * t.spec.bits) % 8 == 0 and (
                t.spec.format not in TOKEN_WIDTH_FORMATS or (t.stored[0] * t.stored[1]) % 2 == 0
            )  # the parts of the members can be laid end to end (4-bit row widths: whole bytes too)
            if t.lowrank == "none" and whole:
                groups.setdefault((t.spec, t.stored, rotated, t.sink), []).append(i)
                continue
            x = self._decode_one(t, parts[i], device, torch.float32 if rotated else dtype)
            x = unrotate(x, config.seed, t.layer, t.kind).to(dtype) if rotated else x
            if t.sink:
                head = _from_bytes(parts[i]["sink"], torch.float16, (t.shape[0], t.sink, t.shape[2]), device)
                x = torch.cat([head.to(dtype), x], dim=1)
            out[i] = x
        batches: list[tuple[tuple[QuantSpec, tuple[int, int, int], bool, int], list[int]]] = []
        for key, members in groups.items():
            _, (h, n, d), _, sink = key
            step = max(1, DECODE_STACK_BYTES // (h * (n + sink) * d * 4))
            batches.extend((key, members[i : i + step]) for i in range(0, len(members), step))
        for (spec, (h, n, d), rotated, sink), members in batches:
            m = len(members)
            stacked = _quantized(spec, (m * h, n, d), [parts[i] for i in members], device)
            x = dequantize_into(stacked, torch.float32 if rotated else dtype).view(m, h, n, d)
            if rotated:  # (m, H, N, D) @ H/sqrt(D), times each member's signs
                s = torch.stack(
                    [signs(config.seed, tensors[i].layer, tensors[i].kind, d, x.device) for i in members]
                )
                x = ((x @ hadamard(d, x.device)) * s[:, None, None, :]).to(dtype)
            if sink:
                full = torch.empty((m, h, sink + n, d), dtype=dtype, device=x.device)
                joined = b"".join(parts[i]["sink"] for i in members)
                full[:, :, :sink] = _from_bytes(joined, torch.float16, (m, h, sink, d), device)
                full[:, :, sink:] = x
                x = full
            for j, i in enumerate(members):
                out[i] = x[j]
        return out  # type: ignore[return-value]

    def _checked_parts(self, t: EncodedTensor) -> dict[str, bytes]:
        parts = {name: _decompress(part) for name, part in t.parts.items()}
        for name, n in t.part_sizes().items():
            if name not in parts or len(parts[name]) != n:
                got = len(parts[name]) if name in parts else "missing"
                raise ValueError(f"layer {t.layer} {t.kind}: part {name!r} has {got} bytes, expected {n}")
        return parts

    def _decode_one(
        self, t: EncodedTensor, parts: dict[str, bytes], device: torch.device | str, dtype: torch.dtype
    ) -> Tensor:
        from kvlink.kernels import dequantize_expand, dequantize_into

        q = _quantized(t.spec, t.stored, [parts], device)
        if t.lowrank == "none":
            return dequantize_into(q, dtype)
        if t.lowrank == "svd":
            h, r, d = t.stored[0], t.stored[2], t.shape[2]
            basis = _from_bytes(parts["basis"], torch.float16, (h, r, d), device)
            return dequantize_expand(q, basis, None, dtype)  # latent (H, N, r) @ basis (H, r, D), fused
        basis, mean = self.profile.expand_factors(t.layer, t.kind, t.stored[2], device)  # type: ignore[union-attr]
        return dequantize_expand(q, basis, mean, dtype)


DECODE_STACK_BYTES = 32 << 20
"""The most float32 bytes one stacked dequantize produces: it bounds the temporaries of a decode
whatever the message's size (32 MiB: a launch of that size is bandwidth-bound on any GPU)."""


def decode_cost(encoded: EncodedKV, dtype: torch.dtype) -> int:
    """An upper bound of the memory Codec.decode takes for `encoded` at its peak, in bytes: the
    decoded cache in `dtype` (kept positions included), every part decompressed and joined, and the
    temporaries of the stacked dequantizes (measured on the reference path at up to 4x the largest
    stack; tests/test_codec.py checks the bound against the process's peak memory). A receiver admits
    a decode against its memory budget with this."""
    element = torch.empty((), dtype=dtype).element_size()
    decoded = sum(t.shape[0] * t.shape[1] * t.shape[2] * element for t in encoded.tensors)
    positions = 8 * (sum(n for _, _, n in encoded.positions) if encoded.positions else encoded.length)
    raw = sum(p.raw_size for t in encoded.tensors for p in t.parts.values())
    largest = max((4 * t.shape[0] * t.shape[1] * t.shape[2] for t in encoded.tensors), default=0)
    fp32 = sum(4 * t.shape[0] * t.shape[1] * t.shape[2] for t in encoded.tensors)
    working = 4 * max(min(DECODE_STACK_BYTES, fp32), largest)
    return decoded + positions + 2 * raw + working


def _quantized(
    spec: QuantSpec, shape: tuple[int, int, int], parts: list[dict[str, bytes]], device: torch.device | str
) -> QuantizedTensor:
    """A QuantizedTensor of `shape` on `device` from the parts of one tensor, or of several laid end to end."""
    from kvlink.quant import scale_shape

    expected = part_sizes(shape, spec)

    def join(name: str, dtype: torch.dtype, part_shape: tuple[int, ...]) -> Tensor | None:
        if name not in expected:
            return None
        data = parts[0][name] if len(parts) == 1 else b"".join(p[name] for p in parts)
        return _from_bytes(data, dtype, part_shape, device)

    sshape = scale_shape(shape, spec)
    codes = join("codes", torch.uint8, (expected["codes"],))
    assert codes is not None
    packed_widths = join("widths", torch.uint8, (expected.get("widths", 0),))
    return QuantizedTensor(
        spec=spec, shape=shape, codes=codes,
        scale=join("scale", torch.float16, sshape), zero=join("zero", torch.float16, sshape),
        widths=None if packed_widths is None else unpack_widths(packed_widths, *widths_shape(shape, spec)),
    )  # fmt: skip


def _compress(tensors: list[EncodedTensor], level: int) -> None:
    import zstandard

    compressor = zstandard.ZstdCompressor(level=level)
    for t in tensors:
        for name, part in t.parts.items():
            packed = compressor.compress(part.data)
            if len(packed) < len(part.data):
                t.parts[name] = Part(packed, part.raw_size, zstd=True)


def _decompress(part: Part) -> bytes:
    """The raw bytes of a part: at most `part.raw_size` of them are ever produced.

    The cap is the part's size as the header declares it (validated against the tensor's shape),
    never the size the zstd frame declares for itself: a frame that claims 1 GiB of content is read
    through a streaming decoder that stops one byte past the cap, and its window is limited to the
    cap too, so a decompression bomb costs a few kilobytes before it is refused.
    """
    if not part.zstd:
        return part.data
    import zstandard

    cap = part.raw_size
    window = max(1 << 10, 1 << max(cap - 1, 1).bit_length())  # zstd's smallest window is 1 KiB
    problem = None
    data = bytearray(cap + 1)  # one byte of room past the cap tells "too long" from "exact"
    n = 0
    try:
        with (
            zstandard.ZstdDecompressor(max_window_size=window).stream_reader(part.data) as reader,
            memoryview(data) as view,
        ):
            while n <= cap and (got := reader.readinto(view[n:])):
                n += got
    except zstandard.ZstdError as exc:
        problem = f"zstd part does not decompress: {exc}"
    if problem is not None:  # raised outside the handler: the refusal keeps no decoder state alive
        raise ValueError(problem)
    if n > cap:
        raise ValueError(f"zstd part decompresses to more than the {cap} bytes its header declares")
    if n < cap:
        raise ValueError(f"zstd part decompressed to {n} bytes, its header declares {cap}")
    del data[cap:]
    return cast(bytes, data)  # a bytearray: every reader takes it as bytes, without another copy
