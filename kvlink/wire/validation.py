"""What a receiver accepts, and the checks that hold a message to it: WireLimits, ids, and the
validation of a Header against the receiver's model, limits and capabilities (every check runs on the
header before a single chunk byte is kept; the cheap ones first).

The errors these checks raise (WireError, its ERROR_CODES and their GRPC_STATUS) are in
kvlink.wire._common, shared by every module of the package.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf.unknown_fields import UnknownFieldSet

from kvlink import positions as pos_codec
from kvlink.capabilities import decodes
from kvlink.codec import EncodedTensor, stored_shape
from kvlink.errors import NotRegistered
from kvlink.models import Geometry
from kvlink.quant import AXES, QuantSpec
from kvlink.recipe import KINDS, Pipeline, Recipe
from kvlink.select import keep_count
from kvlink.stages import Ans, Quantize, Select, Stage, Zstd, stage_class
from kvlink.stages.ans import bound as ans_bound
from kvlink.wire._common import _KIND_FROM_PB, _PART_FROM_PB, _POS_FROM_PB, WireError, _geometry_from_pb, pb
from kvlink.wire.capabilities import check_format, check_profile, check_recipe, check_zstd

# --- limits -----------------------------------------------------------------------------------
FRAME_ENVELOPE_BYTES: Final = 16
"""TransferFrame bytes around its header, chunk, trailer or cancel: version and the oneof's tag and length."""


TEXT_RECIPE: Final = Recipe.from_name("fp16")
"""What a text segment's recomputed cache stands under: the model's own precision, every position."""


@dataclass(frozen=True)
class WireLimits:
    """What a receiver accepts. Checked against the header before anything is allocated.

    max_message_bytes: declared bytes of one message (chunk data + position sets).
    max_decoded_bytes: raw (after zstd) bytes of all parts of one message.
    max_chunk_bytes: data bytes of one chunk. max_header_bytes: serialized Header.
    max_layers/max_heads/max_head_dim/max_length: geometry and context length T.
    max_chunks: payload table rows. max_group_size: quantization group.
    max_chunk_retries: Nacks per chunk before the message is refused as CORRUPT.
    max_id_chars: session and message ids (characters of ID_CHARS).
    max_token_id: the highest token id a text segment may carry (the receiver's vocabulary).
    max_new_tokens, max_question_bytes, max_references, max_reference_bytes: what an Ask may
    request (the last two bound the reference answers' count and their UTF-8 bytes in all).

    A header is bounded twice before any walk over its rows: its bytes (max_header_bytes, checked
    on the raw frame before it is parsed) and its row counts (max_chunks, position sets and tensor
    entries against the geometry). Together they bound the validation's time and memory.
    """

    max_message_bytes: int = 512 << 20
    max_decoded_bytes: int = 4 << 30
    max_chunk_bytes: int = 1 << 20
    max_header_bytes: int = 16 << 20
    max_layers: int = 1024
    max_heads: int = 1024
    max_head_dim: int = 1024
    max_length: int = 1 << 21
    max_chunks: int = 1 << 16
    max_group_size: int = 1 << 16
    max_chunk_retries: int = 3
    max_id_chars: int = 128
    max_new_tokens: int = 4096
    max_question_bytes: int = 64 << 10
    max_references: int = 64
    max_reference_bytes: int = 16 << 10
    max_stages: int = 16
    max_token_id: int = (1 << 24) - 1

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            low = 0 if name == "max_chunk_retries" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.max_chunk_bytes >= 1 << 32:
            raise ValueError(
                f"max_chunk_bytes must be below 4 GiB (a uint32 on the wire), got {self.max_chunk_bytes!r}"
            )
        if self.max_chunk_bytes > self.max_message_bytes:
            raise ValueError(
                f"max_chunk_bytes {self.max_chunk_bytes!r} exceeds max_message_bytes {self.max_message_bytes!r}"
            )
        if self.max_id_chars > 1024:
            raise ValueError(f"max_id_chars must be <= 1024, got {self.max_id_chars!r}")

    @property
    def max_receive_bytes(self) -> int:
        """The gRPC max_receive_message_length a server should set: the largest frame it accepts."""
        ask = self.max_question_bytes + self.max_reference_bytes + self.max_references * 16 + 64 * 1024
        return max(self.max_header_bytes + FRAME_ENVELOPE_BYTES, self.max_chunk_bytes + 64, ask)

    def max_frame_bytes(self, kind: str) -> int:
        """The largest TransferFrame of `kind` (header, chunk, trailer, cancel) accepted: a header
        is not a chunk, and a trailer or cancel is a few bytes."""
        if kind == "header":
            return self.max_header_bytes + FRAME_ENVELOPE_BYTES
        if kind == "chunk":
            return self.max_chunk_bytes + 64
        return 4 << 10

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel/server options matching these limits."""
        n = self.max_receive_bytes
        return [("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)]


# --- ids and models ---------------------------------------------------------------------------
ID_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@+=-")
"""What a session or message id may contain: letters, digits and ._:@+=- (no space, no control
character, nothing that could forge a log line or a path). A UUID's hex or its dashed form fits."""


MAX_SEGMENTS = 4096
"""Segments of one context (a 128k context in 32-token segments): an index beyond is refused."""


@dataclass(frozen=True)
class Segment:
    """Where one message sits in a chunked context: tokens [start, start + length) of a context of
    total_length tokens, the index-th segment, answerable as `stream_id` once the `last` one is in.
    token_ids: a text segment (the receiver recomputes these tokens' KV); empty for KV."""

    stream_id: str
    index: int
    start: int
    total_length: int
    last: bool = False
    token_ids: tuple[int, ...] = ()

    @property
    def text(self) -> bool:
        return bool(self.token_ids)


def segment_from_pb(msg: pb.Segment, length: int, limits: WireLimits) -> Segment:
    """A header's Segment, checked against the header's own length (its token count) and the limits:
    MALFORMED for a bad id or index, SHAPE when its range leaves [0, total_length), TOO_LARGE when the
    context is longer than the receiver takes, MALFORMED for a token id outside the vocabulary."""
    check_id("segment stream_id", msg.stream_id, limits)
    if msg.index >= MAX_SEGMENTS:
        raise WireError(
            "MALFORMED", f"segment index {msg.index} is beyond the limit of {MAX_SEGMENTS} segments"
        )
    if msg.total_length > limits.max_length:
        raise WireError(
            "TOO_LARGE",
            f"the segmented context has {msg.total_length} tokens, the limit is {limits.max_length}",
        )
    end = msg.start + length
    if end > msg.total_length:
        raise WireError(
            "SHAPE",
            f"segment {msg.index} covers tokens [{msg.start}, {end}) of a context of {msg.total_length}",
        )
    if msg.last and end != msg.total_length:
        raise WireError("SHAPE", f"the last segment ends at token {end}, the context has {msg.total_length}")
    if msg.token_ids:
        if len(msg.token_ids) != length:
            raise WireError(
                "SHAPE",
                f"text segment {msg.index} has {len(msg.token_ids)} token ids, its header says {length}",
            )
        top = max(msg.token_ids)
        if top > limits.max_token_id:
            raise WireError(
                "MALFORMED",
                f"text segment {msg.index}: token id {top} is outside the vocabulary (max {limits.max_token_id})",
            )
    return Segment(
        msg.stream_id, int(msg.index), int(msg.start), int(msg.total_length), bool(msg.last),
        tuple(int(t) for t in msg.token_ids),
    )  # fmt: skip


def check_id(name: str, value: str, limits: WireLimits | None = None) -> None:
    """MALFORMED unless `value` is 1..max_id_chars characters of ID_CHARS (quoted escaped in the error)."""
    limits = limits or WireLimits()
    if not value:
        raise WireError("MALFORMED", f"{name} is empty")
    if len(value) > limits.max_id_chars:
        raise WireError(
            "MALFORMED", f"{name} has {len(value)} characters, the limit is {limits.max_id_chars}"
        )
    if not ID_CHARS.issuperset(value):
        bad = sorted(set(value) - ID_CHARS)[:4]
        raise WireError(
            "MALFORMED",
            f"{name} {value[:64]!r} has characters outside letters, digits and ._:@+=- ({bad!r})",
        )


def _check_ids(session_id: str, message_id: str, limits: WireLimits) -> None:
    """The message id must be valid; the session id too, unless empty (then the message id alone names it)."""
    if session_id:
        check_id("session_id", session_id, limits)
    check_id("message_id", message_id, limits)


def _fingerprint_message(sender: str, receiver: str) -> str:
    return (
        f"the message was encoded with model fingerprint {sender[:16]!r}, the receiver holds "
        f"{receiver[:16]!r}: both sides need the same weights and tokenizer"
    )


# --- receiver side: header validation ---------------------------------------------------------
def zstd_bound(size: int) -> int:
    """ZSTD_compressBound: the most bytes zstd can produce from `size` bytes."""
    return size + (size >> 8) + (((128 << 10) - size) >> 11 if size < 128 << 10 else 0)


@dataclass
class _Entry:
    """A validated payload table row."""

    layer: int
    kind: str
    part: str
    size: int
    crc32c: int


@dataclass
class _Plan:
    """A validated header: everything needed to verify chunks and build the EncodedKV."""

    header: pb.Header
    recipe: Recipe
    geometry: Geometry
    positions: list[tuple[str, bytes, int]]
    tensors: list[EncodedTensor]  # parts empty until finish()
    entries: list[_Entry]
    layer_chunks: dict[int, list[int]]
    parts: dict[tuple[int, str, str], tuple[list[int], int, bool]]  # -> (chunk ids, raw_size, zstd)
    segment: Segment | None = None  # of a segmented context's message


def _stage_from_pb(msg: pb.Stage, where: str, capabilities: frozenset[str] | None) -> Stage:
    """One stage of a header's recipe: a registered name, parameters it parses and checks (MALFORMED)."""
    try:
        cls = stage_class(msg.name)
    except ValueError:
        raise WireError(
            "UNKNOWN_CODEC", f"{where}: stage {msg.name[:64]!r} is not one this receiver knows"
        ) from None
    try:
        return cls.from_params(dict(msg.params))
    except NotRegistered as exc:  # a newer sender's format, selection method or mode
        raise WireError("UNKNOWN_CODEC", f"{where}: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise WireError("MALFORMED", f"{where}: {exc}") from None


def recipe_from_pb(msg: pb.Recipe, num_layers: int, capabilities: frozenset[str] | None = None) -> Recipe:
    """The recipe of a header, every layer of each kind covered exactly once; UNKNOWN_CODEC for a stage
    or format this receiver does not decode (`capabilities`, None: everything registered), MALFORMED
    for one whose parameters or composition are invalid."""
    if len(msg.pipelines) > 2 * num_layers:
        raise WireError("TOO_LARGE", f"recipe has {len(msg.pipelines)} pipelines for {num_layers} layers")
    select = _stage_from_pb(msg.select, "recipe select", capabilities) if msg.HasField("select") else None
    zstd = _stage_from_pb(msg.zstd, "recipe zstd", capabilities) if msg.HasField("zstd") else None
    if select is not None and not isinstance(select, Select):
        raise WireError("MALFORMED", f"recipe select is a {select.name!r} stage")
    if zstd is not None and not isinstance(zstd, Zstd):
        raise WireError("MALFORMED", f"recipe zstd is a {zstd.name!r} stage")
    ans = _stage_from_pb(msg.ans, "recipe ans", capabilities) if msg.HasField("ans") else None
    if ans is not None and not isinstance(ans, Ans):
        raise WireError("MALFORMED", f"recipe ans is a {ans.name!r} stage")
    layers: dict[str, list[Pipeline | None]] = {kind: [None] * num_layers for kind in KINDS}
    whole: dict[str, Pipeline | None] = dict.fromkeys(KINDS)
    for i, p in enumerate(msg.pipelines):
        kind = _KIND_FROM_PB.get(p.kind)
        if kind is None:
            raise WireError("MALFORMED", f"recipe pipeline {i} has tensor kind {p.kind}")
        if len(p.stages) > WireLimits().max_stages:
            raise WireError("TOO_LARGE", f"recipe pipeline {i} has {len(p.stages)} stages")
        stages = tuple(_stage_from_pb(s, f"recipe pipeline {i}", capabilities) for s in p.stages)
        if not p.layers:
            if whole[kind] is not None or any(x is not None for x in layers[kind]):
                raise WireError("MALFORMED", f"recipe pipeline {i}: the {kind} layers are covered twice")
            whole[kind] = stages
            continue
        for layer in p.layers:
            if layer >= num_layers or layers[kind][layer] is not None or whole[kind] is not None:
                raise WireError(
                    "MALFORMED", f"recipe pipeline {i}: {kind} layer {layer} is out of range or covered twice"
                )
            layers[kind][layer] = stages
    pipelines: dict[str, tuple[Pipeline, ...]] = {}
    for kind in KINDS:
        if whole[kind] is not None:
            pipelines[kind] = (whole[kind],)  # type: ignore[assignment]
        elif all(x is not None for x in layers[kind]):
            pipelines[kind] = tuple(layers[kind])  # type: ignore[arg-type]
        else:
            raise WireError("SHAPE", f"recipe leaves {kind} layers without a pipeline")
    try:
        recipe = Recipe(select, pipelines["k"], pipelines["v"], zstd, ans)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise WireError("MALFORMED", f"recipe: {exc}") from None
    check_recipe(recipe, capabilities)
    return recipe


def _check_geometry(header: pb.Header, limits: WireLimits, expected: Geometry | None) -> Geometry:
    if not header.HasField("geometry"):
        raise WireError("MALFORMED", "header has no geometry")
    g = _geometry_from_pb(header.geometry)
    for name, value, limit in (
        ("num_layers", g.num_layers, limits.max_layers), ("kv_heads", g.kv_heads, limits.max_heads),
        ("q_heads", g.q_heads, limits.max_heads), ("head_dim", g.head_dim, limits.max_head_dim),
    ):  # fmt: skip
        if value < 1:
            raise WireError("SHAPE", f"geometry {name} is {value}, must be >= 1")
        if value > limit:
            raise WireError("TOO_LARGE", f"geometry {name} {value} exceeds the limit {limit}")
    if expected is not None and (g.num_layers, g.kv_heads, g.head_dim, g.q_heads) != (
        expected.num_layers, expected.kv_heads, expected.head_dim, expected.q_heads,
    ):  # fmt: skip
        raise WireError("SHAPE", f"header geometry {g} does not match the receiver's model {expected}")
    if header.length < 1:
        raise WireError("SHAPE", "header context length T is 0")
    if header.length > limits.max_length:
        raise WireError("TOO_LARGE", f"context length {header.length} exceeds the limit {limits.max_length}")
    return g


def _check_positions(
    header: pb.Header, recipe: Recipe, g: Geometry
) -> tuple[list[tuple[str, bytes, int]], list[int]]:
    """Validate (and fully decode, O(T), vectorized) the kept-position sets; returns them and n_kept per layer."""
    t = header.length
    sets = header.positions
    if recipe.select is None:
        if sets:
            raise WireError(
                "SHAPE", f"selector 'none' keeps every position, but the header has {len(sets)} position sets"
            )
        return [], [t] * g.num_layers
    expected_sets = 1 if recipe.scope == "global" else g.num_layers
    if len(sets) != expected_sets:
        raise WireError(
            "SHAPE", f"scope {recipe.scope!r} needs {expected_sets} position sets, header has {len(sets)}"
        )
    n_keep = keep_count(recipe.retention, t)
    varint_max = max(1, math.ceil((t - 1).bit_length() / 7))
    out: list[tuple[str, bytes, int]] = []
    for i, p in enumerate(sets):
        if p.encoding not in _POS_FROM_PB:
            raise WireError("MALFORMED", f"position set {i} has unknown encoding {p.encoding}")
        enc = _POS_FROM_PB[p.encoding]
        if p.count != n_keep:
            raise WireError(
                "SHAPE",
                f"position set {i} declares {p.count} positions; retention {recipe.retention} of T={t} keeps {n_keep}",
            )
        bound = (t + 7) // 8 if enc == pos_codec.BITMAP else p.count * varint_max
        if len(p.data) > bound:
            raise WireError(
                "SHAPE", f"position set {i} ({enc}) has {len(p.data)} bytes, at most {bound} for T={t}"
            )
        try:
            pos_codec.decode_positions(enc, p.data, t, p.count)
        except ValueError as exc:
            raise WireError("SHAPE", f"position set {i}: {exc}") from None
        out.append((enc, bytes(p.data), int(p.count)))
    per_layer = [n_keep] * g.num_layers
    return out, per_layer


def _check_counts(header: pb.Header, limits: WireLimits, expected: Geometry | None) -> None:
    """The header's row counts against the limits and the geometry, before any walk over the rows:
    whatever a header holds, what its validation walks is bounded by these counts."""
    layers = expected.num_layers if expected is not None else header.geometry.num_layers
    if not 1 <= layers <= limits.max_layers:
        raise WireError("TOO_LARGE", f"geometry num_layers {layers} is outside [1, {limits.max_layers}]")
    if len(header.payload) > limits.max_chunks:
        raise WireError(
            "TOO_LARGE", f"payload table has {len(header.payload)} chunks, the limit is {limits.max_chunks}"
        )
    text = bool(header.segment.token_ids)  # a text segment has no tensors (checked in _text_segment)
    if not text and len(header.tensors) != 2 * layers:
        raise WireError(
            "SHAPE", f"header has {len(header.tensors)} tensor entries, {layers} layers need {2 * layers}"
        )
    if len(header.positions) > layers:
        raise WireError(
            "SHAPE", f"header has {len(header.positions)} position sets, at most one per layer ({layers})"
        )
    pipelines = header.recipe.pipelines
    if len(pipelines) > 2 * layers or any(len(p.stages) > limits.max_stages for p in pipelines):
        raise WireError(
            "TOO_LARGE",
            f"the recipe has {len(pipelines)} pipelines (at most {2 * layers}) or one of over {limits.max_stages} stages",
        )


def _refuse_unknown_fields(msg: Any, path: str) -> None:
    """UNKNOWN_CODEC for any field this side's .proto does not define, at any depth of `msg`.

    protobuf keeps fields it does not know and parses on; for a header that
    would mean decoding a newer sender's message without the option that
    field carries (a rotation, say) and answering from the wrong cache. The
    only safe reading of an unknown header field is a refusal.
    """
    unknown = UnknownFieldSet(msg)
    if len(unknown):
        numbers = sorted({field.field_number for field in unknown})  # type: ignore[attr-defined]
        raise WireError(
            "UNKNOWN_CODEC",
            f"{path} carries field(s) {numbers} this receiver does not know (a newer kvlink sender?); "
            "refused rather than decoded without them",
        )
    for descriptor, value in msg.ListFields():
        if descriptor.message_type is None:
            continue
        if descriptor.message_type.GetOptions().map_entry:  # a map: its values, when they are messages
            if descriptor.message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    _refuse_unknown_fields(item, f"{path}.{descriptor.name}[{key!r}]")
            continue
        if descriptor.is_repeated:
            for i, item in enumerate(value):
                _refuse_unknown_fields(item, f"{path}.{descriptor.name}[{i}]")
        else:
            _refuse_unknown_fields(value, f"{path}.{descriptor.name}")


def _validate_header(
    frame: pb.TransferFrame,
    fingerprint: str,
    geometry: Geometry | None,
    limits: WireLimits,
    capabilities: frozenset[str] | None,
    profile_hashes: Collection[str] | None,
) -> _Plan:
    """Every check of a header, in an order that costs nothing before the cheap checks pass."""
    header = frame.header
    size = header.ByteSize()
    if size > limits.max_header_bytes:
        raise WireError("TOO_LARGE", f"header has {size} bytes, the limit is {limits.max_header_bytes}")
    _check_counts(header, limits, geometry)
    _refuse_unknown_fields(header, "header")
    check_id("session_id", header.session_id, limits)
    check_id("message_id", header.message_id, limits)
    if header.fingerprint != fingerprint:
        raise WireError("FINGERPRINT", _fingerprint_message(header.fingerprint, fingerprint))
    segment = None
    if header.HasField("segment"):
        if not decodes(capabilities, "segment"):
            raise WireError("UNKNOWN_CODEC", "this receiver does not take segmented contexts")
        g = _check_geometry(header, limits, geometry)
        segment = segment_from_pb(header.segment, header.length, limits)
        if segment.text:
            return _text_segment(header, g, segment, capabilities)
    if not header.HasField("recipe"):
        raise WireError("MALFORMED", "header has no recipe")
    g = _check_geometry(header, limits, geometry)
    recipe = recipe_from_pb(header.recipe, g.num_layers, capabilities)
    try:
        recipe.check(g)
    except ValueError as exc:
        raise WireError("SHAPE", str(exc)) from None
    for tensor_kind in KINDS:
        for q in recipe.quantizers(tensor_kind):
            if q.group > limits.max_group_size:
                raise WireError(
                    "TOO_LARGE", f"group_size {q.group} exceeds the limit {limits.max_group_size}"
                )
    check_profile(recipe, header.profile_hash or None, profile_hashes)
    positions, n_kept = _check_positions(header, recipe, g)

    # Tensors: layer 0 K, layer 0 V, ... with shapes that follow from geometry and positions.
    if len(header.tensors) != 2 * g.num_layers:
        raise WireError(
            "SHAPE",
            f"header has {len(header.tensors)} tensor entries, {g.num_layers} layers need {2 * g.num_layers}",
        )
    tensors: list[EncodedTensor] = []
    expected_parts: dict[tuple[int, str, str], int] = {}
    for i, entry in enumerate(header.tensors):
        layer, kind = divmod(i, 2)
        want = f"layer {layer} {KINDS[kind]}"
        if entry.layer != layer or _KIND_FROM_PB.get(entry.kind) != KINDS[kind]:
            raise WireError(
                "SHAPE", f"tensor entry {i} is layer {entry.layer} kind {entry.kind}, expected {want}"
            )
        spec_msg = entry.spec
        check_format(spec_msg.format, capabilities, want)
        if spec_msg.axis not in AXES:
            raise WireError("UNKNOWN_CODEC", f"{want}: axis {spec_msg.axis!r} is not one of {AXES}")
        if not 1 <= spec_msg.group_size <= limits.max_group_size:
            raise WireError(
                "SHAPE", f"{want}: group_size {spec_msg.group_size} outside [1, {limits.max_group_size}]"
            )
        spec = QuantSpec(spec_msg.format, spec_msg.group_size, spec_msg.axis)
        pipeline = recipe.pipeline(KINDS[kind], layer)
        quantize: Quantize = pipeline[-1]  # type: ignore[assignment]
        if spec != quantize.spec:
            raise WireError("MALFORMED", f"{want}: spec {spec} does not match its recipe's {quantize.spec}")
        shape = (g.kv_heads, n_kept[layer], g.head_dim)
        if tuple(entry.shape) != shape:
            raise WireError(
                "SHAPE",
                f"{want}: shape {tuple(entry.shape)} does not match (kv_heads, n_kept, head_dim) {shape}",
            )
        stored = stored_shape(pipeline, shape)
        if tuple(entry.stored_shape) != stored:
            raise WireError(
                "SHAPE", f"{want}: stored shape {tuple(entry.stored_shape)} does not match {stored}"
            )
        tensor = EncodedTensor(layer, KINDS[kind], shape, stored, spec, pipeline, {})
        for name, n in tensor.part_sizes().items():
            expected_parts[(layer, KINDS[kind], name)] = n
        tensors.append(tensor)

    # Payload table: structure, then totals against the limits, then sizes against the tensors.
    table = header.payload
    if len(table) > limits.max_chunks:
        raise WireError(
            "TOO_LARGE", f"payload table has {len(table)} chunks, the limit is {limits.max_chunks}"
        )
    if not table:
        raise WireError("SHAPE", "payload table is empty")
    entries: list[_Entry] = []
    parts: dict[tuple[int, str, str], tuple[list[int], int, bool]] = {}
    layer_chunks: dict[int, list[int]] = {}
    declared = sum(len(p.data) for p in header.positions)
    for i, row in enumerate(table):
        if row.chunk_id != i:
            raise WireError(
                "MALFORMED", f"payload table row {i} has chunk id {row.chunk_id}; ids must be 0, 1, 2, ..."
            )
        kind_name, part_name = _KIND_FROM_PB.get(row.kind), _PART_FROM_PB.get(row.part)
        if kind_name is None or part_name is None or row.layer >= g.num_layers:
            raise WireError(
                "MALFORMED", f"chunk {i} names layer {row.layer}, kind {row.kind}, part {row.part}"
            )
        if row.size > limits.max_chunk_bytes:
            raise WireError(
                "TOO_LARGE", f"chunk {i} declares {row.size} bytes, the limit is {limits.max_chunk_bytes}"
            )
        if row.zstd and recipe.zstd is None:
            raise WireError("MALFORMED", f"chunk {i} is zstd-compressed under a recipe without zstd")
        if row.zstd:
            check_zstd(i, capabilities)
        key = (row.layer, kind_name, part_name)
        if key not in expected_parts:
            raise WireError(
                "SHAPE", f"chunk {i}: layer {row.layer} {kind_name} has no part {part_name!r} under its spec"
            )
        ids, raw, zstd = parts.setdefault(key, ([], row.raw_size, row.zstd))
        if (raw, zstd) != (row.raw_size, row.zstd):
            raise WireError(
                "MALFORMED",
                f"chunk {i}: raw_size/zstd {row.raw_size}/{row.zstd} differ from the part's {raw}/{zstd}",
            )
        ids.append(i)
        layer_chunks.setdefault(row.layer, []).append(i)
        declared += row.size
        entries.append(_Entry(row.layer, kind_name, part_name, row.size, row.crc32c))
    if declared > limits.max_message_bytes:
        raise WireError(
            "TOO_LARGE", f"message declares {declared} bytes, the limit is {limits.max_message_bytes}"
        )
    decoded = sum(expected_parts.values())
    if decoded > limits.max_decoded_bytes:
        raise WireError(
            "TOO_LARGE", f"message decodes to {decoded} bytes, the limit is {limits.max_decoded_bytes}"
        )
    for key, n in expected_parts.items():
        where = f"layer {key[0]} {key[1]} part {key[2]!r}"
        if key not in parts:
            raise WireError("SHAPE", f"{where} is missing from the payload table")
        ids, raw, zstd = parts[key]
        got = sum(entries[c].size for c in ids)
        if raw != n:
            raise WireError(
                "SHAPE", f"{where}: raw size {raw} does not match {n} bytes of its shape and spec"
            )
        coded = recipe.ans is not None and key[2] == "codes"  # an rANS stream: its size is the data's
        if coded and got > ans_bound(n):
            raise WireError(
                "SHAPE",
                f"{where}: a {got}-byte rANS stream exceeds the bound {ans_bound(n)} for {n} raw bytes",
            )
        if not zstd and not coded and got != n:
            raise WireError("SHAPE", f"{where}: chunks hold {got} bytes, its shape and spec need {n}")
        if zstd and got > zstd_bound(n):
            raise WireError(
                "SHAPE", f"{where}: {got} zstd bytes exceed the bound {zstd_bound(n)} for {n} raw bytes"
            )
    return _Plan(header, recipe, g, positions, tensors, entries, layer_chunks, parts, segment)


def _text_segment(
    header: pb.Header, g: Geometry, segment: Segment, capabilities: frozenset[str] | None
) -> _Plan:
    """A text segment's header: its token ids (checked by segment_from_pb) and nothing else."""
    if not decodes(capabilities, "segment:text"):
        raise WireError(
            "UNKNOWN_CODEC",
            "this receiver does not recompute text segments (it does not advertise segment:text)",
        )
    if (
        header.HasField("recipe")
        or header.tensors
        or header.positions
        or header.payload
        or header.profile_hash
    ):
        raise WireError(
            "MALFORMED", "a text segment carries token ids only: no recipe, tensors, positions or payload"
        )
    return _Plan(header, TEXT_RECIPE, g, [], [], [], {}, {}, segment)
