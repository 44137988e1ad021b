"""KVLinkCache: transformers' generate() over a received cache answers as kvlink's own loop does.

`kvlink.generate.greedy_answer` (explicit positions and masks) is the reference throughout: the
cache must give it token for token, with the question at the ORIGINAL context length T
(invariant 2), for a full cache, a global selection, per-layer selections and a codec round trip.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, TextStreamer

from conftest import TINY_FAMILIES, ToyTokenizer, random_ids, tiny_config, tiny_model
from kvlink.cache import ContextKV, Observe, build_cache, cache_arg, prefill
from kvlink.codec import Codec
from kvlink.generate import greedy_answer, teacher_forced_logits
from kvlink.hfcache import KVLinkCache
from kvlink.models import geometry_of
from kvlink.prompt import context_ids, question_ids
from kvlink.recipe import build

DOC = Path(__file__).resolve().parents[1] / "docs" / "transformers.md"
VARIANTS = ("full", "global", "layer", "codec")
CODEC = build(selector="q2c", retention=0.5, scope="layer", k_bits=4, v_bits=4)
# Tiny models: no EOS stop (random weights would stop anywhere), so both sides run every step.
NO_EOS: dict[str, Any] = {"eos_token_id": None, "pad_token_id": 0}


def received(model: Any, variant: str, ctx: torch.Tensor, q: torch.Tensor, seed: int = 0) -> ContextKV:
    """The context as a receiver would hold it: everything, 50% kept in every layer, 50% per layer, or decoded."""
    length = ctx.numel()
    if variant == "codec":
        pre = prefill(model, ctx, q, observe=Observe.QUESTION)
        geometry = geometry_of(model.config)
        return Codec(CODEC, geometry).decode(Codec(CODEC, geometry).encode(pre))
    kv = prefill(model, ctx).kv
    if variant == "full":
        return kv
    g = torch.Generator().manual_seed(seed)
    sets = 1 if variant == "global" else kv.num_layers

    def half() -> torch.Tensor:
        return torch.sort(torch.randperm(length, generator=g)[: length // 2]).values

    kept = [half() for _ in range(sets)]
    return kv.select(kept * kv.num_layers if variant == "global" else kept)


def ask(model: Any, kv: ContextKV, q: torch.Tensor, n: int, **kwargs: Any) -> Any:
    """model.generate over a fresh KVLinkCache, with the logits of every step."""
    cache = KVLinkCache.from_context(kv, model)
    return model.generate(
        **cache.inputs(q), max_new_tokens=n, return_dict_in_generate=True, output_logits=True, **kwargs
    )


def left_pad(questions: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, Q) ids and mask, shorter questions padded on the left."""
    width = max(q.numel() for q in questions)
    ids = torch.full((len(questions), width), pad, dtype=torch.long)
    mask = torch.zeros((len(questions), width), dtype=torch.long)
    for row, q in enumerate(questions):
        ids[row, width - q.numel() :] = q
        mask[row, width - q.numel() :] = 1
    return ids, mask


# --- greedy: token for token -------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_matches_greedy_answer(tiny: Any, variant: str) -> None:
    """Llama / Qwen2 (attention bias) / Mistral: same tokens, and the logits of every step to 1e-5."""
    ctx, q = random_ids(48, seed=21), random_ids(6, seed=22)
    kv = received(tiny.model, variant, ctx, q)
    assert kv.length == 48 and kv.kept() == (48 if variant == "full" else 24)
    if variant == "layer" or variant == "codec":
        assert not torch.equal(kv.positions[0], kv.positions[1])  # the kept sets really differ
    ref = greedy_answer(tiny.model, tiny.tokenizer, kv, q, max_new_tokens=8, stop_at_eos=False)
    out = ask(tiny.model, kv, q, 8, do_sample=False, **NO_EOS)
    assert out.sequences[0, q.numel() :].tolist() == ref.token_ids
    torch.testing.assert_close(torch.cat(out.logits), ref.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_eager_attention_matches_too(family: str) -> None:
    """The eager mask path (a float mask, never skipped) gives the same answer as sdpa."""
    model = tiny_model(family, attn="eager")
    ctx, q = random_ids(40, seed=23), random_ids(5, seed=24)
    kv = received(model, "layer", ctx, q)
    ref = greedy_answer(model, ToyTokenizer(), kv, q, max_new_tokens=6, stop_at_eos=False)
    out = ask(model, kv, q, 6, do_sample=False, **NO_EOS)
    assert out.sequences[0, q.numel() :].tolist() == ref.token_ids


def test_plain_forward_continues_at_the_original_length(tiny: Any) -> None:
    """Without position_ids a forward puts the question at T, T+1, ...: the cache's length is T, not n_kept."""
    ctx, q = random_ids(40, seed=25), random_ids(5, seed=26)
    kv = received(tiny.model, "global", ctx, q)
    ref = greedy_answer(tiny.model, tiny.tokenizer, kv, q, max_new_tokens=3, stop_at_eos=False)
    cache = KVLinkCache.from_context(kv, tiny.model)
    assert cache.get_seq_length() == 40 and cache.layers[0].kept == 20
    with torch.no_grad():
        first = tiny.model(input_ids=q[None], **cache_arg(tiny.model, cache)).logits[0, -1]
        step = torch.tensor([[ref.token_ids[0]]])
        second = tiny.model(input_ids=step, **cache_arg(tiny.model, cache)).logits[0, -1]
    torch.testing.assert_close(first, ref.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, ref.logits[1], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 40 + 5 + 1 and cache.appended == 6


# --- positions: original, and wrong ones refused -----------------------------------------------------------------
def test_positions_are_the_original_ones(tiny: Any) -> None:
    """The first step equals the reference; the same kept entries continued at n_kept do not."""
    ctx, q = random_ids(48, seed=27), random_ids(6, seed=28)
    kv = received(tiny.model, "global", ctx, q)
    ref = greedy_answer(tiny.model, tiny.tokenizer, kv, q, max_new_tokens=1, stop_at_eos=False)
    ours = ask(tiny.model, kv, q, 1, do_sample=False, **NO_EOS).logits[0][0]
    torch.testing.assert_close(ours, ref.prompt_logits, atol=1e-5, rtol=1e-5)

    # What generate() does with a DynamicCache of the kept entries: the question lands at n_kept = 24.
    dynamic = build_cache(tiny.model, kv)
    mask = torch.ones((1, kv.kept() + q.numel()), dtype=torch.long)
    wrong = tiny.model.generate(
        input_ids=q[None],
        attention_mask=mask,
        **cache_arg(tiny.model, dynamic),
        max_new_tokens=1,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **NO_EOS,
    ).logits[0][0]
    assert (wrong - ref.prompt_logits).abs().max() > 1e-2


def test_positions_inside_the_context_are_refused(tiny: Any) -> None:
    """Positions restarted at n_kept (explicit) or at 0 (generate without the full mask) raise, never answer."""
    ctx, q = random_ids(48, seed=29), random_ids(6, seed=30)
    kv = received(tiny.model, "global", ctx, q)
    cache = KVLinkCache.from_context(kv, tiny.model)
    restarted = torch.arange(kv.kept(), kv.kept() + q.numel())[None]
    with pytest.raises(ValueError, match=r"inside the context of 48 tokens: they must continue at 48"):
        tiny.model(input_ids=q[None], position_ids=restarted, **cache_arg(tiny.model, cache))
    # generate() cuts the 48 tokens it believes cached off the front: nothing is left, or 12 tokens at 36...
    for question in (q, random_ids(30, seed=31)):
        with pytest.raises(ValueError, match="attention_mask"):
            tiny.model.generate(
                input_ids=question[None],
                **cache_arg(tiny.model, KVLinkCache.from_context(kv, tiny.model)),
                max_new_tokens=2,
                **NO_EOS,
            )


# --- sampling, streaming, stop strings ---------------------------------------------------------------------------
def test_sampling_follows_the_reference_distribution(tiny: Any) -> None:
    """Sampled answers (seeded, two per question) are scored by generate as kvlink scores them at T, T+1, ..."""
    ctx, q = random_ids(48, seed=32), random_ids(6, seed=33)
    kv = received(tiny.model, "layer", ctx, q)
    sample = {"do_sample": True, "temperature": 1.5, "top_p": 0.95, "num_return_sequences": 2, **NO_EOS}
    torch.manual_seed(7)
    out = ask(tiny.model, kv, q, 8, **sample)
    paths = out.sequences[:, q.numel() :].tolist()
    torch.manual_seed(7)
    assert ask(tiny.model, kv, q, 8, **sample).sequences[:, q.numel() :].tolist() == paths
    greedy = greedy_answer(tiny.model, tiny.tokenizer, kv, q, max_new_tokens=8, stop_at_eos=False)
    assert paths[0] != paths[1] and greedy.token_ids not in paths  # really sampled

    at_n_kept = ContextKV(kv.keys, kv.values, [torch.arange(kv.kept())] * kv.num_layers, kv.kept())
    for row, tokens in enumerate(paths):
        scored = torch.stack([step[row] for step in out.logits])  # (8, vocab): the raw logits of this row
        torch.testing.assert_close(
            scored, teacher_forced_logits(tiny.model, kv, q, tokens), atol=1e-4, rtol=1e-4
        )
        wrong = teacher_forced_logits(
            tiny.model, at_n_kept, q, tokens
        )  # the same entries, question at n_kept
        assert (wrong - scored).abs().max() > 1e-2


def test_text_streamer_receives_the_generated_text(tiny: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ctx, q = random_ids(40, seed=34), random_ids(5, seed=35)
    kv = received(tiny.model, "global", ctx, q)
    cache = KVLinkCache.from_context(kv, tiny.model)
    capsys.readouterr()
    out = tiny.model.generate(
        **cache.inputs(q),
        max_new_tokens=7,
        do_sample=False,
        streamer=TextStreamer(tiny.tokenizer, skip_prompt=True),
        **NO_EOS,
    )
    new = out[0, q.numel() :].tolist()
    assert capsys.readouterr().out == tiny.tokenizer.decode(new) + "\n"
    assert (
        new == greedy_answer(tiny.model, tiny.tokenizer, kv, q, max_new_tokens=7, stop_at_eos=False).token_ids
    )


# --- batches and sharing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["full", "layer"])
def test_batch_of_left_padded_questions(tiny: Any, variant: str) -> None:
    """Three questions of 3, 7 and 5 tokens over one context: each row is that question asked alone."""
    ctx = random_ids(40, seed=36)
    questions = [random_ids(n, seed=40 + n) for n in (3, 7, 5)]
    kv = received(tiny.model, variant, ctx, questions[0])
    ids, mask = left_pad(questions, pad=0)
    cache = KVLinkCache.from_context(kv, tiny.model)
    out = tiny.model.generate(**cache.inputs(ids, mask), max_new_tokens=6, do_sample=False, **NO_EOS)
    for row, q in enumerate(questions):
        alone = greedy_answer(tiny.model, tiny.tokenizer, kv, q, max_new_tokens=6, stop_at_eos=False)
        assert out[row, ids.shape[1] :].tolist() == alone.token_ids, row
    assert cache.layers[0].keys.shape[0] == 3 and cache.layers[0].context_keys.shape[0] == 1


def test_context_is_shared_read_only(tiny: Any) -> None:
    """Caches over one ContextKV share its tensors, never write them, and do not see each other's tokens."""
    ctx, q1, q2 = random_ids(40, seed=37), random_ids(5, seed=38), random_ids(4, seed=39)
    kv = received(tiny.model, "layer", ctx, q1)
    before = [t.clone() for t in (*kv.keys, *kv.values, *kv.positions)]
    a = KVLinkCache.from_context(kv, tiny.model)
    b = KVLinkCache.from_context(kv, tiny.model)
    assert a.layers[1].context_keys.data_ptr() == kv.keys[1].data_ptr()  # fp32 model: no copy

    def run(cache: KVLinkCache, q: torch.Tensor) -> list[int]:
        out = tiny.model.generate(**cache.inputs(q), max_new_tokens=5, do_sample=False, **NO_EOS)
        return out[0, q.numel() :].tolist()  # type: ignore[no-any-return]

    first = run(a, q1)
    other = run(b, q2)
    assert a.appended == 5 + 4 and b.appended == 4 + 4
    a.reset()
    assert a.appended == 0 and a.get_seq_length() == 40
    assert run(a, q1) == first
    assert run(KVLinkCache.from_context(kv, tiny.model), q2) == other
    assert all(torch.equal(x, y) for x, y in zip(before, (*kv.keys, *kv.values, *kv.positions)))


def test_beam_search_over_a_full_cache_is_beam_search_over_the_prompt(tiny: Any) -> None:
    """Beams reorder only what was appended; the shared context is the same for every beam."""
    ctx, q = random_ids(30, seed=44), random_ids(4, seed=45)
    kv = received(tiny.model, "full", ctx, q)
    cache = KVLinkCache.from_context(kv, tiny.model)
    ours = tiny.model.generate(**cache.inputs(q), max_new_tokens=5, num_beams=3, do_sample=False, **NO_EOS)
    full = torch.cat([ctx, q])[None]
    theirs = tiny.model.generate(
        full, attention_mask=torch.ones_like(full), max_new_tokens=5, num_beams=3, do_sample=False, **NO_EOS
    )
    assert ours[0, q.numel() :].tolist() == theirs[0, full.shape[1] :].tolist()


def test_crop_removes_appended_tokens_only(tiny: Any) -> None:
    ctx, q = random_ids(20, seed=46), random_ids(4, seed=47)
    cache = KVLinkCache.from_context(received(tiny.model, "full", ctx, q), tiny.model)
    tiny.model.generate(**cache.inputs(q), max_new_tokens=3, do_sample=False, **NO_EOS)
    assert cache.appended == 6
    cache.crop(-2)
    assert cache.appended == 4 and cache.get_seq_length() == 24
    with pytest.raises(ValueError, match="only 4 were appended"):
        cache.crop(-5)
    with pytest.raises(ValueError, match="negative count"):
        cache.crop(3)


# --- refusals ----------------------------------------------------------------------------------------------------
def test_bad_contexts_are_refused(tiny: Any) -> None:
    kv = prefill(tiny.model, random_ids(16, seed=48)).kv
    uneven = kv.select([torch.arange(8), torch.arange(6), torch.arange(8)])
    with pytest.raises(ValueError, match=r"different numbers of entries \[6, 8\]"):
        KVLinkCache.from_context(uneven, tiny.model)
    two_layers = ContextKV(kv.keys[:2], kv.values[:2], kv.positions[:2], kv.length)
    with pytest.raises(ValueError, match=r"\(2, 2, 16\) is not the model's \(3, 2, 16\)"):
        KVLinkCache.from_context(two_layers, tiny.model)
    past_the_end = ContextKV(kv.keys, kv.values, [torch.arange(1, 17)] * 3, kv.length)
    with pytest.raises(ValueError, match=r"sorted, unique and in \[0, 16\)"):
        KVLinkCache.from_context(past_the_end, tiny.model)
    cache = KVLinkCache.from_context(kv, tiny.model)
    with pytest.raises(ValueError, match="does not match input_ids"):
        cache.inputs(random_ids(4), torch.ones(5, dtype=torch.long))


def test_sliding_window_is_refused_past_the_window() -> None:
    """Mistral with a 32-token window: answers within it; refuses a context, or an answer, that crosses it."""
    config = tiny_config("mistral")
    config.sliding_window = 32
    config._attn_implementation = "sdpa"
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    q = random_ids(4, seed=49)
    kv = prefill(model, random_ids(20, seed=50)).kv
    ref = greedy_answer(model, ToyTokenizer(), kv, q, max_new_tokens=6, stop_at_eos=False)
    out = model.generate(**KVLinkCache.from_context(kv, model).inputs(q), max_new_tokens=6, **NO_EOS)
    assert out[0, 4:].tolist() == ref.token_ids  # 20 + 4 + 6 <= 32
    with pytest.raises(
        ValueError, match=r"plus 13 question and answer tokens exceeds the model's sliding window \(32\)"
    ):
        model.generate(**KVLinkCache.from_context(kv, model).inputs(q), max_new_tokens=12, **NO_EOS)
    # (A prefill of 32 tokens would already have dropped the first: transformers' sliding layers keep 31.)
    full_window = ContextKV(
        [torch.randn(2, 32, 16)] * 3, [torch.randn(2, 32, 16)] * 3, [torch.arange(32)] * 3, 32
    )
    with pytest.raises(ValueError, match=r"context of 32 tokens fills the model's sliding window \(32\)"):
        KVLinkCache.from_context(full_window, model)


def test_a_dynamic_cache_of_the_kept_entries_is_not_enough(tiny: Any) -> None:
    """Why this module exists: transformers' own cache over a selection continues at n_kept, not T."""
    kv = received(tiny.model, "global", random_ids(48, seed=52), random_ids(6, seed=53))
    assert isinstance(build_cache(tiny.model, kv), DynamicCache)
    assert build_cache(tiny.model, kv).get_seq_length() == 24
    assert KVLinkCache.from_context(kv, tiny.model).get_seq_length() == 48


# --- the embedded model ------------------------------------------------------------------------------------------
def _squad(lm: Any, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from kvlink.eval.squad import load_squad

    example = load_squad()[index]
    return context_ids(lm.tokenizer, example.context), question_ids(lm.tokenizer, example.question)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_embedded_generate_matches_greedy_answer(embedded: Any, variant: str) -> None:
    """SmolLM2-135M (Llama): generate() stops at EOS where greedy_answer does, with the same tokens."""
    ctx, q = _squad(embedded)
    kv = received(embedded.model, variant, ctx, q)
    ref = greedy_answer(embedded.model, embedded.tokenizer, kv, q, max_new_tokens=16)
    out = ask(embedded.model, kv, q, 16, do_sample=False)
    assert out.sequences[0, q.numel() :].tolist() == ref.token_ids
    if variant == "full":
        assert ref.token_ids[-1] == embedded.tokenizer.eos_token_id  # both stopped on EOS, at the same step
    torch.testing.assert_close(out.logits[0][0], ref.prompt_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_embedded_stop_strings_and_batch(embedded: Any) -> None:
    lm = embedded
    ctx, q = _squad(lm)
    kv = received(lm.model, "codec", ctx, q)
    ref = greedy_answer(lm.model, lm.tokenizer, kv, q, max_new_tokens=24)
    word = ref.text.split()[1]  # a word inside the answer, not its end
    out = lm.model.generate(
        **KVLinkCache.from_context(kv, lm.model).inputs(q),
        max_new_tokens=24,
        do_sample=False,
        stop_strings=[word],
        tokenizer=lm.tokenizer,
    )
    new = out[0, q.numel() :].tolist()
    assert len(new) < len(ref.token_ids) and new == ref.token_ids[: len(new)]
    assert lm.tokenizer.decode(new).rstrip().endswith(word)

    _, q2 = _squad(lm, 1)
    ids, mask = left_pad([q, q2], pad=lm.tokenizer.pad_token_id)
    cache = KVLinkCache.from_context(kv, lm.model)
    batch = lm.model.generate(**cache.inputs(ids, mask), max_new_tokens=24, do_sample=False)
    for row, question in enumerate([q, q2]):
        alone = greedy_answer(lm.model, lm.tokenizer, kv, question, max_new_tokens=24)
        got = batch[row, ids.shape[1] :].tolist()
        assert got[: len(alone.token_ids)] == alone.token_ids, row
        assert all(t == lm.tokenizer.pad_token_id for t in got[len(alone.token_ids) :])


@pytest.mark.slow
def test_docs_transformers_md_runs_as_written() -> None:
    """Every ```python block of docs/transformers.md, in order, in one namespace; then its claims."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, f"no python block in {DOC}"
    namespace: dict[str, Any] = {"__name__": "docs_transformers"}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)
    lm, kv = namespace["lm"], namespace["kv"]
    assert isinstance(namespace["cache"], KVLinkCache) and namespace["answer"].strip()
    for question, text in zip(namespace["questions"], namespace["answers"], strict=True):
        from kvlink.prompt import question_ids as tokenize

        alone = greedy_answer(lm.model, lm.tokenizer, kv, tokenize(lm.tokenizer, question), max_new_tokens=32)
        assert text == alone.text
