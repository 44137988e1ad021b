"""Position selectors: one matrix over every registered method, scores against eager attention, SQuAD.

Mechanics run on tiny random-weight models (conftest: a GQA Llama and a Qwen2
with attention bias); the captured queries are checked against the model's own
eager attention probabilities; the embedded model checks that Q2C finds
answer spans more often than chance.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import random_ids, tiny_model
from kvlink.cache import Observation, Observe, Prefill, prefill
from kvlink.prompt import CONTEXT_TEMPLATE, context_ids, question_ids, question_rows, split_prompt
from kvlink.select import SCOPES, attention_to_context, get_selector, keep_count, registered_selectors
from kvlink.select.h2o import H2O
from kvlink.select.q2c import Q2C
from kvlink.select.random import RandomSelector
from kvlink.select.snapkv import SnapKV
from kvlink.select.streaming import StreamingLLM

RETENTIONS = (1.0, 0.75, 0.5, 0.25, 0.01)
ARCHS = ("llama", "qwen2")
T = 64  # context length of the tiny models
Q = 9  # question length
SQUAD = Path(__file__).resolve().parents[1] / "kvlink" / "data" / "squad-v2-dev-a.json"


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[Any, Tensor, Tensor]]:
    """arch -> (3-layer GQA model with eager attention, context ids (T,), question ids (Q,)).

    Eager, so the reference test can read the model's own attention probabilities; conftest
    scales q/k up so that attention is peaked and wrong queries would show.
    """
    ctx, question = random_ids(T, seed=1), random_ids(Q, seed=2)
    return {arch: (tiny_model(arch, seed=0, attn="eager"), ctx, question) for arch in ARCHS}


@pytest.fixture(scope="module")
def observe(models: dict[str, tuple[Any, Tensor, Tensor]]) -> Callable[[str, Observe], Prefill]:
    """(arch, kind) -> the Prefill of the tiny model's context, memoized for the module."""
    memo: dict[tuple[str, Observe], Prefill] = {}

    def get(arch: str, kind: Observe) -> Prefill:
        if (arch, kind) not in memo:
            model, ctx, question = models[arch]
            memo[arch, kind] = prefill(model, ctx, question, observe=kind)
        return memo[arch, kind]

    return get


# ---------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("retention", RETENTIONS)
@pytest.mark.parametrize("method", registered_selectors())
@pytest.mark.parametrize("arch", ARCHS)
def test_kept_sets(
    observe: Callable[[str, Observe], Prefill], arch: str, method: str, retention: float, scope: str
) -> None:
    selector = get_selector(method)
    observation = observe(arch, selector.observes).observation
    assert observation.num_layers == 3
    kept = selector.keep(observation, retention, scope)
    n_keep = keep_count(retention, T)
    assert len(kept) == observation.num_layers
    forced = selector.forced(T)
    for layer, positions in enumerate(kept):
        assert positions.dtype == torch.int64 and positions.dim() == 1, f"layer {layer}"
        assert positions.numel() == n_keep, f"layer {layer}: kept {positions.numel()}, rule says {n_keep}"
        assert bool((positions[1:] > positions[:-1]).all()), f"layer {layer}: not sorted and unique"
        assert int(positions.min()) >= 0 and int(positions.max()) < T
        if forced.numel() <= n_keep:
            assert bool(torch.isin(forced, positions).all()), f"layer {layer}: a forced position was dropped"
    if scope == "global":
        assert all(torch.equal(kept[0], positions) for positions in kept)


# ---------------------------------------------------------------------------- scores vs eager attention


@pytest.mark.parametrize("kind", [Observe.QUESTION, Observe.WINDOW, Observe.ALL])
@pytest.mark.parametrize("arch", ARCHS)
def test_scores_match_eager_attention(
    models: dict[str, tuple[Any, Tensor, Tensor]],
    observe: Callable[[str, Observe], Prefill],
    arch: str,
    kind: Observe,
) -> None:
    """Hook-captured queries reproduce the model's own attention: column sums over the observed rows."""
    model, ctx, question = models[arch]
    ids = torch.cat([ctx, question]) if kind is Observe.QUESTION else ctx
    with torch.inference_mode():
        attentions = model(input_ids=ids[None], output_attentions=True).attentions  # L x (1, Hq, S, S)
    window = 32  # prefill's default
    rows = {
        Observe.QUESTION: slice(T, T + Q),
        Observe.WINDOW: slice(T - window, T),
        Observe.ALL: slice(0, T),
    }[kind]
    selector = {Observe.QUESTION: Q2C(), Observe.WINDOW: SnapKV(window=window, kernel=1), Observe.ALL: H2O()}[
        kind
    ]
    observation = observe(arch, kind).observation
    assert len(observation.layers) == len(attentions)
    for layer, probs in enumerate(attentions):
        q_heads = probs.shape[1]
        ref = probs[0, :, rows, :T].sum(dim=1)  # (Hq, T)
        ref = ref.view(2, q_heads // 2, T).sum(dim=1)  # (kv_heads, T): sum over each KV group
        got = attention_to_context(observation.layers[layer], T, observation.scale)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        assert float(ref.max()) > 2 * float(ref.mean()), "attention is near uniform: the check would be weak"
        score = selector.score(observation.layers[layer], T, observation.scale)
        if kind is Observe.WINDOW:  # SnapKV scores the prefix only; the window is forced
            ref = torch.cat([ref[:, : T - window], torch.zeros(2, window)], dim=1)
        torch.testing.assert_close(score, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_pooling(observe: Callable[[str, Observe], Prefill], pooling: str) -> None:
    """Pooling is a sliding max/mean (zero padding) of the unpooled prefix scores, per head."""
    observation = observe("llama", Observe.WINDOW).observation
    layer = observation.layers[1]
    raw = SnapKV(window=16, kernel=1).score(layer, T, observation.scale)[:, : T - 16]  # (H, P)
    pooled = SnapKV(window=16, kernel=5, pooling=pooling).score(layer, T, observation.scale)
    padded = F.pad(raw, (2, 2), value=float("-inf") if pooling == "max" else 0.0)
    windows = padded.unfold(1, 5, 1)  # (H, P, 5)
    ref = windows.amax(dim=-1) if pooling == "max" else windows.sum(dim=-1) / 5
    torch.testing.assert_close(pooled[:, : T - 16], ref)
    assert bool((pooled[:, T - 16 :] == 0).all())


# ---------------------------------------------------------------------------- forced positions


def test_q2c_keep_first(observe: Callable[[str, Observe], Prefill]) -> None:
    observation = observe("llama", Observe.QUESTION).observation
    for scope in SCOPES:
        for positions in Q2C(keep_first=5).keep(observation, 0.25, scope):
            assert positions[:5].tolist() == [0, 1, 2, 3, 4]
    # fewer slots than forced positions: the first ones win
    assert Q2C(keep_first=5).keep(observation, 0.01)[0].tolist() == [0]


def test_snapkv_window_is_kept(models: dict[str, tuple[Any, Tensor, Tensor]]) -> None:
    model, ctx, _ = models["llama"]
    observation = prefill(model, ctx, observe=Observe.WINDOW, window=8).observation
    # selector window < captured, == captured, > captured (scores then use the 8 captured queries)
    for window in (4, 8, 20):
        for scope in SCOPES:
            for positions in SnapKV(window=window).keep(observation, 0.5, scope):
                assert positions[-window:].tolist() == list(range(T - window, T))


def test_h2o_recent(observe: Callable[[str, Observe], Prefill]) -> None:
    observation = observe("qwen2", Observe.ALL).observation
    for positions in H2O(recent=6).keep(observation, 0.25, "layer"):
        assert positions[-6:].tolist() == list(range(T - 6, T))


def test_streaming_sinks_and_recent(observe: Callable[[str, Observe], Prefill]) -> None:
    observation = observe("llama", Observe.NONE).observation
    kept = StreamingLLM(sinks=4).keep(observation, 0.25, "layer")  # 16 of 64
    assert all(torch.equal(kept[0], positions) for positions in kept)
    assert kept[0].tolist() == [0, 1, 2, 3, *range(T - 12, T)]
    assert StreamingLLM(sinks=4).keep(observation, 0.05)[0].tolist() == [0, 1, 2, 3]  # 4 of 64: sinks only
    assert StreamingLLM(sinks=8).keep(observation, 0.05)[0].tolist() == [0, 1, 2, 3]  # budget < sinks
    assert StreamingLLM(sinks=0).keep(observation, 0.05)[0].tolist() == [60, 61, 62, 63]


# ---------------------------------------------------------------------------- random


def test_random_is_reproducible(observe: Callable[[str, Observe], Prefill]) -> None:
    observation = observe("llama", Observe.NONE).observation
    for scope in SCOPES:
        first = RandomSelector(seed=7).keep(observation, 0.25, scope)
        again = RandomSelector(seed=7).keep(observation, 0.25, scope)
        other = RandomSelector(seed=8).keep(observation, 0.25, scope)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert not all(torch.equal(a, b) for a, b in zip(first, other))
    per_layer = RandomSelector(seed=7).keep(observation, 0.25, "layer")
    assert not torch.equal(per_layer[0], per_layer[1]), "scope 'layer' should draw a set per layer"


# ---------------------------------------------------------------------------- bad configurations


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("snapkv", {"window": 0}),
        ("snapkv", {"kernel": 4}),
        ("snapkv", {"kernel": -1}),
        ("snapkv", {"pooling": "median"}),
        ("streaming", {"sinks": -1}),
        ("q2c", {"keep_first": -2}),
        ("h2o", {"recent": -3}),
        ("random", {"seed": -5}),
    ],
)
def test_bad_config_names_the_value(method: str, kwargs: dict[str, object]) -> None:
    (value,) = kwargs.values()
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        get_selector(method, **kwargs)


def test_unknown_method_lists_registered() -> None:
    with pytest.raises(ValueError, match="'nope'") as info:
        get_selector("nope")
    for name in registered_selectors():
        assert repr(name) in str(info.value)


@pytest.mark.parametrize("retention", [0, 0.0, 1.5, -0.25])
def test_bad_retention(retention: float) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(retention))):
        keep_count(retention, 10)


def test_keep_count_rule() -> None:
    assert keep_count(0.01, 64) == 1
    assert keep_count(0.25, 64) == 16
    assert keep_count(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in floats
    assert keep_count(0.31, 10) == 4
    assert keep_count(1.0, 7) == 7


@pytest.mark.parametrize("method", registered_selectors())
def test_bad_scope_and_kind(observe: Callable[[str, Observe], Prefill], method: str) -> None:
    selector = get_selector(method)
    observation = observe("llama", selector.observes).observation
    with pytest.raises(ValueError, match="'diagonal'"):
        selector.keep(observation, 0.5, "diagonal")
    if selector.observes is not Observe.NONE:
        with pytest.raises(ValueError, match="'none'"):
            selector.keep(Observation(Observe.NONE, T, num_layers=3), 0.5)
    else:  # position-only selectors need the layer count
        with pytest.raises(ValueError, match="num_layers"):
            selector.keep(Observation(Observe.NONE, T), 0.5)


# ---------------------------------------------------------------------------- SQuAD, embedded model

SQUAD_QUESTIONS = 24
SQUAD_RETENTIONS = (0.25, 0.5)


def squad_items(count: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(context, question, first gold answer): the first answerable question of short paragraphs.

    Deterministic and spread over the articles: paragraphs of at most 700 characters, taken
    round-robin across the articles in file order.
    """
    data = json.loads(SQUAD.read_text())["data"]
    per_article: list[list[tuple[str, str, dict[str, Any]]]] = []
    for article in data:
        found = []
        for paragraph in article["paragraphs"]:
            if len(paragraph["context"]) > 700:
                continue
            qa = next((qa for qa in paragraph["qas"] if not qa["is_impossible"]), None)
            if qa is not None:
                found.append((paragraph["context"], qa["question"], qa["answers"][0]))
        per_article.append(found)
    items = []
    for rank in range(max(len(found) for found in per_article)):
        items += [found[rank] for found in per_article if rank < len(found)]
    return items[:count]


def answer_positions(tokenizer: Any, context: str, answer: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(context ids, positions of the tokens overlapping the answer's characters) in the prefill ids."""
    head, _ = split_prompt(tokenizer, context, "")
    # the context ids open with the chat template: find where the context text starts inside them
    start = head.index(CONTEXT_TEMPLATE.format(context=context)) + CONTEXT_TEMPLATE.index("{context}")
    begin = start + answer["answer_start"]
    end = begin + len(answer["text"])
    assert head[begin:end] == answer["text"]
    encoded = tokenizer(head, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
    span = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > begin]
    return ids, torch.tensor(span, dtype=torch.long)


def test_q2c_keeps_answer_spans_more_often_than_random(embedded: Any) -> None:
    """Q2C keeps the positions of an answer span more often than Random on a small set of SQuAD questions.

    `embedded` (conftest, session scope) is SmolLM2-135M; its first load converts a GGUF (~40 s).
    Measured as the mean fraction of answer-span tokens kept (global scope). Q2C observes the rows of
    the question's own words (kvlink.prompt.question_rows), as the sender does; the chat-template
    rows around them attend generically and would dilute the signal.
    """
    tokenizer = embedded.tokenizer
    kept: dict[tuple[str, float], list[float]] = {}
    for context, question, answer in squad_items(SQUAD_QUESTIONS):
        ids, span = answer_positions(tokenizer, context, answer)
        assert torch.equal(ids, context_ids(tokenizer, context))
        observation = prefill(
            embedded.model,
            ids,
            question_ids(tokenizer, question),
            observe=Observe.QUESTION,
            question_rows=question_rows(tokenizer, question),
        ).observation
        for retention in SQUAD_RETENTIONS:
            for label, selector in (("q2c", Q2C()), ("random", RandomSelector())):
                positions = selector.keep(observation, retention, "global")[0]
                kept.setdefault((label, retention), []).append(
                    float(torch.isin(span, positions).float().mean())
                )
    mean = {key: sum(values) / len(values) for key, values in kept.items()}
    report = "answer-span tokens kept: " + ", ".join(
        f"{k[0]} @ {k[1]}: {v:.3f}" for k, v in sorted(mean.items())
    )
    # Measured on SmolLM2-135M (24 questions, question rows only): q2c 0.491 / 0.763 against
    # random 0.236 / 0.513 at r = 0.25 / 0.5.
    assert mean["q2c", 0.25] >= mean["random", 0.25] + 0.2, report
    assert mean["q2c", 0.5] >= mean["random", 0.5] + 0.15, report
