"""kvlink.answer: the receiver's answer through transformers' generate() over a KVLinkCache.

kvlink.generate.greedy_answer is the reference: greedy answers must be its tokens (and logits) for every
kind of received context, however the checkpoint's own generation defaults are set; long questions are
prefilled in bounded forwards; answers that share a model take turns forward by forward.
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import Any

import pytest
import torch
from test_hfcache import VARIANTS, received
from transformers import GenerationConfig

from conftest import ToyTokenizer, random_ids
from kvlink.answer import FINISH_REASONS, GenerationOptions, generate_answer, turns
from kvlink.cache import prefill
from kvlink.generate import greedy_answer
from kvlink.prompt import context_ids, question_ids
from kvlink.server.guard import FairLock


class CountingLock:
    """A lock that checks it is released between forwards and counts how often it was taken."""

    def __init__(self) -> None:
        self.entered = self.held = 0

    def __enter__(self) -> None:
        assert self.held == 0
        self.entered += 1
        self.held += 1

    def __exit__(self, *exc: object) -> None:
        self.held -= 1


def _no_eos(model: Any) -> None:
    """Random weights would stop anywhere: no EOS, so both sides run every step."""
    model.generation_config.eos_token_id = None


# --- greedy: the reference, token for token -------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_is_the_reference_answer(tiny: Any, variant: str) -> None:
    ctx, q = random_ids(48, seed=61), random_ids(6, seed=62)
    kv = received(tiny.model, variant, ctx, q)
    _no_eos(tiny.model)
    ref = greedy_answer(tiny.model, None, kv, q, max_new_tokens=8, stop_at_eos=False)
    ours = generate_answer(tiny.model, None, kv, q, GenerationOptions(8), keep_logits=True)
    assert ours.token_ids == ref.token_ids and ours.finish_reason == "length"
    torch.testing.assert_close(ours.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert set(ours.timings) >= {"build_cache_s", "first_token_s", "answer_s"}
    assert 0 < ours.timings["first_token_s"] <= ours.timings["answer_s"]


def test_the_checkpoints_sampling_defaults_do_not_apply(tiny: Any) -> None:
    """A generation_config.json that samples, penalizes repeats and bans n-grams changes nothing."""
    ctx, q = random_ids(40, seed=63), random_ids(5, seed=64)
    kv = received(tiny.model, "layer", ctx, q)
    ref = greedy_answer(tiny.model, None, kv, q, max_new_tokens=16, stop_at_eos=False)
    tiny.model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.3, top_k=5, top_p=0.5, repetition_penalty=1.8, no_repeat_ngram_size=1,
        eos_token_id=None,
    )  # fmt: skip
    assert generate_answer(tiny.model, None, kv, q, GenerationOptions(16)).token_ids == ref.token_ids


def test_a_long_question_is_prefilled_in_bounded_forwards_each_taking_its_turn(tiny: Any) -> None:
    """ceil(23 / 7) question forwards of at most 7 tokens, then one per new token but the last; the lock is
    held around each and released between them; the answer is the one-forward answer."""
    ctx, q = random_ids(30, seed=65), random_ids(23, seed=66)
    kv = prefill(tiny.model, ctx).kv
    _no_eos(tiny.model)
    whole = generate_answer(tiny.model, None, kv, q, GenerationOptions(5), keep_logits=True)
    widths: list[int] = []
    handle = tiny.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(int(kwargs["input_ids"].shape[1])), with_kwargs=True
    )
    lock = CountingLock()
    try:
        chunked = generate_answer(
            tiny.model,
            None,
            kv,
            q,
            GenerationOptions(5),
            prefill_chunk=7,
            forward_lock=lock,
            keep_logits=True,
        )
    finally:
        handle.remove()
    assert chunked.token_ids == whole.token_ids
    torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-4, rtol=1e-4)
    assert widths == [7, 7, 7, 2, 1, 1, 1, 1] and lock.entered == len(widths) and lock.held == 0
    assert chunked.token_ids == greedy_answer(tiny.model, None, kv, q, 5, stop_at_eos=False).token_ids


def test_answers_sharing_a_model_take_turns_forward_by_forward(tiny: Any) -> None:
    """Two answers started together under one FairLock alternate their forwards; a forward on a thread
    that holds no lock is not held up (the hooks only serve the threads that registered one)."""
    ctx = random_ids(40, seed=67)
    kv = prefill(tiny.model, ctx).kv
    _no_eos(tiny.model)
    lock = FairLock()
    order: list[str] = []

    class Recording:
        def __enter__(self) -> None:
            lock.acquire()
            order.append(threading.current_thread().name)

        def __exit__(self, *exc: object) -> None:
            lock.release()

    shared = Recording()
    start = threading.Barrier(2)
    answers: dict[str, list[int]] = {}

    def run(name: str, seed: int) -> None:
        q = random_ids(4, seed=seed)
        start.wait()
        answers[name] = generate_answer(
            tiny.model, None, kv, q, GenerationOptions(12), forward_lock=shared
        ).token_ids

    threads = [threading.Thread(target=run, name=n, args=(n, s)) for n, s in (("a", 68), ("b", 69))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(order) == ["a"] * 12 + ["b"] * 12
    switches = sum(1 for x, y in itertools.pairwise(order) if x != y)
    assert switches >= 8, order  # not one whole answer after the other (that would be 1 switch)
    for name, seed in (("a", 68), ("b", 69)):
        alone = greedy_answer(tiny.model, None, kv, random_ids(4, seed=seed), 12, stop_at_eos=False)
        assert answers[name] == alone.token_ids
    # A thread with no lock registered runs its forward while another holds the lock.
    lock.acquire()
    try:
        done = threading.Event()
        threading.Thread(
            target=lambda: (
                generate_answer(tiny.model, None, kv, random_ids(3), GenerationOptions(2)),
                done.set(),
            )
        ).start()
        assert done.wait(30)
    finally:
        lock.release()
    assert turns(tiny.model) is turns(tiny.model)  # hooks installed once per model


def test_sampling_follows_temperature_and_top_p(tiny: Any) -> None:
    ctx, q = random_ids(40, seed=70), random_ids(5, seed=71)
    kv = received(tiny.model, "global", ctx, q)
    _no_eos(tiny.model)
    greedy = generate_answer(tiny.model, None, kv, q, GenerationOptions(10)).token_ids
    hot = GenerationOptions(10, temperature=2.0, top_p=1.0)
    torch.manual_seed(1)
    first = generate_answer(tiny.model, None, kv, q, hot).token_ids
    torch.manual_seed(1)
    assert generate_answer(tiny.model, None, kv, q, hot).token_ids == first  # seeded: reproducible
    samples = {tuple(generate_answer(tiny.model, None, kv, q, hot).token_ids) for _ in range(4)}
    assert len(samples | {tuple(first)}) > 1 and tuple(greedy) not in samples
    # A tiny nucleus keeps only the most likely token: sampling becomes greedy.
    narrow = GenerationOptions(10, temperature=1.0, top_p=1e-6)
    assert generate_answer(tiny.model, None, kv, q, narrow).token_ids == greedy


def test_options_are_checked() -> None:
    for bad, needle in (
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(temperature=-0.5), "temperature must be in"),
        (dict(temperature=math.nan), "temperature must be in"),
        (dict(temperature=1.0, top_p=0.0), "top_p must be in"),
        (dict(top_p=0.5), "needs sampling"),
        (dict(stop=("",)), "non-empty"),
        (dict(stop=("x" * 300,)), "at most 256 characters"),
        (dict(stop=("a",) * 17), "at most 16 stop strings"),
    ):
        with pytest.raises(ValueError, match=needle):
            GenerationOptions(**bad)  # type: ignore[arg-type]
    assert GenerationOptions(100).clamped(64).max_new_tokens == 64
    assert GenerationOptions(8, stop=["x"]).stop == ("x",)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="question is empty"):
        kv = prefill(_tiny(), random_ids(8)).kv
        generate_answer(_tiny(), ToyTokenizer(), kv, torch.tensor([], dtype=torch.long))


def _tiny() -> Any:
    from conftest import tiny_model

    return tiny_model("llama")


# --- the embedded model: EOS, stop strings, finish reasons --------------------------------------------------------
@pytest.mark.slow
def test_embedded_stops_where_the_reference_stops(embedded: Any) -> None:
    from kvlink.eval.squad import load_squad

    lm = embedded
    example = load_squad()[0]
    ctx, q = context_ids(lm.tokenizer, example.context), question_ids(lm.tokenizer, example.question)
    kv = received(lm.model, "codec", ctx, q)
    ref = greedy_answer(lm.model, lm.tokenizer, kv, q, max_new_tokens=32)
    ours = generate_answer(lm.model, lm.tokenizer, kv, q, GenerationOptions(32))
    assert ours.token_ids == ref.token_ids and ours.text == ref.text
    assert ours.finish_reason == "eos" and ref.token_ids[-1] == lm.tokenizer.eos_token_id
    short = generate_answer(lm.model, lm.tokenizer, kv, q, GenerationOptions(2))
    assert short.token_ids == ref.token_ids[:2] and short.finish_reason == "length"
    word = ref.text.split()[1]
    stopped = generate_answer(lm.model, lm.tokenizer, kv, q, GenerationOptions(32, stop=(word,)))
    assert stopped.finish_reason == "stop" and stopped.text.endswith(word)
    assert stopped.token_ids == ref.token_ids[: len(stopped.token_ids)] and len(stopped.token_ids) < len(
        ref.token_ids
    )
    assert set(FINISH_REASONS) == {"eos", "stop", "length"}
