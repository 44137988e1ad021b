"""gRPC plumbing for server/ and client/: the service and its methods, the handlers that give a
servicer its requests as bytes (and version 1's refusal), the client stub, the error behind a failed
call, and the parsing of raw request bytes into proto messages (MALFORMED when they are not one).

A servicer registered with raw_rpc_handler parses what it receives itself (parse_hello,
parse_ask, parse_release; frames through Assembler.feed_raw, which reads a frame's kind and holds it
to its size limit before parsing it), so that malformed protobuf gets a specific error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from kvlink.wire._common import ERROR_CODES, PROTOCOL_VERSION, WireError, pb, pb_grpc
from kvlink.wire.framing import frame_bytes

# --- service and errors -----------------------------------------------------------------------
SERVICE_NAME: Final = "kvlink.v2.KVLink"
LEGACY_SERVICE_NAME: Final = "kvlink.v1.KVLink"
"""Version 1's service: its Hello is answered with a PROTOCOL error that says what to upgrade."""
HELLO_METHOD: Final = f"/{SERVICE_NAME}/Hello"
TRANSFER_METHOD: Final = f"/{SERVICE_NAME}/Transfer"
ASK_METHOD: Final = f"/{SERVICE_NAME}/Ask"
RELEASE_METHOD: Final = f"/{SERVICE_NAME}/Release"
ERROR_METADATA_KEY: Final = "kvlink-error-code"


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


# --- parsing raw bytes ------------------------------------------------------------------------
_FRAME_FIELDS: Final = {2: "header", 3: "chunk", 4: "trailer", 5: "cancel"}
"""TransferFrame's oneof `frame`, by field number (proto/kvlink/v2/kvlink.proto)."""
_MAX_FRAME_FIELDS: Final = 8


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


def parse_release(raw: bytes) -> pb.Release:
    return _parse(pb.Release, raw, "Release")  # type: ignore[no-any-return]


# --- handlers and stubs for server/ and client/ -----------------------------------------------
KVLinkServicer = pb_grpc.KVLinkServicer
"""Base class of the typed servicer (requests arrive parsed by gRPC)."""


class KVLinkStub(pb_grpc.KVLinkStub):  # type: ignore[misc]
    """Client stub: KVLinkStub(channel).Hello(hello_to_proto(...)), .Transfer(frames), .Ask(...). Its Transfer
    serializes each frame as frame_bytes does (deterministically): the bytes the trailer's header CRC is over
    (the generated stub's default order of map entries can differ from them)."""

    def __init__(self, channel: Any) -> None:
        super().__init__(channel)
        self.Transfer = channel.stream_stream(
            TRANSFER_METHOD, request_serializer=frame_bytes, response_deserializer=pb.Signal.FromString
        )


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
