"""The codec: a recipe, a context KV cache in, encoded tensors out, and back.

    recipe = Recipe.from_name("q2c50%+kint4c/vint4t-g32")     # or kvlink.recipe.build(...)
    codec = Codec(recipe, geometry)
    encoded = codec.encode(prefill)          # EncodedKV: raw little-endian parts per tensor
    kv = codec.decode(encoded)               # ContextKV with the ORIGINAL positions

A recipe (kvlink.recipe) is a Select stage, a pipeline of stages per layer's K
and V, and a Zstd stage (kvlink.stages). Encoding: keep the selected positions;
run every tensor through its transforms in order (Sink, Clamp, LowRank, Rotate,
...: each sets its parts aside and hands on what the next one takes); quantize
all of them (Quantize.encode_all: question-aware keys together); compress every
part (Zstd). Decoding runs it back: tensors quantized alike are dequantized as
one stack, then each transform is undone in reverse order, on the stack or on
the one tensor. The size of every part is known before any byte is written
(`Codec.predicted_sizes`); zstd, which depends on the data, is the only stage
whose size is measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import Tensor

from kvlink import positions as pos_codec
from kvlink.cache import ContextKV, Observation, Observe, Prefill
from kvlink.models import Geometry
from kvlink.quant import QuantizedTensor, QuantSpec, part_sizes, widths_shape
from kvlink.quant.widths import unpack_widths
from kvlink.recipe import KINDS, Pipeline, Recipe
from kvlink.select import keep_count
from kvlink.stages import Item, LowRank, Pca, Predict, Quantize, Transform
from kvlink.stages.predict import PredictState
from kvlink.stages.tensors import from_bytes

logger = logging.getLogger(__name__)

PAYLOAD_PARTS = frozenset({"codes", "sink"})
FACTOR_PARTS = frozenset({"basis"})
"""Part categories: payload (codes, fp16 sink entries), factors (low-rank bases), scales (the rest)."""


@dataclass
class Part:
    """One buffer of an encoded tensor: raw little-endian bytes, zstd-compressed when that paid."""

    data: bytes
    raw_size: int
    zstd: bool = False


@dataclass
class EncodedTensor:
    """One layer's K or V: shape (kv_heads, n_kept, head_dim) once decoded.

    `stored` is the quantized matrix's shape: what the transforms of `stages` hand the Quantize
    stage ((H, n_kept - s, D) after a Sink of s entries, (H, N, rank) under low rank). spec: its
    quantization (format as on the wire). Parts: codes, scale, zero, widths (quantization), basis
    (per-message SVD: (H, rank, head_dim) float16), sink ((H, s, head_dim) float16).
    """

    layer: int
    kind: str
    shape: tuple[int, int, int]
    stored: tuple[int, int, int]
    spec: QuantSpec
    stages: Pipeline
    parts: dict[str, Part]

    @property
    def sink(self) -> int:
        """Entries that travel at fp16 ahead of the quantized ones."""
        return self.shape[1] - self.stored[1]

    @property
    def lowrank(self) -> str:
        """The low-rank mode of this tensor ("none" without one)."""
        return next((s.mode for s in self.stages if isinstance(s, LowRank)), "none")

    def part_sizes(self) -> dict[str, int]:
        """Exact raw bytes of every part this tensor must carry (before zstd)."""
        return tensor_part_sizes(self.stages, self.shape)

    def nbytes(self) -> int:
        return sum(len(p.data) for p in self.parts.values())


def tensor_part_sizes(stages: Pipeline, shape: tuple[int, int, int]) -> dict[str, int]:
    """Raw bytes of each part a tensor of `shape` carries through `stages` (transforms then Quantize)."""
    sizes: dict[str, int] = {}
    for stage in stages:
        if isinstance(stage, Transform):
            sizes.update(stage.part_sizes(shape))
            shape = stage.stored(shape)
    sizes.update(part_sizes(shape, stages[-1].spec))  # type: ignore[attr-defined]
    return sizes


def stored_shape(stages: Pipeline, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    for stage in stages:
        if isinstance(stage, Transform):
            shape = stage.stored(shape)
    return shape


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

    def add(self, name: str, n: int) -> None:
        if name in PAYLOAD_PARTS:
            self.payload += n
        elif name in FACTOR_PARTS:
            self.factors += n
        else:
            self.scales += n

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

    recipe: Recipe
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
                s.add(name, len(part.data))
        return s

    def fp16_bytes(self) -> int:
        return self.geometry.fp16_bytes(self.length)


class Codec:
    """Encode a prefilled context under a Recipe and decode it back (reference path). profile: the
    calibrated profile the recipe needs: the low-rank projection (kvlink.lowrank.ModelProfile) of a
    LowRank("profile") stage, or the cross-layer predictors (kvlink.predict.PredictorProfile) of a
    Predict stage (the codec's recipe then names its hash; the two stages do not compose). residual: the
    residual profile (kvlink.residual.ResidualProfile) of a Pca stage, fitted on those predictors (or both
    as `profile`, a kvlink.residual.TransformProfiles)."""

    def __init__(
        self, recipe: Recipe, geometry: Geometry, profile: Any | None = None, residual: Any | None = None
    ) -> None:
        if not isinstance(recipe, Recipe):
            raise TypeError(f"Codec takes a kvlink.recipe.Recipe, got {type(recipe).__name__}")
        recipe.check(geometry)
        from kvlink.predict import PredictorProfile
        from kvlink.residual import TransformProfiles

        if isinstance(profile, TransformProfiles):  # transform coding's predictors and residual profile
            residual = profile.residual
            profile = profile.predictors

        profiled = [s for s in recipe.stages() if isinstance(s, LowRank) and s.mode == "profile"]
        if profiled:
            if profile is None or isinstance(profile, PredictorProfile):
                raise ValueError(
                    "lowrank 'profile' needs a calibrated model profile (kvlink.lowrank.ModelProfile)"
                )
            for stage in profiled:
                if stage.rank > profile.r_max:
                    raise ValueError(f"rank {stage.rank!r} exceeds the profile's r_max {profile.r_max}")
        predicts = [s for s in recipe.stages() if isinstance(s, Predict)]
        if predicts:
            if not isinstance(profile, PredictorProfile):
                raise ValueError(
                    "predict needs the calibrated predictor profile (kvlink.predict.PredictorProfile), "
                    f"got {type(profile).__name__}"
                )
            profile.check_geometry(geometry)
            bound = predicts[0].bind(profile.hash)  # the profile travels by hash in the stage
            recipe = recipe.replacing(predicts[0], bound)
        pcas = [s for s in recipe.stages() if isinstance(s, Pca)]
        if pcas:
            from kvlink.residual import ResidualProfile

            if not isinstance(residual, ResidualProfile):
                raise ValueError(
                    "pca needs the residual profile (kvlink.residual.ResidualProfile) of its predictors, "
                    f"got {type(residual).__name__}"
                )
            assert isinstance(profile, PredictorProfile)  # Pca.check_recipe: pca comes with predict
            residual.check_for(profile)
            residual.check_geometry(geometry)
            recipe = recipe.replacing(pcas[0], pcas[0].bind(residual.hash))
        self.recipe = recipe
        self.geometry = geometry
        self.profile = profile
        self.predictor = profile if predicts else None
        self.residual = residual if pcas else None

    # --- sizes -------------------------------------------------------------
    def stored_shape(self, kind: str, n_kept: int, layer: int = 0) -> tuple[int, int, int]:
        """Shape of the quantized matrix of a `kind` tensor of `layer` with `n_kept` entries."""
        g = self.geometry
        return stored_shape(self.recipe.pipeline(kind, layer), (g.kv_heads, n_kept, g.head_dim))

    def predicted_sizes(self, length: int, kept: list[Tensor] | None = None) -> Sizes:
        """Exact sizes before zstd. Without `kept`, position bytes use the bitmap upper bound."""
        recipe, g = self.recipe, self.geometry
        n_kept = keep_count(recipe.retention, length) if recipe.select is not None else length
        sizes = Sizes()
        shape = (g.kv_heads, n_kept, g.head_dim)
        for kind in KINDS:
            layers = recipe.k if kind == "k" else recipe.v
            counts: dict[Pipeline, int] = {}  # pipeline -> how many layers use it
            for layer in range(g.num_layers):
                pipeline = layers[0] if len(layers) == 1 else layers[layer]
                counts[pipeline] = counts.get(pipeline, 0) + 1
            for pipeline, n_layers in counts.items():
                for name, n in tensor_part_sizes(pipeline, shape).items():
                    sizes.add(name, n * n_layers)
        if recipe.select is not None:
            if kept is not None:
                unique = kept[:1] if recipe.scope == "global" else kept
                sizes.positions = sum(pos_codec.encoded_size(p, length) for p in unique)
            else:
                sets = 1 if recipe.scope == "global" else g.num_layers
                sizes.positions = sets * (length + 7) // 8
        return sizes

    # --- encode ------------------------------------------------------------
    def select(self, prefill: Prefill) -> list[Tensor] | None:
        """Kept positions per layer, or None when everything is kept."""
        return None if self.recipe.select is None else self.recipe.select.keep(prefill)

    def encode(self, prefill: Prefill) -> EncodedKV:
        """Select, transform, quantize and pack a prefilled context."""
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

        `observation`: the prefill's observed queries, needed by question-aware quantization.
        """
        recipe, g = self.recipe, self.geometry
        aware = [q for kind in KINDS for q in recipe.quantizers(kind) if q.needs() is not Observe.NONE]
        if aware and (observation is None or len(observation.layers) != g.num_layers):
            got = (
                "none"
                if observation is None
                else f"{observation.kind.value!r} with {len(observation.layers)} layers"
            )
            first = aware[0]
            tensor = "key" if any(q is first for q in recipe.quantizers("k")) else "value"
            what = (
                f"{tensor} rounding 'query'" if first.rounding == "query" else f"{tensor} widths 'question'"
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
        if recipe.select is not None:
            sets = kv.positions[:1] if recipe.scope == "global" else kv.positions
            for p in sets:
                enc, data = pos_codec.encode_positions(p, kv.length)
                positions.append((enc, data, int(p.numel())))
        tq = time.perf_counter()
        # Under Predict each tensor is quantized and decoded as soon as it is transformed: the next
        # one is predicted from it as the receiver will have it (closed loop).
        state = PredictState(self.predictor, kv.positions[0]) if self.predictor is not None else None
        items: list[Item] = []
        for layer in range(kv.num_layers):
            for kind in KINDS:
                items.append(self.encode_one(kv, layer, kind, state, observation))
        if state is None:
            Quantize.encode_all(items, observation)
        tensors = [
            EncodedTensor(it.layer, it.kind, it.shape, it.stored, it.info["spec"], it.stages, it.parts)
            for it in items
        ]
        timings["quantize_s"] = time.perf_counter() - tq
        timings["encode_s"] = time.perf_counter() - t0
        if recipe.zstd is not None:
            tz = time.perf_counter()
            recipe.zstd.compress(tensors)
            timings["zstd_s"] = time.perf_counter() - tz
        if recipe.ans is not None:
            ta = time.perf_counter()
            recipe.ans.compress(tensors, self.residual, str(kv.keys[0].device) if kv.keys else None)
            timings["ans_s"] = time.perf_counter() - ta
        profile_hash = self.profile.hash if self.profile is not None and recipe.has("lowrank") and any(
            isinstance(s, LowRank) and s.mode == "profile" for s in recipe.stages()
        ) else None  # fmt: skip
        return EncodedKV(recipe, g, kv.length, positions, tensors, profile_hash, timings)

    def encode_one(
        self,
        kv: ContextKV,
        layer: int,
        kind: str,
        state: PredictState | None = None,
        observation: Observation | None = None,
    ) -> Item:
        """Run `kind` tensor of `layer` through its transforms. With a Predict `state`, also quantize it
        and decode it into `state` (what the next prediction takes); without, Quantize.encode_all
        quantizes every tensor afterwards (question-aware keys together)."""
        x = kv.keys[layer] if kind == "k" else kv.values[layer]
        shape = (int(x.shape[0]), int(x.shape[1]), int(x.shape[2]))
        item = Item(layer, kind, shape, self.recipe.pipeline(kind, layer), x.float())
        item.info["positions"] = kv.positions[layer]
        item.info["observation"] = observation
        if state is not None:
            item.info["predict"] = state
        item.info["pca"] = self.residual
        for transform in item.transforms:
            transform.apply(item, self)
        if state is not None:
            Quantize.encode_all([item], observation)
            tensor = EncodedTensor(
                layer, kind, shape, item.stored, item.info["spec"], item.stages, item.parts
            )
            self._decode_tensors([tensor], x.device, torch.float32, state)
        return item

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
        profiled = any(isinstance(s, LowRank) and s.mode == "profile" for s in encoded.recipe.stages())
        if profiled and (self.profile is None or self.profile.hash != encoded.profile_hash):
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
        state = None
        predicts = [s for s in encoded.recipe.stages() if isinstance(s, Predict)]
        if predicts:
            predicts[0].check_held(self.predictor.hash if self.predictor is not None else None)
            state = PredictState(self.predictor, sets[0].to(device))
        pcas = [s for s in encoded.recipe.stages() if isinstance(s, Pca)]
        if pcas:
            pcas[0].check_held(self.residual.hash if self.residual is not None else None)
        for t in encoded.tensors:
            if t.shape[1] != sets[t.layer].numel():
                raise ValueError(
                    f"layer {t.layer} {t.kind}: {t.shape[1]} entries but {sets[t.layer].numel()} positions"
                )
            want = stored_shape(encoded.recipe.pipeline(t.kind, t.layer), t.shape)
            if t.stored != want:
                raise ValueError(
                    f"layer {t.layer} {t.kind}: stored shape {t.stored}, its recipe makes {want}"
                )
        tensors = encoded.tensors
        if encoded.recipe.ans is not None:  # every codes part is an rANS stream: its float16 symbols back
            symbols = encoded.recipe.ans.decompress(tensors, self.residual, str(device))
            tensors = [
                replace(t, parts={**t.parts, "codes": Part(data, t.parts["codes"].raw_size)})
                for t, data in zip(tensors, symbols, strict=True)
            ]
        decoded = self._decode_tensors(tensors, device, dtype, state)
        keys = [x for t, x in zip(encoded.tensors, decoded, strict=True) if t.kind == "k"]
        values = [x for t, x in zip(encoded.tensors, decoded, strict=True) if t.kind == "v"]
        return ContextKV(keys, values, [s.to(device) for s in sets], encoded.length)

    def _decode_tensors(
        self,
        tensors: list[EncodedTensor],
        device: torch.device | str,
        dtype: torch.dtype,
        state: PredictState | None = None,
    ) -> list[Tensor]:
        """Every tensor of a message -> (H, N, D) of `dtype` on `device`, in the order given.

        Tensors quantized alike (same spec, stored shape and transforms, all stackable) are decoded
        together: their packed streams, laid end to end, are the packed stream of the (n*H, N, D)
        stack when each one ends on a byte boundary, so one host-to-device copy per part and one
        dequantize launch serve them all (the whole message, for a uniform recipe), in stacks of at
        most DECODE_STACK_BYTES. Then each transform is undone in reverse order, on the stack
        (Rotate: one matmul; Sink: one copy of the joined sink parts) or on the one tensor. A
        transform that needs float32 gets the dequantized tensor in float32; the cast to `dtype`
        comes after the last transform that does. Tensors that are not stackable are decoded one by one
        in the order given (Predict: each prediction takes the tensors decoded before, from `state`).
        """
        from kvlink.kernels import dequantize_into

        parts = [self._checked_parts(t) for t in tensors]
        items = [Item(t.layer, t.kind, t.shape, t.stages) for t in tensors]
        for it in items:
            it.info["pca"] = self.residual
            if state is not None:
                it.info["predict"] = state
        out: list[Tensor | None] = [None] * len(tensors)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, t in enumerate(tensors):
            transforms = items[i].transforms
            quantize: Quantize = t.stages[-1]  # type: ignore[assignment]
            if all(tr.stackable for tr in transforms) and quantize.stackable(t.stored):
                groups.setdefault((t.spec, t.stored, transforms), []).append(i)
                continue
            work = torch.float32 if any(tr.needs_float32 for tr in transforms) else dtype
            lowrank = next((tr for tr in transforms if isinstance(tr, LowRank)), None)
            q = _quantized(t.spec, t.stored, [parts[i]], device)
            if lowrank is not None:
                x = lowrank.expand(q, items[i], parts[i], device, work, self.profile)
            else:
                x = dequantize_into(q, work)
            undo = transforms[::-1]
            for j, tr in enumerate(undo):
                if x.dtype != dtype and not any(later.needs_float32 for later in undo[j:]):
                    x = x.to(dtype)
                x = tr.undo_one(x, items[i], parts[i], dtype)
            out[i] = x if x.dtype == dtype else x.to(dtype)
        batches: list[tuple[tuple[Any, ...], list[int]]] = []
        for key, members in groups.items():
            h, n, d = tensors[members[0]].shape
            step = max(1, DECODE_STACK_BYTES // (h * n * d * 4))
            batches.extend((key, members[i : i + step]) for i in range(0, len(members), step))
        for (spec, (h, n, d), transforms), members in batches:
            m = len(members)
            work = torch.float32 if any(tr.needs_float32 for tr in transforms) else dtype
            stacked = _quantized(spec, (m * h, n, d), [parts[i] for i in members], device)
            x = dequantize_into(stacked, work).view(m, h, n, d)
            for tr in reversed(transforms):
                if not tr.needs_float32 and x.dtype != dtype:
                    x = x.to(dtype)
                x = tr.undo_stack(x, [items[i] for i in members], [parts[i] for i in members], dtype)
            if x.dtype != dtype:
                x = x.to(dtype)
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


DECODE_STACK_BYTES = 32 << 20
"""The most float32 bytes one stacked dequantize produces: it bounds the temporaries of a decode
whatever the message's size (32 MiB: a launch of that size is bandwidth-bound on any GPU)."""


def decode_cost(encoded: EncodedKV, dtype: torch.dtype) -> int:
    """An upper bound of the memory Codec.decode takes for `encoded` at its peak, in bytes: the
    decoded cache in `dtype` (kept positions included), every part decompressed and joined, and the
    temporaries of the stacked dequantizes (measured on the reference path at up to 4x the largest
    stack; tests/test_codec.py checks the bound against the process's peak memory; under Predict, the
    float32 tensors a prediction takes and makes besides). A receiver admits
    a decode against its memory budget with this."""
    element = torch.empty((), dtype=dtype).element_size()
    decoded = sum(t.shape[0] * t.shape[1] * t.shape[2] * element for t in encoded.tensors)
    positions = 8 * (sum(n for _, _, n in encoded.positions) if encoded.positions else encoded.length)
    raw = sum(p.raw_size for t in encoded.tensors for p in t.parts.values())
    largest = max((4 * t.shape[0] * t.shape[1] * t.shape[2] for t in encoded.tensors), default=0)
    fp32 = sum(4 * t.shape[0] * t.shape[1] * t.shape[2] for t in encoded.tensors)
    working = 4 * max(min(DECODE_STACK_BYTES, fp32), largest)
    if encoded.recipe.has("predict"):  # the decoded K and V it predicts from, its inputs and prediction
        working += 2 * largest + 2 * (largest + 4 * encoded.tensors[0].shape[1]) + largest
    if encoded.recipe.ans is not None:  # the decoded symbols (int32), as float16 parts, and the lanes' tables
        working += fp32 + raw + 8 * sum(t.stored[0] * t.stored[2] for t in encoded.tensors)
    return decoded + positions + 2 * raw + working


def _quantized(
    spec: QuantSpec, shape: tuple[int, int, int], parts: list[Mapping[str, bytes]], device: torch.device | str
) -> QuantizedTensor:
    """A QuantizedTensor of `shape` on `device` from the parts of one tensor, or of several laid end to end."""
    from kvlink.quant import scale_shape

    expected = part_sizes(shape, spec)

    def join(name: str, dtype: torch.dtype, part_shape: tuple[int, ...]) -> Tensor | None:
        if name not in expected:
            return None
        data = parts[0][name] if len(parts) == 1 else b"".join(p[name] for p in parts)
        return from_bytes(data, dtype, part_shape, device)

    sshape = scale_shape(shape, spec)
    codes = join("codes", torch.uint8, (expected["codes"],))
    assert codes is not None
    packed_widths = join("widths", torch.uint8, (expected.get("widths", 0),))
    return QuantizedTensor(
        spec=spec, shape=shape, codes=codes,
        scale=join("scale", torch.float16, sshape), zero=join("zero", torch.float16, sshape),
        widths=None if packed_widths is None else unpack_widths(packed_widths, *widths_shape(shape, spec)),
    )  # fmt: skip


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
