"""Segments: one token range of a context sent in several Transfers (kvlink.stream), and what a
receiver's work costs (ReceiverCosts, advertised in its Welcome so a sender can plan time to first
token). Both are plain dataclasses with their proto conversions and the checks a receiver makes.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from kvlink.wire._common import pb
from kvlink.wire.validation import MAX_SEGMENTS, Segment, segment_from_pb


def segment_to_pb(segment: Segment) -> pb.Segment:
    return pb.Segment(
        stream_id=segment.stream_id, index=segment.index, start=segment.start,
        total_length=segment.total_length, last=segment.last, token_ids=list(segment.token_ids),
    )  # fmt: skip


MAX_COST_POINTS = 64
"""Prefill lengths, and decode formats, a receiver may advertise (a sender plans with every one)."""
MAX_RATE = 1e15
"""Tokens or bytes a second no receiver reaches: an advertised rate above it is refused."""
MAX_COST_S = 3600.0
"""Seconds no receiver's first token or per-segment cost takes: a longer one is refused."""
MAX_FORMAT_CHARS = 256


def _rate(value: float, what: str) -> float:
    if not (math.isfinite(value) and 0 < value <= MAX_RATE):
        raise ValueError(f"{what} must be a finite rate in (0, {MAX_RATE:g}], got {value!r}")
    return float(value)


def _seconds(value: float, what: str) -> float:
    if not (math.isfinite(value) and 0 <= value <= MAX_COST_S):
        raise ValueError(f"{what} must be finite seconds in [0, {MAX_COST_S:g}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ReceiverCosts:
    """A receiver's measured throughputs (kvlink.stream.measure_costs): prefill tokens/s by context
    length (ascending, each length once), FP16-equivalent bytes of KV decoded per second (INT4: the
    rate of a format not in `decode`), a short question's prefill plus first answer token in seconds,
    the decode rate of each KV format measured (format: kvlink.stream.decode_format, a recipe's name
    less its selection), the fixed seconds of one segment's message at the receiver beyond its
    bytes and decode (0: not measured), and what a context's first answer token takes beyond its
    question's prefill: answer_s + answer_s_per_token per context token (both 0: not measured).
    Every number is checked here (ValueError quoting it): a receiver's Welcome must not make a sender
    divide by zero, plan with NaN or loop over millions."""

    prefill: tuple[tuple[int, float], ...]
    decode_bytes_per_s: float
    first_token_s: float
    decode: tuple[tuple[str, float], ...] = ()
    segment_s: float = 0.0
    answer_s: float = 0.0
    answer_s_per_token: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= len(self.prefill) <= MAX_COST_POINTS:
            raise ValueError(f"1 to {MAX_COST_POINTS} prefill rates, got {len(self.prefill)}")
        lengths = [n for n, _ in self.prefill]
        if any(not isinstance(n, int) or n < 1 for n in lengths) or lengths != sorted(set(lengths)):
            raise ValueError(f"prefill lengths must be positive, ascending and distinct, got {lengths!r}")
        for n, r in self.prefill:
            _rate(r, f"the prefill rate at {n} tokens")
        _rate(self.decode_bytes_per_s, "the decode rate")
        _seconds(self.first_token_s, "the first token's time")
        _seconds(self.segment_s, "the per-segment cost")
        _seconds(self.answer_s, "the first token beyond the question")
        _seconds(self.answer_s_per_token, "the first token's time per context token")
        if len(self.decode) > MAX_COST_POINTS:
            raise ValueError(f"at most {MAX_COST_POINTS} decode formats, got {len(self.decode)}")
        names = [name for name, _ in self.decode]
        if len(set(names)) != len(names):
            raise ValueError(f"each decode format once, got {names!r}")
        for name, r in self.decode:
            if not name or len(name) > MAX_FORMAT_CHARS:
                raise ValueError(
                    f"a decode format is a name of 1 to {MAX_FORMAT_CHARS} characters, got {name!r}"
                )
            _rate(r, f"the decode rate of {name!r}")

    def decode_rate(self, format: str) -> float:
        """FP16-equivalent bytes/s this receiver decodes `format` at (kvlink.stream.decode_format); a
        format it did not measure (or a receiver that measured one rate only) at decode_bytes_per_s."""
        return next((r for name, r in self.decode if name == format), self.decode_bytes_per_s)

    def answer_time(self, context: int, question: int) -> float:
        """Seconds from the last segment's arrival to the first answer token of a question of `question`
        tokens after a context of `context` tokens, beyond its decode: the question's prefill there
        plus answer_s + answer_s_per_token * context; without them (a receiver of before them), the
        larger of that prefill and first_token_s."""
        prefill = self.recompute_s(context, question)
        if self.answer_s > 0 or self.answer_s_per_token > 0:
            return prefill + self.answer_s + self.answer_s_per_token * context
        return max(prefill, self.first_token_s)

    def prefill_rate(self, tokens: int) -> float:
        """Tokens/s of a prefill at a context of `tokens` (linear between measured lengths, the
        nearest measured one outside them)."""
        lengths = [n for n, _ in self.prefill]
        i = bisect.bisect_left(lengths, tokens)
        if i == 0:
            return self.prefill[0][1]
        if i == len(lengths):
            return self.prefill[-1][1]
        (n0, r0), (n1, r1) = self.prefill[i - 1], self.prefill[i]
        return r0 + (r1 - r0) * (tokens - n0) / (n1 - n0)

    def prefill_s(self, tokens: int) -> float:
        """Seconds to prefill a context of `tokens` tokens from nothing. Beyond the longest length measured,
        t(n) = a n + b n^2 through the two longest of at least three (linear layers, then attention
        growing with the context); with fewer, the longest one's rate."""
        if tokens <= 0:
            return 0.0
        n2 = self.prefill[-1][0]
        if tokens <= n2 or len(self.prefill) < 3:  # two short lengths say little of the curve beyond
            return tokens / self.prefill_rate(tokens)
        (n1, r1), (n2, r2) = self.prefill[-2], self.prefill[-1]
        per1, per2 = 1 / r1, 1 / r2  # seconds a token: a + b n at n1 and n2
        b = max((per2 - per1) / (n2 - n1), 0.0)
        a = per2 - b * n2
        return a * tokens + b * tokens * tokens

    def recompute_s(self, prefix: int, n: int) -> float:
        """Seconds to prefill `n` tokens after `prefix` cached ones: what a prefill of prefix + n tokens
        takes beyond one of prefix tokens (late tokens attend to more, so they cost more than the
        average of a whole prefill); never faster than the fastest rate measured."""
        marginal = self.prefill_s(prefix + n) - self.prefill_s(prefix)
        return max(marginal, n / max(rate for _, rate in self.prefill))


def costs_to_pb(costs: ReceiverCosts) -> pb.ReceiverCosts:
    return pb.ReceiverCosts(
        prefill=[pb.PrefillRate(tokens=n, tokens_per_s=r) for n, r in costs.prefill],
        decode_bytes_per_s=costs.decode_bytes_per_s, first_token_s=costs.first_token_s,
        decode=[pb.DecodeRate(format=name, bytes_per_s=r) for name, r in costs.decode],
        segment_s=costs.segment_s, answer_s=costs.answer_s, answer_s_per_token=costs.answer_s_per_token,
    )  # fmt: skip


def costs_from_pb(msg: pb.ReceiverCosts) -> ReceiverCosts | None:
    """None when the receiver measured nothing (no prefill rate, no decode rate). A Welcome of before
    per-format rates (no `decode`, no `segment_s`) reads as one decode rate for every format and no
    per-segment cost. Raises ValueError, quoting the value, for a count, rate or time no plan can use."""
    if not msg.prefill and msg.decode_bytes_per_s == 0:
        return None
    for what, count in (("prefill rates", len(msg.prefill)), ("decode formats", len(msg.decode))):
        if count > MAX_COST_POINTS:  # before anything is copied out of the message
            raise ValueError(f"at most {MAX_COST_POINTS} {what}, got {count}")
    prefill = tuple(sorted((int(p.tokens), float(p.tokens_per_s)) for p in msg.prefill))
    decode = tuple((str(d.format), float(d.bytes_per_s)) for d in msg.decode)
    return ReceiverCosts(
        prefill, float(msg.decode_bytes_per_s), float(msg.first_token_s), decode, float(msg.segment_s),
        float(msg.answer_s), float(msg.answer_s_per_token),
    )  # fmt: skip


__all__ = [
    "MAX_COST_POINTS",
    "MAX_SEGMENTS",
    "ReceiverCosts",
    "Segment",
    "costs_from_pb",
    "costs_to_pb",
    "segment_from_pb",
    "segment_to_pb",
]
