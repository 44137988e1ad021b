"""The wire: protobuf framing, chunking, checksums and validation of one KV message.

proto/kvlink/v2/kvlink.proto is the contract; this is the only module that
imports the stubs generated from it (they are generated on first import when a
source checkout lacks them). Everything else, server/ and client/ included,
works with the domain objects of kvlink.codec and the plain dataclasses below.

Primitives, and which side calls them:

    sender (client/)                          receiver (server/)
    hello_to_proto(Hello)          ──Hello──►  hello_from_proto(msg, fingerprint)
    welcome_from_proto(msg)      ◄──Welcome──  welcome_to_proto(Welcome)
    frames = to_frames(encoded, ...)           asm = Assembler(fingerprint, geometry, limits)
    outbox = Outbox(frames)       ──frames──►  signals = asm.feed(frame) (or parse_frame(raw))
    outbox.handle(signal) -> resends ◄─acks──  (Ack per layer, Nack per damaged chunk)
                                               encoded, receipt = asm.finish()
    outbox.receipt               ◄─receipt──   receipt, signal = receipt_signal(receipt)
    ask_to_proto(Ask)              ──Ask────►  ask_from_proto(msg, limits)
    answer_from_proto(msg)        ◄─Answer──   answer_to_proto(Answer)
    release_to_proto(Release)     ──Release──► release_from_proto(msg, limits)
    released_from_proto(msg)     ◄─Released──  released_to_proto(Released)
    message_wire_size(encoded, ...), http2_overhead(...): exact bytes for the budget planner.

A message on the wire (one Transfer call): a Header (ids, fingerprint,
geometry, T, the recipe as stages, kept positions, per-tensor entries, and a payload
table with the size and CRC32C of every chunk), then the chunks layer by layer
(K parts then V parts of each layer; a part longer than the chunk size spans
several chunks), then a Trailer (with the CRC32C of the header frame). The
receiver validates the whole header against its model and its WireLimits
before it keeps a single chunk byte, and checks every chunk's size and CRC32C
against the table: a damaged chunk is asked for again (Nack) up to
`max_chunk_retries` times; a damaged header fails the trailer's check
(CORRUPT). Chunks may arrive in any order; one received intact twice is
refused (ORDER). Only a complete, verified message becomes an EncodedKV; any
failure raises WireError, whose code maps to a gRPC status (GRPC_STATUS).
A header field this side's .proto does not define is refused (UNKNOWN_CODEC),
never skipped: a newer sender's codec option must not be decoded without it; so
is a stage this receiver does not decode (its capabilities, kvlink.capabilities).
Protocol version 2 (2026-12) carries the recipe as stages; a version-1 peer is
refused at its Hello with a readable PROTOCOL error (legacy_rpc_handler).
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

import google_crc32c
import grpc
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from kvlink import capabilities as caps
from kvlink import positions as pos_codec
from kvlink.answer import GenerationOptions
from kvlink.codec import PAYLOAD_PARTS, EncodedKV, EncodedTensor, Part, stored_shape
from kvlink.errors import NotRegistered
from kvlink.models import Geometry
from kvlink.quant import AXES, BITS, QuantSpec
from kvlink.recipe import KINDS, Pipeline, Recipe
from kvlink.select import keep_count
from kvlink.stages import Quantize, Select, Stage, Zstd, stage_class

logger = logging.getLogger(__name__)


# --- generated stubs ---------------------------------------------------------
def _load_stubs() -> tuple[ModuleType, ModuleType]:
    """Import kvlink._proto.kvlink_pb2{,_grpc}, generating them first when missing or older than the proto."""
    from kvlink._proto import build

    stub = build.PACKAGE_DIR / "kvlink_pb2.py"
    missing = not stub.is_file() or not (build.PACKAGE_DIR / "kvlink_pb2_grpc.py").is_file()
    stale = (
        (not missing)
        and build.PROTO_FILE.is_file()
        and stub.stat().st_mtime < build.PROTO_FILE.stat().st_mtime
    )
    if missing or stale:
        logger.info(
            "%s protobuf stubs: generating from %s", "missing" if missing else "stale", build.PROTO_FILE
        )
        try:
            build.generate()
        except (OSError, RuntimeError) as exc:
            if missing:
                raise ImportError(
                    f"kvlink's protobuf stubs are missing and could not be generated: {exc}"
                ) from exc
            logger.warning("could not regenerate stale protobuf stubs (%s); using the existing ones", exc)
        importlib.invalidate_caches()
    return (
        importlib.import_module("kvlink._proto.kvlink_pb2"),
        importlib.import_module("kvlink._proto.kvlink_pb2_grpc"),
    )


if TYPE_CHECKING:
    from kvlink._proto import kvlink_pb2 as pb
    from kvlink._proto import kvlink_pb2_grpc as pb_grpc
else:
    pb, pb_grpc = _load_stubs()


# --- constants -----------------------------------------------------------------
PROTOCOL_VERSION: Final = 2
SERVICE_NAME: Final = "kvlink.v2.KVLink"
LEGACY_SERVICE_NAME: Final = "kvlink.v1.KVLink"
"""Version 1's service: its Hello is answered with a PROTOCOL error that says what to upgrade."""
HELLO_METHOD: Final = f"/{SERVICE_NAME}/Hello"
TRANSFER_METHOD: Final = f"/{SERVICE_NAME}/Transfer"
ASK_METHOD: Final = f"/{SERVICE_NAME}/Ask"
RELEASE_METHOD: Final = f"/{SERVICE_NAME}/Release"

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

ERROR_CODES: Final = (
    "PROTOCOL",  # wrong protocol version
    "FINGERPRINT",  # the sender's model is not the receiver's
    "UNKNOWN_CODEC",  # a format, selector, low-rank mode or profile the receiver cannot decode
    "SHAPE",  # geometry, counts, shapes or sizes disagree with the model or with each other
    "TOO_LARGE",  # over a WireLimits bound
    "CORRUPT",  # a chunk failed verification more than max_chunk_retries times
    "TRUNCATED",  # the stream ended before the message was complete
    "ORDER",  # a frame the stream's state does not allow (chunk before header, duplicate, ...)
    "MALFORMED",  # not a valid protobuf, or fields that contradict the protocol
    "CANCELLED",  # the sender cancelled the message
    "STALLED",  # no frame arrived within the receiver's stall timeout; the message was dropped
    "BUSY",  # the receiver serves its maximum of concurrent calls (in all, or for this peer)
    "UNAUTHENTICATED",  # the call lacks the receiver's bearer token
    "EXISTS",  # this identity already has a message with these ids: ids are never reused or overwritten
    "DEADLINE",  # the message did not complete within the receiver's per-message deadline
    "UNAVAILABLE",  # something the receiver needs (its shared store) is unreachable now; retry later
)
GRPC_STATUS: Final[dict[str, str]] = {
    "PROTOCOL": "FAILED_PRECONDITION",
    "FINGERPRINT": "FAILED_PRECONDITION",
    "UNKNOWN_CODEC": "UNIMPLEMENTED",
    "SHAPE": "INVALID_ARGUMENT",
    "TOO_LARGE": "RESOURCE_EXHAUSTED",
    "CORRUPT": "DATA_LOSS",
    "TRUNCATED": "ABORTED",  # the whole message may be sent again
    "ORDER": "FAILED_PRECONDITION",
    "MALFORMED": "INVALID_ARGUMENT",
    "CANCELLED": "CANCELLED",
    "STALLED": "DEADLINE_EXCEEDED",
    "BUSY": "RESOURCE_EXHAUSTED",  # like TOO_LARGE, but worth retrying later
    "UNAUTHENTICATED": "UNAUTHENTICATED",
    "EXISTS": "ALREADY_EXISTS",
    "DEADLINE": "DEADLINE_EXCEEDED",
    "UNAVAILABLE": "UNAVAILABLE",
}
"""WireError code -> grpc.StatusCode name. The server also sets ERROR_METADATA_KEY in the trailing
metadata so that a client can tell codes that share a status apart (see error_from_rpc)."""
ERROR_METADATA_KEY: Final = "kvlink-error-code"

FRAME_ENVELOPE_BYTES: Final = 16
"""TransferFrame bytes around its header, chunk, trailer or cancel: version and the oneof's tag and length."""
_FRAME_FIELDS: Final = {2: "header", 3: "chunk", 4: "trailer", 5: "cancel"}
"""TransferFrame's oneof `frame`, by field number (proto/kvlink/v2/kvlink.proto)."""
_MAX_FRAME_FIELDS: Final = 8

ID_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@+=-")
"""What a session or message id may contain: letters, digits and ._:@+=- (no space, no control
character, nothing that could forge a log line or a path). A UUID's hex or its dashed form fits."""

_KIND_TO_PB: Final = {"k": pb.TENSOR_KIND_K, "v": pb.TENSOR_KIND_V}
_KIND_FROM_PB: Final = {v: k for k, v in _KIND_TO_PB.items()}
PART_ORDER: Final = ("codes", "scale", "zero", "basis", "sink", "widths")
"""Order of an EncodedTensor's parts on the wire."""
_PART_TO_PB: Final = {
    "codes": pb.PART_KIND_CODES,
    "scale": pb.PART_KIND_SCALE,
    "zero": pb.PART_KIND_ZERO,
    "basis": pb.PART_KIND_BASIS,
    "sink": pb.PART_KIND_SINK,
    "widths": pb.PART_KIND_WIDTHS,
}
_PART_FROM_PB: Final = {v: k for k, v in _PART_TO_PB.items()}
_POS_TO_PB: Final = {
    pos_codec.BITMAP: pb.POSITION_ENCODING_BITMAP,
    pos_codec.DELTA_VARINT: pb.POSITION_ENCODING_DELTA_VARINT,
}
_POS_FROM_PB: Final = {v: k for k, v in _POS_TO_PB.items()}


# --- errors ----------------------------------------------------------------------
class WireError(Exception):
    """A message (or frame) the receiver refuses: `code` is one of ERROR_CODES, `message` says why."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown wire error code {code!r}; known: {ERROR_CODES}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def detached(self) -> WireError:
        """A fresh copy of this error, never raised: no traceback, no exception chain. What keeps a
        refusal (a message's sticky error, a call's status) must keep this copy, so that it holds
        none of the frames, buffers or parsed headers that were alive where the error was raised."""
        return WireError(self.code, self.message)

    @property
    def status_code(self) -> grpc.StatusCode:
        """The gRPC status the server answers with."""
        return grpc_status(self.code)


def grpc_status(code: str) -> grpc.StatusCode:
    """grpc.StatusCode for a WireError code."""
    try:
        return grpc.StatusCode[GRPC_STATUS[code]]
    except KeyError:
        raise ValueError(f"unknown wire error code {code!r}; known: {ERROR_CODES}") from None


def error_from_rpc(error: grpc.RpcError) -> WireError | None:
    """The WireError behind a failed call (read from its trailing metadata), or None if it carries none."""
    trailing = getattr(error, "trailing_metadata", None)
    details = getattr(error, "details", None)
    items: Iterable[Any] = (trailing() if callable(trailing) else None) or ()
    for key, value in items:
        if key == ERROR_METADATA_KEY and value in ERROR_CODES:
            message = details() if callable(details) else str(error)
            return WireError(str(value), str(message or ""))
    return None


# --- limits ----------------------------------------------------------------------
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


# --- plain objects of the other messages -------------------------------------------
def local_capabilities() -> frozenset[str]:
    """What this process encodes and decodes: everything registered in kvlink (kvlink.capabilities)."""
    return caps.local_capabilities()


@dataclass(frozen=True)
class Hello:
    """The sender's handshake."""

    fingerprint: str
    capabilities: frozenset[str] = field(default_factory=local_capabilities)
    client: str = ""


@dataclass(frozen=True)
class Welcome:
    """The receiver's handshake answer: its model, capabilities and limits."""

    fingerprint: str
    capabilities: frozenset[str]
    max_message_bytes: int
    max_chunk_bytes: int
    profile_hashes: tuple[str, ...] = ()
    model: str = ""
    geometry: Geometry | None = None


@dataclass(frozen=True)
class Ask:
    """A question about the context of `message_id`, sent after its transfer (an empty session_id:
    the message id alone names it), and how to answer it (greedy unless temperature > 0)."""

    session_id: str
    message_id: str
    question: str
    max_new_tokens: int
    reference_answers: tuple[str, ...] = ()
    sender_timings: dict[str, float] = field(default_factory=dict)
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    @property
    def options(self) -> GenerationOptions:
        """The generation options (ValueError when they make no sense)."""
        return GenerationOptions(self.max_new_tokens, self.temperature, self.top_p, tuple(self.stop))


@dataclass(frozen=True)
class Answer:
    """The receiver's answer, decoded from the transferred cache only."""

    message_id: str
    text: str
    token_ids: tuple[int, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    f1: float | None = None
    exact_match: float | None = None
    finish_reason: str = (
        ""  # "eos", "stop" or "length" (kvlink.answer.FINISH_REASONS); "" from older receivers
    )


@dataclass(frozen=True)
class Release:
    """Free the context of `message_id` (an empty session_id: the message id alone names it)."""

    session_id: str
    message_id: str


@dataclass(frozen=True)
class Released:
    """A context freed, and the bytes of decoded cache it gave back."""

    message_id: str
    freed_bytes: int = 0


@dataclass(frozen=True)
class Ack:
    """Every chunk of `layer` arrived intact."""

    layer: int
    chunk_ids: tuple[int, ...]


@dataclass(frozen=True)
class Nack:
    """`chunk_id` arrived damaged: send it (only it) again."""

    chunk_id: int
    reason: str
    attempts_left: int


@dataclass(frozen=True)
class RemoteError:
    """An Error signal: the receiver refused the message (the call then ends with a non-OK status)."""

    code: str
    message: str


@dataclass(frozen=True)
class Receipt:
    """The receiver's byte account of one message (bytes on the wire, gRPC prefixes included).

    payload: codes chunk data. metadata = positions + scales (scales and zeros) + factors (bases).
    framing: every other byte of the frames. signaling: acks, nacks (and, once sealed by
    receipt_signal, the receipt itself). Retransmitted chunks count in their categories and
    again in retransmitted_bytes. timings: seconds per stage.
    """

    message_id: str
    payload: int
    positions: int
    scales: int
    factors: int
    framing: int
    signaling: int
    chunks: int
    retransmits: int = 0
    retransmitted_bytes: int = 0
    fp16_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def metadata(self) -> int:
        return self.positions + self.scales + self.factors

    @property
    def total(self) -> int:
        return self.payload + self.metadata + self.framing + self.signaling

    def as_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id, "payload": self.payload, "metadata": self.metadata,
            "positions": self.positions, "scales": self.scales, "factors": self.factors,
            "framing": self.framing, "signaling": self.signaling, "total": self.total,
            "chunks": self.chunks, "retransmits": self.retransmits,
            "retransmitted_bytes": self.retransmitted_bytes, "fp16_bytes": self.fp16_bytes,
            "timings": dict(self.timings),
        }  # fmt: skip


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


# --- sizes ------------------------------------------------------------------------
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


# --- sender side ------------------------------------------------------------------
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
    return msg


def _geometry_to_pb(g: Geometry) -> pb.Geometry:
    return pb.Geometry(num_layers=g.num_layers, kv_heads=g.kv_heads, head_dim=g.head_dim, q_heads=g.q_heads)


def _geometry_from_pb(msg: pb.Geometry) -> Geometry:
    return Geometry(msg.num_layers, msg.kv_heads, msg.head_dim, msg.q_heads)


def to_frames(
    encoded: EncodedKV, session_id: str, message_id: str, fingerprint: str, chunk_bytes: int
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
    header_frame = pb.TransferFrame(protocol_version=PROTOCOL_VERSION, header=header)
    trailer = pb.Trailer(
        chunk_count=len(chunks),
        payload_bytes=sum(e.size for e in header.payload),
        header_crc32c=google_crc32c.value(header_frame.SerializeToString()),
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


class Outbox:
    """Sender side of one Transfer: the frames to send and what the receiver's signals ask for.

    outbox = Outbox(to_frames(encoded, ...))
    send(outbox.frames)                  # all of them, in order
    for signal in received:
        send(outbox.handle(signal))      # a Nack asks for one chunk again
    outbox.receipt                       # set once the receiver has the whole message
    """

    def __init__(self, frames: Sequence[pb.TransferFrame]) -> None:
        if (
            len(frames) < 2
            or frames[0].WhichOneof("frame") != "header"
            or frames[-1].WhichOneof("frame") != "trailer"
        ):
            raise ValueError("frames must be [header, chunks..., trailer] as made by to_frames")
        self.frames = list(frames)
        self.n_chunks = len(self.frames[0].header.payload)
        if len(self.frames) != self.n_chunks + 2:
            raise ValueError(f"header declares {self.n_chunks} chunks, frames hold {len(self.frames) - 2}")
        self.acked: set[int] = set()
        self.nacks: list[Nack] = []
        self.receipt: Receipt | None = None
        self.signaling_bytes = 0
        self.resent_bytes = 0

    @property
    def complete(self) -> bool:
        return self.receipt is not None

    def chunk_frame(self, chunk_id: int) -> pb.TransferFrame:
        if not 0 <= chunk_id < self.n_chunks:
            raise WireError(
                "MALFORMED", f"the receiver asked for chunk {chunk_id}, this message has {self.n_chunks}"
            )
        return self.frames[chunk_id + 1]

    def handle(self, signal: pb.Signal) -> list[pb.TransferFrame]:
        """Account one signal; returns the frames to send again. An Error signal raises its WireError."""
        self.signaling_bytes += signal_size(signal)
        event = read_signal(signal)
        if isinstance(event, Ack):
            self.acked.update(event.chunk_ids)
            return []
        if isinstance(event, Nack):
            if event.chunk_id in self.acked:
                raise WireError(
                    "ORDER", f"the receiver asked again for chunk {event.chunk_id}, which it had acknowledged"
                )
            frame = self.chunk_frame(event.chunk_id)
            self.nacks.append(event)
            self.resent_bytes += frame_size(frame)
            logger.info("resending chunk %d: %s", event.chunk_id, event.reason)
            return [frame]
        if isinstance(event, Receipt):
            self.receipt = event
            return []
        raise WireError(event.code, f"receiver: {event.message}")


# --- parsing ----------------------------------------------------------------------
def _not_a_frame(raw: bytes, why: str) -> WireError:
    return WireError("MALFORMED", f"frame of {len(raw)} bytes is not a kvlink TransferFrame: {why}")


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    """The varint at raw[at:] and the offset after it; MALFORMED past 10 bytes or the end."""
    value = shift = 0
    for i in range(at, min(at + 10, len(raw))):
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise _not_a_frame(raw, f"a broken varint at byte {at}")


def frame_kind(raw: bytes) -> str:
    """Which of header, chunk, trailer, cancel a serialized TransferFrame carries, read from its
    top-level tags without parsing it (a few bytes are read, whatever the frame's size).

    A valid frame has a version and one `frame` field; more than a handful of top-level fields,
    two `frame` fields, or none is MALFORMED. This lets a receiver hold each kind to its own size
    before it spends anything on parsing (WireLimits.max_frame_bytes).
    """
    kinds: list[str] = []
    at = fields = 0
    while at < len(raw):
        fields += 1
        if fields > _MAX_FRAME_FIELDS:
            raise _not_a_frame(raw, f"more than {_MAX_FRAME_FIELDS} top-level fields")
        tag, at = _varint(raw, at)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, at = _varint(raw, at)
        elif wire_type == 2:
            size, at = _varint(raw, at)
            at += size
        elif wire_type in (1, 5):
            at += 8 if wire_type == 1 else 4
        else:
            raise _not_a_frame(raw, f"field {number} has wire type {wire_type}")
        if number in _FRAME_FIELDS:
            kinds.append(_FRAME_FIELDS[number])
    if at > len(raw):
        raise _not_a_frame(raw, "it ends inside a field")
    if len(kinds) != 1:
        raise _not_a_frame(raw, f"it carries {len(kinds)} of header, chunk, trailer, cancel, not one")
    return kinds[0]


def parse_frame(raw: bytes) -> pb.TransferFrame:
    """Parse one TransferFrame; bytes that are not one raise WireError("MALFORMED")."""
    frame = pb.TransferFrame()
    try:
        frame.ParseFromString(raw)
    except (DecodeError, ValueError, TypeError) as exc:
        raise WireError(
            "MALFORMED", f"frame of {len(raw)} bytes is not a kvlink TransferFrame: {exc}"
        ) from None
    return frame


def parse_signal(raw: bytes) -> pb.Signal:
    """Parse one Signal; bytes that are not one raise WireError("MALFORMED")."""
    signal = pb.Signal()
    try:
        signal.ParseFromString(raw)
    except (DecodeError, ValueError, TypeError) as exc:
        raise WireError("MALFORMED", f"signal of {len(raw)} bytes is not a kvlink Signal: {exc}") from None
    return signal


def _parse(cls: Any, raw: bytes, what: str) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, ValueError, TypeError) as exc:
        raise WireError("MALFORMED", f"{len(raw)} bytes are not a kvlink {what}: {exc}") from None
    return msg


def parse_hello(raw: bytes) -> pb.Hello:
    return _parse(pb.Hello, raw, "Hello")  # type: ignore[no-any-return]


def parse_ask(raw: bytes) -> pb.Ask:
    return _parse(pb.Ask, raw, "Ask")  # type: ignore[no-any-return]


def _check_version(version: int, what: str) -> None:
    if version != PROTOCOL_VERSION:
        older = "it" if version < PROTOCOL_VERSION else "this side"
        raise WireError(
            "PROTOCOL",
            f"{what} speaks kvlink protocol version {version}, this side speaks {PROTOCOL_VERSION}: "
            f"upgrade {older} (kvlink 2026-12 and later speak version 2)",
        )


# --- handshake, questions, signals: proto <-> plain --------------------------------------
def hello_to_proto(hello: Hello) -> pb.Hello:
    return pb.Hello(
        protocol_version=PROTOCOL_VERSION, fingerprint=hello.fingerprint,
        capabilities=sorted(hello.capabilities), client=hello.client,
    )  # fmt: skip


def hello_from_proto(msg: pb.Hello, fingerprint: str | None = None) -> Hello:
    """Check version (PROTOCOL) and, when given, that the sender's model is `fingerprint` (FINGERPRINT)."""
    _check_version(msg.protocol_version, "the sender")
    if fingerprint is not None and msg.fingerprint != fingerprint:
        raise WireError("FINGERPRINT", _fingerprint_message(msg.fingerprint, fingerprint))
    return Hello(msg.fingerprint, frozenset(msg.capabilities), msg.client)


def welcome_to_proto(welcome: Welcome) -> pb.Welcome:
    msg = pb.Welcome(
        protocol_version=PROTOCOL_VERSION, fingerprint=welcome.fingerprint,
        capabilities=sorted(welcome.capabilities),
        max_message_bytes=welcome.max_message_bytes, max_chunk_bytes=welcome.max_chunk_bytes,
        profile_hashes=welcome.profile_hashes, model=welcome.model,
    )  # fmt: skip
    if welcome.geometry is not None:
        msg.geometry.CopyFrom(_geometry_to_pb(welcome.geometry))
    return msg


def welcome_from_proto(msg: pb.Welcome, fingerprint: str | None = None) -> Welcome:
    """Check version (PROTOCOL) and, when given, that the receiver's model is `fingerprint` (FINGERPRINT)."""
    _check_version(msg.protocol_version, "the receiver")
    if fingerprint is not None and msg.fingerprint != fingerprint:
        raise WireError("FINGERPRINT", _fingerprint_message(fingerprint, msg.fingerprint))
    return Welcome(
        fingerprint=msg.fingerprint, capabilities=frozenset(msg.capabilities),
        max_message_bytes=msg.max_message_bytes,
        max_chunk_bytes=msg.max_chunk_bytes, profile_hashes=tuple(msg.profile_hashes), model=msg.model,
        geometry=_geometry_from_pb(msg.geometry) if msg.HasField("geometry") else None,
    )  # fmt: skip


def ask_to_proto(ask: Ask) -> pb.Ask:
    msg = pb.Ask(
        protocol_version=PROTOCOL_VERSION, session_id=ask.session_id, message_id=ask.message_id,
        question=ask.question, max_new_tokens=ask.max_new_tokens, reference_answers=ask.reference_answers,
        sender_timings=ask.sender_timings, temperature=ask.temperature, stop=ask.stop,
    )  # fmt: skip
    if ask.top_p != 1.0:
        msg.top_p = ask.top_p
    return msg


def _check_ids(session_id: str, message_id: str, limits: WireLimits) -> None:
    """The message id must be valid; the session id too, unless empty (then the message id alone names it)."""
    if session_id:
        check_id("session_id", session_id, limits)
    check_id("message_id", message_id, limits)


def ask_from_proto(msg: pb.Ask, limits: WireLimits | None = None) -> Ask:
    """Check version and the request against `limits` (MALFORMED, TOO_LARGE)."""
    limits = limits or WireLimits()
    _check_version(msg.protocol_version, "the sender")
    _check_ids(msg.session_id, msg.message_id, limits)
    if not msg.question.strip():
        raise WireError("MALFORMED", "the question is empty")
    size = len(msg.question.encode())
    if size > limits.max_question_bytes:
        raise WireError(
            "TOO_LARGE", f"the question has {size} bytes, the limit is {limits.max_question_bytes}"
        )
    if not 1 <= msg.max_new_tokens <= limits.max_new_tokens:
        raise WireError(
            "MALFORMED", f"max_new_tokens must be in [1, {limits.max_new_tokens}], got {msg.max_new_tokens}"
        )
    if len(msg.reference_answers) > limits.max_references:
        raise WireError(
            "TOO_LARGE",
            f"{len(msg.reference_answers)} reference answers, the limit is {limits.max_references}",
        )
    ref_bytes = sum(len(r.encode()) for r in msg.reference_answers)
    if ref_bytes > limits.max_reference_bytes:
        raise WireError(
            "TOO_LARGE",
            f"the reference answers have {ref_bytes} bytes in all, the limit is {limits.max_reference_bytes}",
        )
    ask = Ask(
        msg.session_id, msg.message_id, msg.question, msg.max_new_tokens,
        tuple(msg.reference_answers), dict(msg.sender_timings), msg.temperature,
        msg.top_p if msg.HasField("top_p") else 1.0, tuple(msg.stop),
    )  # fmt: skip
    try:
        ask.options  # noqa: B018 (validates the generation options)
    except ValueError as exc:
        raise WireError("MALFORMED", f"generation options: {exc}") from None
    return ask


def answer_to_proto(answer: Answer) -> pb.Answer:
    msg = pb.Answer(
        protocol_version=PROTOCOL_VERSION, message_id=answer.message_id, text=answer.text,
        token_ids=answer.token_ids, timings=answer.timings, finish_reason=answer.finish_reason,
    )  # fmt: skip
    if answer.f1 is not None:
        msg.f1 = answer.f1
    if answer.exact_match is not None:
        msg.exact_match = answer.exact_match
    return msg


def answer_from_proto(msg: pb.Answer) -> Answer:
    _check_version(msg.protocol_version, "the receiver")
    return Answer(
        msg.message_id, msg.text, tuple(msg.token_ids), dict(msg.timings),
        msg.f1 if msg.HasField("f1") else None,
        msg.exact_match if msg.HasField("exact_match") else None, msg.finish_reason,
    )  # fmt: skip


def parse_release(raw: bytes) -> pb.Release:
    return _parse(pb.Release, raw, "Release")  # type: ignore[no-any-return]


def release_to_proto(release: Release) -> pb.Release:
    return pb.Release(
        protocol_version=PROTOCOL_VERSION, session_id=release.session_id, message_id=release.message_id
    )


def release_from_proto(msg: pb.Release, limits: WireLimits | None = None) -> Release:
    """Check version and ids (PROTOCOL, MALFORMED)."""
    _check_version(msg.protocol_version, "the sender")
    _check_ids(msg.session_id, msg.message_id, limits or WireLimits())
    return Release(msg.session_id, msg.message_id)


def released_to_proto(released: Released) -> pb.Released:
    return pb.Released(
        protocol_version=PROTOCOL_VERSION, message_id=released.message_id, freed_bytes=released.freed_bytes
    )


def released_from_proto(msg: pb.Released) -> Released:
    _check_version(msg.protocol_version, "the receiver")
    return Released(msg.message_id, msg.freed_bytes)


def _ack_signal(layer: int, chunk_ids: Iterable[int]) -> pb.Signal:
    return pb.Signal(protocol_version=PROTOCOL_VERSION, ack=pb.Ack(layer=layer, chunk_ids=chunk_ids))


def _nack_signal(chunk_id: int, reason: str, attempts_left: int) -> pb.Signal:
    nack = pb.Nack(chunk_id=chunk_id, reason=reason, attempts_left=attempts_left)
    return pb.Signal(protocol_version=PROTOCOL_VERSION, nack=nack)


def error_signal(error: WireError) -> pb.Signal:
    """The Error signal a server may send before ending the call with error.status_code."""
    return pb.Signal(
        protocol_version=PROTOCOL_VERSION, error=pb.Error(code=error.code, message=error.message[:1024])
    )


def receipt_to_proto(receipt: Receipt) -> pb.Receipt:
    return pb.Receipt(
        message_id=receipt.message_id, payload_bytes=receipt.payload, metadata_bytes=receipt.metadata,
        framing_bytes=receipt.framing, signaling_bytes=receipt.signaling, total_bytes=receipt.total,
        positions_bytes=receipt.positions, scales_bytes=receipt.scales, factors_bytes=receipt.factors,
        chunks=receipt.chunks, retransmits=receipt.retransmits, retransmitted_bytes=receipt.retransmitted_bytes,
        fp16_bytes=receipt.fp16_bytes, timings=receipt.timings,
    )  # fmt: skip


def receipt_from_proto(msg: pb.Receipt) -> Receipt:
    """The Receipt dataclass; its categories must add up to its total (MALFORMED otherwise)."""
    r = Receipt(
        message_id=msg.message_id, payload=msg.payload_bytes, positions=msg.positions_bytes,
        scales=msg.scales_bytes, factors=msg.factors_bytes, framing=msg.framing_bytes,
        signaling=msg.signaling_bytes, chunks=msg.chunks, retransmits=msg.retransmits,
        retransmitted_bytes=msg.retransmitted_bytes, fp16_bytes=msg.fp16_bytes, timings=dict(msg.timings),
    )  # fmt: skip
    if r.metadata != msg.metadata_bytes or r.total != msg.total_bytes:
        raise WireError(
            "MALFORMED",
            f"receipt categories do not add up: metadata {msg.metadata_bytes} vs {r.metadata}, "
            f"total {msg.total_bytes} vs {r.total}",
        )
    return r


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


def read_signal(signal: pb.Signal) -> Ack | Nack | Receipt | RemoteError:
    """The plain object of a signal received by the sender."""
    _check_version(signal.protocol_version, "the receiver")
    kind = signal.WhichOneof("signal")
    if kind == "ack":
        return Ack(signal.ack.layer, tuple(signal.ack.chunk_ids))
    if kind == "nack":
        return Nack(signal.nack.chunk_id, signal.nack.reason, signal.nack.attempts_left)
    if kind == "receipt":
        return receipt_from_proto(signal.receipt)
    if kind == "error":
        code = signal.error.code if signal.error.code in ERROR_CODES else "MALFORMED"
        return RemoteError(code, signal.error.message)
    raise WireError("MALFORMED", "signal carries none of ack, nack, receipt, error")


# --- receiver side: header validation --------------------------------------------------
def _fingerprint_message(sender: str, receiver: str) -> str:
    return (
        f"the message was encoded with model fingerprint {sender[:16]!r}, the receiver holds "
        f"{receiver[:16]!r}: both sides need the same weights and tokenizer"
    )


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
        recipe = Recipe(select, pipelines["k"], pipelines["v"], zstd)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise WireError("MALFORMED", f"recipe: {exc}") from None
    lacking = caps.missing(recipe, capabilities)
    if lacking:
        raise WireError(
            "UNKNOWN_CODEC", f"the recipe needs {', '.join(lacking)}, which this receiver does not decode"
        )
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
    if len(header.tensors) != 2 * layers:
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
    profile_hash = header.profile_hash or None
    profiled = any(s.name == "lowrank" and getattr(s, "mode", "") == "profile" for s in recipe.stages())
    if profiled:
        if profile_hash is None:
            raise WireError("MALFORMED", "lowrank 'profile' needs the profile hash in the header")
        if profile_hashes is not None and profile_hash not in profile_hashes:
            raise WireError(
                "UNKNOWN_CODEC",
                f"calibrated profile {profile_hash!r} is not held here; held: {sorted(profile_hashes)}",
            )
    elif profile_hash is not None:
        raise WireError(
            "MALFORMED", f"profile hash {profile_hash[:64]!r} given without a profile low-rank stage"
        )
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
        if spec_msg.format not in BITS or not caps.decodes(capabilities, f"format:{spec_msg.format}"):
            raise WireError(
                "UNKNOWN_CODEC", f"{want}: format {spec_msg.format[:32]!r} is not one this receiver decodes"
            )
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
        if row.zstd and not caps.decodes(capabilities, "zstd"):
            raise WireError(
                "UNKNOWN_CODEC", f"chunk {i} is zstd-compressed, which this receiver does not read"
            )
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
        if not zstd and got != n:
            raise WireError("SHAPE", f"{where}: chunks hold {got} bytes, its shape and spec need {n}")
        if zstd and got > zstd_bound(n):
            raise WireError(
                "SHAPE", f"{where}: {got} zstd bytes exceed the bound {zstd_bound(n)} for {n} raw bytes"
            )
    return _Plan(header, recipe, g, positions, tensors, entries, layer_chunks, parts)


# --- receiver side: the assembler -----------------------------------------------------
class Assembler:
    """Receiver side of one Transfer: validates frames and assembles one EncodedKV.

        asm = Assembler(model.fingerprint, model.geometry, limits)
        for raw in request_stream:
            for signal in asm.feed(parse_frame(raw)):
                yield signal                    # acks and nacks
        encoded, receipt = asm.finish()         # TRUNCATED if the stream ended early

    The header is validated in full (fingerprint, codecs, geometry, counts, sizes and limits)
    before any chunk is kept. Each chunk's size and CRC32C are checked against the header's
    payload table: a bad chunk is Nacked (at most limits.max_chunk_retries times, then CORRUPT);
    a layer is Acked once all its chunks are in. The trailer carries the CRC32C of the header
    frame: a header damaged in transit is CORRUPT, so no unverified byte is ever used. The
    message is complete when the trailer has arrived and every chunk is verified (a Nacked chunk
    may come after the trailer). Any error is raised as WireError, drops what was received, and
    sticks: later calls raise it again.

    Order: chunks may arrive in any order between the header and the trailer (each is placed by
    its id and verified by size and CRC32C, so order carries no information); a chunk that
    arrived intact once and comes again is refused (ORDER), as is any chunk after the trailer
    that was not Nacked. HTTP/2 delivers a stream's frames once and in order, so either means a
    faulty sender.
    capabilities/profile_hashes: what this receiver decodes (default: everything registered here;
    any profile hash).
    """

    def __init__(
        self,
        fingerprint: str,
        geometry: Geometry | None = None,
        limits: WireLimits | None = None,
        capabilities: frozenset[str] | None = None,
        profile_hashes: Collection[str] | None = None,
    ) -> None:
        if not fingerprint:
            raise ValueError("the receiver's fingerprint must be a non-empty string")
        self.fingerprint = fingerprint
        self.geometry = geometry
        self.limits = limits or WireLimits()
        self.capabilities = capabilities if capabilities is not None else local_capabilities()
        self.profile_hashes = profile_hashes
        self._plan: _Plan | None = None
        self._ids: tuple[str, str] | None = None  # (session, message) of a validated header
        self._data: dict[int, bytes] = {}
        self._failures: dict[int, int] = {}
        self._awaiting: set[int] = set()  # Nacked, not yet received intact
        self._layer_left: dict[int, int] = {}
        self._trailer = False
        self._error: WireError | None = None
        self._result: tuple[EncodedKV, Receipt] | None = None
        self._tally = _Tally()
        self._seen: set[int] = set()
        self._retransmits = 0
        self._retransmitted_bytes = 0
        self._t_first: float | None = None
        self._t_last = 0.0
        self._verify_s = 0.0
        self._validate_s = 0.0
        self._header_crc: int | None = None
        self._buffered = 0

    @property
    def message_id(self) -> str | None:
        """The message's id once its header was validated (kept after a refusal, for the logs)."""
        return self._ids[1] if self._ids else None

    @property
    def session_id(self) -> str | None:
        return self._ids[0] if self._ids else None

    @property
    def recipe(self) -> Recipe | None:
        return self._plan.recipe if self._plan else None

    @property
    def declared_bytes(self) -> int:
        """Chunk data the validated header declares (0 before it): what this message will buffer."""
        return sum(e.size for e in self._plan.entries) if self._plan is not None else 0

    @property
    def buffered_bytes(self) -> int:
        """Chunk data held so far (0 once the message failed or was assembled)."""
        return self._buffered

    @property
    def complete(self) -> bool:
        """The trailer arrived and every chunk is verified: finish() will return the message."""
        return (
            self._error is None
            and self._plan is not None
            and self._trailer
            and len(self._data) == len(self._plan.entries)
        )

    def feed_raw(self, raw: bytes) -> list[pb.Signal]:
        """feed(parse_frame(raw)), with a parse failure counted as this message's error.

        The frame's kind is read from its first bytes and its size held to that kind's limit
        (WireLimits.max_frame_bytes) before it is parsed."""
        if self._error is not None:
            raise self._error.detached()
        try:
            kind = frame_kind(raw)
            if kind == "header" and self._ids is not None:
                raise WireError("ORDER", "a second header arrived; one Transfer carries one message")
            if len(raw) > self.limits.max_frame_bytes(kind):
                raise WireError(
                    "TOO_LARGE",
                    f"a {kind} frame of {len(raw)} bytes; the limit for a {kind} is "
                    f"{self.limits.max_frame_bytes(kind)}",
                )
            frame = parse_frame(raw)
        except WireError as err:
            self._fail(err)
            raise err.detached() from None
        return self._take(frame, raw)

    def feed(self, frame: pb.TransferFrame) -> list[pb.Signal]:
        """Take one frame; returns the signals to send back (Acks, Nacks). Raises WireError."""
        return self._take(frame, None)

    def _take(self, frame: pb.TransferFrame, raw: bytes | None) -> list[pb.Signal]:
        """raw: the frame's bytes as received (the header's CRC32C is taken over them), if known."""
        if self._error is not None:
            raise self._error.detached()
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first = now
        self._t_last = now
        try:
            signals = self._feed(frame, raw)
        except WireError as err:
            self._fail(err)
            raise err.detached() from None
        for s in signals:
            self._tally.signaling += signal_size(s)
        return signals

    def _fail(self, err: WireError) -> None:
        """Refuse the message for good. What stays of a refusal holds none of its frames or buffers:
        the sticky error is a fresh copy, and `err` loses its traceback (the frames it was raised in)."""
        err.__traceback__ = None
        self._error = err.detached()  # sticky, so it must hold nothing of what was refused
        self._plan = None  # nor the parsed header
        self._data.clear()  # a partial message is never used
        self._buffered = 0
        logger.info("message %r refused: %s", self.message_id, err)

    def _feed(self, frame: pb.TransferFrame, raw: bytes | None) -> list[pb.Signal]:
        _check_version(frame.protocol_version, "the sender")
        kind = frame.WhichOneof("frame")
        if kind is None:
            raise WireError("MALFORMED", "frame carries none of header, chunk, trailer, cancel")
        if kind == "cancel":
            raise WireError("CANCELLED", f"the sender cancelled the message: {frame.cancel.reason[:256]!r}")
        if self.complete:
            raise WireError("ORDER", f"a {kind} frame arrived after the message was complete")
        if kind == "header":
            if self._plan is not None:
                raise WireError("ORDER", "a second header arrived; one Transfer carries one message")
            t0 = time.perf_counter()
            plan = _validate_header(
                frame, self.fingerprint, self.geometry, self.limits, self.capabilities, self.profile_hashes
            )
            self._validate_s = time.perf_counter() - t0
            self._header_crc = google_crc32c.value(raw if raw is not None else frame.SerializeToString())
            self._plan = plan
            self._ids = (plan.header.session_id, plan.header.message_id)
            self._layer_left = {layer: len(ids) for layer, ids in plan.layer_chunks.items()}
            self._tally.header(frame)
            return []
        if self._plan is None:
            raise WireError("ORDER", f"a {kind} frame arrived before the header")
        if kind == "chunk":
            return self._on_chunk(frame, self._plan, raw)
        return self._on_trailer(frame, self._plan)

    def _on_chunk(self, frame: pb.TransferFrame, plan: _Plan, raw: bytes | None) -> list[pb.Signal]:
        chunk = frame.chunk
        cid = chunk.chunk_id
        n = len(plan.entries)
        if cid >= n:
            raise WireError("MALFORMED", f"chunk id {cid} is not in the payload table of {n} chunks")
        if cid in self._data:
            raise WireError("ORDER", f"chunk {cid} arrived again after it was received intact")
        if self._trailer and cid not in self._awaiting:
            raise WireError("ORDER", f"chunk {cid} arrived after the trailer without being asked for")
        entry = plan.entries[cid]
        # The data is read out of the message once (each read is a copy), and the frame's size is the
        # bytes received: serializing a 1 MiB frame again to size it cost as much as receiving it.
        data = chunk.data
        size = len(raw) + GRPC_PREFIX_BYTES if raw is not None else frame_size(frame)
        if cid in self._seen:
            self._retransmits += 1
            self._retransmitted_bytes += size
        self._seen.add(cid)
        self._tally.chunk(frame, entry.part if len(data) == entry.size else None, (size, len(data)))
        t0 = time.perf_counter()
        problem = None
        if len(data) != entry.size:
            problem = f"has {len(data)} bytes, the header declares {entry.size}"
        else:
            crc = google_crc32c.value(data)
            if crc != entry.crc32c or chunk.crc32c != entry.crc32c:
                problem = f"CRC32C {crc:08x} (chunk says {chunk.crc32c:08x}) does not match the header's {entry.crc32c:08x}"
        self._verify_s += time.perf_counter() - t0
        if problem is not None:
            failures = self._failures.get(cid, 0) + 1
            self._failures[cid] = failures
            left = self.limits.max_chunk_retries - failures
            where = f"chunk {cid} (layer {entry.layer} {entry.kind} {entry.part})"
            if left < 0:
                raise WireError("CORRUPT", f"{where} failed verification {failures} times; last: {problem}")
            self._awaiting.add(cid)
            logger.info("nack %s: %s (%d attempts left)", where, problem, left)
            return [_nack_signal(cid, problem, left)]
        self._data[cid] = data
        self._buffered += len(data)
        self._awaiting.discard(cid)
        self._layer_left[entry.layer] -= 1
        if self._layer_left[entry.layer] == 0:
            return [_ack_signal(entry.layer, plan.layer_chunks[entry.layer])]
        return []

    def _on_trailer(self, frame: pb.TransferFrame, plan: _Plan) -> list[pb.Signal]:
        if self._trailer:
            raise WireError("ORDER", "a second trailer arrived")
        trailer = frame.trailer
        if trailer.header_crc32c != self._header_crc:
            raise WireError(
                "CORRUPT",
                f"the header frame's CRC32C {self._header_crc or 0:08x} does not match the trailer's "
                f"{trailer.header_crc32c:08x}: the header (or the trailer) was damaged in transit",
            )
        n = len(plan.entries)
        total = sum(e.size for e in plan.entries)
        if trailer.chunk_count != n or trailer.payload_bytes != total:
            raise WireError(
                "MALFORMED",
                f"trailer declares {trailer.chunk_count} chunks of {trailer.payload_bytes} bytes, "
                f"the header {n} chunks of {total} bytes",
            )
        missing = [c for c in range(n) if c not in self._data and c not in self._awaiting]
        if missing:
            raise WireError(
                "TRUNCATED",
                f"the trailer arrived but {len(missing)} of {n} chunks never did: {_ids(missing)}",
            )
        self._trailer = True
        self._tally.other(frame)
        return []

    def finish(self) -> tuple[EncodedKV, Receipt]:
        """The complete message and its receipt (not sealed: see receipt_signal). TRUNCATED if incomplete."""
        if self._error is not None:
            raise self._error.detached()
        if self._result is not None:
            return self._result
        plan = self._plan
        if plan is None:
            err = WireError("TRUNCATED", "the stream ended before the header")
        elif not self._trailer:
            err = WireError(
                "TRUNCATED",
                f"the stream ended after {len(self._data)} of {len(plan.entries)} chunks, before the trailer",
            )
        elif self._awaiting:
            err = WireError(
                "TRUNCATED", f"chunks {_ids(sorted(self._awaiting))} were asked for again but never came"
            )
        else:
            t0 = time.perf_counter()
            self._result = self._assemble(plan)
            self._result[1].timings["assemble_s"] = time.perf_counter() - t0
            return self._result
        self._fail(err)
        raise err.detached()

    def _assemble(self, plan: _Plan) -> tuple[EncodedKV, Receipt]:
        tensors = []
        for t in plan.tensors:
            parts: dict[str, Part] = {}
            for name in PART_ORDER:
                key = (t.layer, t.kind, name)
                if key in plan.parts:
                    ids, raw, zstd = plan.parts[key]
                    # Each part's chunks are let go as it is joined: the message is held once, not twice.
                    data = (
                        self._data.pop(ids[0])
                        if len(ids) == 1
                        else b"".join([self._data.pop(c) for c in ids])
                    )
                    parts[name] = Part(data, raw, zstd)
            tensors.append(replace(t, parts=parts))
        self._data.clear()
        self._buffered = 0
        encoded = EncodedKV(
            recipe=plan.recipe,
            geometry=plan.geometry,
            length=plan.header.length,
            positions=plan.positions,
            tensors=tensors,
            profile_hash=plan.header.profile_hash or None,
        )
        tally = self._tally
        receipt = Receipt(
            message_id=plan.header.message_id,
            payload=tally.payload, positions=tally.positions, scales=tally.scales, factors=tally.factors,
            framing=tally.framing, signaling=tally.signaling, chunks=len(plan.entries),
            retransmits=self._retransmits, retransmitted_bytes=self._retransmitted_bytes,
            fp16_bytes=plan.geometry.fp16_bytes(plan.header.length),
            timings={"receive_s": self._t_last - (self._t_first or self._t_last),
                     "validate_s": self._validate_s, "verify_s": self._verify_s},
        )  # fmt: skip
        return encoded, receipt


def _ids(ids: Sequence[int], show: int = 10) -> str:
    head = ", ".join(str(i) for i in ids[:show])
    return f"[{head}{', ...' if len(ids) > show else ''}]"


# --- gRPC plumbing for server/ and client/ --------------------------------------------
KVLinkServicer = pb_grpc.KVLinkServicer
"""Base class of the typed servicer (requests arrive parsed by gRPC)."""
KVLinkStub = pb_grpc.KVLinkStub
"""Client stub: KVLinkStub(channel).Hello(hello_to_proto(...)), .Transfer(frames), .Ask(...)."""


def raw_rpc_handler(servicer: Any) -> grpc.GenericRpcHandler:
    """A handler whose methods receive the request BYTES, so the servicer parses them itself
    (parse_hello, parse_frame / Assembler.feed_raw, parse_ask) and malformed protobuf gets
    INVALID_ARGUMENT with a message instead of gRPC's generic deserialization failure.
    `servicer` has Hello(bytes, ctx) -> pb Welcome, Transfer(iterator of bytes, ctx) -> iterator of
    pb Signal, Ask(bytes, ctx) -> pb Answer, Release(bytes, ctx) -> pb Released (sync or grpc.aio;
    a servicer without Release answers it UNIMPLEMENTED). Add with
    server.add_generic_rpc_handlers((raw_rpc_handler(servicer),))."""
    handlers = {
        "Hello": grpc.unary_unary_rpc_method_handler(
            servicer.Hello, response_serializer=pb.Welcome.SerializeToString
        ),
        "Transfer": grpc.stream_stream_rpc_method_handler(
            servicer.Transfer, response_serializer=pb.Signal.SerializeToString
        ),
        "Ask": grpc.unary_unary_rpc_method_handler(
            servicer.Ask, response_serializer=pb.Answer.SerializeToString
        ),
    }
    if hasattr(servicer, "Release"):
        handlers["Release"] = grpc.unary_unary_rpc_method_handler(
            servicer.Release, response_serializer=pb.Released.SerializeToString
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def legacy_rpc_handler() -> grpc.GenericRpcHandler:
    """Answers version 1's Hello (kvlink.v1.KVLink) with FAILED_PRECONDITION, code PROTOCOL and a message
    that says which side to upgrade, instead of gRPC's bare UNIMPLEMENTED; its other methods likewise."""

    def refuse(request: Any, context: Any) -> Any:
        message = (
            f"this receiver speaks kvlink protocol version {PROTOCOL_VERSION} (service {SERVICE_NAME}); "
            "the sender speaks version 1: upgrade the sender (kvlink 2026-12 and later speak version 2)"
        )
        return context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            message,
            trailing_metadata=((ERROR_METADATA_KEY, "PROTOCOL"),),
        )

    handlers = {name: grpc.unary_unary_rpc_method_handler(refuse) for name in ("Hello", "Ask")}
    handlers["Transfer"] = grpc.stream_stream_rpc_method_handler(refuse)  # type: ignore[assignment]
    return grpc.method_handlers_generic_handler(LEGACY_SERVICE_NAME, handlers)


def add_servicer(servicer: Any, server: Any) -> None:
    """Register a typed KVLinkServicer (requests parsed by gRPC) on a grpc or grpc.aio server."""
    pb_grpc.add_KVLinkServicer_to_server(servicer, server)
