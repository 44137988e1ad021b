"""kvlink.attention: a text segment's recompute after its cached prefix, by lower-right causal attention."""

from __future__ import annotations

import pytest
import torch

from conftest import ToyTokenizer, random_ids, tiny_config, tiny_model
from kvlink.attention import (
    IMPLEMENTATION,
    PREFIX_CAUSAL,
    prefix_causal,
    prefix_causal_ok,
    use_prefix_attention,
)
from kvlink.cache import prefill
from kvlink.models import fingerprint, wrap
from kvlink.stream import join, recompute


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out: query i of q sees keys 0 .. k - q + i."""
    q, k = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
    seen = torch.arange(k)[None, :] <= (k - q + torch.arange(q))[:, None]
    out = scores.masked_fill(~seen, float("-inf")).softmax(-1) @ value
    return out.transpose(1, 2)


@pytest.mark.parametrize(("q", "k"), [(5, 12), (1, 9), (7, 7)])
def test_prefix_causal_is_lower_right_causal_attention_with_gqa(q: int, k: int) -> None:
    g = torch.Generator().manual_seed(q * 100 + k)
    query = torch.randn(2, 4, q, 16, generator=g)
    key, value = torch.randn(2, 2, k, 16, generator=g), torch.randn(2, 2, k, 16, generator=g)
    torch.testing.assert_close(prefix_causal(query, key, value), _reference(query, key, value))
    with pytest.raises(ValueError, match="must include the queries"):
        prefix_causal(query, key[:, :, : q - 1], value[:, :, : q - 1])


def test_models_on_sdpa_switch_and_keep_their_fingerprint() -> None:
    model = tiny_model("llama")
    before = fingerprint(model, ToyTokenizer())
    lm = wrap(model, ToyTokenizer())
    assert model.config._attn_implementation == IMPLEMENTATION and prefix_causal_ok(model)
    assert lm.fingerprint == before
    eager = wrap(tiny_model("llama", attn="eager"), ToyTokenizer())
    assert eager.model.config._attn_implementation == "eager" and not prefix_causal_ok(eager.model)
    assert not use_prefix_attention(object())


def test_the_flag_reaches_every_layer_and_replaces_the_mask() -> None:
    """A forward with PREFIX_CAUSAL ignores the mask Transformers built: a padding mask hiding the first
    tokens changes the plain forward's logits and not the flagged one's, which equal the unmasked run."""
    model = wrap(tiny_model("qwen2"), ToyTokenizer()).model
    ids = random_ids(12, seed=3)[None]
    hide = torch.ones_like(ids)
    hide[0, :4] = 0
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        masked = model(input_ids=ids, attention_mask=hide).logits
        flagged = model(input_ids=ids, attention_mask=hide, **{PREFIX_CAUSAL: True}).logits
    assert not torch.allclose(masked, plain, atol=1e-3)
    torch.testing.assert_close(flagged, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_recompute_after_a_selected_prefix_matches_the_masked_path(family: str) -> None:
    """Segment after segment, the last after a prefix whose middle entries were dropped: the flagged
    recompute gives the keys and values of the eager model's explicit-mask recompute."""
    fast = wrap(tiny_model(family), ToyTokenizer()).model
    slow = wrap(tiny_model(family, attn="eager"), ToyTokenizer()).model
    assert prefix_causal_ok(fast, 64) and not prefix_causal_ok(slow, 64)
    ids = random_ids(64, seed=5)
    first = prefill(fast, ids[:24]).kv
    kept = torch.tensor([0, 1, 2, 5, 9, 10, 17, 20, 23])
    prefix = first.select([kept] * first.num_layers)
    for model_kv in (recompute(fast, prefix, ids[24:40], 24), recompute(slow, prefix, ids[24:40], 24)):
        assert torch.equal(model_kv.positions[0], torch.arange(24, 40))
    a, b = recompute(fast, prefix, ids[24:40], 24), recompute(slow, prefix, ids[24:40], 24)
    for layer in range(a.num_layers):
        torch.testing.assert_close(a.keys[layer], b.keys[layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.values[layer], b.values[layer], rtol=1e-4, atol=1e-4)
    # Without the selection, segment by segment equals one prefill of the whole context.
    parts = [first]
    for start, stop in ((24, 40), (40, 63), (63, 64)):
        parts.append(recompute(fast, join(parts, start), ids[start:stop], start))
    whole = prefill(fast, ids).kv
    joined = join(parts, 64)
    for layer in range(whole.num_layers):
        torch.testing.assert_close(joined.keys[layer], whole.keys[layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(joined.values[layer], whole.values[layer], rtol=1e-4, atol=1e-4)


def test_a_sliding_window_model_takes_the_fast_path_only_within_its_window() -> None:
    """Within the window lower-right causal attention is the model's attention (the same keys and values
    as the eager model's); past it the transferred cache is refused before any attention runs."""
    from transformers import AutoModelForCausalLM

    def build(attn: str) -> torch.nn.Module:
        config = tiny_config("mistral")
        config.sliding_window = 32
        config._attn_implementation = attn
        torch.manual_seed(0)
        return wrap(AutoModelForCausalLM.from_config(config, dtype=torch.float32), ToyTokenizer()).model

    model, eager = build("sdpa"), build("eager")
    assert model.config._attn_implementation == IMPLEMENTATION
    assert prefix_causal_ok(model, 32) and not prefix_causal_ok(model, 33)
    ids = random_ids(40, seed=7)
    first = prefill(eager, ids[:20]).kv
    got, want = recompute(model, first, ids[20:30], 20), recompute(eager, first, ids[20:30], 20)
    assert torch.equal(got.positions[0], torch.arange(20, 30))
    for layer in range(got.num_layers):
        torch.testing.assert_close(got.keys[layer], want.keys[layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.values[layer], want.values[layer], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="sliding window"):
        recompute(model, first, ids[20:40], 20)
