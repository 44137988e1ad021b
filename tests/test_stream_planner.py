"""kvlink.stream.Planner: the window of open segments, plan(), and choose() as it was without a window.

(What kvlink-bench ttft found; to join tests/test_stream.py.)
"""

from __future__ import annotations

import itertools

import pytest

from kvlink.models import Geometry
from kvlink.recipe import Recipe
from kvlink.stream import (
    Costs,
    Option,
    Planner,
    Prediction,
    fp16_option,
    recipe_option,
    segment_bounds,
    text_option,
)
from kvlink.wire import ReceiverCosts

G = Geometry(4, 2, 32, 4)
RECEIVER = ReceiverCosts(((128, 2000.0), (1024, 1500.0)), 2e9, 0.02)
OPTIONS = [text_option(), fp16_option(), recipe_option(Recipe.from_name("kint4c/vint4t-g32"), 0.9)]


def _costs(link_bps: float, prefill_s: float = 0.0) -> Costs:
    return Costs(RECEIVER, link_bps, encode_bps=1e9, prefill_s=prefill_s, question_tokens=16)


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
