"""The wire (kvlink.wire): round trips, exact byte accounting, and one specific error per bad input."""

from __future__ import annotations

import ast
import functools
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import google_crc32c
import grpc
import pytest
import torch

from kvlink import wire
from kvlink.cache import ContextKV, LayerObservation, Observation, Observe
from kvlink.codec import Codec, EncodedKV
from kvlink.lowrank import ModelProfile
from kvlink.models import Geometry
from kvlink.recipe import Recipe, build
from kvlink.select import keep_count

REPO = Path(__file__).resolve().parent.parent
GEOM = Geometry(num_layers=3, kv_heads=2, head_dim=16, q_heads=4)
FP = "f" * 64
T = 40


# --- helpers -------------------------------------------------------------------
def _kv(length: int = T, seed: int = 0, geometry: Geometry = GEOM, coarse: bool = False) -> ContextKV:
    """Random K/V; `coarse` rounds them to few distinct values so that zstd pays."""
    g = torch.Generator().manual_seed(seed)
    shape = (geometry.kv_heads, length, geometry.head_dim)
    keys = [torch.randn(shape, generator=g) * 3 for _ in range(geometry.num_layers)]
    values = [torch.randn(shape, generator=g) for _ in range(geometry.num_layers)]
    if coarse:
        keys, values = [k.round().clamp(-2, 2) for k in keys], [v.round().clamp(-1, 1) for v in values]
    return ContextKV(keys, values, [torch.arange(length)] * geometry.num_layers, length)


def _kept(config: Recipe, length: int, seed: int = 1) -> list[torch.Tensor] | None:
    if config.select is None:
        return None
    g = torch.Generator().manual_seed(seed)
    n = keep_count(config.retention, length)

    def one() -> torch.Tensor:
        return torch.sort(torch.randperm(length, generator=g)[:n]).values

    if config.scope == "global":
        return [one()] * GEOM.num_layers
    return [one() for _ in range(GEOM.num_layers)]


def _profile(r_max: int = 8) -> ModelProfile:
    g = torch.Generator().manual_seed(7)
    bases, means = {}, {}
    for layer in range(GEOM.num_layers):
        for kind in ("k", "v"):
            q, _ = torch.linalg.qr(torch.randn(GEOM.kv_heads, GEOM.head_dim, r_max, generator=g))
            bases[(layer, kind)] = q.contiguous()  # (H, D, r) orthonormal columns
            means[(layer, kind)] = torch.zeros(GEOM.kv_heads, GEOM.head_dim)
    return ModelProfile(FP, r_max, 0, bases, means)


def _observation(length: int) -> Observation:
    """Question queries and the context keys they see, for the configs that need them (key and
    value widths, query rounding)."""
    g = torch.Generator().manual_seed(11)
    gk = torch.Generator().manual_seed(12)
    layers = [
        LayerObservation(
            torch.randn(GEOM.q_heads, 5, GEOM.head_dim, generator=g) * torch.logspace(1, -1, GEOM.head_dim),
            torch.arange(length, length + 5),
            torch.randn(GEOM.kv_heads, length, GEOM.head_dim, generator=gk),
            torch.arange(length),
        )
        for _ in range(GEOM.num_layers)
    ]
    return Observation(Observe.QUESTION, length, layers, num_layers=GEOM.num_layers)


def _encode(config: Recipe, length: int = T, profile: Any = None) -> EncodedKV:
    kv = _kv(length, coarse=config.zstd_level > 0)
    observed = (config.needs() is not Observe.NONE and config.select is None) or any(
        q.question_aware for kind in ("k", "v") for q in config.quantizers(kind)
    )
    return Codec(config, GEOM, profile).encode_kv(
        kv, _kept(config, length), _observation(length) if observed else None
    )


def _frames(encoded: EncodedKV, chunk_bytes: int = 1 << 20) -> list[Any]:
    return wire.to_frames(encoded, "session-1", "message-1", FP, chunk_bytes)


def _copy(frame: Any) -> Any:
    return wire.parse_frame(wire.frame_bytes(frame))


def _asm(**kwargs: Any) -> wire.Assembler:
    kwargs.setdefault("geometry", GEOM)
    return wire.Assembler(FP, **kwargs)


def _feed_all(asm: wire.Assembler, frames: list[Any]) -> list[Any]:
    signals: list[Any] = []
    for frame in frames:
        signals.extend(asm.feed(frame))
    return signals


def _same(a: EncodedKV, b: EncodedKV) -> None:
    assert b.recipe == a.recipe
    assert b.geometry == a.geometry
    assert b.length == a.length
    assert b.positions == a.positions
    assert b.profile_hash == a.profile_hash
    assert b.tensors == a.tensors  # shapes, specs, low-rank mode and every part's bytes


def _raises(code: str, fn: Callable[[], Any], *needles: str) -> wire.WireError:
    with pytest.raises(wire.WireError) as info:
        fn()
    err = info.value
    assert err.code == code, f"expected {code}, got {err.code}: {err.message}"
    for needle in needles:
        assert needle in err.message, f"{needle!r} not in {err.message!r}"
    return err


CONFIGS = {
    "fp16-full": build(),
    "int4/int2-random-global": build(selector="random", retention=0.5, k_bits=4, v_bits=2),
    "int3/nf4-layer-g8": build(selector="random", retention=0.25, scope="layer", k_bits=3, v_bits="nf4",
                                     group_size=8),
    "int8-zstd": build(k_bits=8, v_bits=8, zstd_level=3),
    "fp16/int2-zstd": build(selector="random", retention=0.5, k_bits=16, v_bits=2, zstd_level=19),
    "svd-k8-int4": build(selector="random", retention=0.75, k_bits=4, v_bits=4, lowrank="svd", k_rank=8),
    "layer-bits-sink": build(selector="random", retention=0.5, scope="layer", group_size=8, sink=1,
                                   k_layer_bits=(8, 2, 4), v_layer_bits=(3, 4, 2)),
    "key-widths-mixed": build(selector="random", retention=0.5, scope="layer", group_size=8, sink=1,
                                    k_layer_bits=(8, 3, 2), v_layer_bits=(4, 4, 4), k_widths="question",
                                    round_k="query"),
    "key-widths-zstd": build(k_bits=4, v_bits=3, k_widths="question", zstd_level=3),
    "value-widths-mixed": build(selector="random", retention=0.5, scope="layer", group_size=8, sink=1,
                                      k_bits=4, v_layer_bits=(8, 3, 2), k_widths="question", v_widths="question"),
    "value-widths-zstd": build(k_bits=4, v_bits=3, v_widths="question", zstd_level=3),
}  # fmt: skip


# --- generated code ------------------------------------------------------------------
def test_generated_stubs_load_with_the_installed_protobuf_runtime() -> None:
    from google.protobuf import __version__ as protobuf_version

    from kvlink._proto import kvlink_pb2, kvlink_pb2_grpc

    assert kvlink_pb2.DESCRIPTOR.package == "kvlink.v2"
    assert "KVLink" in kvlink_pb2.DESCRIPTOR.services_by_name
    frame = kvlink_pb2.TransferFrame(
        protocol_version=1, chunk=kvlink_pb2.Chunk(chunk_id=7, data=b"\x00\xff", crc32c=9)
    )
    back = kvlink_pb2.TransferFrame.FromString(frame.SerializeToString())
    assert back == frame and back.chunk.data == b"\x00\xff", protobuf_version
    assert hasattr(kvlink_pb2_grpc, "KVLinkStub")


def test_every_top_level_message_carries_the_protocol_version() -> None:
    from kvlink._proto import kvlink_pb2

    for name in ("Hello", "Welcome", "TransferFrame", "Signal", "Ask", "Answer"):
        version = kvlink_pb2.DESCRIPTOR.message_types_by_name[name].fields_by_name["protocol_version"]
        assert version.number == 1, name


def test_generate_into_a_tmp_dir_and_import(tmp_path: Path) -> None:
    from kvlink._proto import build

    pkg = tmp_path / "stubpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    written = build.generate(out_dir=pkg)
    assert {p.name for p in written} == {"kvlink_pb2.py", "kvlink_pb2.pyi", "kvlink_pb2_grpc.py"}
    code = textwrap.dedent("""
        from stubpkg import kvlink_pb2 as pb, kvlink_pb2_grpc
        h = pb.Hello(protocol_version=2, fingerprint="x", capabilities=["format:int4"])
        assert pb.Hello.FromString(h.SerializeToString()) == h
        assert kvlink_pb2_grpc.KVLinkStub
        print("ok")
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_wire_generates_missing_stubs(tmp_path: Path) -> None:
    """A source checkout without stubs (no `make proto`) still imports kvlink.wire."""
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    shutil.copytree(
        REPO / "kvlink", tmp_path / "kvlink", ignore=shutil.ignore_patterns("__pycache__", "data", "*_pb2*")
    )
    stub = tmp_path / "kvlink" / "_proto" / "kvlink_pb2.py"
    assert not stub.exists()
    code = (
        f"import kvlink.wire as w; assert w.__file__.startswith({str(tmp_path)!r}); print(w.PROTOCOL_VERSION)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"
    assert stub.is_file() and (stub.parent / "kvlink_pb2_grpc.py").is_file()


WIRE_LAYERS = (
    "assembler",
    "grpc",
    "framing",
    "messages",
    "segments",
    "validation",
    "capabilities",
    "_common",
)
"""kvlink.wire's modules, each importing only those after it (its docstring lists them so)."""


def test_wire_modules_import_only_the_ones_below_them() -> None:
    """No import cycle inside kvlink.wire, and only its _common imports the generated stubs."""
    package = Path(wire.__file__).parent
    assert sorted(p.stem for p in package.glob("*.py")) == sorted((*WIRE_LAYERS, "__init__"))
    for i, name in enumerate(WIRE_LAYERS):
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        inside = {m.removeprefix("kvlink.wire.") for m in imported if m.startswith("kvlink.wire")}
        assert inside <= set(WIRE_LAYERS[i + 1 :]), f"{name} imports {sorted(inside)}"
        assert any(m.startswith("kvlink._proto") for m in imported) == (name == "_common"), name


# --- round trips and sizes --------------------------------------------------------------
@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip(name: str, chunk_bytes: int) -> None:
    config = CONFIGS[name]
    encoded = _encode(config)
    frames = _frames(encoded, chunk_bytes)
    assert frames[0].WhichOneof("frame") == "header" and frames[-1].WhichOneof("frame") == "trailer"
    assert max(len(f.chunk.data) for f in frames[1:-1]) <= chunk_bytes
    if chunk_bytes == 64:
        assert len(frames) - 2 > sum(len(t.parts) for t in encoded.tensors)  # parts were split
    asm = _asm()
    signals = _feed_all(asm, frames)
    assert asm.complete
    received, receipt = asm.finish()
    _same(encoded, received)
    acks = [wire.read_signal(s) for s in signals]
    assert sorted(a.layer for a in acks if isinstance(a, wire.Ack)) == list(range(GEOM.num_layers))
    assert sorted(c for a in acks if isinstance(a, wire.Ack) for c in a.chunk_ids) == list(
        range(len(frames) - 2)
    )
    # The receiver decodes exactly what the sender would have decoded.
    mine, theirs = Codec(config, GEOM).decode(encoded), Codec(config, GEOM).decode(received)
    for a, b in zip(mine.keys + mine.values, theirs.keys + theirs.values):
        assert torch.equal(a, b)
    assert receipt.chunks == len(frames) - 2 and receipt.retransmits == 0


def test_round_trip_with_a_calibrated_profile() -> None:
    profile = _profile()
    config = build(k_bits=4, v_bits=8, lowrank="profile", k_rank=4, v_rank=6)
    encoded = _encode(config, profile=profile)
    assert encoded.profile_hash == profile.hash
    received, _ = _assemble(_frames(encoded), profile_hashes={profile.hash})
    _same(encoded, received)
    err = _raises("UNKNOWN_CODEC", lambda: _feed_all(_asm(profile_hashes={"other"}), _frames(encoded)))
    assert profile.hash in err.message


def _assemble(frames: list[Any], **kwargs: Any) -> tuple[EncodedKV, wire.Receipt]:
    asm = _asm(**kwargs)
    _feed_all(asm, frames)
    return asm.finish()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_exact_size_accounting(name: str) -> None:
    encoded = _encode(CONFIGS[name])
    frames = _frames(encoded, 100)
    size = wire.message_wire_size(encoded, "session-1", "message-1", FP, 100)
    assert size.frames == sum(f.ByteSize() + 5 for f in frames)
    assert size.frames == sum(wire.frame_size(f) for f in frames)
    sizes = encoded.sizes()
    assert (size.payload, size.positions, size.scales, size.factors) == (
        sizes.payload, sizes.positions, sizes.scales, sizes.factors,
    )  # fmt: skip
    assert size.metadata == sizes.metadata and size.framing > 0
    # The receiver counts the same bytes, then adds its signaling (acks and the receipt itself).
    asm = _asm()
    signals = _feed_all(asm, frames)
    _, receipt = asm.finish()
    assert (receipt.payload, receipt.positions, receipt.scales, receipt.factors, receipt.framing) == (
        size.payload, size.positions, size.scales, size.factors, size.framing,
    )  # fmt: skip
    receipt = wire.Receipt(**{**receipt.__dict__, "timings": {**receipt.timings, "decode_s": 0.25}})
    sealed, signal = wire.receipt_signal(receipt)
    exact_signaling = sum(wire.signal_size(s) for s in signals) + wire.signal_size(signal)
    assert sealed.signaling == exact_signaling <= size.signaling
    assert sealed.total == sealed.payload + sealed.metadata + sealed.framing + sealed.signaling
    assert sealed.total == size.frames + exact_signaling
    assert sealed.fp16_bytes == encoded.fp16_bytes()
    # The sender's view: the Outbox reads the acks and the receipt back.
    outbox = wire.Outbox(frames)
    for s in [*signals, signal]:
        assert outbox.handle(s) == []
    assert outbox.complete and outbox.receipt == sealed
    assert outbox.acked == set(range(len(frames) - 2))
    assert outbox.signaling_bytes == exact_signaling


def test_receipt_allowance_bounds_the_largest_receipt() -> None:
    big = (1 << 64) - 1
    receipt = wire.Receipt(
        message_id="m" * 128, payload=big // 8, positions=big // 8, scales=big // 8, factors=big // 8,
        framing=big // 8, signaling=big // 8, chunks=(1 << 32) - 1, retransmits=(1 << 32) - 1,
        retransmitted_bytes=big, fp16_bytes=big, timings={f"{i:02d}".ljust(32, "x"): -1e300 for i in range(16)},
    )  # fmt: skip
    sealed, signal = wire.receipt_signal(receipt)
    assert wire.signal_size(signal) <= wire.RECEIPT_ALLOWANCE
    assert sealed.signaling == receipt.signaling + wire.signal_size(signal)
    with pytest.raises(ValueError, match="timings"):
        wire.receipt_signal(wire.Receipt(**{**receipt.__dict__, "timings": {"t" * 40: 1.0}}))


def test_http2_overhead() -> None:
    fixed = wire.HTTP2_RPC_ALLOWANCE + wire.HTTP2_CONNECTION_ALLOWANCE
    per_frame = 9 + 2 * 13  # DATA header + stream and connection WINDOW_UPDATEs
    assert wire.http2_overhead(0, 0) == fixed
    # 3 messages of 60000 bytes in all: at most 3 + ceil(60000 / 16384) = 7 DATA frames.
    assert wire.http2_overhead(3, 60000) == per_frame * 7 + fixed
    assert wire.http2_overhead(3, 60000, n_signals=4) == per_frame * 11 + fixed
    assert wire.http2_overhead(3, 60000, rpcs=2) == wire.http2_overhead(3, 60000) + wire.HTTP2_RPC_ALLOWANCE
    with pytest.raises(ValueError, match="counts must be >= 0"):
        wire.http2_overhead(-1, 0)


# --- damaged chunks ----------------------------------------------------------------
def _flipped(frame: Any, at: int = 0) -> Any:
    bad = _copy(frame)
    data = bytearray(bad.chunk.data)
    data[at] ^= 0x01
    bad.chunk.data = bytes(data)
    return bad


def test_flipped_byte_is_nacked_and_the_resend_completes() -> None:
    encoded = _encode(CONFIGS["int4/int2-random-global"])
    frames = _frames(encoded, 64)
    outbox = wire.Outbox(frames)
    asm = _asm()
    resend: list[Any] = []
    for i, frame in enumerate(frames):
        signals = asm.feed(_flipped(frame) if i == 3 else frame)
        for s in signals:
            resend.extend(outbox.handle(s))
    assert not asm.complete  # chunk 2 (frame 3) is still owed; the trailer did not complete the message
    assert [n.chunk_id for n in outbox.nacks] == [2]
    assert "CRC32C" in outbox.nacks[0].reason and outbox.nacks[0].attempts_left == 2
    assert resend == [frames[3]]  # only that chunk is sent again
    for frame in resend:
        for s in asm.feed(frame):
            outbox.handle(s)
    received, receipt = asm.finish()
    _same(encoded, received)
    assert receipt.retransmits == 1 and receipt.retransmitted_bytes == wire.frame_size(frames[3])
    assert outbox.acked == set(range(len(frames) - 2))


def test_short_chunk_is_nacked() -> None:
    frames = _frames(_encode(CONFIGS["fp16-full"]), 64)
    asm = _asm()
    asm.feed(frames[0])
    short = _copy(frames[1])
    short.chunk.data = short.chunk.data[:-1]
    (signal,) = asm.feed(short)
    nack = wire.read_signal(signal)
    assert isinstance(nack, wire.Nack) and nack.chunk_id == 0 and "63 bytes" in nack.reason


def test_four_flips_of_one_chunk_are_corrupt() -> None:
    encoded = _encode(CONFIGS["int8-zstd"])
    assert any(p.zstd for t in encoded.tensors for p in t.parts.values())
    frames = _frames(encoded)
    asm = _asm()
    asm.feed(frames[0])
    for left in (2, 1, 0):
        (signal,) = asm.feed(_flipped(frames[1], at=5))
        assert wire.read_signal(signal) == wire.Nack(0, signal.nack.reason, left)
    err = _raises("CORRUPT", lambda: asm.feed(_flipped(frames[1], at=5)), "chunk 0", "4 times")
    assert err.status_code == grpc.StatusCode.DATA_LOSS
    # The failure sticks and nothing partial comes out.
    _raises("CORRUPT", lambda: asm.feed(frames[1]))
    _raises("CORRUPT", asm.finish)


# --- truncated and out-of-order streams ---------------------------------------------
def test_trailer_missing_is_truncated() -> None:
    frames = _frames(_encode(CONFIGS["int4/int2-random-global"]))
    asm = _asm()
    _feed_all(asm, frames[:-1])
    assert not asm.complete
    err = _raises("TRUNCATED", asm.finish, "before the trailer")
    assert err.status_code == grpc.StatusCode.ABORTED


def test_chunk_missing_is_truncated() -> None:
    frames = _frames(_encode(CONFIGS["int4/int2-random-global"]))
    asm = _asm()
    _feed_all(asm, frames[:2] + frames[3:-1])
    _raises("TRUNCATED", lambda: asm.feed(frames[-1]), "never did: [1]")
    _raises("TRUNCATED", asm.finish)


def test_stream_without_header_is_truncated() -> None:
    _raises("TRUNCATED", _asm().finish, "before the header")


def test_nacked_chunk_never_resent_is_truncated() -> None:
    frames = _frames(_encode(CONFIGS["fp16-full"]))
    asm = _asm()
    _feed_all(asm, [frames[0], _flipped(frames[1]), *frames[2:]])
    _raises("TRUNCATED", asm.finish, "asked for again")


def test_duplicate_chunk_is_refused() -> None:
    frames = _frames(_encode(CONFIGS["fp16-full"]))
    asm = _asm()
    _feed_all(asm, frames[:3])
    _raises("ORDER", lambda: asm.feed(frames[2]), "chunk 1", "again")


def test_out_of_order_chunks_are_accepted() -> None:
    """Chunks are placed by id and verified by size and CRC32C: any order between header and trailer."""
    encoded = _encode(CONFIGS["int3/nf4-layer-g8"])
    frames = _frames(encoded, 64)
    chunks = frames[1:-1]
    asm = _asm()
    signals = _feed_all(asm, [frames[0], *reversed(chunks), frames[-1]])
    received, receipt = asm.finish()
    _same(encoded, received)
    assert receipt.retransmits == 0 and sorted(s.ack.layer for s in signals) == list(range(GEOM.num_layers))


def test_header_damaged_in_transit_is_corrupt() -> None:
    """A header that still validates (an unchecked field changed) fails the trailer's header CRC32C."""
    encoded = _encode(CONFIGS["int4/int2-random-global"])
    frames = _frames(encoded, 64)
    assert frames[-1].trailer.header_crc32c == google_crc32c.value(wire.frame_bytes(frames[0]))
    header = _copy(frames[0])
    header.header.recipe.select.params["seed"] = (
        "5"  # the selector's seed: not used to decode, so not validated
    )
    asm = _asm()
    _feed_all(asm, [header, *frames[1:-1]])
    assert asm.buffered_bytes == sum(len(f.chunk.data) for f in frames[1:-1])
    _raises("CORRUPT", lambda: asm.feed(frames[-1]), "header frame's CRC32C", "damaged in transit")
    assert asm.buffered_bytes == 0  # dropped with the message
    # The same bytes, as the server receives them (feed_raw): the CRC is taken over the raw frame.
    asm = _asm()
    for frame in frames:
        asm.feed_raw(wire.frame_bytes(frame))
    _same(encoded, asm.finish()[0])


def test_chunk_before_header_is_refused() -> None:
    frames = _frames(_encode(CONFIGS["fp16-full"]))
    err = _raises("ORDER", lambda: _asm().feed(frames[1]), "before the header")
    assert err.status_code == grpc.StatusCode.FAILED_PRECONDITION
    _raises("ORDER", lambda: _asm().feed(frames[-1]), "before the header")


def test_frame_kind_is_read_from_the_tags_and_each_kind_has_its_own_size_cap() -> None:
    frames = _frames(_encode(CONFIGS["fp16-full"]))
    assert [wire.frame_kind(wire.frame_bytes(f)) for f in (frames[0], frames[1], frames[-1])] == [
        "header", "chunk", "trailer",
    ]  # fmt: skip
    assert wire.frame_kind(wire.frame_bytes(wire.cancel_frame("x"))) == "cancel"
    two = wire.frame_bytes(frames[1]) + wire.frame_bytes(frames[-1])  # protobuf would parse this
    for raw, needle in (
        (b"\xff\xff\xff", "broken varint"),
        (two, "carries 2 of"),
        (b"\x08\x01", "carries 0"),
        (b"\x12\x7f", "ends inside"),
        (b"\x08\x01" * 9, "top-level fields"),
        (b"\x0b", "wire type 3"),
    ):
        err = _raises("MALFORMED", lambda raw=raw: wire.frame_kind(raw), needle)  # fmt: skip
        assert "not a kvlink TransferFrame" in err.message
    # A chunk frame is held to the chunk size, a trailer to a few bytes, before either is parsed.
    limits = wire.WireLimits(max_chunk_bytes=1024, max_message_bytes=1 << 20)
    asm = _asm(limits=limits)
    asm.feed_raw(wire.frame_bytes(_frames(_encode(CONFIGS["fp16-full"]), chunk_bytes=1024)[0]))
    big = wire.pb.TransferFrame(protocol_version=1, chunk=wire.pb.Chunk(chunk_id=0, data=bytes(4096)))
    _raises("TOO_LARGE", lambda: asm.feed_raw(wire.frame_bytes(big)), "chunk frame of", "limit for a chunk")
    asm = _asm(limits=limits)
    fat = wire.pb.TransferFrame(protocol_version=1, cancel=wire.pb.Cancel(reason="x" * 8192))
    _raises("TOO_LARGE", lambda: asm.feed_raw(wire.frame_bytes(fat)), "cancel frame of")
    # A second header is refused from its tags, unparsed.
    asm = _asm()
    asm.feed_raw(wire.frame_bytes(frames[0]))
    _raises("ORDER", lambda: asm.feed_raw(wire.frame_bytes(frames[0])), "second header")


def test_ids_are_letters_digits_and_a_few_marks() -> None:
    for good in ("0f3c9e", "5e3b-uuid-with-dashes", "agent.7:job_2@host+x=y"):
        wire.check_id("message_id", good)
    for bad in ("a b", "m\nINFO forged", "../etc", "é", "tab\t"):
        err = _raises("MALFORMED", lambda bad=bad: wire.check_id("message_id", bad), "outside letters")
        assert "\n" not in err.message and "\t" not in err.message  # quoted escaped


def test_a_refused_message_keeps_no_buffer() -> None:
    """The sticky error is a fresh copy without traceback, and the plan (parsed header) is dropped."""
    frames = _frames(_encode(CONFIGS["fp16-full"]))
    asm = _asm()
    asm.feed_raw(wire.frame_bytes(frames[0]))
    bad = wire.pb.TransferFrame(protocol_version=1, chunk=wire.pb.Chunk(chunk_id=10**6, data=b"x"))
    with pytest.raises(wire.WireError) as first:
        asm.feed(bad)
    assert asm._plan is None and asm._error is not None and asm._error.__traceback__ is None
    assert (
        asm._error is not first.value and first.value.__context__ is not None
    )  # the raised copy chains it...
    assert first.value.__context__.__traceback__ is None  # ...without the frames it was raised in
    with pytest.raises(wire.WireError) as again:
        asm.feed(frames[1])
    assert again.value.code == first.value.code and asm.message_id == frames[0].header.message_id


def test_frames_after_the_message_and_second_header_are_refused() -> None:
    frames = _frames(_encode(CONFIGS["fp16-full"]))
    asm = _asm()
    _feed_all(asm, frames)
    _raises("ORDER", lambda: asm.feed(frames[0]), "after the message was complete")
    asm = _asm()
    asm.feed(frames[0])
    _raises("ORDER", lambda: asm.feed(frames[0]), "second header")


def test_cancel_drops_the_message() -> None:
    frames = _frames(_encode(CONFIGS["fp16-full"]))
    asm = _asm()
    _feed_all(asm, frames[:2])
    err = _raises("CANCELLED", lambda: asm.feed(wire.cancel_frame("user pressed ^C")), "user pressed ^C")
    assert err.status_code == grpc.StatusCode.CANCELLED
    _raises("CANCELLED", asm.finish)


# --- bad headers ------------------------------------------------------------------
def _tampered(config: Recipe, edit: Callable[[Any], None], chunk_bytes: int = 1 << 20) -> list[Any]:
    frames = _frames(_encode(config), chunk_bytes)
    header = _copy(frames[0])
    edit(header.header)
    return [header, *frames[1:]]


def test_wrong_fingerprint() -> None:
    frames = _frames(_encode(CONFIGS["fp16-full"]))
    err = _raises("FINGERPRINT", lambda: wire.Assembler("a" * 64, GEOM).feed(frames[0]), "'ffff", "'aaaa")
    assert err.status_code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda h: setattr(h.tensors[0].spec, "format", "int5"), "'int5'"),
        (lambda h: h.recipe.pipelines[0].stages[-1].params.__setitem__("format", "int5"), "'int5'"),
        (lambda h: setattr(h.recipe.select, "name", "magic"), "'magic'"),
        (lambda h: setattr(h.recipe.pipelines[1].stages[-1], "name", "tucker"), "'tucker'"),
        (lambda h: h.recipe.pipelines[0].stages[-1].params.__setitem__("axis", "diagonal"), "'diagonal'"),
    ],
    ids=["tensor-format", "recipe-format", "stage-name", "stage-name-2", "axis"],
)
def test_unknown_codec(edit: Callable[[Any], None], needle: str) -> None:
    """A stage or format this receiver does not know is UNKNOWN_CODEC; a known stage with parameters it
    refuses is MALFORMED. Either way, nothing of the message is kept."""
    frames = _tampered(CONFIGS["int4/int2-random-global"], edit)
    with pytest.raises(wire.WireError) as info:
        _asm().feed(frames[0])
    assert info.value.code in ("UNKNOWN_CODEC", "MALFORMED") and needle in info.value.message, info.value
    expected = (
        grpc.StatusCode.UNIMPLEMENTED
        if info.value.code == "UNKNOWN_CODEC"
        else grpc.StatusCode.INVALID_ARGUMENT
    )
    assert info.value.status_code == expected


def test_codec_the_receiver_does_not_list() -> None:
    frames = _frames(_encode(CONFIGS["int3/nf4-layer-g8"]))
    few = frozenset({"format:fp16", "format:int8", "select:random"})
    _raises("UNKNOWN_CODEC", lambda: _asm(capabilities=few).feed(frames[0]), "format:int3")
    zstd_frames = _frames(_encode(CONFIGS["int8-zstd"]))
    no_zstd = wire.local_capabilities() - {"zstd"}
    _raises("UNKNOWN_CODEC", lambda: _asm(capabilities=no_zstd).feed(zstd_frames[0]), "zstd")


def _bump_size(h: Any) -> None:
    h.payload[0].size += 1


def _bump_raw(h: Any) -> None:
    h.payload[0].raw_size += 2


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda h: h.tensors[2].shape.__setitem__(1, 7), "layer 1 k: shape"),
        (lambda h: h.tensors[3].stored_shape.__setitem__(2, 8), "stored shape"),
        (_bump_size, "chunks hold"),
        (_bump_raw, "raw size"),
        (lambda h: h.positions[0].__setattr__("count", 3), "declares 3 positions"),
        (lambda h: h.positions[0].__setattr__("data", h.positions[0].data[:-1]), "position set 0"),
        (lambda h: setattr(h, "length", T + 8), "position set 0"),
        (lambda h: h.tensors.pop(), "5 tensor entries"),
        (lambda h: setattr(h.geometry, "kv_heads", 4), "does not match the receiver's model"),
        (lambda h: h.payload.pop(), "missing from the payload table"),
    ],
    ids=["shape", "stored-shape", "table-size", "raw-size", "position-count",
         "position-bytes", "length", "tensor-count", "geometry", "table-row-missing"],
)  # fmt: skip
def test_shape_and_size_mismatch_with_header(edit: Callable[[Any], None], needle: str) -> None:
    frames = _tampered(CONFIGS["int4/int2-random-global"], edit)
    err = _raises("SHAPE", lambda: _asm().feed(frames[0]), needle)
    assert err.status_code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("field", "value"),
    [("group_size", 16), ("format", "int8"), ("axis", "token")],
    ids=["group", "format", "axis"],
)
def test_tensor_spec_must_follow_the_recipe(field: str, value: Any) -> None:
    frames = _tampered(CONFIGS["int4/int2-random-global"], lambda h: setattr(h.tensors[0].spec, field, value))
    err = _raises("MALFORMED", lambda: _asm().feed(frames[0]), "layer 0 k: spec", "does not match its recipe")
    assert err.status_code == grpc.StatusCode.INVALID_ARGUMENT


def test_zstd_part_larger_than_its_bound_is_refused() -> None:
    def inflate(h: Any) -> None:
        row = next(r for r in h.payload if r.zstd)
        row.size = wire.zstd_bound(row.raw_size) + 1

    frames = _tampered(CONFIGS["int8-zstd"], inflate)
    assert any(r.zstd for r in frames[0].header.payload)
    _raises("SHAPE", lambda: _asm().feed(frames[0]), "zstd bytes exceed the bound")


@pytest.mark.parametrize(
    ("limits", "needle"),
    [
        (wire.WireLimits(max_message_bytes=1000, max_chunk_bytes=1000), "message declares"),
        (wire.WireLimits(max_chunk_bytes=32), "chunk 0 declares"),
        (wire.WireLimits(max_length=T - 1), "context length"),
        (wire.WireLimits(max_layers=2), "num_layers 3"),
        (wire.WireLimits(max_decoded_bytes=1000), "decodes to"),
        (wire.WireLimits(max_header_bytes=100), "header has"),
        (wire.WireLimits(max_chunks=3), "chunks, the limit is 3"),
    ],
    ids=["message", "chunk", "length", "layers", "decoded", "header", "chunks"],
)
def test_over_limit_message(limits: wire.WireLimits, needle: str) -> None:
    frames = _frames(_encode(CONFIGS["int4/int2-random-global"]), 64)
    err = _raises("TOO_LARGE", lambda: _asm(limits=limits).feed(frames[0]), needle)
    assert err.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_malformed_protobuf_bytes() -> None:
    frames = _frames(_encode(CONFIGS["fp16-full"]))
    raw = wire.frame_bytes(frames[0])
    for junk in (b"\xff\xff\xff", raw[: len(raw) // 2], b"\x12\x80"):
        err = _raises("MALFORMED", functools.partial(wire.parse_frame, junk), "not a kvlink TransferFrame")
        assert err.status_code == grpc.StatusCode.INVALID_ARGUMENT
    asm = _asm()
    _raises("MALFORMED", lambda: asm.feed_raw(b"\xff\xff\xff"))
    _raises("MALFORMED", lambda: asm.feed(frames[0]))  # the failure sticks
    _raises("MALFORMED", lambda: wire.parse_signal(b"\xff\xff"))
    _raises("MALFORMED", lambda: wire.parse_hello(b"\x0a\x05ab"))
    # A well-formed frame without content, and an inconsistent table, are malformed too.
    _raises("MALFORMED", lambda: _asm().feed(_copy_empty(frames[0])), "none of header")
    bad_ids = _tampered(CONFIGS["fp16-full"], lambda h: setattr(h.payload[1], "chunk_id", 5))
    _raises("MALFORMED", lambda: _asm().feed(bad_ids[0]), "chunk id 5")


def _copy_empty(frame: Any) -> Any:
    empty = _copy(frame)
    empty.ClearField("header")
    return empty


def test_wrong_protocol_version() -> None:
    frames = _frames(_encode(CONFIGS["fp16-full"]))
    old = _copy(frames[0])
    old.protocol_version = 1
    err = _raises("PROTOCOL", lambda: _asm().feed(old), "version 1", "upgrade it")
    assert err.status_code == grpc.StatusCode.FAILED_PRECONDITION
    asm = _asm()
    asm.feed(frames[0])
    chunk = _copy(frames[1])
    chunk.protocol_version = 0
    _raises("PROTOCOL", lambda: asm.feed(chunk), "version 0")
    hello = wire.hello_to_proto(wire.Hello(FP))
    hello.protocol_version = 9
    _raises("PROTOCOL", lambda: wire.hello_from_proto(hello))


def test_trailer_disagreeing_with_the_header() -> None:
    frames = _frames(_encode(CONFIGS["fp16-full"]))
    trailer = _copy(frames[-1])
    trailer.trailer.payload_bytes += 1
    asm = _asm()
    _feed_all(asm, frames[:-1])
    _raises("MALFORMED", lambda: asm.feed(trailer), "trailer declares")


# --- handshake, questions, errors ----------------------------------------------------
def test_handshake_and_question_helpers_round_trip() -> None:
    hello = wire.Hello(FP, wire.local_capabilities(), "kvlink-send test")
    assert (
        wire.hello_from_proto(wire.parse_hello(wire.hello_to_proto(hello).SerializeToString()), FP) == hello
    )
    _raises("FINGERPRINT", lambda: wire.hello_from_proto(wire.hello_to_proto(hello), "b" * 64))
    assert {
        "format:int4",
        "format:int4cw",
        "select:q2c",
        "lowrank:svd",
        "sink",
        "rotate",
        "zstd",
    } <= hello.capabilities
    welcome = wire.Welcome(FP, wire.local_capabilities(), 1 << 29, 1 << 20, ("abc",), "tiny", GEOM)
    assert wire.welcome_from_proto(wire.welcome_to_proto(welcome), FP) == welcome
    assert (
        wire.welcome_from_proto(wire.welcome_to_proto(wire.Welcome(FP, welcome.capabilities, 1, 1))).geometry
        is None
    )
    ask = wire.Ask("s", "m", "Who?", 16, ("Ann", "Ann B."), {"prefill_s": 0.5})
    assert wire.ask_from_proto(wire.parse_ask(wire.ask_to_proto(ask).SerializeToString())) == ask
    sampled = wire.Ask("", "m", "Who?", 16, temperature=0.7, top_p=0.9, stop=("\n", "."))
    assert wire.ask_from_proto(wire.parse_ask(wire.ask_to_proto(sampled).SerializeToString())) == sampled
    assert sampled.options.temperature == 0.7 and ask.options.greedy  # unset options: greedy
    answer = wire.Answer(
        "m", "Ann", (1, 2, 3), {"decode_s": 0.1}, f1=1.0, exact_match=0.0, finish_reason="eos"
    )
    assert wire.answer_from_proto(wire.answer_to_proto(answer)) == answer
    assert wire.answer_from_proto(wire.answer_to_proto(wire.Answer("m", "x"))).f1 is None
    release = wire.Release("", "m")
    assert (
        wire.release_from_proto(wire.parse_release(wire.release_to_proto(release).SerializeToString()))
        == release
    )
    released = wire.Released("m", 1234)
    assert wire.released_from_proto(wire.released_to_proto(released)) == released
    _raises(
        "MALFORMED",
        lambda: wire.release_from_proto(wire.release_to_proto(wire.Release("s", ""))),
        "message_id",
    )


@pytest.mark.parametrize(
    ("change", "code", "needle"),
    [
        ({"question": "  "}, "MALFORMED", "question is empty"),
        ({"max_new_tokens": 0}, "MALFORMED", "max_new_tokens"),
        ({"max_new_tokens": 10**6}, "MALFORMED", "max_new_tokens"),
        ({"question": "x" * 70000}, "TOO_LARGE", "70000 bytes"),
        ({"session_id": "a b"}, "MALFORMED", "session_id"),
        ({"message_id": ""}, "MALFORMED", "message_id is empty"),
        ({"reference_answers": ("a",) * 65}, "TOO_LARGE", "65 reference answers"),
        ({"temperature": -1.0}, "MALFORMED", "temperature must be in"),
        ({"top_p": 0.5}, "MALFORMED", "needs sampling"),
        ({"stop": ("",)}, "MALFORMED", "stop string"),
    ],
)
def test_ask_is_validated(change: dict[str, Any], code: str, needle: str) -> None:
    ask = wire.Ask(**{**wire.Ask("s", "m", "Who?", 16).__dict__, **change})
    _raises(code, lambda: wire.ask_from_proto(wire.ask_to_proto(ask)), needle)


def test_error_codes_map_to_grpc_statuses() -> None:
    assert set(wire.GRPC_STATUS) == set(wire.ERROR_CODES)
    for code in wire.ERROR_CODES:
        assert isinstance(wire.grpc_status(code), grpc.StatusCode)
    with pytest.raises(ValueError, match="unknown wire error code"):
        wire.WireError("OOPS", "x")
    signal = wire.error_signal(wire.WireError("SHAPE", "bad shape"))
    assert wire.read_signal(signal) == wire.RemoteError("SHAPE", "bad shape")
    outbox = wire.Outbox(_frames(_encode(CONFIGS["fp16-full"])))
    _raises("SHAPE", lambda: outbox.handle(signal), "bad shape")


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        wire.WireLimits(max_chunk_bytes=0)
    with pytest.raises(ValueError, match="exceeds max_message_bytes"):
        wire.WireLimits(max_message_bytes=10, max_chunk_bytes=20)
    with pytest.raises(ValueError, match="max_layers"):
        wire.WireLimits(max_layers=True)
    options = dict(wire.WireLimits().grpc_options())
    assert options["grpc.max_receive_message_length"] >= (1 << 20)
    with pytest.raises(ValueError, match="chunk_bytes"):
        _frames(_encode(CONFIGS["fp16-full"]), 0)


# --- over gRPC (loopback) ------------------------------------------------------------
class _Servicer:
    """The smallest receiver: Transfer through an Assembler; errors become statuses with the code attached."""

    def Hello(self, request: bytes, context: grpc.ServicerContext) -> Any:
        try:
            hello = wire.hello_from_proto(wire.parse_hello(request), FP)
        except wire.WireError as err:
            _abort(context, err)
        return wire.welcome_to_proto(
            wire.Welcome(hello.fingerprint, wire.local_capabilities(), 1 << 29, 1 << 20)
        )

    def Transfer(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        asm = wire.Assembler(FP, GEOM)
        try:
            for raw in requests:
                yield from asm.feed_raw(raw)
                if asm.complete:
                    break
            _, receipt = asm.finish()
        except wire.WireError as err:
            yield wire.error_signal(err)
            _abort(context, err)
        yield wire.receipt_signal(receipt)[1]

    def Ask(self, request: bytes, context: grpc.ServicerContext) -> Any:
        ask = wire.ask_from_proto(wire.parse_ask(request))
        return wire.answer_to_proto(wire.Answer(ask.message_id, "42"))


def _abort(context: grpc.ServicerContext, err: wire.WireError) -> None:
    context.set_trailing_metadata(((wire.ERROR_METADATA_KEY, err.code),))
    context.abort(err.status_code, err.message)


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=wire.WireLimits().grpc_options())
    server.add_generic_rpc_handlers((wire.raw_rpc_handler(_Servicer()),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(grace=None)


def test_transfer_over_grpc_loopback(channel: grpc.Channel) -> None:
    stub = wire.KVLinkStub(channel)
    welcome = wire.welcome_from_proto(stub.Hello(wire.hello_to_proto(wire.Hello(FP)), timeout=10), FP)
    encoded = _encode(CONFIGS["int3/nf4-layer-g8"])
    frames = wire.to_frames(encoded, "s", "m", FP, min(welcome.max_chunk_bytes, 256))
    outbox = wire.Outbox(frames)
    for signal in stub.Transfer(iter(frames), timeout=30):
        assert outbox.handle(signal) == []
    assert outbox.receipt is not None
    expected = wire.message_wire_size(encoded, "s", "m", FP, 256)
    assert outbox.receipt.payload + outbox.receipt.metadata + outbox.receipt.framing == expected.frames
    assert outbox.receipt.total <= expected.total
    answer = wire.answer_from_proto(stub.Ask(wire.ask_to_proto(wire.Ask("s", "m", "Who?", 4)), timeout=10))
    assert answer.text == "42"


def test_errors_over_grpc_carry_status_and_code(channel: grpc.Channel) -> None:
    raw_transfer = channel.stream_stream(wire.TRANSFER_METHOD, response_deserializer=wire.parse_signal)
    with pytest.raises(grpc.RpcError) as info:
        list(raw_transfer(iter([b"\xff\xff\xff"]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = wire.error_from_rpc(info.value)
    assert err is not None and err.code == "MALFORMED" and "TransferFrame" in err.message
    frames = _frames(_encode(CONFIGS["fp16-full"]))
    with pytest.raises(grpc.RpcError) as info:
        list(wire.KVLinkStub(channel).Transfer(iter(frames[:-1]), timeout=10))  # no trailer
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert (wire.error_from_rpc(info.value) or wire.WireError("ORDER", "")).code == "TRUNCATED"
    with pytest.raises(grpc.RpcError) as info:
        wire.KVLinkStub(channel).Hello(wire.hello_to_proto(wire.Hello("b" * 64)), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("where", ["header", "recipe", "stage", "tensor-spec", "payload-entry"])
def test_unknown_header_fields_are_refused(where: str) -> None:
    """A field this receiver's .proto lacks (a newer sender's codec option) is refused, never ignored."""
    extra = bytes([0xF8, 0x06, 0x01])  # field 111, varint 1: no kvlink message defines it
    frames = _frames(_encode(CONFIGS["int4/int2-random-global"]))
    header = frames[0].header
    target = {"header": header, "recipe": header.recipe, "stage": header.recipe.pipelines[0].stages[0],
              "tensor-spec": header.tensors[3].spec, "payload-entry": header.payload[2]}[where]  # fmt: skip
    target.MergeFromString(extra)
    tampered = wire.parse_frame(wire.frame_bytes(frames[0]))
    err = _raises("UNKNOWN_CODEC", lambda: _asm().feed(tampered), "[111]", "newer kvlink sender")
    assert err.status_code == grpc.StatusCode.UNIMPLEMENTED
    good = _frames(_encode(CONFIGS["int4/int2-random-global"]))  # the same receiver config takes a good one
    _feed_all(_asm(), good)


@pytest.mark.parametrize("chunk_id", [0, 1, 127, 128, 16_383, 16_384, 65_535])
@pytest.mark.parametrize("n", [0, 1, 127, 128, 16_383, 16_384, 1 << 20])
def test_chunk_frame_size_without_building_the_frame(chunk_id: int, n: int) -> None:
    """message_wire_size sizes chunk frames arithmetically: the same bytes as the frame serialized, a
    zero CRC32C (left out by proto3) 5 bytes fewer."""
    for crc in (0x1234ABCD, 0):
        frame = wire.pb.TransferFrame(
            protocol_version=wire.PROTOCOL_VERSION,
            chunk=wire.pb.Chunk(chunk_id=chunk_id, data=bytes(n), crc32c=crc),
        )
        assert wire.chunk_frame_size(chunk_id, n, crc) == wire.frame_size(frame)
    assert wire.chunk_frame_size(chunk_id, n, 0) == wire.chunk_frame_size(chunk_id, n) - 5


_ONE_MESSAGE = """
import hashlib, sys, torch
from kvlink import wire
from kvlink.cache import ContextKV
from kvlink.codec import Codec
from kvlink.models import Geometry
from kvlink.recipe import Recipe
torch.manual_seed(0)
T = 24
kv = ContextKV([torch.randn(2, T, 64) for _ in range(3)], [torch.randn(2, T, 64) for _ in range(3)], [torch.arange(T)] * 3, T)
recipe = Recipe.from_name("q2c50%+kint4c/vint3t-g64+sink1+zstd3")
encoded = Codec(recipe, Geometry(3, 2, 64, 4)).encode_kv(kv, [torch.arange(0, T, 2)] * 3)
frames = wire.to_frames(encoded, "s" * 32, "m" * 32, "fingerprint", 256)
sys.stdout.write(hashlib.sha256(b"".join(wire.frame_bytes(f) for f in frames)).hexdigest())
"""


def test_one_message_is_the_same_bytes_in_every_process() -> None:
    # A header's stage params are a protobuf map, whose default order differs between processes; kvlink
    # sends frames serialized deterministically, and the trailer's CRC is over those bytes.
    digests = set()
    for seed in ("1", "2", "3"):
        out = subprocess.run(
            [sys.executable, "-c", _ONE_MESSAGE], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )  # fmt: skip
        digests.add(out.stdout.strip())
    assert len(digests) == 1 and len(next(iter(digests))) == 64
