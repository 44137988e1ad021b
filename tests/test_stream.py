"""Segmented contexts over real gRPC on loopback (kvlink.stream, kvlink.client.stream, the receiver's
segments): what the receiver commits is the context the sender read, text segments are recomputed
at their original positions, nothing is answered before the last segment, a receiver that refuses
text is never sent any, and the sender follows a link whose rate drops mid-message."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

import kvlink.client.stream as client_stream
from kvlink import wire
from kvlink.cache import Observe, prefill
from kvlink.client.sender import SendError, ask, transfer
from kvlink.client.stream import ENCODE_RATES, RATE_TOKENS, send_streamed
from kvlink.eval.link import PacedProxy
from kvlink.metrics import MetricsRegistry
from kvlink.models import LoadedModel, load_model
from kvlink.prompt import context_ids, question_ids, question_rows
from kvlink.recipe import Recipe, build
from kvlink.select import keep_count
from kvlink.server.service import KVLinkService
from kvlink.server.store import SessionStore
from kvlink.stream import (
    JUMP,
    Costs,
    LinkEstimate,
    LinkMemory,
    Planner,
    Scores,
    decode_format,
    encode_segment,
    fp16_option,
    measure_costs,
    recipe_option,
    segment_bounds,
    text_option,
)
from kvlink.wire.segments import costs_from_pb, costs_to_pb
from netutil import Receiver, free_port

TINY = "random:tiny-llama"
TINY_ARG = f"--model={TINY}"
CONTEXT = " ".join(f"Paragraph {i} says that the code of box {i} is {7 * i + 3}." for i in range(70))
# Long enough for 7 segments of 256 tokens (the link-change test needs several after the drop).
LONG_CONTEXT = " ".join(f"Paragraph {i} says that the code of box {i} is {7 * i + 3}." for i in range(100))
QUESTION = "What is the code of box 12?"
OWNER = "anonymous"
# A receiver whose model prefills 20k tokens/s and decodes KV at 2 GB/s: text costs 12.8 ms per 256
# tokens, FP16 KV of 256 tokens (64 KiB here) 0.5 ms at 1 Gbit/s and 52 ms at 10 Mbit/s.
COSTS = wire.ReceiverCosts(((128, 20_000.0), (2048, 20_000.0)), 2e9, 0.001)


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model(TINY)


@contextlib.asynccontextmanager
async def receiver(
    lm: LoadedModel, service_class: type[KVLinkService] = KVLinkService, **kwargs: Any
) -> AsyncIterator[tuple[str, KVLinkService]]:
    """An in-process receiver on a loopback port: (its target, its service); kwargs go to the service, costs
    COSTS unless given (tests/test_xl_stages.py's receiver too)."""
    kwargs.setdefault("costs", COSTS)
    service = service_class(lm, SessionStore(), MetricsRegistry(), **kwargs)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((wire.raw_rpc_handler(service),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        await server.stop(None)


def _read(lm: LoadedModel, context: str = CONTEXT) -> Any:
    ids = context_ids(lm.tokenizer, context)
    q = question_ids(lm.tokenizer, QUESTION)
    return prefill(lm.model, ids, q, Observe.QUESTION, 32, question_rows(lm.tokenizer, QUESTION))


async def test_fp16_segments_commit_the_context_the_sender_read(lm: LoadedModel) -> None:
    full = _read(lm).kv
    links = LinkMemory()
    async with receiver(lm) as (target, service):
        result = await send_streamed(target, CONTEXT, QUESTION, lm=lm, segment_tokens=200, fixed="fp16",
                                     links=links)  # fmt: skip
        kv = service.store.get(OWNER, result.session_id, result.stream_id)
    assert [s.option for s in result.segments] == ["fp16"] * len(segment_bounds(full.length, 200))
    # The receipts taught the sender the per-segment call cost (kvlink.stream.call_sample): the first
    # segment's always (nothing was before it on the link), a later one's unless it may have queued, the
    # last one's never (its receipt waits for the context's commit).
    learned = links.get(target)
    assert 1 <= learned.segment_samples < len(result.segments) and learned.segment_s is not None
    receipts = [s.transfer.receipt.timings for s in result.segments if s.transfer is not None]
    assert all(r["turn_s"] >= 0 for r in receipts)  # how long each waited for the one before it
    assert ENCODE_RATES[lm.fingerprint, "fp16"] > 0  # the next send plans with it before encoding
    assert 0.0 <= learned.segment_s < 5.0
    assert kv is not None and kv.length == full.length
    for layer in range(kv.num_layers):
        assert torch.equal(kv.positions[layer].cpu(), torch.arange(full.length))
        torch.testing.assert_close(
            kv.keys[layer].float().cpu(), full.keys[layer].float().cpu(), rtol=1e-3, atol=1e-3
        )
        torch.testing.assert_close(
            kv.values[layer].float().cpu(), full.values[layer].float().cpu(), rtol=1e-3, atol=1e-3
        )
    assert result.answer.finish_reason in ("eos", "length", "stop")
    assert result.total_bytes > result.fp16_bytes  # FP16 plus every header and frame: honest bytes


async def test_text_segments_are_recomputed_at_their_original_positions(lm: LoadedModel) -> None:
    """Recomputing segment after segment with the earlier ones as prefix gives the prefill of the
    whole context: the receiver's cache holds the same keys (RoPE'd at the original positions)."""
    full = _read(lm).kv
    links = LinkMemory()
    async with receiver(lm) as (target, service):
        result = await send_streamed(target, CONTEXT, QUESTION, lm=lm, segment_tokens=160, fixed="text",
                                     links=links)  # fmt: skip
        kv = service.store.get(OWNER, result.session_id, result.stream_id)
    assert kv is not None
    assert all(s.option == "text" for s in result.segments)
    assert result.total_bytes < 0.05 * result.fp16_bytes
    for layer in range(kv.num_layers):
        assert torch.equal(kv.positions[layer].cpu(), torch.arange(full.length))
        torch.testing.assert_close(
            kv.keys[layer].float().cpu(), full.keys[layer].float().cpu(), rtol=2e-2, atol=2e-2
        )
    receipts = [s.transfer.receipt for s in result.segments if s.transfer is not None]
    assert all("recompute_s" in r.timings for r in receipts)
    # Each receipt of a segment of RATE_TOKENS or more taught the sender how the receiver's recompute
    # compares with its advertised rates (COSTS), in the order the receipts came: the next send plans
    # text work scaled by it. The short last segment taught nothing (its fixed costs are no rate), nor
    # did the first: a whole prefill, what the advertised rates time.
    assert result.segments[-1].stop - result.segments[-1].start < RATE_TOKENS
    expected = LinkEstimate()
    for seg in sorted(result.segments, key=lambda s: s.index):
        assert seg.transfer is not None
        if seg.stop - seg.start < RATE_TOKENS or seg.start == 0:
            continue
        expected.add_work(
            True,
            seg.transfer.receipt.timings["recompute_s"],
            COSTS.recompute_s(seg.start, seg.stop - seg.start),
        )
    learned = links.get(target)
    assert expected.recompute_samples > 0 and learned.recompute_samples == expected.recompute_samples
    assert learned.recompute_scale == pytest.approx(expected.recompute_scale) and learned.decode_samples == 0
    assert result.work_scales == (learned.recompute_scale, 1.0)


async def test_selecting_segments_keep_their_best_positions_by_the_global_scores(lm: LoadedModel) -> None:
    name = "q2c50%+kint4c/vint4t-g32"
    pre = _read(lm)
    scores = Scores(pre).of(Recipe.from_name(name))
    async with receiver(lm) as (target, service):
        result = await send_streamed(target, CONTEXT, QUESTION, lm=lm, segment_tokens=160, fixed=name,
                                     links=LinkMemory())  # fmt: skip
        kv = service.store.get(OWNER, result.session_id, result.stream_id)
    assert kv is not None and kv.length == pre.kv.length
    expected = []
    for a, b in segment_bounds(pre.kv.length, 160):
        n = keep_count(0.5, b - a)
        best = torch.argsort(scores[a:b], descending=True, stable=True)[:n]
        expected.append(torch.sort(best).values + a)
    assert torch.equal(kv.positions[0].cpu(), torch.cat(expected))
    assert result.total_bytes < 0.25 * result.fp16_bytes
    # The encode rate this send leaves for the next one's plan: its last segment of RATE_TOKENS or more,
    # not the short one at the end (whose fixed costs would pass for a slow rate).
    timed = [s for s in result.segments if s.stop - s.start >= RATE_TOKENS]
    assert (
        len(timed) == len(result.segments) - 1 and result.segments[-1].stop - result.segments[-1].start < 128
    )
    last = timed[-1]
    assert (
        ENCODE_RATES[lm.fingerprint, name] == lm.geometry.fp16_bytes(last.stop - last.start) / last.encode_s
    )


async def test_nothing_is_answered_before_the_last_segment_and_an_abandoned_context_is_dropped(
    lm: LoadedModel,
) -> None:
    pre = _read(lm)
    g = lm.geometry
    bounds = segment_bounds(pre.kv.length, 256)
    scores = Scores(pre)
    stream_id = uuid.uuid4().hex
    async with (
        receiver(lm, stall_timeout_s=0.5) as (target, service),
        grpc.aio.insecure_channel(target) as channel,
    ):
        for i, (a, b) in enumerate(bounds[:2]):
            seg = wire.Segment(stream_id, i, a, pre.kv.length)
            encoded = encode_segment(pre, scores, fp16_option(), g, a, b)
            frames = wire.to_frames(encoded, "s", uuid.uuid4().hex, lm.fingerprint, 1 << 20, seg)
            await transfer(channel, frames)
        assert service.store._reserved > 0  # the two segments' caches, held for the context
        with pytest.raises(SendError) as refused:
            await ask(channel, wire.Ask("s", stream_id, QUESTION, 4))
        assert refused.value.status is grpc.StatusCode.NOT_FOUND
        await asyncio.sleep(1.2)  # no segment for longer than the stall timeout: dropped
        assert not service._streams
        assert service.store._reserved == 0
        # A segment of the dropped context is refused, and so is one out of order.
        seg = wire.Segment(stream_id, 2, bounds[2][0], pre.kv.length)
        encoded = encode_segment(pre, scores, fp16_option(), g, *bounds[2])
        with pytest.raises(SendError) as late:
            await transfer(
                channel, wire.to_frames(encoded, "s", uuid.uuid4().hex, lm.fingerprint, 1 << 20, seg)
            )
        assert late.value.code in ("STALLED", "ORDER")


async def test_a_receiver_that_refuses_text_is_never_sent_any(lm: LoadedModel) -> None:
    fast_prefill = wire.ReceiverCosts(((128, 1e9),), 1e6, 0.001)  # text would win by far
    async with receiver(lm, text_segments=False, costs=fast_prefill, stall_timeout_s=2.0) as (
        target,
        service,
    ):
        assert "segment:text" not in service.capabilities
        result = await send_streamed(target, CONTEXT, QUESTION, lm=lm, segment_tokens=256, links=LinkMemory())
        assert result.segments and all(s.option != "text" for s in result.segments)
        with pytest.raises(SendError) as pinned:
            await send_streamed(
                target, CONTEXT, QUESTION, lm=lm, segment_tokens=256, fixed="text", links=LinkMemory()
            )
        assert pinned.value.code == "UNKNOWN_CODEC"
        ids = context_ids(lm.tokenizer, CONTEXT)[:64]
        seg = wire.Segment(uuid.uuid4().hex, 0, 0, 64, last=True, token_ids=tuple(int(t) for t in ids))
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(SendError) as forged:
                await transfer(
                    channel, wire.text_frames("s", uuid.uuid4().hex, lm.fingerprint, lm.geometry, seg)
                )
        assert forged.value.code == "UNKNOWN_CODEC"
        assert not service._streams and service.store._reserved == 0


async def test_a_text_segment_outside_the_vocabulary_costs_one_error(lm: LoadedModel) -> None:
    vocab = int(lm.model.config.vocab_size)
    seg = wire.Segment(uuid.uuid4().hex, 0, 0, 3, last=True, token_ids=(1, 2, vocab + 5))
    async with receiver(lm) as (target, _service):
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(SendError) as bad:
                await transfer(
                    channel, wire.text_frames("s", uuid.uuid4().hex, lm.fingerprint, lm.geometry, seg)
                )
        assert bad.value.code == "MALFORMED" and "vocabulary" in bad.value.message
        result = await send_streamed(target, CONTEXT, QUESTION, lm=lm, segment_tokens=512, links=LinkMemory())
        assert result.answer.finish_reason  # the receiver kept serving


async def test_the_sender_follows_a_link_that_slows_down_mid_message(
    lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver that prefills 2k tokens/s: text costs it 128 ms per 256 tokens, while FP16 KV of 256
    tokens (64 KiB) takes ~1 ms at 1 Gbit/s (~10 ms as Python paces it here) and 0.5 s at 1 Mbit/s.
    The sender has read the context already. Once the link drops, it switches to text within two
    segments: the segment two after the last fast one. The encode rates earlier sends measured are set
    aside: one timed while the machine was busy (a full test run on two cores beside another job) priced
    FP16 above text for the first segment."""
    monkeypatch.setattr(client_stream, "ENCODE_RATES", {})
    pre = _read(lm, LONG_CONTEXT)
    costs = wire.ReceiverCosts(((128, 2_000.0), (2048, 2_000.0)), 2e9, 0.001)
    async with receiver(lm, costs=costs) as (target, _service):
        host, port = target.rsplit(":", 1)
        with PacedProxy((host, int(port)), 1e9) as link:
            switched: list[int] = []

            def on_segment(seg: Any) -> None:
                if seg.index == 1 and not switched:
                    link.set_rate(1e6)
                    switched.append(seg.index)

            result = await send_streamed(
                link.target, LONG_CONTEXT, QUESTION, lm=lm, segment_tokens=256, allowed=("text", "fp16"),
                link_bps=1e9, links=LinkMemory(), on_segment=on_segment, prefilled=pre,
            )  # fmt: skip
    options = [s.option for s in result.segments]
    assert options[:2] == ["fp16", "fp16"], options  # before the drop: KV
    # The drop comes with segment 1's receipt, when the next one may be on its way already; the first
    # segment the slow link carried shows it in its receipt, and two segments later the sender sends text.
    slow = [
        s.index for s in result.segments
        if s.transfer is not None and s.wire_bytes > 32 << 10
        and 8 * s.wire_bytes / s.transfer.receipt.timings["receive_s"] < 10e6
    ]  # fmt: skip
    assert slow, [s.as_dict() for s in result.segments]
    first_slow = slow[0]
    assert first_slow <= 3 and len(options) >= first_slow + 4, options
    assert options[first_slow + 2 :] == ["text"] * len(options[first_slow + 2 :]), options
    assert result.segments[-1].link_bps < 10e6 < result.segments[1].link_bps


async def test_a_slow_encode_rate_probe_does_not_hold_the_segments_back(
    lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender times the KV options it has no encode rate for once the context is read, on a slice of
    a segment's size. That probe runs beside the segments: while it takes 3 s, segment after segment goes and is answered (it used to
    hold the next segment back until it was done), and its rates reach ENCODE_RATES when it ends."""
    probe_window: list[float] = []
    real = client_stream.encode_rates_of

    sliced: list[int] = []

    def slow_probe(*args: Any) -> dict[str, float]:
        sliced.append(args[-1])  # the tokens it times each option on
        probe_window.append(time.perf_counter())
        time.sleep(3.0)
        rates = real(*args)
        probe_window.append(time.perf_counter())
        return rates

    monkeypatch.setattr(client_stream, "encode_rates_of", slow_probe)
    options = ("text", "fp16", "q2c50%+kint4c/vint4t-g32")
    for name in options:
        ENCODE_RATES.pop((lm.fingerprint, name), None)
    receipts: list[float] = []
    async with receiver(lm) as (target, _service):
        result = await send_streamed(
            target, CONTEXT, QUESTION, lm=lm, segment_tokens=160, allowed=options, links=LinkMemory(),
            on_segment=lambda seg: receipts.append(time.perf_counter()),
        )  # fmt: skip
        for _ in range(200):  # the probe may outlive the send
            if len(probe_window) == 2:
                break
            await asyncio.sleep(0.05)
    assert result.answer.finish_reason and len(result.segments) >= 8
    assert len(probe_window) == 2
    assert sliced == [160]  # a segment's size: timed on fewer tokens, an encode's fixed costs pass for a rate
    during = [t for t in receipts if probe_window[0] < t < probe_window[1]]
    assert len(during) >= 4, (probe_window, receipts)  # more than the two segments open when it began
    await asyncio.sleep(0)  # the probe's done-callback
    assert all(ENCODE_RATES[lm.fingerprint, name] > 0 for name in options[1:])


async def test_a_failed_encode_rate_probe_costs_a_warning_not_the_send(
    lm: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> dict[str, float]:
        raise RuntimeError("out of memory while probing")

    monkeypatch.setattr(client_stream, "encode_rates_of", broken)
    options = ("text", "fp16", "q2c50%+kint4c/vint4t-g32")
    for name in options:
        ENCODE_RATES.pop((lm.fingerprint, name), None)
    with caplog.at_level(logging.WARNING, logger="kvlink.client.stream"):
        async with receiver(lm) as (target, _service):
            result = await send_streamed(target, CONTEXT, QUESTION, lm=lm, segment_tokens=160, allowed=options,
                                         links=LinkMemory())  # fmt: skip
        for _ in range(100):
            if "encode-rate probe failed" in caplog.text:
                break
            await asyncio.sleep(0.05)
    assert result.answer.finish_reason and len(result.segments) >= 8
    assert "encode-rate probe failed" in caplog.text and "out of memory while probing" in caplog.text


class _HostileCosts(KVLinkService):
    """A receiver whose Welcome advertises costs no plan can use (NaN decode rates, a duplicated prefill
    length that would divide by zero, a negative call cost, thousands of formats)."""

    async def Hello(self, request: bytes, context: grpc.aio.ServicerContext) -> wire.pb.Welcome:
        msg = await super().Hello(request, context)
        msg.costs.prefill.add(tokens=128, tokens_per_s=1e3)  # twice: COSTS measured 128 already
        msg.costs.decode.extend(wire.pb.DecodeRate(format=f"f{i}", bytes_per_s=math.nan) for i in range(5000))
        msg.costs.segment_s = -1.0
        return msg


async def test_a_receiver_advertising_hostile_costs_is_still_sent_to(
    lm: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    async with receiver(lm, service_class=_HostileCosts) as (target, _service):
        with caplog.at_level(logging.WARNING):
            result = await asyncio.wait_for(
                send_streamed(target, CONTEXT, QUESTION, lm=lm, segment_tokens=256, links=LinkMemory()), 120
            )
    assert result.welcome.costs is None and result.answer.finish_reason
    assert "ignoring the costs the receiver" in caplog.text and "at most 64 decode formats" in caplog.text
    assert "advertises no measured costs: assuming" in caplog.text


def test_the_receiver_measures_each_format_and_its_call_cost(lm: LoadedModel) -> None:
    formats = [Recipe.from_name(n) for n in ("kint8c/vint8t-g32", "q2c50%+kint4c/vint3t-g32+sink1")]
    costs = measure_costs(lm.model, lm.geometry, 256, int(lm.model.config.vocab_size), formats=formats)
    rates = dict(costs.decode)
    assert list(rates) == ["fp16", decode_format(build(k_bits=4, v_bits=4)), "kint8c/vint8t-g32",
                           "kint4c/vint3t-g32+sink1"]  # fmt: skip
    assert all(math.isfinite(r) and r > 0 for r in rates.values())
    assert 0 < costs.segment_s < 5.0 and costs.decode_rate("fp16") == rates["fp16"]
    assert 0 < costs.answer_s <= costs.first_token_s and costs.answer_s_per_token >= 0
    # What the receiver advertises reads back on the sender's side as it was measured.
    assert costs_from_pb(costs_to_pb(costs)) == costs


def test_link_estimate_smooths_and_jumps() -> None:
    est = LinkEstimate()
    assert not est.add(1000, 0.01)  # too small to time the link
    assert est.add(1 << 20, 8 * (1 << 20) / 1e9) and est.bps == pytest.approx(1e9)
    est.add(1 << 20, 8 * (1 << 20) / 1.5e9)  # within JUMP: smoothed
    assert 1e9 < est.bps < 1.5e9
    est.add(1 << 20, 8 * (1 << 20) / 1e8)  # JUMP x off: replaced
    assert est.bps == pytest.approx(1e8) and JUMP == 2.0


def test_planner_prefers_text_on_a_slow_link_and_kv_on_a_fast_one(lm: LoadedModel) -> None:
    g = lm.geometry
    bounds = segment_bounds(2000, 250)
    options = [text_option(), fp16_option(), recipe_option(Recipe.from_name("kint4c/vint4t-g32"), 0.9)]
    planner = Planner(g, bounds, options, 1 << 40)
    slow = Costs(COSTS, 1e6)
    fast = Costs(COSTS, 100e9)
    assert planner.choose(0, slow)[0].text
    assert not planner.choose(3, fast)[0].text
    # The pipeline: predicted TTFT is bounded below by the slowest stage, above by the sum of stages.
    p = planner.predict([options[2]] * len(bounds), fast)
    link_s = sum(8 * n / fast.link_bps for n in p.wire_bytes)
    decode_s = sum(g.fp16_bytes(b - a) / COSTS.decode_bytes_per_s for a, b in bounds)
    encode_s = sum(g.fp16_bytes(b - a) / fast.encode_bps for a, b in bounds)
    assert max(link_s, decode_s, encode_s) <= p.ttft <= link_s + decode_s + encode_s + 0.01
    # A byte budget bounds every segment: with room for text only, text it is.
    tight = Planner(g, bounds, options, sum(planner.bytes_of(text_option(), i) for i in range(len(bounds))))
    assert all(tight.choose(i, fast, spent=sum(tight.bytes_of(text_option(), j) for j in range(i)))[0].text
               for i in range(len(bounds)))  # fmt: skip


async def test_a_segmented_context_sent_to_one_replica_is_answered_by_another(lm: LoadedModel) -> None:
    """Two replicas on one real redis-server: replica A stores the segments' messages (text and KV) as
    one context; replica B fetches them, verifies each and rebuilds the cache A holds, and answers."""
    from kvlink.server.fleet import FleetService
    from kvlink.server.local import LocalRedis
    from kvlink.server.shared import SharedStore

    redis = LocalRedis()
    try:
        redis.wait_ready()
        pre = _read(lm)
        g, n = lm.geometry, pre.kv.length
        bounds = segment_bounds(n, n // 3 + 1)
        kinds = [text_option(), recipe_option(Recipe.from_name("kint8c/vint8t-g32"), 1.0), text_option()]
        stream_id, session = uuid.uuid4().hex, "s"
        shared = [SharedStore.from_url(redis.url()) for _ in range(2)]
        async with (
            receiver(lm, service_class=FleetService, shared=shared[0]) as (target_a, a),
            receiver(lm, service_class=FleetService, shared=shared[1]) as (target_b, b),
            grpc.aio.insecure_channel(target_a) as channel,
        ):
            for i, ((start, stop), option) in enumerate(zip(bounds, kinds, strict=True)):
                ids = tuple(int(t) for t in pre.context_ids[start:stop]) if option.text else ()
                seg = wire.Segment(stream_id, i, start, n, last=i == len(bounds) - 1, token_ids=ids)
                if option.text:
                    frames = wire.text_frames(session, uuid.uuid4().hex, lm.fingerprint, g, seg)
                else:
                    encoded = encode_segment(pre, Scores(pre), option, g, start, stop)
                    frames = wire.to_frames(encoded, session, uuid.uuid4().hex, lm.fingerprint, 1 << 20, seg)
                await transfer(channel, frames)
            held = a.store.get(OWNER, session, stream_id)
            assert held is not None
            async with grpc.aio.insecure_channel(target_b) as other:
                answer = await ask(other, wire.Ask(session, stream_id, QUESTION, 8))
            fetched = b.store.get(OWNER, session, stream_id)
            assert fetched is not None and answer.token_ids
            for layer in range(held.num_layers):
                assert torch.equal(fetched.positions[layer], held.positions[layer])
                torch.testing.assert_close(fetched.keys[layer], held.keys[layer], rtol=0, atol=0)
                torch.testing.assert_close(fetched.values[layer], held.values[layer], rtol=0, atol=0)
    finally:
        redis.stop()


def test_kvlink_send_goal_ttft_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """kvlink-serve (costs measured at start-up, advertised) and kvlink-send --goal ttft --json: the
    context goes in segments, every one of them verified, and is answered; --explain prints the plan."""
    from kvlink.client import main as client_main

    rx = Receiver([TINY_ARG, "--cost-probe-tokens", "512"], tmp_path / "rx.log", free_port(), free_port())
    rx.start()
    try:
        rx.wait_ready()
        assert "measured: prefill" in rx.log_text()
        context = tmp_path / "context.txt"
        context.write_text(CONTEXT)
        argv = ["--server", rx.target, "--model", TINY, "--context", str(context), "--question", QUESTION,
                "--goal", "ttft", "--segment-tokens", "300"]  # fmt: skip
        assert client_main.main([*argv, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert len(out["segments"]) == math.ceil(out["context_tokens"] / 300)
        assert out["wire_bytes"] == sum(s["wire_bytes"] for s in out["segments"]) > 0
        assert out["ttft_s"] > 0 and out["predicted_ttft_s"] > 0 and out["stages"]["wall_s"] > 0
        assert client_main.main([*argv, "--explain"]) == 0
        shown = capsys.readouterr().out
        assert (
            "segments: chosen, predicted and measured" in shown and "TTFT" in shown and "pipelined" in shown
        )
        stats = rx.stats()
        assert any(label.startswith("segments ") for label in json.dumps(stats).split('"'))
    finally:
        assert rx.stop() == 0


def test_kvlink_send_needs_a_budget_unless_the_goal_is_ttft(capsys: pytest.CaptureFixture[str]) -> None:
    from kvlink.client import main as client_main

    argv = ["--server", "127.0.0.1:1", "--context", "-", "--question", "Where?"]
    assert client_main.main(argv) == 2
    assert "--budget is required (or --goal ttft" in capsys.readouterr().err
    assert client_main.main([*argv, "--goal", "ttft", "--segment-tokens", "0"]) == 2
    assert "--segment-tokens must be >= 1" in capsys.readouterr().err
    assert client_main.main([*argv, "--goal", "ttft", "--min-quality", "1.5"]) == 2
    assert "--min-quality must be in [0, 1]" in capsys.readouterr().err
    assert client_main.main([*argv, "--goal", "ttft", "--profile", "xl.safetensors"]) == 2
    assert "--profile is for --goal bytes" in capsys.readouterr().err


async def test_a_receiver_out_of_memory_refuses_the_message_and_keeps_serving(
    lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device running out of memory while a context's segments are joined (seen on an H100 holding
    the contexts of earlier messages): that message is refused RESOURCE_EXHAUSTED (BUSY: retry later),
    naming what the receiver holds, its segments are freed, and the next message is served."""
    import kvlink.server.service as service_module

    real, failures = service_module.join, []
    n_ctx = int(context_ids(lm.tokenizer, CONTEXT).numel())

    def join_once_out_of_memory(parts: Any, length: int) -> Any:
        if not failures and length == n_ctx:  # the commit's join of the whole context
            failures.append(length)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 66.00 MiB.")
        return real(parts, length)

    monkeypatch.setattr(service_module, "join", join_once_out_of_memory)
    async with receiver(lm) as (target, service):
        with pytest.raises(SendError) as refused:
            await send_streamed(target, CONTEXT, QUESTION, lm=lm, segment_tokens=512, fixed="fp16",
                                links=LinkMemory())  # fmt: skip
        assert failures  # the commit's join was the one that failed
        assert refused.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.code == "BUSY"
        assert "ran out of memory" in refused.value.message and "contexts" in refused.value.message
        assert not service._streams and len(service.store) == 0  # nothing of it is held
        result = await send_streamed(target, CONTEXT, QUESTION, lm=lm, segment_tokens=512, fixed="fp16",
                                     links=LinkMemory())  # fmt: skip
        assert service.store.get(OWNER, result.session_id, result.stream_id) is not None
        # Out of memory while answering: that question is refused alike, the context stays to ask again.
        real_answer, answers_failed = service_module.generate_answer, []

        def answer_once_out_of_memory(*args: Any, **kwargs: Any) -> Any:
            if not answers_failed:
                answers_failed.append(1)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
            return real_answer(*args, **kwargs)

        monkeypatch.setattr(service_module, "generate_answer", answer_once_out_of_memory)
        question = wire.Ask(result.session_id, result.stream_id, QUESTION, 4)
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(SendError) as refused:
                await ask(channel, question)
            assert refused.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.code == "BUSY"
            assert "ran out of memory" in refused.value.message
            again = await ask(channel, question)
        assert again.text == result.answer.text[: len(again.text)] and again.token_ids
