"""The wire: protobuf framing, chunking, checksums and validation of one KV message.

proto/kvlink/v2/kvlink.proto is the contract; this package is the only code that imports the stubs
generated from it (kvlink.wire._common does, generating them on first import when a source checkout
lacks them). Everything else, server/ and client/ included, works with the domain objects of
kvlink.codec and the plain dataclasses of kvlink.wire.messages, and imports them from kvlink.wire:
every name below is re-exported here.

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

Modules, by role (each imports only the ones below it in this list):

    assembler.py     Outbox (sender) and Assembler (receiver): the two ends of one Transfer
    grpc.py          SERVICE_NAME and the *_METHOD paths, raw_rpc_handler, legacy_rpc_handler,
                     add_servicer, KVLinkServicer, KVLinkStub, ERROR_METADATA_KEY, error_from_rpc;
                     frame_kind and parse_* of raw request bytes
    framing.py       to_frames, cancel_frame, recipe_to_pb, PART_ORDER (chunking); the exact sizes:
                     frame_size, signal_size, chunk_frame_size, message_wire_size, frames_wire_size,
                     WireSize, ack_signals, http2_overhead, receipt_signal, GRPC_PREFIX_BYTES, the
                     HTTP2_* constants, RECEIPT_ALLOWANCE
    messages.py      Hello, Welcome, Ask, Answer, Release, Released, Ack, Nack, RemoteError, Receipt
                     and their *_to_proto / *_from_proto; error_signal, read_signal
    segments.py      Segment (one token range of a context sent in several Transfers, kvlink.stream)
                     and ReceiverCosts (a Welcome's measured throughputs), with their checks
    validation.py    WireLimits, FRAME_ENVELOPE_BYTES, ID_CHARS, check_id, zstd_bound, recipe_from_pb
                     and the validation of a header before anything is allocated
    capabilities.py  local_capabilities (what a Welcome advertises) and the UNKNOWN_CODEC checks
                     of a header against what the receiver decodes
    _common.py       what all of them share: the generated stubs (pb, pb_grpc), PROTOCOL_VERSION,
                     WireError, ERROR_CODES, GRPC_STATUS, grpc_status
"""

from kvlink.wire._common import (
    ERROR_CODES,
    GRPC_STATUS,
    PROTOCOL_VERSION,
    WireError,
    grpc_status,
    pb,
    pb_grpc,
)
from kvlink.wire.assembler import Assembler, Outbox
from kvlink.wire.capabilities import local_capabilities
from kvlink.wire.framing import (
    CRC_PLACEHOLDER,
    GRPC_PREFIX_BYTES,
    HTTP2_CONNECTION_ALLOWANCE,
    HTTP2_FRAME_HEADER_BYTES,
    HTTP2_MAX_FRAME_BYTES,
    HTTP2_RPC_ALLOWANCE,
    HTTP2_WINDOW_UPDATE_BYTES,
    MAX_RECEIPT_TIMINGS,
    MAX_TIMING_KEY_CHARS,
    PART_ORDER,
    RECEIPT_ALLOWANCE,
    WireSize,
    ack_signals,
    cancel_frame,
    chunk_frame_size,
    frame_bytes,
    frame_size,
    frames_wire_size,
    http2_overhead,
    message_wire_size,
    receipt_signal,
    recipe_to_pb,
    signal_size,
    text_frames,
    to_frames,
)
from kvlink.wire.grpc import (
    ASK_METHOD,
    ERROR_METADATA_KEY,
    HELLO_METHOD,
    LEGACY_SERVICE_NAME,
    RELEASE_METHOD,
    SERVICE_NAME,
    TRANSFER_METHOD,
    KVLinkServicer,
    KVLinkStub,
    add_servicer,
    error_from_rpc,
    frame_kind,
    legacy_rpc_handler,
    parse_ask,
    parse_frame,
    parse_hello,
    parse_release,
    parse_signal,
    raw_rpc_handler,
)
from kvlink.wire.messages import (
    Ack,
    Answer,
    Ask,
    Hello,
    Nack,
    Receipt,
    Release,
    Released,
    RemoteError,
    Welcome,
    answer_from_proto,
    answer_to_proto,
    ask_from_proto,
    ask_to_proto,
    error_signal,
    hello_from_proto,
    hello_to_proto,
    read_signal,
    receipt_from_proto,
    receipt_to_proto,
    release_from_proto,
    release_to_proto,
    released_from_proto,
    released_to_proto,
    welcome_from_proto,
    welcome_to_proto,
)
from kvlink.wire.segments import MAX_SEGMENTS, ReceiverCosts, Segment
from kvlink.wire.validation import (
    FRAME_ENVELOPE_BYTES,
    ID_CHARS,
    TEXT_RECIPE,
    WireLimits,
    check_id,
    recipe_from_pb,
    zstd_bound,
)

__all__ = [
    "ASK_METHOD",
    "CRC_PLACEHOLDER",
    "ERROR_CODES",
    "ERROR_METADATA_KEY",
    "FRAME_ENVELOPE_BYTES",
    "GRPC_PREFIX_BYTES",
    "GRPC_STATUS",
    "HELLO_METHOD",
    "HTTP2_CONNECTION_ALLOWANCE",
    "HTTP2_FRAME_HEADER_BYTES",
    "HTTP2_MAX_FRAME_BYTES",
    "HTTP2_RPC_ALLOWANCE",
    "HTTP2_WINDOW_UPDATE_BYTES",
    "ID_CHARS",
    "LEGACY_SERVICE_NAME",
    "MAX_RECEIPT_TIMINGS",
    "MAX_SEGMENTS",
    "MAX_TIMING_KEY_CHARS",
    "PART_ORDER",
    "PROTOCOL_VERSION",
    "RECEIPT_ALLOWANCE",
    "RELEASE_METHOD",
    "SERVICE_NAME",
    "TEXT_RECIPE",
    "TRANSFER_METHOD",
    "Ack",
    "Answer",
    "Ask",
    "Assembler",
    "Hello",
    "KVLinkServicer",
    "KVLinkStub",
    "Nack",
    "Outbox",
    "Receipt",
    "ReceiverCosts",
    "Release",
    "Released",
    "RemoteError",
    "Segment",
    "Welcome",
    "WireError",
    "WireLimits",
    "WireSize",
    "ack_signals",
    "add_servicer",
    "answer_from_proto",
    "answer_to_proto",
    "ask_from_proto",
    "ask_to_proto",
    "cancel_frame",
    "check_id",
    "chunk_frame_size",
    "error_from_rpc",
    "error_signal",
    "frame_bytes",
    "frame_kind",
    "frame_size",
    "frames_wire_size",
    "grpc_status",
    "hello_from_proto",
    "hello_to_proto",
    "http2_overhead",
    "legacy_rpc_handler",
    "local_capabilities",
    "message_wire_size",
    "parse_ask",
    "parse_frame",
    "parse_hello",
    "parse_release",
    "parse_signal",
    "pb",
    "pb_grpc",
    "raw_rpc_handler",
    "read_signal",
    "receipt_from_proto",
    "receipt_signal",
    "receipt_to_proto",
    "recipe_from_pb",
    "recipe_to_pb",
    "release_from_proto",
    "release_to_proto",
    "released_from_proto",
    "released_to_proto",
    "signal_size",
    "text_frames",
    "to_frames",
    "welcome_from_proto",
    "welcome_to_proto",
    "zstd_bound",
]
