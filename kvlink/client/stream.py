"""Segmented sending by time to first token (kvlink-send --goal ttft): the gRPC half of kvlink.stream.

    result = await send_streamed("127.0.0.1:50051", context, question, lm=lm, budget=1.0)
    result.answer.text, result.ttft_s, result.predicted_ttft_s, [s.option for s in result.segments]

The context is cut into segments (kvlink.stream.segment_bounds); each is one Transfer whose header
names the context (kvlink.wire.Segment), and the receiver answers only once the last one is in.
Three things run at once: the sender's prefill (in a worker thread, started before anything is
chosen), the loop that chooses each segment's option and encodes it (with the link rate measured
from the receipts so far: kvlink.stream.Planner.choose), and the segments' Transfers, each started as
soon as the one before has been written, not answered, so the receiver decodes segment i while
segment i+1 is on the link. Segment i is chosen once segment i-2 is answered (MAX_IN_FLIGHT open at
once; the planner's window), knowing what the segment still open holds of the link and the
receiver, so a link that slows down is followed within two segments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvlink import wire
from kvlink.answer import GenerationOptions
from kvlink.budget import parse_budget
from kvlink.cache import Observe, Prefill, prefill
from kvlink.client.sender import (
    PLAINTEXT,
    ClientSecurity,
    SendError,
    Stage,
    TransferResult,
    ask,
    channel_options,
    hello,
    prompt_ids,
    transfer,
)
from kvlink.models import Geometry, LoadedModel
from kvlink.prompt import question_rows
from kvlink.recipe import Recipe
from kvlink.stream import (
    LINKS,
    TEXT,
    Costs,
    LinkMemory,
    Option,
    Planner,
    Scores,
    call_sample,
    encode_segment,
    kv_options,
    recipe_option,
    segment_bounds,
    segmentable,
    text_option,
)

logger = logging.getLogger(__name__)

GOALS = ("bytes", "ttft")
MAX_IN_FLIGHT = 2
"""Segment Transfers open at once: one the receiver decodes while the next one is on the link (each
open call holds one of the receiver's per-peer call slots)."""
ASSUMED_COSTS = wire.ReceiverCosts(((1024, 20_000.0),), 5e9, 0.05)
"""What a receiver that advertises no measured costs is assumed to cost (logged when used)."""
RATE_TOKENS = 128
"""Tokens an encode rate is timed on at least (the probe times a segment's size; a shorter last segment
teaches nothing)."""
ENCODE_RATES: dict[tuple[str, str], float] = {}
"""This process's encode rates (FP16 bytes/s) by (model fingerprint, option name), the last measured: a
send plans with them before it has encoded anything, and measures only the options not in here."""
_PROBES: set[asyncio.Task[dict[str, float]]] = set()
"""Encode-rate probes still running (held here so that one outliving its send is not collected)."""


@dataclass
class SegmentSent:
    """One segment as chosen, predicted and sent."""

    index: int
    start: int
    stop: int
    option: str
    predicted_ttft_s: float  # the whole context's TTFT predicted when this segment was chosen
    link_bps: float  # the link estimate it was chosen with
    transfer: TransferResult | None = None
    encode_s: float = 0.0
    call_s: float = 0.0  # the per-segment call cost it was chosen with
    plan_s: float = 0.0  # the sender's time choosing it (the planner; not in the prediction)

    @property
    def wire_bytes(self) -> int:
        return self.transfer.receipt.total if self.transfer is not None else 0

    def as_dict(self) -> dict[str, Any]:
        r = self.transfer.receipt if self.transfer is not None else None
        return {
            "index": self.index, "start": self.start, "stop": self.stop, "option": self.option,
            "predicted_ttft_s": self.predicted_ttft_s, "link_gbps": self.link_bps / 1e9,
            "wire_bytes": self.wire_bytes, "encode_s": self.encode_s, "call_s": self.call_s,
            "plan_s": self.plan_s, "receiver": dict(r.timings) if r is not None else {},
        }  # fmt: skip


@dataclass
class StreamResult:
    """A context sent in segments and one question answered from it."""

    session_id: str
    stream_id: str
    segments: list[SegmentSent]
    answer: wire.Answer
    welcome: wire.Welcome
    context_tokens: int
    fp16_bytes: int
    budget_bytes: int
    predicted_ttft_s: float  # the plan's TTFT predicted before anything was sent
    static_predictions: dict[str, float]  # every option for every segment, predicted alike
    ttft_s: float  # measured: from the Hello's answer to the receiver's first answer token
    timings: dict[str, float] = field(default_factory=dict)
    work_scales: tuple[float, float] = (1.0, 1.0)  # (text, KV): measured / advertised receiver work, learned

    @property
    def total_bytes(self) -> int:
        return sum(s.wire_bytes for s in self.segments)

    def stages(self) -> dict[str, float]:
        """Seconds of each stage summed over the segments, and the wall time they took together: a
        pipeline's wall time is near its slowest stage, not the sum."""
        receipts = [s.transfer.receipt.timings for s in self.segments if s.transfer is not None]
        out = {
            "prefill_s": self.timings.get("prefill_s", 0.0),
            "encode_s": sum(s.encode_s for s in self.segments),
            "plan_s": sum(s.plan_s for s in self.segments),
            "link_s": sum(r.get("receive_s", 0.0) for r in receipts),
            "receiver_s": sum(r.get("decode_s", 0.0) + r.get("recompute_s", 0.0) for r in receipts),
            "wall_s": self.timings.get("transfer_s", 0.0),
        }
        out["sum_s"] = out["prefill_s"] + out["encode_s"] + out["plan_s"] + out["link_s"] + out["receiver_s"]
        return out

    @property
    def fraction(self) -> float:
        return self.total_bytes / self.fp16_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "message_id": self.stream_id, "answer": self.answer.text,
            "f1": self.answer.f1, "context_tokens": self.context_tokens, "fp16_bytes": self.fp16_bytes,
            "budget_bytes": self.budget_bytes, "wire_bytes": self.total_bytes,
            "percent_of_fp16": 100 * self.fraction, "predicted_ttft_s": self.predicted_ttft_s,
            "ttft_s": self.ttft_s, "static_predictions_s": dict(self.static_predictions),
            "timings": dict(self.timings), "stages": self.stages(),
            "segments": [s.as_dict() for s in self.segments],
        }  # fmt: skip


async def send_streamed(
    target: str,
    context: str,
    question: str,
    *,
    lm: LoadedModel,
    budget: float | str | None = None,
    segment_tokens: int = 1024,
    min_quality: float = 0.0,
    fixed: str | None = None,
    allowed: Sequence[str] | None = None,
    prefilled: Prefill | None = None,
    reference_answers: Sequence[str] = (),
    options: GenerationOptions | None = None,
    timeout: float = 120.0,
    security: ClientSecurity = PLAINTEXT,
    session_id: str | None = None,
    transfer_target: str | None = None,
    link_bps: float | None = None,
    links: LinkMemory = LINKS,
    truncate: bool = False,
    on_stage: Stage | None = None,
    on_segment: Any = None,
) -> StreamResult:
    """Send `context` in segments of `segment_tokens`, each as text, FP16 or a quality-table config,
    chosen to minimize the predicted time to first token within `budget` (of the FP16 size: every
    byte counts; None: no bound) and `min_quality` (a floor on each KV segment's expected quality), re-planned after
    every receipt; then ask `question`. fixed: send every segment as this option instead ("text",
    "fp16" or a config name: the static baselines; `budget` is then not applied). allowed: choose only
    among the options of these names ("text", "fp16", config names). link_bps: the link rate to assume before the
    first receipt (else what `links` remembers of this receiver). on_segment(SegmentSent): told as
    each segment's receipt arrives. prefilled: the context's prefill when the sender already holds it
    (kvlink.cache.prefill of the context and question with Observe.QUESTION, as this reads it): no
    prefill is then on the path (a warm sender; kvlink-bench ttft). Raises SendError when a call fails or the receiver does not take
    segments, ValueError for a bad budget or when nothing fits it.
    """
    fraction = None if budget is None else parse_budget(budget)
    options = options or GenerationOptions(32)
    stage = on_stage or (lambda name, detail: None)
    session_id = session_id or uuid.uuid4().hex
    stream_id = uuid.uuid4().hex
    meta = security.metadata
    ctx_ids, q_ids, _ = prompt_ids(lm, context, question, options.max_new_tokens, truncate)
    n_ctx = int(ctx_ids.numel())
    if prefilled is not None and prefilled.kv.length != n_ctx:
        raise ValueError(f"the prefill given holds {prefilled.kv.length} tokens, the context has {n_ctx}")
    g = lm.geometry
    bounds = segment_bounds(n_ctx, segment_tokens)
    timings: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        stage("connect", target)
        channel = await stack.enter_async_context(security.channel(target, channel_options()))
        welcome = await hello(channel, lm.fingerprint, timeout=timeout, metadata=meta)
        if transfer_target is not None and transfer_target != target:
            channel = await stack.enter_async_context(security.channel(transfer_target, channel_options()))
        t0 = time.perf_counter()
        if "segment" not in welcome.capabilities:
            raise SendError(
                grpc.StatusCode.UNIMPLEMENTED, "the receiver does not take segmented contexts (an older kvlink?)",
                code="UNKNOWN_CODEC", rpc="Hello",
            )  # fmt: skip
        receiver = welcome.costs
        if receiver is None:
            logger.warning("the receiver advertises no measured costs: assuming %s", ASSUMED_COSTS)
            receiver = ASSUMED_COSTS
        choices = kv_options(lm.fingerprint, lm.name, welcome.capabilities, g, min_quality, n_ctx)
        if "segment:text" in welcome.capabilities:
            choices.insert(0, text_option())
        if allowed is not None:
            choices = [o for o in choices if o.name in set(allowed)]
            if not choices:
                raise ValueError(f"none of {sorted(allowed)} is an option here")
        if fixed is not None:
            pinned = [o for o in choices if o.name == fixed]
            if not pinned and fixed != TEXT:
                recipe = Recipe.from_name(fixed)
                if not segmentable(recipe):
                    raise ValueError(
                        f"config {fixed!r} cannot encode one segment alone (kvlink.stream.segmentable)"
                    )
                pinned = [recipe_option(recipe, float("nan"))]
            if not pinned:
                raise SendError(
                    grpc.StatusCode.UNIMPLEMENTED, "the receiver does not recompute text segments",
                    code="UNKNOWN_CODEC", rpc="Hello",
                )  # fmt: skip
            choices = pinned
        fp16_bytes = g.fp16_bytes(n_ctx)
        bound = 1 << 62 if fraction is None or fixed is not None else int(fraction * fp16_bytes)
        planner = Planner(g, bounds, choices, bound, window=MAX_IN_FLIGHT)
        link = links.get(transfer_target or target, link_bps)
        needs_kv = any(not o.text for o in choices)
        prefill_estimate = receiver.recompute_s(0, n_ctx) if needs_kv and prefilled is None else 0.0
        # Each option's own encode rate (FP16 and INT4 differ several times), as earlier sends measured it.
        known = ((o.name, (lm.fingerprint, o.name)) for o in choices)
        encode_rates = {name: ENCODE_RATES[key] for name, key in known if key in ENCODE_RATES}
        costs = Costs(
            receiver, link.bps, prefill_s=prefill_estimate, question_tokens=int(q_ids.numel()),
            encode_rates=dict(encode_rates), segment_s=link.call_s(receiver),
            recompute_scale=link.recompute_scale, decode_scale=link.decode_scale,
        )  # fmt: skip

        async def read() -> Prefill:
            if prefilled is not None:
                return prefilled
            rows = question_rows(lm.tokenizer, question)
            t = time.perf_counter()
            pre = await asyncio.to_thread(prefill, lm.model, ctx_ids, q_ids, Observe.QUESTION, 32, rows)
            timings["prefill_s"] = time.perf_counter() - t
            return pre

        stage("prefill", "reading the context while the first segments go")
        reading = asyncio.create_task(read()) if needs_kv else None
        sent: list[SegmentSent] = []
        encode_bps = costs.encode_bps  # the last encode's rate, for options not measured yet
        probed = False  # the options without a known encode rate timed once the context is read

        def learn_probe(probe: asyncio.Task[dict[str, float]]) -> None:
            _PROBES.discard(probe)
            if probe.cancelled():  # its event loop closed first (a one-shot send that outlived it)
                return
            if probe.exception() is not None:
                logger.warning(
                    "the encode-rate probe failed (%r): planning with the last encode's rate",
                    probe.exception(),
                )
                return
            for name, rate in probe.result().items():
                encode_rates.setdefault(name, rate)  # a segment's own encode, if one came first, stands
                ENCODE_RATES.setdefault((lm.fingerprint, name), rate)

        spent = 0
        scores: Scores | None = None
        chosen: list[Option] = []
        began: dict[int, float] = {}  # segment -> when its Transfer began (perf_counter)
        answered: dict[int, float] = {}  # segment -> when its receipt came

        def backlog(i: int, c: Costs, clock: float) -> dict[str, float]:
            """When the link and the receiver are next free (seconds from `clock`) with segments ..i-1
            sent: an answered one is done; the others cross the link from when their Transfer began (or
            now), at the current estimate, and then take the receiver their predicted time."""
            link_at, ready_at = -math.inf, max(answered.values(), default=t0)
            for j in (j for j in range(i) if j not in answered):
                on_link = 8 * planner.bytes_of(chosen[j], j) / c.link_bps
                link_at = max(began.get(j, clock), link_at) + on_link
                ready_at = max(link_at + c.latency_s, ready_at) + planner.work_s(chosen[j], j, c)
            return {"link_free": max(link_at - clock, 0.0), "ready": max(ready_at - clock, 0.0)}

        async def deliver(
            seg: SegmentSent, frames: list[wire.pb.TransferFrame], written: asyncio.Event
        ) -> None:
            deadline = timeout + 8 * sum(wire.frame_size(f) for f in frames) / 100e6
            began[seg.index] = time.perf_counter()
            seg.transfer = await transfer(
                channel, frames, timeout=deadline, metadata=meta, on_written=written.set
            )
            r = seg.transfer.receipt
            if link.add(r.total, r.timings.get("receive_s", 0.0)):
                logger.debug("link estimate %.2f Gbit/s after segment %d", link.bps / 1e9, seg.index)
            answered[seg.index] = time.perf_counter()
            work = r.timings.get("decode_s", 0.0) + r.timings.get("recompute_s", 0.0)
            call = call_sample(
                began[seg.index], answered[seg.index], answered.get(seg.index - 1),
                r.timings.get("receive_s", 0.0), work, r.timings.get("turn_s", 0.0),
            )  # fmt: skip
            # The last segment's receipt comes after the context is committed (joined and stored once):
            # not a segment's call cost.
            if seg.index != len(bounds) - 1 and link.add_call(call):
                logger.debug(
                    "segment call cost %.1f ms after segment %d", 1e3 * (link.segment_s or 0), seg.index
                )
            option = chosen[seg.index]
            # Not from a short segment: work that does not grow with its tokens (after a long prefix, the
            # attention over it and the prefix's copy) would pass for a slow rate, and the scale taught by
            # a 31-token last segment after 32k tokens (20x) made text look 6x too slow to every later plan.
            # Nor from a whole prefill (Planner.whole_prefill), which is planned unscaled.
            short = seg.stop - seg.start < RATE_TOKENS
            if not (short or planner.whole_prefill(option, seg.index)) and link.add_work(
                option.text, work, planner.advertised_work_s(option, seg.index, receiver)
            ):
                logger.debug(
                    "receiver work x%.2f (text) x%.2f (KV) of its advertised rates after segment %d",
                    link.recompute_scale, link.decode_scale, seg.index,
                )  # fmt: skip
            if on_segment is not None:
                on_segment(seg)

        stage("transfer", f"{len(bounds)} segments of up to {segment_tokens} tokens")
        in_flight: list[asyncio.Task[None]] = []
        written: asyncio.Event | None = None
        try:
            for i, (a, b) in enumerate(bounds):
                # Chosen once the segment two before it is in (its receipt carries a link sample), just
                # before it is encoded while the one before is on the link: a changed link is followed
                # within two segments.
                busy = [t for t in in_flight if not t.done()]
                while len(busy) >= MAX_IN_FLIGHT:
                    await asyncio.wait(busy, return_when=asyncio.FIRST_COMPLETED)
                    busy = [t for t in busy if not t.done()]
                failed = next((t for t in in_flight if t.done() and t.exception() is not None), None)
                if failed is not None:
                    await failed  # raises its SendError
                done = reading is None or reading.done()
                if done and reading is not None and not probed:
                    # Once the context is read: the encode rate of each KV option not known yet, on a slice
                    # of it (FP16 is a copy, INT4 a quantization: a single rate would price them alike).
                    # In the background: a first send's probe (the selections' scores over the whole
                    # context, each format's first encode) held segment 2 back 1.6 s at 32k tokens on an
                    # H100 (bench/results/ttft-h100-rerun3) while the receiver idled. Until it is in,
                    # the plan prices those options at the last encode's rate.
                    probed = True
                    pre = await reading
                    scores = scores or Scores(pre)
                    # On a slice of a segment's size: timed on RATE_TOKENS, the fixed costs of an encode
                    # call passed for a slow rate (Q2C 25% + INT4 predicted at 51 s for 1.8 s, 32k tokens
                    # in 4k segments: bench/results/ttft-h100-rerun4), and an option predicted that slow
                    # is never sent, so its rate is never corrected.
                    unknown = [o for o in choices if o.name not in encode_rates and not o.text]
                    probe_tokens = min(max(RATE_TOKENS, bounds[0][1] - bounds[0][0]), n_ctx)
                    if unknown:
                        probe = asyncio.create_task(
                            asyncio.to_thread(encode_rates_of, pre, scores, unknown, g, probe_tokens)
                        )
                        _PROBES.add(probe)  # runs on past this send if it must: the next send plans with it
                        probe.add_done_callback(learn_probe)
                clock = time.perf_counter()
                now = clock - t0
                # A prefill that overran its estimate is assumed to need a quarter of what it took so far.
                c = Costs(
                    receiver, link.bps, encode_bps, 0.0 if done else max(prefill_estimate - now, now / 4),
                    encode_rates=dict(encode_rates),
                    question_tokens=int(q_ids.numel()), segment_s=link.call_s(receiver),
                    recompute_scale=link.recompute_scale, decode_scale=link.decode_scale,
                )  # fmt: skip
                option, guess = planner.choose(i, c, spent=spent, **backlog(i, c, clock))
                chosen.append(option)
                spent += planner.bytes_of(option, i)
                seg = SegmentSent(i, a, b, option.name, now + guess.ttft, link.bps, call_s=c.segment_s)
                seg.plan_s = time.perf_counter() - clock
                segment = wire.Segment(
                    stream_id, i, a, n_ctx, last=i == len(bounds) - 1,
                    token_ids=tuple(int(t) for t in ctx_ids[a:b]) if option.text else (),
                )  # fmt: skip
                if option.text:
                    frames = wire.text_frames(session_id, uuid.uuid4().hex, lm.fingerprint, g, segment)
                else:
                    assert reading is not None
                    pre = await reading
                    scores = scores or Scores(pre)
                    if option.recipe is not None and option.recipe.select is not None:
                        # Once per send and method, not per segment: kept out of the encode rate.
                        await asyncio.to_thread(scores.of, option.recipe)
                    started = time.perf_counter()
                    frames = await asyncio.to_thread(
                        _encoded_frames, pre, scores, option, g, segment, b, lm.fingerprint, session_id,
                        min(1 << 20, welcome.max_chunk_bytes),
                    )  # fmt: skip
                    seg.encode_s = time.perf_counter() - started
                    if b - a >= RATE_TOKENS:  # a short segment's fixed costs would pass for a slow rate
                        encode_bps = g.fp16_bytes(b - a) / max(seg.encode_s, 1e-6)
                        encode_rates[option.name] = ENCODE_RATES[lm.fingerprint, option.name] = encode_bps
                # The link is free once the segment before is written; one segment decodes meanwhile.
                busy = [t for t in in_flight if not t.done()]
                if written is not None and busy:
                    waiter = asyncio.create_task(written.wait())
                    await asyncio.wait({waiter, *busy}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                failed = next((t for t in in_flight if t.done() and t.exception() is not None), None)
                if failed is not None:
                    await failed  # raises its SendError
                sent.append(seg)
                written = asyncio.Event()
                in_flight.append(asyncio.create_task(deliver(seg, frames, written)))
                del frames
            await asyncio.gather(*in_flight)
        finally:
            for t in (*in_flight, *([reading] if reading is not None else [])):
                if not t.done():
                    t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*in_flight, return_exceptions=True)
        timings["transfer_s"] = time.perf_counter() - t0
        links.save()

        stage("answer", "waiting for the receiver's answer")
        request = wire.Ask(
            session_id, stream_id, question, options.max_new_tokens, tuple(reference_answers), dict(timings),
            options.temperature, options.top_p, options.stop,
        )  # fmt: skip
        asked = time.perf_counter()
        answer = await ask(channel, request, timeout=timeout, metadata=meta)
        timings["ask_s"] = time.perf_counter() - asked
    # What was predicted before the first segment, from `costs` as it was then (nothing changes it), worked
    # out now: the whole plan and every static schedule take the planner long enough to delay that segment.
    started = time.perf_counter()
    predicted = planner.plan(costs)[1].ttft
    static = {o.name: planner.predict([o] * len(bounds), costs).ttft for o in choices}
    timings["predict_s"] = time.perf_counter() - started
    first = answer.timings.get("first_token_s", timings["ask_s"])
    return StreamResult(
        session_id=session_id, stream_id=stream_id, segments=sent, answer=answer, welcome=welcome,
        context_tokens=n_ctx, fp16_bytes=fp16_bytes, budget_bytes=planner.budget_bytes,
        predicted_ttft_s=predicted, static_predictions=static, ttft_s=asked - t0 + first, timings=timings,
        work_scales=(link.recompute_scale, link.decode_scale),
    )  # fmt: skip


def encode_rates_of(
    pre: Prefill, scores: Scores, options: Sequence[Option], geometry: Geometry, tokens: int
) -> dict[str, float]:
    """FP16 bytes a second each KV option encodes (select, quantize, pack), timed on the first `tokens`
    tokens after one untimed run."""
    rates: dict[str, float] = {}
    for option in options:
        if option.text:
            continue
        encode_segment(pre, scores, option, geometry, 0, tokens)
        started = time.perf_counter()
        encoded = encode_segment(pre, scores, option, geometry, 0, tokens)
        wire.to_frames(encoded, "rate", "rate", "rate", 1 << 20)
        rates[option.name] = geometry.fp16_bytes(tokens) / max(time.perf_counter() - started, 1e-6)
    return rates


def _encoded_frames(
    pre: Prefill,
    scores: Scores,
    option: Option,
    geometry: Geometry,
    segment: wire.Segment,
    stop: int,
    fingerprint: str,
    session_id: str,
    chunk_bytes: int,
) -> list[wire.pb.TransferFrame]:
    """One KV segment's frames: tokens [segment.start, stop) encoded under `option`."""
    encoded = encode_segment(pre, scores, option, geometry, segment.start, stop)
    return wire.to_frames(encoded, session_id, uuid.uuid4().hex, fingerprint, chunk_bytes, segment)
