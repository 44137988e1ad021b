"""What every module of kvlink.wire shares: the generated stubs, the protocol version and its check,
the error every check raises (WireError, ERROR_CODES, GRPC_STATUS), and the tables between proto
enums and kvlink's names.

This is the only module of kvlink that imports the stubs generated from
proto/kvlink/v2/kvlink.proto (generated on first import when a source checkout lacks them): the
other modules of kvlink.wire take `pb` and `pb_grpc` from here, and everything outside kvlink.wire
works with kvlink's domain objects and the dataclasses of kvlink.wire.messages.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import TYPE_CHECKING, Final

import grpc

from kvlink import positions as pos_codec
from kvlink.models import Geometry

logger = logging.getLogger(__name__)


# --- generated stubs --------------------------------------------------------------------------
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


# --- protocol version and errors --------------------------------------------------------------
PROTOCOL_VERSION: Final = 2
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


def _check_version(version: int, what: str) -> None:
    if version != PROTOCOL_VERSION:
        older = "it" if version < PROTOCOL_VERSION else "this side"
        raise WireError(
            "PROTOCOL",
            f"{what} speaks kvlink protocol version {version}, this side speaks {PROTOCOL_VERSION}: "
            f"upgrade {older} (kvlink 2026-12 and later speak version 2)",
        )


# --- proto enums and geometry <-> kvlink names ------------------------------------------------
_KIND_TO_PB: Final = {"k": pb.TENSOR_KIND_K, "v": pb.TENSOR_KIND_V}
_KIND_FROM_PB: Final = {v: k for k, v in _KIND_TO_PB.items()}
_PART_TO_PB: Final = {
    "codes": pb.PART_KIND_CODES,
    "scale": pb.PART_KIND_SCALE,
    "zero": pb.PART_KIND_ZERO,
    "basis": pb.PART_KIND_BASIS,
    "sink": pb.PART_KIND_SINK,
    "widths": pb.PART_KIND_WIDTHS,
    "shifts": pb.PART_KIND_SHIFTS,
}
_PART_FROM_PB: Final = {v: k for k, v in _PART_TO_PB.items()}
_POS_TO_PB: Final = {
    pos_codec.BITMAP: pb.POSITION_ENCODING_BITMAP,
    pos_codec.DELTA_VARINT: pb.POSITION_ENCODING_DELTA_VARINT,
}
_POS_FROM_PB: Final = {v: k for k, v in _POS_TO_PB.items()}


def _geometry_to_pb(g: Geometry) -> pb.Geometry:
    return pb.Geometry(num_layers=g.num_layers, kv_heads=g.kv_heads, head_dim=g.head_dim, q_heads=g.q_heads)


def _geometry_from_pb(msg: pb.Geometry) -> Geometry:
    return Geometry(msg.num_layers, msg.kv_heads, msg.head_dim, msg.q_heads)
