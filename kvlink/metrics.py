"""Per-message byte and time accounting, and the in-memory registry the receiver's REST stats read.

    registry = MetricsRegistry()
    registry.record_message(MessageRecord.from_receipt(receipt, session_id, config, length, kept))
    registry.record_answer(message_id, AskRecord(question, answer, ...), sender_timings)
    registry.record_error("CORRUPT")
    registry.stats()        # aggregates per codec config label and per context-length bucket (aggregate())

Bytes are bytes on the wire as the receipt counts them (gRPC 5-byte prefixes
included): payload (quantized codes), metadata (positions + scales/zeros +
low-rank factors), framing (every other byte of the frames) and signaling
(acks, nacks, the receipt). Timings are seconds per stage; stage keys end in
"_s": the sender's (prefill_s, select_s, quantize_s, pack_s, transfer_s, sent
with the question) and the receiver's (receive_s, verify_s, decode_s,
answer_s, ...). The registry is thread-safe; it keeps the last `max_records`
messages (and at most `max_bytes` of them: texts are stored cut to
MAX_STORED_TEXT characters) for the per-message views, and cumulative totals
that are never dropped. Records belong to an owner (the identity that sent the
message, kvlink.server.guard): message ids are unique per owner, and the views can be
narrowed to one owner. No web code lives here: kvlink/server/rest.py serves it.
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

from kvlink.recipe import Recipe
from kvlink.wire import Receipt

logger = logging.getLogger(__name__)

BYTE_CATEGORIES: tuple[str, ...] = ("payload", "metadata", "framing", "signaling")
METADATA_SPLIT: tuple[str, ...] = ("positions", "scales", "factors")
SENDER_STAGES: tuple[str, ...] = ("prefill_s", "select_s", "quantize_s", "pack_s", "plan_s", "transfer_s")
"""Sender stage timings an Ask may carry; anything else it sends is ignored."""
MAX_STORED_TEXT = 2048
"""Characters of a question, answer or reference answer kept in a record (scores use the whole text)."""
MAX_STORED_ASKS = 64
"""Answers kept per message record (the latest; the older ones are counted in `dropped_asks`)."""


LENGTH_BUCKETS: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
"""Upper bounds (inclusive) of the context-length buckets of /v1/stats; longer contexts share the last."""


def length_bucket(length: int) -> str:
    """The context-length bucket of T tokens: '1-256', '257-512', ..., '16385-32768', '>32768'."""
    low = 1
    for high in LENGTH_BUCKETS:
        if length <= high:
            return f"{low}-{high}"
        low = high + 1
    return f">{LENGTH_BUCKETS[-1]}"


def config_family(config: Mapping[str, Any]) -> str:
    """A config's family, a label of bounded cardinality (for Prometheus): which positions travel
    (the selector, or "all"), low rank, and the K/V precisions in bits ("mixed" when they vary by
    layer); not retention, groups, sinks, rotation, widths or seeds, which take unbounded values.
    E.g. 'q2c/k4v4', 'all/fp16', 'snapkv/svd/k8v8', 'q2c/kmixedv4'. `config`: Recipe.to_dict()."""
    from kvlink.quant.formats import format_spec
    from kvlink.recipe import Recipe

    try:
        recipe = Recipe.from_dict(config)
    except (ValueError, KeyError, TypeError):
        return "other"

    def bits(kind: str) -> str:
        formats = {q.format for q in recipe.quantizers(kind)}
        if len(formats) > 1:
            return "mixed"
        spec = format_spec(formats.pop())
        return "nf4" if spec.family == "nf" else str(spec.bits)

    parts = ["all" if recipe.select is None else recipe.method]
    lowrank = [s for s in recipe.stages() if s.name == "lowrank"]
    if lowrank:
        parts.append(str(getattr(lowrank[0], "mode", "other")))
    k, v = bits("k"), bits("v")
    parts.append("fp16" if k == v == "16" else f"k{k}v{v}")
    return "/".join(parts)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_STORED_TEXT else text[: MAX_STORED_TEXT - 1] + "…"


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

    def stored(self) -> AskRecord:
        """This record as the registry keeps it: every text cut to MAX_STORED_TEXT characters."""
        return replace(
            self, question=_cut(self.question), answer=_cut(self.answer),
            reference_answers=[_cut(r) for r in self.reference_answers],
        )  # fmt: skip

    def nbytes(self) -> int:
        """About what this record costs in memory (its texts and a fixed share for the rest)."""
        texts = len(self.question) + len(self.answer) + sum(len(r) for r in self.reference_answers)
        return 512 + 4 * texts + 8 * len(self.token_ids) + 64 * len(self.timings)


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
    owner: str = ""
    dropped_asks: int = 0  # answers beyond MAX_STORED_ASKS, no longer held

    @property
    def questions(self) -> int:
        """Questions answered from this message, dropped ones included."""
        return len(self.asks) + self.dropped_asks

    @classmethod
    def from_receipt(
        cls,
        receipt: Receipt,
        session_id: str,
        config: Recipe,
        length: int,
        kept: int,
        timings: Mapping[str, float] | None = None,
        received_at: float | None = None,
        owner: str = "",
    ) -> MessageRecord:
        """The record of a sealed receipt (see kvlink.wire.receipt_signal)."""
        return cls(
            message_id=receipt.message_id, session_id=session_id, config_label=config.name,
            config=config.to_dict(), length=length, kept=kept, fp16_bytes=receipt.fp16_bytes,
            payload=receipt.payload, positions=receipt.positions, scales=receipt.scales,
            factors=receipt.factors, framing=receipt.framing, signaling=receipt.signaling,
            chunks=receipt.chunks, retransmits=receipt.retransmits,
            retransmitted_bytes=receipt.retransmitted_bytes,
            timings=dict(receipt.timings if timings is None else timings),
            received_at=time.time() if received_at is None else received_at, owner=owner,
        )  # fmt: skip

    @property
    def metadata(self) -> int:
        return self.positions + self.scales + self.factors

    @property
    def family(self) -> str:
        """config_family of the record's config: a bounded label."""
        return config_family(self.config)

    @property
    def length_bucket(self) -> str:
        return length_bucket(self.length)

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
            "message_id": self.message_id, "session_id": self.session_id, "owner": self.owner,
            "config_label": self.config_label, "config": dict(self.config), "family": self.family,
            "length": self.length, "length_bucket": self.length_bucket, "kept": self.kept, "fp16_bytes": self.fp16_bytes,
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
            "questions": self.questions,
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


def aggregate(
    records: Iterable[MessageRecord], group_by: Callable[[MessageRecord], str] = lambda r: r.config_label
) -> dict[str, dict[str, Any]]:
    """Per codec config label (or per `group_by` of a record, e.g. its length bucket): messages, bytes by
    category (sum and mean per message), compression ratio vs FP16 (sum of FP16 bytes over sum of
    wire bytes), timings (mean/p50/p95 per stage, answer timings included), and F1/EM means over the
    questions that came with reference answers. "config" is the group's last config."""
    groups: dict[str, list[MessageRecord]] = {}
    for r in records:
        groups.setdefault(group_by(r), []).append(r)
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
            "questions": sum(r.questions for r in group),
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
    """Told about every event as it is recorded (kvlink/server/rest.py feeds Prometheus this way)."""

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


RecordKey = tuple[str, str]  # (owner, message_id)


def _record_nbytes(record: MessageRecord) -> int:
    return 2048 + 64 * len(record.timings) + sum(a.nbytes() for a in record.asks)


class MetricsRegistry:
    """Thread-safe store of MessageRecords (the last `max_records`, at most about `max_bytes` of them)
    and cumulative totals."""

    def __init__(
        self, max_records: int = 10_000, clock: Callable[[], float] = time.time, max_bytes: int = 64 << 20
    ) -> None:
        for name, value in (("max_records", max_records), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._records: OrderedDict[RecordKey, MessageRecord] = OrderedDict()
        self._bytes = 0
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

    def _trim(self) -> None:
        """Drop the oldest records past max_records or max_bytes (lock held); the newest stays."""
        while len(self._records) > 1 and (
            len(self._records) > self.max_records or self._bytes > self.max_bytes
        ):
            _, old = self._records.popitem(last=False)
            self._bytes -= _record_nbytes(old)

    def has(self, owner: str, message_id: str) -> bool:
        """Whether a record of `owner`'s message `message_id` is held."""
        with self._lock:
            return (owner, message_id) in self._records

    def record_message(self, record: MessageRecord) -> None:
        """Add a message the receiver accepted (replaces an earlier record of the same owner and id)."""
        with self._lock:
            if not record.received_at:
                record.received_at = self._clock()
            key = (record.owner, record.message_id)
            old = self._records.pop(key, None)
            if old is not None:
                self._bytes -= _record_nbytes(old)
            record.asks = [a.stored() for a in record.asks]
            self._records[key] = record
            self._bytes += _record_nbytes(record)
            self._trim()
            t = self._totals
            t.messages += 1
            t.fp16_bytes += record.fp16_bytes
            for c in BYTE_CATEGORIES:
                t.bytes[c] += getattr(record, c)
        self._notify("on_message", record)

    def record_answer(
        self,
        message_id: str,
        ask: AskRecord,
        sender_timings: Mapping[str, float] | None = None,
        owner: str = "",
    ) -> bool:
        """Attach an answer (and the sender's stage timings it reported) to `owner`'s message; its
        texts are stored cut to MAX_STORED_TEXT characters.

        Returns False when the message has no record (dropped from the history)."""
        with self._lock:
            record = self._records.get((owner, message_id))
            if record is None:
                return False
            if not ask.asked_at:
                ask.asked_at = self._clock()
            for key, value in (sender_timings or {}).items():
                if key in SENDER_STAGES and math.isfinite(value) and value >= 0:
                    record.timings.setdefault(key, float(value))
            stored = ask.stored()
            record.asks.append(stored)
            self._bytes += stored.nbytes()
            while len(record.asks) > MAX_STORED_ASKS:
                self._bytes -= record.asks.pop(0).nbytes()
                record.dropped_asks += 1
            self._totals.questions += 1
            self._trim()
        self._notify("on_answer", record, stored)
        return True

    def record_error(self, code: str, rpc: str = "Transfer") -> None:
        """Count a refused request by error code (a WireError code, NOT_FOUND, INTERNAL, ...)."""
        with self._lock:
            self._totals.errors[code] = self._totals.errors.get(code, 0) + 1
        self._notify("on_error", code, rpc)

    def get(self, message_id: str, owner: str | None = "") -> MessageRecord | None:
        """A copy of `owner`'s record of a message, or None; owner None: the newest record with this
        id whoever owns it (an operator's view)."""
        with self._lock:
            if owner is not None:
                record = self._records.get((owner, message_id))
            else:
                record = next(
                    (r for r in reversed(self._records.values()) if r.message_id == message_id), None
                )
            return _copy(record) if record is not None else None

    def messages(self, limit: int | None = None, owner: str | None = None) -> list[MessageRecord]:
        """Copies of the most recent records (of `owner` only, unless None), newest first."""
        with self._lock:
            records = [r for r in reversed(self._records.values()) if owner is None or r.owner == owner]
            if limit is not None:
                records = records[: max(limit, 0)]
            return [_copy(r) for r in records]

    def totals(self) -> Totals:
        with self._lock:
            t = self._totals
            return Totals(t.messages, t.questions, dict(t.bytes), t.fp16_bytes, dict(t.errors))

    def stats(self, owner: str | None = None) -> dict[str, Any]:
        """Totals since start and aggregate() of the records held; with `owner`, both over that
        owner's records only (the totals then cover the records held, not all time)."""
        with self._lock:
            records = [_copy(r) for r in self._records.values() if owner is None or r.owner == owner]
        totals = self.totals() if owner is None else _totals_of(records)
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
            "lengths": dict(
                sorted(
                    aggregate(records, lambda r: r.length_bucket).items(), key=lambda kv: _bucket_order(kv[0])
                )
            ),
        }


def _bucket_order(bucket: str) -> int:
    return int(bucket.lstrip(">").split("-")[0])


def _totals_of(records: Sequence[MessageRecord]) -> Totals:
    totals = Totals(messages=len(records), questions=sum(r.questions for r in records))
    for r in records:
        totals.fp16_bytes += r.fp16_bytes
        for c in BYTE_CATEGORIES:
            totals.bytes[c] += getattr(r, c)
    return totals


def _copy(record: MessageRecord) -> MessageRecord:
    return replace(
        record,
        config=dict(record.config),
        timings=dict(record.timings),
        asks=[replace(a, timings=dict(a.timings)) for a in record.asks],
    )
