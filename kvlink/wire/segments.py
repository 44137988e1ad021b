"""Segments: one token range of a context sent in several Transfers (kvlink.stream), and what a
receiver's work costs (ReceiverCosts, advertised in its Welcome so a sender can plan time to first
token). Both are plain dataclasses with their proto conversions and the checks a receiver makes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from kvlink.wire._common import pb
from kvlink.wire.validation import MAX_SEGMENTS, Segment, segment_from_pb


def segment_to_pb(segment: Segment) -> pb.Segment:
    return pb.Segment(
        stream_id=segment.stream_id, index=segment.index, start=segment.start,
        total_length=segment.total_length, last=segment.last, token_ids=list(segment.token_ids),
    )  # fmt: skip


@dataclass(frozen=True)
class ReceiverCosts:
    """A receiver's measured throughputs (kvlink.stream.measure_costs): prefill tokens/s by context
    length (ascending), FP16-equivalent bytes of KV decoded per second, and a short question's
    prefill plus first answer token in seconds."""

    prefill: tuple[tuple[int, float], ...]
    decode_bytes_per_s: float
    first_token_s: float

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
    )  # fmt: skip


def costs_from_pb(msg: pb.ReceiverCosts) -> ReceiverCosts | None:
    """None when the receiver measured nothing (or sent rates no plan can use)."""
    prefill = tuple(sorted((int(p.tokens), float(p.tokens_per_s)) for p in msg.prefill))
    usable = prefill and all(n > 0 and r > 0 for n, r in prefill) and msg.decode_bytes_per_s > 0
    if not usable:
        return None
    return ReceiverCosts(prefill, float(msg.decode_bytes_per_s), max(float(msg.first_token_s), 0.0))


__all__ = [
    "MAX_SEGMENTS",
    "ReceiverCosts",
    "Segment",
    "costs_from_pb",
    "costs_to_pb",
    "segment_from_pb",
    "segment_to_pb",
]
