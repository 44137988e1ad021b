"""Shared fixtures: tiny random-weight models (Llama, Qwen2 with attention bias, Mistral) and the embedded model."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis profiles (tests/test_fuzz.py): "ci", the default, runs a few hundred examples in all,
# derandomized so that `make test` is reproducible; "fuzz" (`make fuzz`, HYPOTHESIS_PROFILE=fuzz) runs
# FUZZ_EXAMPLES per property, over 100k in all, with fresh randomness each run.
CI_EXAMPLES, FUZZ_EXAMPLES = 50, 20_000
settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TINY_FAMILIES = ("llama", "qwen2", "mistral")


class ToyTokenizer:
    """Just enough tokenizer for the decode loop on random-weight models: ids are text."""

    eos_token_id = 2
    chat_template = None
    all_special_tokens: ClassVar[list[str]] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(256)}


def tiny_config(family: str) -> Any:
    """A 3-layer, GQA (4 query / 2 KV heads) config of the given family with head_dim 16."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)  # Qwen2 has q/k/v attention bias
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(f"unknown tiny family {family!r}")


def tiny_model(family: str, seed: int = 0, attn: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is small; scale up attention so positions matter and logits are not flat.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model.eval()


@pytest.fixture(params=TINY_FAMILIES)
def tiny(request: pytest.FixtureRequest) -> Any:
    from kvlink.models import wrap

    seed = TINY_FAMILIES.index(request.param)
    return wrap(tiny_model(request.param, seed=seed), ToyTokenizer(), name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def embedded() -> Any:
    """The embedded SmolLM2-135M-Instruct (converted once from GGUF, then cached)."""
    from kvlink.models import load_model

    return load_model()


def random_ids(n: int, seed: int = 0, low: int = 3, high: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n,), generator=g)
