"""Property-based fuzzing of the frame decoder and header validation (kvlink.wire.parse_frame + Assembler).

What arrives on a Transfer call is bytes. Whatever they are - random, a valid message with bits flipped,
cut short, spliced, its frames dropped, repeated or reordered, or its header's fields set to any value of
their type (counts, shapes, sizes, enum values, huge numbers) - the receiver:

- raises nothing but kvlink.wire.WireError (the server turns it into a specific gRPC status);
- never builds a message other than the one sent: a message that arrives damaged either fails, or (after
  Nacks and resends of the intact chunks) is exactly the original, byte for byte;
- validates before it allocates: with small WireLimits, the Python heap of a whole transfer stays far
  below what a hostile header declares (tracemalloc);
- hands the codec only what it can decode or refuse with ValueError (which the server answers as
  MALFORMED), when a mutated header is internally consistent enough to pass.

Examples per property come from the hypothesis profile (tests/conftest.py): "ci" (default, `make
test`) runs a few hundred in all, "fuzz" (`make fuzz`) over 100k.
"""

from __future__ import annotations

import contextlib
import tracemalloc
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import google_crc32c
import pytest
import torch
from hypothesis import event, given, note
from hypothesis import strategies as st

from kvlink import wire
from kvlink.cache import ContextKV
from kvlink.codec import Codec, EncodedKV
from kvlink.models import Geometry
from kvlink.recipe import Recipe, build
from kvlink.select import keep_count

GEOM = Geometry(num_layers=2, kv_heads=2, head_dim=8, q_heads=4)
FP = "c" * 64
T = 24
CHUNK = 48  # small chunks: every part spans a few, so ids, order and resends matter
LIMITS = wire.WireLimits(
    max_message_bytes=64 << 10, max_decoded_bytes=256 << 10, max_chunk_bytes=4 << 10, max_header_bytes=16 << 10,
    max_layers=8, max_heads=8, max_head_dim=64, max_length=512, max_chunks=512, max_group_size=64,
    max_chunk_retries=2, max_id_chars=64, max_new_tokens=64, max_question_bytes=1 << 10, max_references=4,
)  # fmt: skip
HEAP_BOUND = 2 << 20
"""Python heap one transfer may take under LIMITS (the messages here are a few KB; a header may declare GBs)."""

CONFIGS = (
    build(),
    build(selector="random", retention=0.5, k_bits=4, v_bits=2),
    build(selector="random", retention=0.25, scope="layer", k_bits=3, v_bits="nf4", group_size=8),
    build(k_bits=8, v_bits=8, zstd_level=3),
    build(selector="random", retention=0.75, k_bits=4, v_bits=4, lowrank="svd", k_rank=4),
    build(selector="random", retention=0.5, scope="layer", k_bits=4, v_bits=3, sink=2, rotate="v"),
)


@dataclass(frozen=True)
class Sample:
    """A valid message: its EncodedKV and its frames' bytes (header, chunks, trailer)."""

    encoded: EncodedKV
    raws: tuple[bytes, ...]

    @property
    def chunks(self) -> dict[int, bytes]:
        """Chunk id -> the intact frame: what the sender's Outbox resends on a Nack."""
        return {i: raw for i, raw in enumerate(self.raws[1:-1])}


def _sample(config: Recipe, seed: int) -> Sample:
    g = torch.Generator().manual_seed(seed)
    shape = (GEOM.kv_heads, T, GEOM.head_dim)
    keys = [torch.randn(shape, generator=g) for _ in range(GEOM.num_layers)]
    values = [torch.randn(shape, generator=g) for _ in range(GEOM.num_layers)]
    if config.zstd_level:
        keys, values = [k.round() for k in keys], [v.round() for v in values]
    kept = None
    if config.select is not None:
        n = keep_count(config.retention, T)
        one = lambda: torch.sort(torch.randperm(T, generator=g)[:n]).values  # noqa: E731
        kept = (
            [one()] * GEOM.num_layers if config.scope == "global" else [one() for _ in range(GEOM.num_layers)]
        )
    kv = ContextKV(keys, values, [torch.arange(T)] * GEOM.num_layers, T)
    encoded = Codec(config, GEOM).encode_kv(kv, kept)
    frames = wire.to_frames(encoded, "session", "message", FP, CHUNK)
    return Sample(encoded, tuple(wire.frame_bytes(f) for f in frames))


SAMPLES = tuple(_sample(c, i) for i, c in enumerate(CONFIGS))


# --- the receiver under test ---------------------------------------------------------------------------------
def _assembler() -> wire.Assembler:
    return wire.Assembler(FP, GEOM, LIMITS)


def deliver(raws: Sequence[bytes], resend: dict[int, bytes] | None = None) -> tuple[EncodedKV, wire.Receipt]:
    """Feed frames as the server does (parse_frame inside feed_raw) and answer Nacks like a sender: the
    intact chunk frame again. Raises WireError; anything else is a bug."""
    asm = _assembler()
    queue = deque(raws)
    resent = 0
    while queue:
        raw = queue.popleft()
        for signal in asm.feed_raw(raw):
            kind = signal.WhichOneof("signal")
            assert kind in ("ack", "nack"), f"the assembler emitted {kind}"
            if kind == "nack" and resend and signal.nack.chunk_id in resend and resent < 64:
                queue.append(resend[signal.nack.chunk_id])
                resent += 1
        if asm.complete:
            break
    result = asm.finish()
    assert asm.buffered_bytes == 0
    return result


def same(a: EncodedKV, b: EncodedKV) -> None:
    assert (b.recipe, b.geometry, b.length, b.positions, b.profile_hash) == (
        a.recipe, a.geometry, a.length, a.positions, a.profile_hash,
    )  # fmt: skip
    assert b.tensors == a.tensors, "a different message came out of a damaged one"


@contextlib.contextmanager
def bounded_heap(limit: int = HEAP_BOUND) -> Iterator[None]:
    """Fail if the block's peak Python heap (tracemalloc: bytes, lists, numpy) grows by more than `limit`."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        yield
        peak = tracemalloc.get_traced_memory()[1] - base
        assert peak <= limit, f"{peak} bytes allocated while validating: a size was trusted before checking"
    finally:
        if started:
            tracemalloc.stop()


def refused_or_original(sample: Sample, raws: Sequence[bytes]) -> str:
    """The property of a damaged message: WireError, or exactly the original. Returns the outcome."""
    try:
        encoded, _ = deliver(raws, sample.chunks)
    except wire.WireError as err:
        note(f"refused: {err}")
        event(f"refused {err.code}")
        return err.code
    same(sample.encoded, encoded)
    event("the original, intact")
    return "original"


# --- 1: random bytes, anywhere bytes are parsed -------------------------------------------------------------------
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_wire_errors(data: bytes) -> None:
    checks: list[Callable[[], Any]] = [
        lambda: _assembler().feed_raw(data),
        lambda: deliver([data]),
        lambda: wire.hello_from_proto(wire.parse_hello(data), FP),
        lambda: wire.ask_from_proto(wire.parse_ask(data), LIMITS),
        lambda: wire.read_signal(wire.parse_signal(data)),  # the sender parses the receiver's signals
    ]
    for i, check in enumerate(checks):
        try:
            check()
        except wire.WireError as err:
            event(f"parser {i}: refused {err.code}")


@given(st.lists(st.one_of(st.binary(max_size=80), st.sampled_from(SAMPLES[1].raws)), max_size=8))
def test_random_frame_sequences_raise_only_wire_errors(raws: list[bytes]) -> None:
    with bounded_heap():
        try:
            deliver(raws)
        except wire.WireError as err:
            event(f"refused {err.code}")
        else:
            event("assembled")


# --- 2: a valid message, its bytes damaged ---------------------------------------------------------------------------
@st.composite
def damaged(draw: st.DrawFn) -> tuple[Sample, list[bytes], str]:
    sample = draw(st.sampled_from(SAMPLES))
    raws = list(sample.raws)
    i = draw(st.integers(0, len(raws) - 1))
    frame = bytearray(raws[i])
    how = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "empty"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            bit = draw(st.integers(0, 8 * len(frame) - 1))
            frame[bit // 8] ^= 1 << (bit % 8)
    elif how == "truncate":
        del frame[draw(st.integers(0, len(frame) - 1)) :]
    elif how == "insert":
        at = draw(st.integers(0, len(frame)))
        frame[at:at] = draw(st.binary(min_size=1, max_size=32))
    elif how == "delete":
        at = draw(st.integers(0, len(frame) - 1))
        del frame[at : at + draw(st.integers(1, 32))]
    elif how == "overwrite":
        at = draw(st.integers(0, len(frame) - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        frame[at : at + len(patch)] = patch
    else:
        frame = bytearray()
    raws[i] = bytes(frame)
    return sample, raws, f"{how} frame {i}"


@given(damaged())
def test_damaged_bytes_never_yield_another_message(case: tuple[Sample, list[bytes], str]) -> None:
    sample, raws, what = case
    note(what)
    with bounded_heap():
        refused_or_original(sample, raws)


@given(st.sampled_from(SAMPLES), st.data())
def test_dropped_repeated_or_reordered_frames(sample: Sample, data: st.DataObject) -> None:
    raws = list(sample.raws)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raws) - 1))
        j = data.draw(st.integers(0, len(raws)))
        op = data.draw(st.sampled_from(["drop", "repeat", "move", "swap"]))
        note(f"{op} {i} {j}")
        if op == "drop" and len(raws) > 1:
            del raws[i]
        elif op == "repeat":
            raws.insert(j, raws[i])
        elif op == "move":
            raws.insert(j, raws.pop(i))
        elif op == "swap":
            j = min(j, len(raws) - 1)
            raws[i], raws[j] = raws[j], raws[i]
    outcome = refused_or_original(sample, raws)
    # Chunks only reordered between header and trailer: that is accepted (order carries no information).
    chunks = raws[1:-1]
    if (
        raws[0] == sample.raws[0]
        and raws[-1] == sample.raws[-1]
        and sorted(chunks) == sorted(sample.raws[1:-1])
    ):
        assert outcome == "original"


# --- 3: the header's fields, set to any value of their type --------------------------------------------------------------
U32 = st.one_of(st.integers(0, 40), st.sampled_from([255, 256, 4096, 65535, 65536, 2**31 - 1, 2**32 - 1]),
                st.integers(0, 2**32 - 1))  # fmt: skip
U64 = st.one_of(U32, st.sampled_from([2**32, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
I64 = st.integers(-(2**63), 2**63 - 1)
ENUM = st.one_of(st.integers(-2, 6), st.just(2**31 - 1))  # proto3 enums are open: unknown values parse
NAMES = ("none", "q2c", "random", "snapkv", "global", "layer", "fp16", "int8", "int4", "int3", "int2", "nf4",
         "int4cw", "int3rw", "token", "channel", "svd", "profile", "nearest", "query", "uniform", "question",
         "select", "quantize", "sink", "rotate", "lowrank", "clamp", "zstd", "")  # fmt: skip
TEXT = st.one_of(st.sampled_from(NAMES), st.text(max_size=12), st.text(min_size=100, max_size=300))
F64 = st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True))
PARAMS = ("method", "retention", "scope", "window", "seed", "format", "group", "axis", "rounding", "widths", "n",
          "mode", "rank", "sigmas", "level")  # fmt: skip
"""The parameter names of the registered stages (kvlink.stages): a Stage's params map carries them as text."""
PARAM_TEXT = st.one_of(
    TEXT, U32.map(str), I64.map(str), F64.map(repr), st.sampled_from(["", "0", "1", "-1", "1e9"])
)
"""Any value of a parameter's type, as text: names, integers of any width, floats (nan, inf), garbage."""


def _pick(draw: st.DrawFn, seq: Any) -> int | None:
    return draw(st.integers(0, len(seq) - 1)) if len(seq) else None


def _mutate_header(draw: st.DrawFn, h: Any) -> str:
    """Set one field (or add/remove one repeated entry) of a parsed Header to any value of its type."""
    area = draw(
        st.sampled_from(["ids", "geometry", "length", "recipe", "positions", "tensors", "payload", "grow"])
    )
    if area == "ids":
        name = draw(st.sampled_from(["session_id", "message_id", "fingerprint", "profile_hash"]))
        setattr(h, name, draw(TEXT))
        return f"{name}"
    if area == "geometry":
        name = draw(st.sampled_from(["num_layers", "kv_heads", "head_dim", "q_heads"]))
        setattr(h.geometry, name, draw(U32))
        return f"geometry.{name}"
    if area == "length":
        h.length = draw(U32)
        return "length"
    if area == "recipe":
        return _mutate_recipe(draw, h.recipe)
    if area == "positions":
        i = _pick(draw, h.positions)
        op = draw(st.sampled_from(["encoding", "count", "data", "add", "remove"]))
        if op == "add" or i is None:
            h.positions.add(encoding=draw(ENUM), data=draw(st.binary(max_size=64)), count=draw(U32))
        elif op == "remove":
            del h.positions[i]
        elif op == "encoding":
            h.positions[i].encoding = draw(ENUM)
        elif op == "count":
            h.positions[i].count = draw(U32)
        else:
            h.positions[i].data = draw(st.binary(max_size=80))
        return f"positions {op}"
    if area == "tensors":
        i = _pick(draw, h.tensors)
        assert i is not None
        t = h.tensors[i]
        op = draw(st.sampled_from(["layer", "kind", "shape", "stored_shape", "format", "group", "axis", "remove",
                                   "repeat"]))  # fmt: skip
        if op == "layer":
            t.layer = draw(U32)
        elif op == "kind":
            t.kind = draw(ENUM)
        elif op in ("shape", "stored_shape"):
            del getattr(t, op)[:]
            getattr(t, op).extend(draw(st.lists(U32, max_size=4)))
        elif op == "format":
            t.spec.format = draw(TEXT)
        elif op == "group":
            t.spec.group_size = draw(U32)
        elif op == "axis":
            t.spec.axis = draw(TEXT)
        elif op == "remove":
            del h.tensors[i]
        else:
            h.tensors.add().CopyFrom(t)
        return f"tensors[{i}] {op}"
    if area == "payload":
        i = _pick(draw, h.payload)
        assert i is not None
        row = h.payload[i]
        op = draw(st.sampled_from(["chunk_id", "layer", "kind", "part", "size", "raw_size", "zstd", "crc32c",
                                   "remove", "repeat"]))  # fmt: skip
        if op in ("chunk_id", "layer", "size", "crc32c"):
            setattr(row, op, draw(U32))
        elif op in ("kind", "part"):
            setattr(row, op, draw(ENUM))
        elif op == "raw_size":
            row.raw_size = draw(U64)
        elif op == "zstd":
            row.zstd = not row.zstd
        elif op == "remove":
            del h.payload[i]
        else:
            h.payload.add().CopyFrom(row)
        return f"payload[{i}] {op}"
    # grow: many repeated entries at once (the header-size and table limits)
    n = draw(st.sampled_from([50, 600, 2000]))
    target = draw(st.sampled_from(["payload", "tensors", "positions", "recipe.pipelines", "recipe.stages"]))
    if target == "recipe.pipelines":
        entries = h.recipe.pipelines
    elif target == "recipe.stages":
        entries = h.recipe.pipelines[0].stages if h.recipe.pipelines else []
    else:
        entries = getattr(h, target)
    if len(entries):
        for _ in range(n):
            entries.add().CopyFrom(entries[0])
    return f"grow {target} by {n}"


def _mutate_stage(draw: st.DrawFn, stage: Any, where: str) -> str:
    """Set a Stage's name, or one of its params (a known name or any text) to any text, or drop one."""
    op = draw(st.sampled_from(["name", "param", "drop param", "clear params"]))
    if op == "name":
        stage.name = draw(TEXT)
    elif op == "param":
        key = draw(st.one_of(st.sampled_from(PARAMS), TEXT))
        stage.params[key] = draw(PARAM_TEXT)
        return f"{where}.params[{key[:16]!r}]"
    elif op == "drop param" and stage.params:
        del stage.params[draw(st.sampled_from(sorted(stage.params)))]
    else:
        op = "clear params"
        stage.params.clear()
    return f"{where} {op}"


def _mutate_recipe(draw: st.DrawFn, r: Any) -> str:
    """Set one field of the header's Recipe (its select and zstd stages, its pipelines' kinds, layers and
    stages) to any value of its type, or add or remove one entry."""
    area = draw(st.sampled_from(["select", "zstd", "pipeline"]))
    if area in ("select", "zstd"):
        op = draw(st.sampled_from(["mutate", "clear", "set"]))
        if op == "clear":
            r.ClearField(area)
        elif op == "set" or not r.HasField(area):
            getattr(r, area).CopyFrom(wire.pb.Stage(name=draw(TEXT), params={
                draw(st.sampled_from(PARAMS)): draw(PARAM_TEXT) for _ in range(draw(st.integers(0, 3)))
            }))  # fmt: skip
        else:
            return _mutate_stage(draw, getattr(r, area), f"recipe.{area}")
        return f"recipe.{area} {op}"
    i = _pick(draw, r.pipelines)
    op = draw(st.sampled_from(["kind", "add layer", "set layer", "clear layers", "stage", "add stage",
                               "remove stage", "swap stages", "remove", "repeat"]))  # fmt: skip
    if i is None:
        r.pipelines.add(kind=draw(ENUM), layers=draw(st.lists(U32, max_size=3)))
        return "recipe.pipelines add"
    p = r.pipelines[i]
    j = _pick(draw, p.stages)
    if op == "set layer" and not p.layers:
        op = "add layer"
    if (op in ("stage", "remove stage") and j is None) or (op == "swap stages" and len(p.stages) < 2):
        op = "add stage"
    if op == "kind":
        p.kind = draw(ENUM)
    elif op == "add layer":
        p.layers.append(draw(U32))
    elif op == "set layer":
        p.layers[draw(st.integers(0, len(p.layers) - 1))] = draw(U32)
    elif op == "clear layers":
        del p.layers[:]
    elif op == "stage":
        return _mutate_stage(draw, p.stages[j], f"recipe.pipelines[{i}].stages[{j}]")
    elif op == "add stage":
        p.stages.add(name=draw(st.one_of(st.sampled_from(NAMES), TEXT)), params={
            draw(st.sampled_from(PARAMS)): draw(PARAM_TEXT) for _ in range(draw(st.integers(0, 3)))
        })  # fmt: skip
    elif op == "remove stage":
        del p.stages[j]
    elif op == "swap stages":
        a, b = p.stages[0], p.stages[len(p.stages) - 1]
        first, last = type(a)(), type(b)()
        first.CopyFrom(a)
        last.CopyFrom(b)
        a.CopyFrom(last)
        b.CopyFrom(first)
    elif op == "remove":
        del r.pipelines[i]
    else:
        r.pipelines.add().CopyFrom(p)
    return f"recipe.pipelines[{i}] {op}"


@st.composite
def mutated_header(draw: st.DrawFn) -> tuple[Sample, list[bytes], list[str]]:
    sample = draw(st.sampled_from(SAMPLES))
    frame = wire.parse_frame(sample.raws[0])
    changes = [_mutate_header(draw, frame.header) for _ in range(draw(st.integers(1, 3)))]
    header_raw = wire.frame_bytes(frame)
    trailer = wire.parse_frame(sample.raws[-1])
    if draw(st.integers(0, 9)):  # mostly a consistent header CRC, to reach validation past the trailer
        trailer.trailer.header_crc32c = google_crc32c.value(header_raw)
    if draw(st.booleans()):  # and the trailer's totals of the new table
        trailer.trailer.chunk_count = len(frame.header.payload)
        trailer.trailer.payload_bytes = sum(r.size for r in frame.header.payload)
    return sample, [header_raw, *sample.raws[1:-1], wire.frame_bytes(trailer)], changes


@given(mutated_header())
def test_header_field_mutations_are_validated_before_allocation(
    case: tuple[Sample, list[bytes], list[str]],
) -> None:
    sample, raws, changes = case
    note(", ".join(changes))
    with bounded_heap():
        try:
            encoded, _ = deliver(raws, sample.chunks)
        except wire.WireError as err:
            note(f"refused: {err}")
            event(f"refused {err.code}")
            return
    # It passed: a self-consistent header (an irrelevant field, say). The codec decodes it or refuses
    # with ValueError, which the server answers as MALFORMED.
    event(_decode_or_value_error(encoded))


def _decode_or_value_error(encoded: EncodedKV) -> str:
    """Decode as the server does; ValueError (answered as MALFORMED) is the only failure allowed."""
    try:
        kv = Codec(encoded.recipe, encoded.geometry).decode(encoded)
    except ValueError as exc:
        note(f"decode refused: {exc}")
        return "assembled; decode refused (ValueError -> MALFORMED)"
    for x in (*kv.keys, *kv.values):
        heads, _, dim = x.shape
        assert (heads, dim) == (GEOM.kv_heads, GEOM.head_dim)
    return "assembled and decoded"


# --- 4: a consistent message with arbitrary chunk bytes: the codec's turn ------------------------------------------------
@given(st.sampled_from(SAMPLES), st.data())
def test_consistent_messages_with_arbitrary_payload_decode_or_value_error(
    sample: Sample, data: st.DataObject
) -> None:
    """Chunks replaced by arbitrary bytes of the declared size, with CRCs recomputed (a sender that lies
    consistently): the assembler accepts them; decoding must still fail only with ValueError."""
    header = wire.parse_frame(sample.raws[0])
    chunks = [wire.parse_frame(r) for r in sample.raws[1:-1]]
    for _ in range(data.draw(st.integers(1, 4))):
        cid = data.draw(st.integers(0, len(chunks) - 1))
        row = header.header.payload[cid]
        size = row.size if not row.zstd else data.draw(st.integers(1, max(1, row.size)))
        blob = data.draw(st.binary(min_size=size, max_size=size))
        row.size, row.crc32c = len(blob), google_crc32c.value(blob)
        chunks[cid].chunk.data, chunks[cid].chunk.crc32c = blob, row.crc32c
    header_raw = wire.frame_bytes(header)
    trailer = wire.parse_frame(sample.raws[-1])
    trailer.trailer.header_crc32c = google_crc32c.value(header_raw)
    trailer.trailer.payload_bytes = sum(r.size for r in header.header.payload)
    raws = [header_raw, *(wire.frame_bytes(c) for c in chunks), wire.frame_bytes(trailer)]
    try:
        encoded, _ = deliver(raws)
    except wire.WireError as err:  # a zstd part's bytes over its bound, say
        note(f"refused: {err}")
        event(f"refused {err.code}")
        return
    event(_decode_or_value_error(encoded))


def test_the_samples_are_valid() -> None:
    """The fuzzers start from valid messages: each one assembles to itself and decodes."""
    for sample in SAMPLES:
        encoded, receipt = deliver(sample.raws)
        same(sample.encoded, encoded)
        assert receipt.chunks == len(sample.raws) - 2 > len(encoded.tensors)
        assert _decode_or_value_error(encoded) == "assembled and decoded"


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q", "--hypothesis-show-statistics"])
