"""One KV message as frames, and the exact bytes of everything on the wire.

to_frames makes a Transfer's frames: a Header, the chunks layer by layer (a part longer than the
chunk size spans several chunks) and a Trailer. The sizes are exact and computed the way the frames
are made: frame_size and signal_size (gRPC's 5-byte prefix included), message_wire_size (a
message's WireSize without building its chunks, for the budget planner), frames_wire_size (of the
frames themselves), http2_overhead (the HTTP/2 bytes around them), and receipt_signal, which seals a
Receipt so that it counts its own signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Final

import google_crc32c

from kvlink import positions as pos_codec
from kvlink.codec import PAYLOAD_PARTS, EncodedKV
from kvlink.models import Geometry
from kvlink.recipe import KINDS, Pipeline, Recipe
from kvlink.stages import Stage
from kvlink.wire._common import (
    _KIND_TO_PB,
    _PART_FROM_PB,
    _PART_TO_PB,
    _POS_TO_PB,
    PROTOCOL_VERSION,
    _geometry_to_pb,
    pb,
)
from kvlink.wire.messages import Receipt, _ack_signal, receipt_to_proto
from kvlink.wire.segments import Segment, segment_to_pb

# --- constants --------------------------------------------------------------------------------
GRPC_PREFIX_BYTES: Final = 5
"""gRPC length-prefixed message framing: 1 compressed-flag byte + 4 length bytes per message."""
HTTP2_FRAME_HEADER_BYTES: Final = 9
HTTP2_MAX_FRAME_BYTES: Final = 16384
"""The default SETTINGS_MAX_FRAME_SIZE: one DATA frame carries at most this many bytes."""
HTTP2_WINDOW_UPDATE_BYTES: Final = 13
HTTP2_RPC_ALLOWANCE: Final = 1024
HTTP2_CONNECTION_ALLOWANCE: Final = 512
"""Fixed bytes per RPC for what is not DATA: request HEADERS (method path, authority, content-type,
user-agent, te, grpc-* headers; ~300 bytes before HPACK), response HEADERS and trailers (grpc-status,
grpc-message), and a share of SETTINGS/PING frames. Conservative: HPACK usually makes them smaller."""
RECEIPT_ALLOWANCE: Final = 1280
"""Upper bound of one Receipt signal's bytes (with its 5-byte prefix), given the limits receipt_signal
enforces: a message id of at most 128 characters and at most 16 timings with keys of at most 32
characters. The planner counts it as signaling before the receipt exists."""
MAX_RECEIPT_TIMINGS: Final = 16
MAX_TIMING_KEY_CHARS: Final = 32
PART_ORDER: Final = ("codes", "scale", "zero", "basis", "sink", "widths", "shifts")
"""Order of an EncodedTensor's parts on the wire."""


# --- sizes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WireSize:
    """Bytes of one message on the wire by category (gRPC 5-byte prefixes included, HTTP/2 not).

    payload: codes chunk data. positions/scales/factors: metadata (position sets in the header;
    scale/zero and basis chunk data). framing: every other byte of the frames (protobuf tags and
    lengths, header fields, payload table, trailer, gRPC prefixes). frames = payload + metadata +
    framing is exact: the sum of ByteSize() + 5 over the frames. signaling is the receiver's side:
    exact for the acks of a transfer without retransmits, plus RECEIPT_ALLOWANCE for the receipt.
    """

    payload: int
    positions: int
    scales: int
    factors: int
    framing: int
    signaling: int = 0

    @property
    def metadata(self) -> int:
        return self.positions + self.scales + self.factors

    @property
    def frames(self) -> int:
        return self.payload + self.metadata + self.framing

    @property
    def total(self) -> int:
        return self.frames + self.signaling

    def as_dict(self) -> dict[str, int]:
        return {
            "payload": self.payload, "metadata": self.metadata, "positions": self.positions,
            "scales": self.scales, "factors": self.factors, "framing": self.framing,
            "signaling": self.signaling, "frames": self.frames, "total": self.total,
        }  # fmt: skip


def frame_size(frame: pb.TransferFrame) -> int:
    """Bytes of one frame on the wire: serialized message + the gRPC length prefix."""
    return frame.ByteSize() + GRPC_PREFIX_BYTES


def signal_size(signal: pb.Signal) -> int:
    """Bytes of one signal (ack, nack, receipt, error) on the wire, gRPC prefix included."""
    return signal.ByteSize() + GRPC_PREFIX_BYTES


def http2_overhead(n_frames: int, total_bytes: int, rpcs: int = 1, n_signals: int = 0) -> int:
    """Upper bound of the HTTP/2 bytes, both directions, around one message's gRPC traffic.

    Measured at the socket (tests/test_server.py), a transfer carries besides its gRPC messages:
    - a 9-byte DATA frame header per DATA frame; a message of m bytes takes at most
      1 + ceil(m / 16384) frames, so n_frames + ceil(total / 16384) bounds them all;
    - WINDOW_UPDATE frames (13 bytes) from the receiving side, up to one for the stream and one
      for the connection per DATA frame received (grpc's BDP probing updates eagerly);
    - per signal (ack, nack, receipt) the same: a DATA header and up to two window updates;
    - per RPC, HEADERS and trailers (HTTP2_RPC_ALLOWANCE); per connection, the preface,
      SETTINGS and their acks, PING pairs and a possible RST_STREAM (HTTP2_CONNECTION_ALLOWANCE).
    The planner adds this to a WireSize so that bytes measured at the socket stay under budget.
    """
    if n_frames < 0 or total_bytes < 0 or rpcs < 0 or n_signals < 0:
        raise ValueError(
            f"counts must be >= 0, got n_frames={n_frames!r}, total_bytes={total_bytes!r}, "
            f"rpcs={rpcs!r}, n_signals={n_signals!r}"
        )
    per_frame = HTTP2_FRAME_HEADER_BYTES + 2 * HTTP2_WINDOW_UPDATE_BYTES
    data_frames = n_frames + math.ceil(total_bytes / HTTP2_MAX_FRAME_BYTES)
    return per_frame * (data_frames + n_signals) + HTTP2_RPC_ALLOWANCE * rpcs + HTTP2_CONNECTION_ALLOWANCE


class _Tally:
    """Byte categories of frames as they are sent or received."""

    def __init__(self) -> None:
        self.payload = self.positions = self.scales = self.factors = self.framing = self.signaling = 0

    def header(self, frame: pb.TransferFrame) -> None:
        positions = sum(len(p.data) for p in frame.header.positions)
        self.positions += positions
        self.framing += frame_size(frame) - positions

    def chunk(
        self, frame: pb.TransferFrame | None, part: str | None, sizes: tuple[int, int] | None = None
    ) -> None:
        """sizes: (frame bytes on the wire, data bytes) when the caller knows them (no re-serializing)."""
        if sizes is None:
            assert frame is not None
            sizes = (frame_size(frame), len(frame.chunk.data))
        wire_bytes, data = sizes
        n = data if part is not None else 0
        if part in PAYLOAD_PARTS:  # codes and fp16 sink entries: the data itself, as Codec sizes count it
            self.payload += n
        elif part == "basis":
            self.factors += n
        elif part is not None:
            self.scales += n
        self.framing += wire_bytes - n

    def other(self, frame: pb.TransferFrame) -> None:
        self.framing += frame_size(frame)


def ack_signals(header: pb.Header) -> list[pb.Signal]:
    """The Acks a receiver sends for `header`'s message when nothing needs retransmitting."""
    by_layer: dict[int, list[int]] = {}
    for entry in header.payload:
        by_layer.setdefault(entry.layer, []).append(entry.chunk_id)
    return [_ack_signal(layer, ids) for layer, ids in sorted(by_layer.items())]


def frames_wire_size(frames: Sequence[pb.TransferFrame]) -> WireSize:
    """Byte categories of the frames of one message (from to_frames); see WireSize."""
    if not frames or frames[0].WhichOneof("frame") != "header":
        raise ValueError("frames must start with the message's header frame")
    header = frames[0].header
    parts = [_PART_FROM_PB.get(e.part) for e in header.payload]
    tally = _Tally()
    for frame in frames:
        kind = frame.WhichOneof("frame")
        if kind == "header":
            tally.header(frame)
        elif kind == "chunk":
            cid = frame.chunk.chunk_id
            tally.chunk(frame, parts[cid] if cid < len(parts) else None)
        else:
            tally.other(frame)
    signaling = sum(signal_size(s) for s in ack_signals(header)) + RECEIPT_ALLOWANCE
    return WireSize(tally.payload, tally.positions, tally.scales, tally.factors, tally.framing, signaling)


CRC_PLACEHOLDER: Final = 0xFFFFFFFF
"""A nonzero CRC32C stand-in for sizing: a fixed32 field takes 5 bytes unless it is 0 (proto3 omits zeros)."""


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def chunk_frame_size(chunk_id: int, n: int, crc32c: int = CRC_PLACEHOLDER) -> int:
    """Bytes on the wire (gRPC prefix included) of the TransferFrame carrying chunk `chunk_id` of `n`
    data bytes: what frame_size() of to_frames' frame gives, without building it. Every field number
    here is below 16 (one-byte tags) and proto3 leaves out zero values."""
    inner = (1 + _varint_size(chunk_id) if chunk_id else 0) + (1 + _varint_size(n) + n if n else 0)
    inner += 5 if crc32c else 0
    version = 1 + _varint_size(PROTOCOL_VERSION) if PROTOCOL_VERSION else 0
    return GRPC_PREFIX_BYTES + version + 1 + _varint_size(inner) + inner


def message_wire_size(
    encoded: EncodedKV, session_id: str, message_id: str, fingerprint: str, chunk_bytes: int
) -> WireSize:
    """Bytes of `encoded` on the wire as to_frames would send it (see WireSize), computed without
    building the chunk frames: no copy of the data and no checksum, so sizing a message costs the
    header alone whatever its length (the planner sizes every candidate it encodes). Exact, but
    for a chunk (or header) whose CRC32C is 0, which proto3 leaves out: the real frames are then 5
    bytes smaller (1 chance in 2^32 per chunk), never larger."""
    header, pieces = _header(encoded, session_id, message_id, fingerprint, chunk_bytes, None)
    header_frame = pb.TransferFrame(protocol_version=PROTOCOL_VERSION, header=header)
    tally = _Tally()
    tally.header(header_frame)
    for cid, (_, name, _, n) in enumerate(pieces):
        size = chunk_frame_size(cid, n)
        tally.chunk(None, name, (size, n))
    payload = sum(n for _, _, _, n in pieces)
    trailer = pb.TransferFrame(
        protocol_version=PROTOCOL_VERSION,
        trailer=pb.Trailer(chunk_count=len(pieces), payload_bytes=payload, header_crc32c=CRC_PLACEHOLDER),
    )
    tally.other(trailer)
    signaling = sum(signal_size(s) for s in ack_signals(header)) + RECEIPT_ALLOWANCE
    return WireSize(tally.payload, tally.positions, tally.scales, tally.factors, tally.framing, signaling)


def receipt_signal(receipt: Receipt) -> tuple[Receipt, pb.Signal]:
    """Seal a receipt: its signaling bytes then include the receipt's own signal. Returns both.

    Raises ValueError when the receipt could exceed RECEIPT_ALLOWANCE (too many or too long timings).
    """
    if len(receipt.message_id) > 128:
        raise ValueError(f"receipt message_id has {len(receipt.message_id)} characters, at most 128 fit")
    if len(receipt.timings) > MAX_RECEIPT_TIMINGS or any(
        len(k) > MAX_TIMING_KEY_CHARS for k in receipt.timings
    ):
        raise ValueError(
            f"a receipt carries at most {MAX_RECEIPT_TIMINGS} timings with keys of at most "
            f"{MAX_TIMING_KEY_CHARS} characters, got {sorted(receipt.timings)}"
        )
    own = 0
    while True:  # the size grows with the value it reports; this fixed point is reached in 2-3 steps
        sealed = replace(receipt, signaling=receipt.signaling + own)
        signal = pb.Signal(protocol_version=PROTOCOL_VERSION, receipt=receipt_to_proto(sealed))
        size = signal_size(signal)
        if size == own:
            return sealed, signal
        own = size


# --- sender side: frames ----------------------------------------------------------------------
def _stage_to_pb(stage: Stage) -> pb.Stage:
    return pb.Stage(name=stage.name, params=stage.params())


def recipe_to_pb(recipe: Recipe) -> pb.Recipe:
    """The recipe as stages: one TensorPipeline per distinct pipeline of each kind, with its layers."""
    msg = pb.Recipe()
    if recipe.select is not None:
        msg.select.CopyFrom(_stage_to_pb(recipe.select))
    for kind in KINDS:
        layers = recipe.k if kind == "k" else recipe.v
        if len(layers) == 1:
            msg.pipelines.add(kind=_KIND_TO_PB[kind], stages=[_stage_to_pb(s) for s in layers[0]])
            continue
        served: dict[Pipeline, list[int]] = {}
        for layer, pipeline in enumerate(layers):
            served.setdefault(pipeline, []).append(layer)
        for pipeline, ids in served.items():
            msg.pipelines.add(kind=_KIND_TO_PB[kind], layers=ids, stages=[_stage_to_pb(s) for s in pipeline])
    if recipe.zstd is not None:
        msg.zstd.CopyFrom(_stage_to_pb(recipe.zstd))
    if recipe.ans is not None:
        msg.ans.CopyFrom(_stage_to_pb(recipe.ans))
    return msg


def to_frames(
    encoded: EncodedKV,
    session_id: str,
    message_id: str,
    fingerprint: str,
    chunk_bytes: int,
    segment: Segment | None = None,
) -> list[pb.TransferFrame]:
    """The frames of one Transfer: [Header, Chunk 0, ..., Chunk N-1, Trailer].

    Chunks follow the tensors' order (layer 0 K, layer 0 V, layer 1 K, ...) and, within a
    tensor, PART_ORDER; a part longer than `chunk_bytes` is split into consecutive chunks.
    Chunk i is frames[i + 1], which is what a Nack for chunk i asks to be sent again. The trailer
    carries the CRC32C of the header frame's bytes, so the receiver verifies the header too.
    """
    chunks: list[pb.TransferFrame] = []

    def add(cid: int, data: bytes, crc: int) -> None:
        chunks.append(
            pb.TransferFrame(
                protocol_version=PROTOCOL_VERSION, chunk=pb.Chunk(chunk_id=cid, data=data, crc32c=crc)
            )
        )

    header, _ = _header(encoded, session_id, message_id, fingerprint, chunk_bytes, add)
    if segment is not None:
        header.segment.CopyFrom(segment_to_pb(segment))
    return _framed(header, chunks)


def text_frames(
    session_id: str, message_id: str, fingerprint: str, geometry: Geometry, segment: Segment
) -> list[pb.TransferFrame]:
    """The frames of a text segment: a Header carrying its token ids (the receiver recomputes their KV
    after the earlier segments'), no chunk, and the Trailer."""
    if not segment.token_ids:
        raise ValueError("a text segment needs its token ids")
    header = pb.Header(
        session_id=session_id, message_id=message_id, fingerprint=fingerprint,
        geometry=_geometry_to_pb(geometry), length=len(segment.token_ids), segment=segment_to_pb(segment),
    )  # fmt: skip
    return _framed(header, [])


def frame_bytes(frame: pb.TransferFrame) -> bytes:
    """A frame as kvlink sends it: serialized deterministically (map entries, such as a stage's params, in
    key order; the default order varies between processes), so one message is the same bytes in every
    process. The trailer's header CRC is over these bytes: whatever sends frames sends these."""
    return frame.SerializeToString(deterministic=True)


def _framed(header: pb.Header, chunks: list[pb.TransferFrame]) -> list[pb.TransferFrame]:
    """[Header, *chunks, Trailer], the trailer checking the header frame's bytes (frame_bytes)."""
    header_frame = pb.TransferFrame(protocol_version=PROTOCOL_VERSION, header=header)
    trailer = pb.Trailer(
        chunk_count=len(chunks),
        payload_bytes=sum(e.size for e in header.payload),
        header_crc32c=google_crc32c.value(frame_bytes(header_frame)),
    )
    return [header_frame, *chunks, pb.TransferFrame(protocol_version=PROTOCOL_VERSION, trailer=trailer)]


def _header(
    encoded: EncodedKV,
    session_id: str,
    message_id: str,
    fingerprint: str,
    chunk_bytes: int,
    add: Callable[[int, bytes, int], None] | None,
) -> tuple[pb.Header, list[tuple[int, str, int, int]]]:
    """The Header of `encoded`'s message and its chunks as (tensor index, part, offset, size).

    add(chunk_id, data, crc32c) gets each chunk's bytes, in order; without it no chunk is copied or
    checksummed, and the payload table carries CRC_PLACEHOLDER (for sizing: message_wire_size).
    """
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or not 1 <= chunk_bytes < 1 << 32:
        raise ValueError(f"chunk_bytes must be an integer in [1, 2**32), got {chunk_bytes!r}")
    for name, value in (("session_id", session_id), ("message_id", message_id), ("fingerprint", fingerprint)):
        if not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    g = encoded.geometry
    if len(encoded.tensors) != 2 * g.num_layers:
        raise ValueError(
            f"expected {2 * g.num_layers} tensors (K and V per layer), got {len(encoded.tensors)}"
        )
    header = pb.Header(
        session_id=session_id,
        message_id=message_id,
        fingerprint=fingerprint,
        geometry=_geometry_to_pb(g),
        length=encoded.length,
        recipe=recipe_to_pb(encoded.recipe),
        profile_hash=encoded.profile_hash or "",
    )
    for enc, data, count in encoded.positions:
        if enc not in _POS_TO_PB:
            raise ValueError(f"unknown position encoding {enc!r}; expected one of {pos_codec.ENCODINGS}")
        header.positions.add(encoding=_POS_TO_PB[enc], data=data, count=count)
    pieces: list[tuple[int, str, int, int]] = []
    for index, t in enumerate(encoded.tensors):
        header.tensors.add(
            layer=t.layer, kind=_KIND_TO_PB[t.kind], shape=t.shape, stored_shape=t.stored,
            spec=pb.QuantSpec(format=t.spec.format, group_size=t.spec.group_size, axis=t.spec.axis),
        )  # fmt: skip
        unknown = set(t.parts) - set(PART_ORDER)
        if unknown:
            raise ValueError(
                f"layer {t.layer} {t.kind}: unknown parts {sorted(unknown)}; known: {PART_ORDER}"
            )
        for name in (n for n in PART_ORDER if n in t.parts):
            part = t.parts[name]
            view = memoryview(part.data)
            for start in range(0, max(len(view), 1), chunk_bytes):
                size = min(chunk_bytes, len(view) - start)
                cid = len(pieces)
                crc = CRC_PLACEHOLDER
                if add is not None:
                    piece = bytes(view[start : start + size])
                    crc = google_crc32c.value(piece)
                    add(cid, piece, crc)
                header.payload.add(
                    chunk_id=cid, layer=t.layer, kind=_KIND_TO_PB[t.kind], part=_PART_TO_PB[name],
                    size=size, raw_size=part.raw_size, zstd=part.zstd, crc32c=crc,
                )  # fmt: skip
                pieces.append((index, name, start, size))
    return header, pieces


def cancel_frame(reason: str) -> pb.TransferFrame:
    """A frame that abandons the message in flight."""
    return pb.TransferFrame(protocol_version=PROTOCOL_VERSION, cancel=pb.Cancel(reason=reason[:256]))
