"""kvlink.stream.Planner: the window of open segments, plan(), choose() as it was without a window, each
format's decode rate and the per-segment call cost; the costs a receiver advertises
(kvlink.wire.ReceiverCosts: its checks, its proto, a Welcome of before per-format rates) and the call
cost a sender learns (LinkEstimate).

(What kvlink-bench ttft found; to join tests/test_stream.py.)
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest

from kvlink import wire
from kvlink.models import Geometry
from kvlink.recipe import Recipe
from kvlink.stream import (
    MAX_SEGMENT_S,
    MAX_WORK_SCALE,
    Costs,
    LinkEstimate,
    LinkMemory,
    Option,
    Planner,
    Prediction,
    call_sample,
    decode_format,
    fp16_option,
    recipe_option,
    segment_bounds,
    text_option,
)
from kvlink.wire import ReceiverCosts
from kvlink.wire.segments import MAX_COST_POINTS, costs_from_pb, costs_to_pb

G = Geometry(4, 2, 32, 4)
RECEIVER = ReceiverCosts(((128, 2000.0), (1024, 1500.0)), 2e9, 0.02)
OPTIONS = [text_option(), fp16_option(), recipe_option(Recipe.from_name("kint4c/vint4t-g32"), 0.9)]


def _costs(link_bps: float, prefill_s: float = 0.0) -> Costs:
    return Costs(RECEIVER, link_bps, encode_bps=1e9, prefill_s=prefill_s, question_tokens=16)


@pytest.mark.parametrize(
    ("length", "size", "expected"),
    [
        (1000, 256, [(0, 256), (256, 512), (512, 768), (768, 1000)]),  # 232 left: a segment of its own
        (800, 256, [(0, 256), (256, 512), (512, 800)]),  # 32 left: joins the one before
        (32799, 4096, [(a, a + 4096) for a in range(0, 24576, 4096)] + [(24576, 28672), (28672, 32799)]),
        (820, 256, [(0, 256), (256, 512), (512, 820)]),  # 52 left, a quarter is 64: joins
        (832, 256, [(0, 256), (256, 512), (512, 768), (768, 832)]),  # exactly a quarter: its own
        (40, 256, [(0, 40)]),
        (5, 1, [(i, i + 1) for i in range(5)]),
    ],
)
def test_segments_cover_the_context_and_a_short_remainder_joins_the_last(
    length: int, size: int, expected: list[tuple[int, int]]
) -> None:
    assert segment_bounds(length, size) == expected


def test_a_segment_goes_once_the_one_a_window_before_it_is_answered() -> None:
    bounds = segment_bounds(768, 256)
    costs = _costs(1e9)
    schedule = [OPTIONS[0], OPTIONS[1], OPTIONS[1]]  # text (slow at the receiver), then KV
    free = Planner(G, bounds, OPTIONS, 1 << 40).predict(schedule, costs)
    held = Planner(G, bounds, OPTIONS, 1 << 40, window=2).predict(schedule, costs)
    assert free.arrive[2] < free.ready[0]  # no window: segment 2 crossed while segment 0 was recomputed
    encode = G.fp16_bytes(256) / costs.encode_bps
    link = 8 * OPTIONS[1].wire_bytes(G, 256) / costs.link_bps
    assert held.arrive[2] == pytest.approx(held.ready[0] + encode + link + costs.latency_s)
    assert held.arrive[:2] == free.arrive[:2] and held.ttft > free.ttft
    with pytest.raises(ValueError, match="0"):
        Planner(G, bounds, OPTIONS, 1, window=0)


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("link_bps", [3e6, 30e6, 300e6, 3e9])
@pytest.mark.parametrize("prefill_s", [0.0, 0.5])
def test_plan_is_no_worse_than_any_static(window: int | None, link_bps: float, prefill_s: float) -> None:
    planner = Planner(G, segment_bounds(1000, 128), OPTIONS, 1 << 40, window=window)
    costs = _costs(link_bps, prefill_s)
    schedule, predicted = planner.plan(costs)
    assert predicted.ttft == planner.predict(schedule, costs).ttft
    statics = [planner.predict([o] * len(planner.bounds), costs).ttft for o in OPTIONS]
    assert predicted.ttft <= min(statics) + 1e-12


def _old_choose(
    planner: Planner, i: int, costs: Costs, spent: int = 0, **state: float
) -> tuple[Option, Prediction]:
    """choose() before the window: the head predicted alone, the tail by uniform() from its state."""
    best: tuple[Option, Prediction] | None = None
    rest = len(planner.bounds) - i - 1
    for option in planner.options:
        nbytes = planner.bytes_of(option, i)
        if spent + nbytes > planner.budget_bytes:
            continue
        if rest:
            head = planner.predict([option], costs, i, **state)
            tail_state = dict(state, link_free=head.arrive[0] - costs.latency_s, ready=head.ready[0])
            if not option.text:
                tail_state["encoded"] = max(state.get("encoded", 0.0), costs.prefill_s) + (
                    G.fp16_bytes(planner.bounds[i][1] - planner.bounds[i][0]) / costs.encode_bps
                )
            _, tail = planner.uniform(costs, i + 1, spent=spent + nbytes, **tail_state)
            ttft, total = tail.ttft, nbytes + tail.total_bytes
        else:
            ttft, total = planner.predict([option], costs, i, **state).ttft, nbytes
        if spent + total <= planner.budget_bytes and (best is None or ttft < best[1].ttft):
            best = (option, Prediction(ttft=ttft, wire_bytes=[total]))
    assert best is not None
    return best


@pytest.mark.parametrize(
    ("link_bps", "budget"), list(itertools.product([3e6, 30e6, 3e9], [1 << 40, 900_000]))
)
def test_choose_without_a_window_chooses_as_before(link_bps: float, budget: int) -> None:
    planner = Planner(G, segment_bounds(1000, 128), OPTIONS, budget)
    costs = _costs(link_bps, 0.2)
    for i, state in itertools.product(range(len(planner.bounds)), [{}, {"link_free": 0.3, "ready": 0.5}]):
        new, old = planner.choose(i, costs, 0, **state), _old_choose(planner, i, costs, 0, **state)
        assert new[0] == old[0] and new[1].ttft == pytest.approx(old[1].ttft)
        assert new[1].wire_bytes == old[1].wire_bytes


def test_recompute_costs_what_the_longer_prefill_costs_beyond_the_shorter() -> None:
    costs = ReceiverCosts(((128, 400.0), (2048, 300.0)), 1e9, 0.01)
    bounds = segment_bounds(2048, 256)
    parts = [costs.recompute_s(a, b - a) for a, b in bounds]
    assert sum(parts) == pytest.approx(costs.prefill_s(2048)) == pytest.approx(2048 / 300.0)
    assert parts == sorted(parts) and parts[-1] > 256 / 300.0  # the last tokens attend to the most
    assert costs.recompute_s(0, 100) == pytest.approx(100 / 400.0)
    rising = ReceiverCosts(((128, 100.0), (512, 1000.0)), 1e9, 0.01)  # a rate climbing this steeply
    assert rising.recompute_s(128, 384) == pytest.approx(384 / 1000.0)  # is never beaten


# --- each format's decode rate, the per-segment call cost ---------------------------------------------
INT4 = recipe_option(Recipe.from_name("kint4c/vint4t-g32"), 0.9)


def test_decode_format_is_the_recipe_less_its_selection() -> None:
    assert decode_format(Recipe.from_name("q2c50%+kint4c/vint4t-g32")) == "kint4c/vint4t-g32"
    assert decode_format(Recipe.from_name("kint4c/vint3t-g32+sink1")) == "kint4c/vint3t-g32+sink1"
    assert (
        fp16_option().format == "fp16"
        and INT4.format == "kint4c/vint4t-g32"
        and text_option().format == "text"
    )


def test_each_format_decodes_at_its_own_rate_and_that_changes_the_choice() -> None:
    """One segment of 256 tokens on a 10 Gbit/s link, encoding free: FP16 sends 4x the bytes of INT4.
    With one decode rate (2 GB/s) for both, INT4 is faster; with FP16 decoded at 8 GB/s and INT4 at
    0.5 GB/s (a dequantization against a copy), FP16 is, and the TTFT is what the stages add up to."""
    bounds = segment_bounds(256, 256)
    options = [fp16_option(), INT4]
    planner = Planner(G, bounds, options, 1 << 40)
    prefill = ((128, 2000.0), (1024, 1500.0))
    one_rate = ReceiverCosts(prefill, 2e9, 0.02)
    by_format = ReceiverCosts(prefill, 2e9, 0.02, (("fp16", 8e9), ("kint4c/vint4t-g32", 0.5e9)))
    encode = {"fp16": 1e15, "kint4c/vint4t-g32": 1e15}

    def by_hand(option: Option, decode_bps: float) -> float:
        costs = Costs(one_rate, 10e9)
        link = 8 * option.wire_bytes(G, 256) / 10e9
        question = one_rate.recompute_s(256, costs.question_tokens)
        return (
            G.fp16_bytes(256) / 1e15
            + link
            + costs.latency_s
            + G.fp16_bytes(256) / decode_bps
            + max(question, one_rate.first_token_s)
        )

    single = Costs(one_rate, 10e9, encode_rates=encode)
    split = Costs(by_format, 10e9, encode_rates=encode)
    assert planner.predict([options[0]], single).ttft == pytest.approx(by_hand(options[0], 2e9))
    assert planner.predict([options[1]], single).ttft == pytest.approx(by_hand(options[1], 2e9))
    assert planner.predict([options[0]], split).ttft == pytest.approx(by_hand(options[0], 8e9))
    assert planner.predict([options[1]], split).ttft == pytest.approx(by_hand(options[1], 0.5e9))
    assert planner.choose(0, single)[0] == INT4
    assert planner.choose(0, split)[0] == options[0]
    # A format the receiver did not measure decodes at its single rate.
    int8 = recipe_option(Recipe.from_name("kint8c/vint8t-g32"), 1.0)
    assert by_format.decode_rate(int8.format) == 2e9
    assert Planner(G, bounds, [int8], 1 << 40).work_s(int8, 0, split) == pytest.approx(
        G.fp16_bytes(256) / 2e9
    )


def test_the_call_cost_is_paid_once_per_segment() -> None:
    """Text segments keep the receiver busy back to back: each segment's call cost delays every later
    one, so 4 segments cost 4 call costs; work_s counts it for text and KV alike."""
    bounds = segment_bounds(1024, 256)
    planner = Planner(G, bounds, OPTIONS, 1 << 40)
    free = _costs(1e9)
    paid = Costs(RECEIVER, 1e9, encode_bps=1e9, question_tokens=16, segment_s=0.05)
    texts = [text_option()] * 4
    p0, p1 = planner.predict(texts, free), planner.predict(texts, paid)
    assert p1.ttft - p0.ttft == pytest.approx(4 * 0.05)
    assert [b - a for a, b in zip(p0.ready, p1.ready, strict=True)] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    for option in OPTIONS:
        assert planner.work_s(option, 1, paid) - planner.work_s(option, 1, free) == pytest.approx(0.05)
    # Many small segments pay it many times: with a call cost, the planner's TTFT for 8 segments of
    # 128 exceeds that of 4 of 256 by the 4 extra calls.
    fine = Planner(G, segment_bounds(1024, 128), OPTIONS, 1 << 40)
    extra = fine.predict([text_option()] * 8, paid).ttft - fine.predict([text_option()] * 8, free).ttft
    assert extra == pytest.approx(8 * 0.05)


def test_the_sender_learns_the_call_cost_from_its_receipts() -> None:
    est = LinkEstimate()
    assert est.segment_s is None and est.call_s(RECEIVER) == RECEIVER.segment_s == 0.0
    advertised = ReceiverCosts(RECEIVER.prefill, 2e9, 0.02, segment_s=0.004)
    assert est.call_s(advertised) == 0.004  # before any receipt: the receiver's own part
    # Segment 0 arrived 0.03 s after its call began and was decoded in 0.02 s, answered at 0.08 s.
    first = call_sample(began=10.0, answered=10.08, previous=None, receive_s=0.03, work_s=0.02)
    assert first == pytest.approx(0.03)
    # Segment 1 waited 5 ms at the receiver for segment 0: it could only be taken once 0 was answered.
    second = call_sample(10.04, 10.14, previous=10.08, receive_s=0.01, work_s=0.02, turn_s=0.005)
    assert second == pytest.approx(0.04)
    # Segment 2 began after segment 1 was answered: from when its bytes were in.
    assert call_sample(10.2, 10.3, previous=10.14, receive_s=0.05, work_s=0.02) == pytest.approx(0.03)
    # Segment 3 began while segment 2 was open and did not wait at the receiver: its bytes may have queued
    # on the link behind 2's, so its receipt says nothing of the call.
    assert call_sample(10.25, 10.9, previous=10.3, receive_s=0.05, work_s=0.02) is None
    assert not est.add_call(None)
    assert est.add_call(first) and est.segment_s == pytest.approx(0.03)  # the first sample replaces
    assert est.add_call(second) and est.segment_s == pytest.approx(0.3 * 0.04 + 0.7 * 0.03)
    assert est.call_s(advertised) == est.segment_s
    assert not est.add_call(math.nan) and est.segment_samples == 2
    est.add_call(1e9)  # a stalled call is clamped, not believed
    assert est.segment_s <= MAX_SEGMENT_S and est.add_call(-1.0)  # and a negative one counts as 0


def test_link_memory_keeps_the_call_cost_and_reads_a_file_of_before(tmp_path: Path) -> None:
    path = tmp_path / "links.json"
    path.write_text(json.dumps({"old:1": 3e8, "bad:1": {"bps": "x"}, "nan:1": {"bps": 1e9, "segment_s": -2}}))
    memory = LinkMemory(path)
    assert memory.get("old:1").bps == 3e8 and memory.get("old:1").segment_s is None
    assert memory.get("nan:1").segment_s is None  # a negative call cost is not kept
    memory.get("new:1", 1e9).add_call(0.02)
    memory.save()
    again = LinkMemory(path)
    assert again.get("new:1").segment_s == pytest.approx(0.02) and again.get("new:1").bps == 1e9
    assert again.get("old:1").bps == 3e8


def test_the_sender_learns_how_the_receivers_work_departs_from_its_rates(tmp_path: Path) -> None:
    """Receipts teach how long the receiver's recompute (text) and decode (KV) really take against what
    its advertised rates predict; the planner scales its work by that, each kind apart."""
    est = LinkEstimate()
    assert (est.recompute_scale, est.decode_scale) == (1.0, 1.0)
    assert not est.add_work(True, 0.3, 0.0005)  # a prediction too small to scale by
    assert not est.add_work(True, math.nan, 0.2) and est.recompute_samples == 0
    assert est.add_work(True, 0.3, 0.2) and est.recompute_scale == pytest.approx(1.5)  # the first replaces
    assert est.add_work(True, 0.2, 0.2) and est.recompute_scale == pytest.approx(0.5 * 1.0 + 0.5 * 1.5)
    assert est.decode_scale == 1.0  # text taught nothing of decoding
    assert est.add_work(False, 100.0, 0.01) and est.decode_scale == MAX_WORK_SCALE  # clamped, not believed
    planner = Planner(G, segment_bounds(1024, 256), OPTIONS, 1 << 40)
    plain = Costs(RECEIVER, 1e9, segment_s=0.01)
    scaled = Costs(RECEIVER, 1e9, segment_s=0.01, recompute_scale=1.25, decode_scale=3.0)
    for option in OPTIONS:
        for i in range(4):
            advertised = planner.advertised_work_s(option, i, RECEIVER)
            assert planner.work_s(option, i, plain) == pytest.approx(advertised + 0.01)
            # A text segment at the start is a whole prefill, what the advertised rates time: unscaled.
            factor = (1.25 if i > 0 else 1.0) if option.text else 3.0
            assert planner.work_s(option, i, scaled) == pytest.approx(advertised * factor + 0.01)
    # Text grows slower than KV here: with its recompute measured 1.25x, all-text stays as predicted
    # +25% of the receiver's part; the predicted TTFT of every schedule moves with its own kind only.
    texts = [text_option()] * 4
    assert planner.predict(texts, scaled).ttft > planner.predict(texts, plain).ttft
    # Kept per receiver between sends, with the rate and the call cost; a hostile file is not believed.
    memory = LinkMemory(tmp_path / "links.json")
    memory.get("rx:1", 1e9).add_work(True, 0.3, 0.2)
    memory.save()
    kept = LinkMemory(tmp_path / "links.json").get("rx:1")
    assert (
        kept.recompute_scale == pytest.approx(1.5)
        and kept.recompute_samples == 1
        and kept.decode_scale == 1.0
    )
    (tmp_path / "bad.json").write_text(
        json.dumps({"rx:1": {"bps": 1e9, "recompute_scale": 1e9, "decode_scale": "x"}})
    )
    bad = LinkMemory(tmp_path / "bad.json").get("rx:1")
    assert (bad.recompute_scale, bad.decode_scale, bad.bps) == (1.0, 1.0, 1e9)


# --- the costs a receiver advertises -------------------------------------------------------------------
FULL = ReceiverCosts(
    ((128, 2000.0), (1024, 1500.0)),
    2e9,
    0.02,
    (("fp16", 8e9), ("kint4c/vint3t-g32+sink1", 6e8)),
    0.004,
    0.015,
    1e-4,
)


def test_the_first_token_costs_the_questions_prefill_plus_a_part_growing_with_the_context() -> None:
    """With answer_s and answer_s_per_token, the first token after a context of T tokens is the question's
    prefill there plus answer_s + answer_s_per_token * T (the join and the cache's copies grow with T);
    a receiver of before them is priced as before (the larger of the prefill and first_token_s)."""
    question = FULL.recompute_s(1024, 32)
    assert question == pytest.approx(32 / 1500.0)
    assert FULL.answer_time(1024, 32) == pytest.approx(question + 0.015 + 1e-4 * 1024)
    assert FULL.answer_time(512, 32) < FULL.answer_time(1024, 32)
    assert RECEIVER.answer_time(1024, 32) == pytest.approx(max(question, 0.02))
    planner = Planner(G, segment_bounds(1024, 256), OPTIONS, 1 << 40)
    costs = Costs(FULL, 1e9, encode_bps=1e9, question_tokens=32)
    p = planner.predict([text_option()] * 4, costs)
    assert p.ttft == pytest.approx(p.ready[-1] + question + 0.015 + 0.1024)


def test_costs_survive_the_proto_and_the_welcome() -> None:
    assert costs_from_pb(wire.pb.ReceiverCosts.FromString(costs_to_pb(FULL).SerializeToString())) == FULL
    welcome = wire.Welcome("fp", frozenset({"segment"}), 1 << 20, 1 << 16, costs=FULL)
    raw = wire.welcome_to_proto(welcome).SerializeToString()
    assert wire.welcome_from_proto(wire.pb.Welcome.FromString(raw)).costs == FULL


def test_a_welcome_of_before_per_format_rates_reads_as_one_rate_and_no_call_cost() -> None:
    # What a receiver of before 2026-12 sends: fields 1-3 of ReceiverCosts only.
    old = wire.pb.ReceiverCosts(
        prefill=[wire.pb.PrefillRate(tokens=128, tokens_per_s=2000.0)],
        decode_bytes_per_s=3e8,
        first_token_s=0.1,
    )
    msg = wire.pb.Welcome(protocol_version=wire.PROTOCOL_VERSION, fingerprint="fp")
    msg.costs.CopyFrom(old)
    costs = wire.welcome_from_proto(wire.pb.Welcome.FromString(msg.SerializeToString())).costs
    assert costs is not None and costs.decode == () and costs.segment_s == 0.0 == costs.answer_s
    assert costs.answer_s_per_token == 0.0 and costs.answer_time(128, 16) == 0.1  # first_token_s, as before
    assert costs.decode_rate("fp16") == costs.decode_rate("kint4c/vint4t-g32") == 3e8
    assert costs_from_pb(wire.pb.ReceiverCosts()) is None  # measured nothing


def _hostile(**changes: Any) -> wire.pb.ReceiverCosts:
    msg = costs_to_pb(FULL)
    for name, value in changes.items():
        if name == "prefill":
            del msg.prefill[:]
            msg.prefill.extend(wire.pb.PrefillRate(tokens=n, tokens_per_s=r) for n, r in value)
        elif name == "decode":
            del msg.decode[:]
            msg.decode.extend(wire.pb.DecodeRate(format=f, bytes_per_s=r) for f, r in value)
        else:
            setattr(msg, name, value)
    return msg


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"decode": [("fp16", math.nan)]}, "decode rate of 'fp16' must be a finite rate"),
        ({"decode": [("fp16", 0.0)]}, "decode rate of 'fp16'"),
        ({"decode": [("fp16", math.inf)]}, "inf"),
        ({"decode": [("fp16", 1e300)]}, "1e+300"),
        ({"decode": [("fp16", 1e9), ("fp16", 2e9)]}, "each decode format once"),
        ({"decode": [("", 1e9)]}, "a decode format is a name"),
        (
            {"decode": [(f"f{i}", 1e9) for i in range(MAX_COST_POINTS + 1)]},
            f"at most {MAX_COST_POINTS} decode",
        ),
        ({"prefill": [(i + 1, 1e3) for i in range(10_000)]}, f"at most {MAX_COST_POINTS} prefill"),
        ({"prefill": [(512, 1e3), (512, 2e3)]}, "distinct"),  # would divide by zero beyond 512
        ({"prefill": [(0, 1e3)]}, "positive"),
        ({"prefill": [(128, -5.0)]}, "prefill rate at 128 tokens"),
        ({"decode_bytes_per_s": math.nan}, "the decode rate must"),
        ({"segment_s": -0.01}, "per-segment cost must be finite seconds"),
        ({"segment_s": math.nan}, "per-segment cost"),
        ({"segment_s": 1e6}, "per-segment cost"),
        ({"first_token_s": math.inf}, "first token"),
        ({"answer_s": -1.0}, "the first token beyond the question"),
        ({"answer_s_per_token": math.nan}, "per context token"),
    ],
)
def test_hostile_costs_are_refused_with_a_readable_error(
    changes: dict[str, Any], says: str, caplog: pytest.LogCaptureFixture
) -> None:
    msg = _hostile(**changes)
    with pytest.raises(ValueError, match=re.escape(says)):
        costs_from_pb(msg)
    # In a Welcome: the receiver stays usable, its costs are ignored, and the log says why.
    welcome = wire.pb.Welcome(protocol_version=wire.PROTOCOL_VERSION, fingerprint="fp", model="evil")
    welcome.costs.CopyFrom(msg)
    with caplog.at_level(logging.WARNING, logger="kvlink.wire.messages"):
        assert wire.welcome_from_proto(welcome).costs is None
    assert (
        "ignoring the costs the receiver 'evil' advertises" in caplog.text
        and says.split("'")[0] in caplog.text
    )


def test_recipes_that_need_a_calibrated_profile_are_not_segmentable():
    from kvlink.recipe import Recipe
    from kvlink.stream import segmentable

    assert segmentable(Recipe.from_name("kint4c/vint4t-g32+sink1"))
    assert segmentable(Recipe.from_name("q2c50%+kint4c/vint4t-g32"))
    assert segmentable(Recipe.from_name("svd-r32+kint4c/vint4t-g32"))  # its basis travels in the message
    assert not segmentable(Recipe.from_name("profile-r32+kint4c/vint4t-g32"))  # segments carry no profile
    assert not segmentable(Recipe.from_name("xpred+kint2c/vint2t-g64+sink1"))
    assert not segmentable(Recipe.from_name("q2c50%/layer+kint4c/vint4t-g32"))  # per-layer scores
