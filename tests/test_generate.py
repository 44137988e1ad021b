"""The receiver's decode loop: positions continue at the ORIGINAL length T (invariant 2)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from conftest import random_ids
from kvlink.cache import cache_arg, prefill
from kvlink.generate import attention_mask, greedy_answer, teacher_forced_logits


def test_decode_loop_matches_hf_generate(tiny: Any) -> None:
    """With the full cache, the explicit loop is plain greedy decoding of context + question."""
    ctx, q = random_ids(40, seed=1), random_ids(6, seed=2)
    pre = prefill(tiny.model, ctx, q)
    answer = greedy_answer(tiny.model, tiny.tokenizer, pre.kv, q, max_new_tokens=8, stop_at_eos=False)
    full = torch.cat([ctx, q])[None]
    out = tiny.model.generate(
        full,
        attention_mask=torch.ones_like(full),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert answer.token_ids == out[0, full.shape[1] :].tolist()
    with torch.no_grad():
        logits = tiny.model(full).logits[0, -1]
    torch.testing.assert_close(answer.prompt_logits, logits, atol=1e-4, rtol=1e-4)


def test_eviction_equals_masking_at_original_positions(tiny: Any) -> None:
    """Dropping entries == keeping them but masking them out, with the question at position T (1e-4, fp32)."""
    ctx, q = random_ids(48, seed=3), random_ids(5, seed=4)
    pre = prefill(tiny.model, ctx, q)
    g = torch.Generator().manual_seed(5)
    kept = torch.sort(torch.randperm(48, generator=g)[:20]).values
    dropped = torch.tensor(sorted(set(range(48)) - set(kept.tolist())))
    evicted = pre.kv.select([kept] * pre.kv.num_layers)
    assert evicted.kept() == 20 and evicted.length == 48

    a_evicted = greedy_answer(tiny.model, tiny.tokenizer, evicted, q, max_new_tokens=6, stop_at_eos=False)
    a_masked = greedy_answer(
        tiny.model, tiny.tokenizer, pre.kv, q, max_new_tokens=6, stop_at_eos=False, mask_out=dropped
    )
    assert a_evicted.token_ids == a_masked.token_ids
    torch.testing.assert_close(a_evicted.logits, a_masked.logits, atol=1e-4, rtol=0)

    # The same eviction continued at position n_kept instead of T gives different logits: positions matter.
    renumbered = evicted.__class__(evicted.keys, evicted.values, evicted.positions, length=20)
    a_wrong = greedy_answer(tiny.model, tiny.tokenizer, renumbered, q, max_new_tokens=1, stop_at_eos=False)
    assert (a_wrong.prompt_logits - a_evicted.prompt_logits).abs().max() > 1e-3

    # And the eviction really removed information.
    a_full = greedy_answer(tiny.model, tiny.tokenizer, pre.kv, q, max_new_tokens=1, stop_at_eos=False)
    assert (a_full.prompt_logits - a_evicted.prompt_logits).abs().max() > 1e-3


def test_a_long_question_is_prefilled_in_chunks(tiny: Any) -> None:
    """Chunked question prefill gives the one-forward answer, and each forward holds the lock alone."""
    ctx, q = random_ids(30, seed=8), random_ids(23, seed=9)
    pre = prefill(tiny.model, ctx, None)
    whole = greedy_answer(tiny.model, tiny.tokenizer, pre.kv, q, max_new_tokens=5, stop_at_eos=False)

    class CountingLock:
        def __init__(self) -> None:
            self.entered = self.held = 0

        def __enter__(self) -> None:
            assert self.held == 0  # released between forwards
            self.entered += 1
            self.held += 1

        def __exit__(self, *exc: object) -> None:
            self.held -= 1

    lock = CountingLock()
    chunked = greedy_answer(
        tiny.model, tiny.tokenizer, pre.kv, q, max_new_tokens=5, stop_at_eos=False, prefill_chunk=7,
        forward_lock=lock,
    )  # fmt: skip
    assert chunked.token_ids == whole.token_ids
    torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-4, rtol=1e-4)
    assert lock.entered == 4 + 4 and lock.held == 0  # ceil(23 / 7) question forwards, then 4 steps


def test_teacher_forced_logits_match_the_loop(tiny: Any) -> None:
    ctx, q = random_ids(30, seed=6), random_ids(4, seed=7)
    pre = prefill(tiny.model, ctx, q)
    answer = greedy_answer(tiny.model, tiny.tokenizer, pre.kv, q, max_new_tokens=5, stop_at_eos=False)
    forced = teacher_forced_logits(tiny.model, pre.kv, q, answer.token_ids)
    torch.testing.assert_close(forced, answer.logits, atol=1e-4, rtol=1e-4)


def test_attention_mask_uses_positions() -> None:
    keys = torch.tensor([0, 5, 9, 10, 11])
    queries = torch.tensor([10, 11])
    mask = attention_mask(keys, queries, torch.float32)[0, 0]
    assert mask.shape == (2, 5)
    assert (mask[0, :4] == 0).all() and mask[0, 4] < -1e30
    assert (mask[1] == 0).all()
    windowed = attention_mask(keys, queries, torch.float32, sliding_window=3)[0, 0]
    assert windowed[1, :2].min() < -1e30 and (windowed[1, 2:] == 0).all()


def test_bad_arguments_raise(tiny: Any) -> None:
    pre = prefill(tiny.model, random_ids(8), None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_answer(tiny.model, tiny.tokenizer, pre.kv, random_ids(2), max_new_tokens=0)
    with pytest.raises(ValueError, match="question is empty"):
        greedy_answer(tiny.model, tiny.tokenizer, pre.kv, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="context is empty"):
        prefill(tiny.model, torch.tensor([], dtype=torch.long))


def test_cache_is_passed_under_the_name_forward_takes(tiny: Any) -> None:
    """transformers 5.24 renamed past_key_values to cache: prefill, decoding and teacher forcing warn under none."""
    ctx, q = random_ids(20, seed=8), random_ids(4, seed=9)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        pre = prefill(tiny.model, ctx, q)
        answer = greedy_answer(tiny.model, tiny.tokenizer, pre.kv, q, max_new_tokens=3, stop_at_eos=False)
        teacher_forced_logits(tiny.model, pre.kv, q, answer.token_ids)
    assert len(answer.token_ids) == 3


def test_cache_arg_follows_the_forward_signature() -> None:
    class Renamed(torch.nn.Module):
        def forward(self, input_ids: Any, cache: Any = None) -> None: ...

    class Older(torch.nn.Module):
        def forward(self, input_ids: Any, past_key_values: Any = None) -> None: ...

    assert cache_arg(Renamed(), "c") == {"cache": "c"}
    assert cache_arg(Older(), "c") == {"past_key_values": "c"}


def test_the_answer_shares_the_decoded_context(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer's cache references the context's tensors (no second copy on the receiver), keeps what it
    appends apart, and answers as a copy of the context in a DynamicCache does."""
    from kvlink.cache import build_cache
    from kvlink.generate import _answer_cache

    kv = prefill(tiny.model, random_ids(40, seed=3)).kv
    cache = _answer_cache(tiny.model, kv)
    for layer, entry in enumerate(cache.layers):
        assert entry.context_keys.data_ptr() == kv.keys[layer].data_ptr()
        assert entry.context_values.data_ptr() == kv.values[layer].data_ptr()
    q = random_ids(6, seed=4)
    shared = greedy_answer(tiny.model, None, kv, q, max_new_tokens=4, stop_at_eos=False)
    assert all(e.appended == 0 for e in cache.layers)  # each answer builds its own
    dynamic = build_cache(tiny.model, kv)
    assert dynamic.layers[0].keys.data_ptr() != kv.keys[0].data_ptr()  # what the answer used to do: a copy
    monkeypatch.setattr("kvlink.generate._answer_cache", build_cache)
    copied = greedy_answer(tiny.model, None, kv, q, max_new_tokens=4, stop_at_eos=False)
    assert shared.token_ids == copied.token_ids
    torch.testing.assert_close(shared.logits, copied.logits)
