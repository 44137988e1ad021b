"""Per-message byte and time accounting, and the in-memory registry the receiver's REST stats read.

    registry = MetricsRegistry()
    registry.record_message(MessageRecord.from_receipt(receipt, session_id, config, length, kept))
    registry.record_answer(message_id, AskRecord(question, answer, ...), sender_timings)
    registry.record_error("CORRUPT")
    registry.stats()        # aggregates per codec config label (see aggregate())

Bytes are bytes on the wire as the receipt counts them (gRPC 5-byte prefixes
included): payload (quantized codes), metadata (positions + scales/zeros +
low-rank factors), framing (every other byte of the frames) and signaling
(acks, nacks, the receipt). Timings are seconds per stage; stage keys end in
"_s": the sender's (prefill_s, select_s, quantize_s, pack_s, transfer_s, sent
with the question) and the receiver's (receive_s, verify_s, decode_s,
answer_s, ...). The registry is thread-safe; it keeps the last `max_records`
messages for the per-message views and cumulative totals that are never
dropped. No web code lives here: server/rest.py serves it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from kvlink.codec import CodecConfig
from kvlink.wire import Receipt

logger = logging.getLogger(__name__)

BYTE_CATEGORIES: tuple[str, ...] = ("payload", "metadata", "framing", "signaling")
METADATA_SPLIT: tuple[str, ...] = ("positions", "scales", "factors")
SENDER_STAGES: tuple[str, ...] = ("prefill_s", "select_s", "quantize_s", "pack_s", "plan_s", "transfer_s")
"""Sender stage timings an Ask may carry; anything else it sends is ignored."""


@dataclass
class AskRecord:
    """One question answered from a message's cache. f1/exact_match only when references were given."""

    question: str
    answer: str
    token_ids: list[int] = field(default_factory=list)
    reference_answers: list[str] = field(default_factory=list)
    f1: float | None = None
    exact_match: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    asked_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MessageRecord:
    """One message the receiver accepted: ids, codec config, bytes by category, timings, answers.

    fp16_bytes is the FP16 size of the FULL context KV (the budget's denominator).
    length: original context length T; kept: positions kept (of layer 0).
    """

    message_id: str
    session_id: str
    config_label: str
    config: dict[str, Any]
    length: int
    kept: int
    fp16_bytes: int
    payload: int
    positions: int
    scales: int
    factors: int
    framing: int
    signaling: int
    chunks: int = 0
    retransmits: int = 0
    retransmitted_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    received_at: float = 0.0
    asks: list[AskRecord] = field(default_factory=list)

    @classmethod
    def from_receipt(
        cls,
        receipt: Receipt,
        session_id: str,
        config: CodecConfig,
        length: int,
        kept: int,
        timings: Mapping[str, float] | None = None,
        received_at: float | None = None,
    ) -> MessageRecord:
        """The record of a sealed receipt (see kvlink.wire.receipt_signal)."""
        return cls(
            message_id=receipt.message_id, session_id=session_id, config_label=config.label,
            config=config.to_dict(), length=length, kept=kept, fp16_bytes=receipt.fp16_bytes,
            payload=receipt.payload, positions=receipt.positions, scales=receipt.scales,
            factors=receipt.factors, framing=receipt.framing, signaling=receipt.signaling,
            chunks=receipt.chunks, retransmits=receipt.retransmits,
            retransmitted_bytes=receipt.retransmitted_bytes,
            timings=dict(receipt.timings if timings is None else timings),
            received_at=time.time() if received_at is None else received_at,
        )  # fmt: skip

    @property
    def metadata(self) -> int:
        return self.positions + self.scales + self.factors

    @property
    def total(self) -> int:
        return self.payload + self.metadata + self.framing + self.signaling

    @property
    def fraction(self) -> float:
        """Wire bytes as a fraction of the FP16 size of the full context KV."""
        return self.total / self.fp16_bytes if self.fp16_bytes else math.nan

    @property
    def compression_ratio(self) -> float:
        """FP16 size of the full context KV over wire bytes (higher is smaller)."""
        return self.fp16_bytes / self.total if self.total else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id, "session_id": self.session_id,
            "config_label": self.config_label, "config": dict(self.config),
            "length": self.length, "kept": self.kept, "fp16_bytes": self.fp16_bytes,
            "bytes": {
                "payload": self.payload, "metadata": self.metadata, "positions": self.positions,
                "scales": self.scales, "factors": self.factors, "framing": self.framing,
                "signaling": self.signaling, "total": self.total,
            },
            "percent_of_fp16": 100 * self.fraction if self.fp16_bytes else None,
            "compression_ratio": self.compression_ratio if self.total else None,
            "chunks": self.chunks, "retransmits": self.retransmits,
            "retransmitted_bytes": self.retransmitted_bytes, "timings": dict(self.timings),
            "received_at": self.received_at, "asks": [a.as_dict() for a in self.asks],
        }  # fmt: skip


# --- aggregation ------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; nan when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q!r}")
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """{"n", "mean", "p50", "p95"} of `values` (None for an empty sequence: JSON has no NaN)."""
    n = len(values)
    if not n:
        return {"n": 0, "mean": None, "p50": None, "p95": None}
    return {"n": n, "mean": sum(values) / n, "p50": percentile(values, 50), "p95": percentile(values, 95)}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(records: Iterable[MessageRecord]) -> dict[str, dict[str, Any]]:
    """Per codec config label: messages, bytes by category (sum and mean per message), compression
    ratio vs FP16 (sum of FP16 bytes over sum of wire bytes), timings (mean/p50/p95 per stage,
    answer timings included), and F1/EM means over the questions that came with reference answers."""
    groups: dict[str, list[MessageRecord]] = {}
    for r in records:
        groups.setdefault(r.config_label, []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for label, group in sorted(groups.items()):
        sums = {c: sum(getattr(r, c) for r in group) for c in (*BYTE_CATEGORIES, *METADATA_SPLIT)}
        total = sum(r.total for r in group)
        fp16 = sum(r.fp16_bytes for r in group)
        stages: dict[str, list[float]] = {}
        for r in group:
            for key, value in r.timings.items():
                stages.setdefault(key, []).append(float(value))
            for ask in r.asks:
                for key, value in ask.timings.items():
                    stages.setdefault(key, []).append(float(value))
        asks = [a for r in group for a in r.asks]
        scored = [a for a in asks if a.f1 is not None]
        out[label] = {
            "config": dict(group[-1].config),
            "messages": len(group),
            "questions": len(asks),
            "bytes": {**sums, "total": total},
            "bytes_per_message": {k: v / len(group) for k, v in {**sums, "total": total}.items()},
            "fp16_bytes": fp16,
            "percent_of_fp16": 100 * total / fp16 if fp16 else None,
            "compression_ratio": fp16 / total if total else None,
            "retransmits": sum(r.retransmits for r in group),
            "timings": {k: summarize(v) for k, v in sorted(stages.items())},
            "scored_questions": len(scored),
            "f1_mean": _mean([a.f1 for a in scored if a.f1 is not None]),
            "exact_match_mean": _mean([a.exact_match for a in scored if a.exact_match is not None]),
        }
    return out


# --- registry -----------------------------------------------------------------------------
class MetricsListener(Protocol):
    """Told about every event as it is recorded (server/rest.py feeds Prometheus this way)."""

    def on_message(self, record: MessageRecord) -> None: ...
    def on_answer(self, record: MessageRecord, ask: AskRecord) -> None: ...
    def on_error(self, code: str, rpc: str) -> None: ...


@dataclass
class Totals:
    """Cumulative counts since start; kept when old records are dropped."""

    messages: int = 0
    questions: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_CATEGORIES, 0))
    fp16_bytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class MetricsRegistry:
    """Thread-safe store of MessageRecords (the last `max_records`) and cumulative totals."""

    def __init__(self, max_records: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
            raise ValueError(f"max_records must be a positive integer, got {max_records!r}")
        self.max_records = max_records
        self._clock = clock
        self._lock = threading.Lock()
        self._records: OrderedDict[str, MessageRecord] = OrderedDict()
        self._totals = Totals()
        self._listeners: list[MetricsListener] = []

    def add_listener(self, listener: MetricsListener) -> None:
        self._listeners.append(listener)

    def _notify(self, method: str, *args: Any) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, method)(*args)
            except Exception:  # a broken exporter must not fail the RPC that recorded the event
                logger.exception("metrics listener %r failed in %s", listener, method)

    def record_message(self, record: MessageRecord) -> None:
        """Add a message the receiver accepted (replaces an earlier record with the same id)."""
        with self._lock:
            if not record.received_at:
                record.received_at = self._clock()
            self._records.pop(record.message_id, None)
            self._records[record.message_id] = record
            while len(self._records) > self.max_records:
                self._records.popitem(last=False)
            t = self._totals
            t.messages += 1
            t.fp16_bytes += record.fp16_bytes
            for c in BYTE_CATEGORIES:
                t.bytes[c] += getattr(record, c)
        self._notify("on_message", record)

    def record_answer(
        self, message_id: str, ask: AskRecord, sender_timings: Mapping[str, float] | None = None
    ) -> bool:
        """Attach an answer (and the sender's stage timings it reported) to its message.

        Returns False when the message has no record (dropped from the history)."""
        with self._lock:
            record = self._records.get(message_id)
            if record is None:
                return False
            if not ask.asked_at:
                ask.asked_at = self._clock()
            for key, value in (sender_timings or {}).items():
                if key in SENDER_STAGES and math.isfinite(value) and value >= 0:
                    record.timings.setdefault(key, float(value))
            record.asks.append(ask)
            self._totals.questions += 1
        self._notify("on_answer", record, ask)
        return True

    def record_error(self, code: str, rpc: str = "Transfer") -> None:
        """Count a refused request by error code (a WireError code, NOT_FOUND, INTERNAL, ...)."""
        with self._lock:
            self._totals.errors[code] = self._totals.errors.get(code, 0) + 1
        self._notify("on_error", code, rpc)

    def get(self, message_id: str) -> MessageRecord | None:
        """A copy of one message's record, or None."""
        with self._lock:
            record = self._records.get(message_id)
            return _copy(record) if record is not None else None

    def messages(self, limit: int | None = None) -> list[MessageRecord]:
        """Copies of the most recent records, newest first."""
        with self._lock:
            records = list(reversed(self._records.values()))
            if limit is not None:
                records = records[: max(limit, 0)]
            return [_copy(r) for r in records]

    def totals(self) -> Totals:
        with self._lock:
            t = self._totals
            return Totals(t.messages, t.questions, dict(t.bytes), t.fp16_bytes, dict(t.errors))

    def stats(self) -> dict[str, Any]:
        """Totals since start and aggregate() of the records held."""
        with self._lock:
            records = [_copy(r) for r in self._records.values()]
        totals = self.totals()
        wire_total = sum(totals.bytes.values())
        return {
            "messages": totals.messages,
            "questions": totals.questions,
            "bytes": {**totals.bytes, "total": wire_total},
            "fp16_bytes": totals.fp16_bytes,
            "compression_ratio": totals.fp16_bytes / wire_total if wire_total else None,
            "errors": dict(sorted(totals.errors.items())),
            "records_held": len(records),
            "configs": aggregate(records),
        }


def _copy(record: MessageRecord) -> MessageRecord:
    return replace(
        record,
        config=dict(record.config),
        timings=dict(record.timings),
        asks=[replace(a, timings=dict(a.timings)) for a in record.asks],
    )
