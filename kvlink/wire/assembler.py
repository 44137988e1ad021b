"""The two ends of one Transfer: Outbox (sender: the frames to send, and what the receiver's signals
ask to be sent again) and Assembler (receiver: validates the header, verifies every chunk, acks and
nacks, and assembles one EncodedKV once the message is complete and verified).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import replace

import google_crc32c

from kvlink.codec import EncodedKV, Part
from kvlink.models import Geometry
from kvlink.recipe import Recipe
from kvlink.wire._common import WireError, _check_version, pb
from kvlink.wire.capabilities import local_capabilities
from kvlink.wire.framing import GRPC_PREFIX_BYTES, PART_ORDER, _Tally, frame_bytes, frame_size, signal_size
from kvlink.wire.grpc import frame_kind, parse_frame
from kvlink.wire.messages import Ack, Nack, Receipt, _ack_signal, _nack_signal, read_signal
from kvlink.wire.segments import Segment
from kvlink.wire.validation import WireLimits, _Plan, _validate_header

logger = logging.getLogger(__name__)


# --- sender side: the outbox ------------------------------------------------------------------
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


# --- receiver side: the assembler -------------------------------------------------------------
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
        self._segment: Segment | None = None  # kept after finish() (which lets the plan go), like the ids

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
    def segment(self) -> Segment | None:
        """The Segment a validated header declares (None: a whole context)."""
        return self._segment

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
            self._header_crc = google_crc32c.value(raw if raw is not None else frame_bytes(frame))
            self._plan = plan
            self._segment = plan.segment
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
