"""The plain objects exchanged besides the KV message itself (Hello, Welcome, Ask, Answer, Release,
Released, and the signals Ack, Nack, Receipt, Error) and their conversions to and from proto.

A *_from_proto checks what its message must satisfy on arrival: the protocol version (PROTOCOL), the
sender's or receiver's model (FINGERPRINT), ids and an Ask's request against WireLimits (MALFORMED,
TOO_LARGE), a receipt's categories against its total (MALFORMED).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kvlink.answer import GenerationOptions
from kvlink.models import Geometry
from kvlink.wire._common import (
    ERROR_CODES,
    PROTOCOL_VERSION,
    WireError,
    _check_version,
    _geometry_from_pb,
    _geometry_to_pb,
    pb,
)
from kvlink.wire.capabilities import local_capabilities
from kvlink.wire.segments import ReceiverCosts, costs_from_pb, costs_to_pb
from kvlink.wire.validation import WireLimits, _check_ids, _fingerprint_message

logger = logging.getLogger(__name__)


# --- plain objects of the messages besides the KV message -------------------------------------
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
    costs: ReceiverCosts | None = None  # measured throughputs (None: not measured)


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


# --- handshake, questions, releases: proto <-> plain ------------------------------------------
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
    if welcome.costs is not None:
        msg.costs.CopyFrom(costs_to_pb(welcome.costs))
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
        costs=_costs(msg),
    )  # fmt: skip


def _costs(msg: pb.Welcome) -> ReceiverCosts | None:
    """The Welcome's costs; None, with a warning naming the bad value, when a sender cannot plan with
    them (they only inform the choice of options: the receiver is still usable without)."""
    if not msg.HasField("costs"):
        return None
    try:
        return costs_from_pb(msg.costs)
    except ValueError as exc:
        who = msg.model or msg.fingerprint
        logger.warning("ignoring the costs the receiver %r advertises: %s", who, exc)
        return None


def ask_to_proto(ask: Ask) -> pb.Ask:
    msg = pb.Ask(
        protocol_version=PROTOCOL_VERSION, session_id=ask.session_id, message_id=ask.message_id,
        question=ask.question, max_new_tokens=ask.max_new_tokens, reference_answers=ask.reference_answers,
        sender_timings=ask.sender_timings, temperature=ask.temperature, stop=ask.stop,
    )  # fmt: skip
    if ask.top_p != 1.0:
        msg.top_p = ask.top_p
    return msg


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


# --- signals: proto <-> plain -----------------------------------------------------------------
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
