"""Low rank: SVD optimality, the calibrated profile's projection, and its file (round trip, hash, validation)."""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from conftest import random_ids, tiny_model
from kvlink.cache import prefill
from kvlink.lowrank import (
    PROFILE_FORMAT,
    PROFILE_VERSION,
    ModelProfile,
    calibrate_profile,
    default_profile_path,
    svd_factors,
)

HEAD_DIM = 16  # the tiny models: hidden 64, 4 query heads, 2 KV heads


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / x.norm())


def structured(h: int = 2, t: int = 48, d: int = HEAD_DIM, seed: int = 0) -> torch.Tensor:
    """(H, T, D) with a decaying spectrum, so that every rank matters."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, d)
    return torch.randn(h, t, d, generator=g) * scales + torch.randn(h, 1, d, generator=g)


# --- per-message SVD -----------------------------------------------------------


def test_svd_full_rank_reconstructs_exactly() -> None:
    x = structured()
    latent, basis = svd_factors(x, HEAD_DIM)
    assert latent.shape == (2, 48, HEAD_DIM) and basis.shape == (2, HEAD_DIM, HEAD_DIM)
    assert latent.dtype == basis.dtype == torch.float32
    assert rel_err(x, latent @ basis) < 1e-4


def test_svd_error_is_eckart_young_optimal_and_decreases_with_rank() -> None:
    x = structured(seed=3)
    s = torch.linalg.svdvals(x.double())  # (H, D)
    errors = []
    for rank in range(1, HEAD_DIM + 1):
        latent, basis = svd_factors(x, rank)
        assert latent.shape == (2, 48, rank) and basis.shape == (2, rank, HEAD_DIM)
        err = float(((latent @ basis).double() - x.double()).pow(2).sum())
        optimal = float(s[:, rank:].pow(2).sum())  # the discarded squared singular values
        assert err == pytest.approx(optimal, rel=1e-3, abs=1e-6 * float(x.double().pow(2).sum()))
        errors.append(err)
    assert all(a >= b for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 10 * errors[HEAD_DIM // 2]


def test_svd_basis_rows_are_orthonormal_and_signs_are_fixed() -> None:
    x = structured(seed=5)
    _, basis = svd_factors(x, 6)
    torch.testing.assert_close(basis @ basis.transpose(1, 2), torch.eye(6).expand(2, 6, 6), atol=1e-5, rtol=0)
    _, flipped = svd_factors(-x, 6)  # same subspace, SVD sign choice may differ: ours does not
    torch.testing.assert_close(basis, flipped, atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [0, 1, 3])
def test_svd_fewer_tokens_than_rank_pads_with_zeros(t: int) -> None:
    x = structured(t=t) if t else torch.zeros(2, 0, HEAD_DIM)
    latent, basis = svd_factors(x, 8)
    assert latent.shape == (2, t, 8) and basis.shape == (2, 8, HEAD_DIM)
    assert not latent[..., t:].any() and not basis[:, t:].any()
    if t:
        assert rel_err(x, latent @ basis) < 1e-4


def test_svd_on_a_real_kv_cache() -> None:
    kv = prefill(tiny_model("llama"), random_ids(64, seed=4)).kv
    for x in (kv.keys[1], kv.values[1]):
        s = torch.linalg.svdvals(x.double())
        latent, basis = svd_factors(x, 4)
        err = float(((latent @ basis).double() - x.double()).pow(2).sum())
        assert err == pytest.approx(float(s[:, 4:].pow(2).sum()), rel=1e-3)


@pytest.mark.parametrize("rank", [0, -1, HEAD_DIM + 1, 2.0, True])
def test_svd_bad_rank_raises_naming_it(rank: Any) -> None:
    with pytest.raises(ValueError, match=repr(rank).replace(".", r"\.")):
        svd_factors(structured(), rank)


def test_svd_bad_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"\(48, 16\)"):
        svd_factors(torch.zeros(48, HEAD_DIM), 4)


# --- calibrated profile -------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> Any:
    """The tiny Llama with anisotropic K/V, as in trained models (random weights give nearly isotropic KV).

    Output channel i of k_proj/v_proj is scaled by a decaying factor; RoPE rotates
    channel pairs (i, i + D/2), so both channels of a pair get the same factor.
    """
    model = tiny_model("llama")
    half = torch.logspace(0, -1.5, HEAD_DIM // 2)
    scale = torch.cat([half, half]).repeat(2)[:, None]  # (kv_heads * D, 1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(scale)
            layer.self_attn.v_proj.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def calibration() -> list[torch.Tensor]:
    return [random_ids(96, seed=10 + i) for i in range(4)]


@pytest.fixture(scope="module")
def profile(model: Any, calibration: list[torch.Tensor]) -> ModelProfile:
    return calibrate_profile(model, None, calibration, max_rank=HEAD_DIM, fingerprint="tiny-llama")


def held_out(model: Any) -> Any:
    return prefill(model, random_ids(128, seed=99)).kv


def random_basis(h: int, d: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(h, d, r, generator=g))
    return q  # (H, D, r), orthonormal columns


def test_profile_metadata_and_orthonormal_bases(profile: ModelProfile, model: Any) -> None:
    assert (profile.num_layers, profile.kv_heads, profile.head_dim) == (3, 2, HEAD_DIM)
    assert profile.r_max == HEAD_DIM and profile.tokens == 4 * 96 and profile.fingerprint == "tiny-llama"
    eye = torch.eye(HEAD_DIM).expand(2, HEAD_DIM, HEAD_DIM)
    for (layer, kind), basis in profile.bases.items():
        assert basis.shape == (2, HEAD_DIM, HEAD_DIM) and basis.dtype == torch.float32
        torch.testing.assert_close(basis.transpose(1, 2) @ basis, eye, atol=1e-5, rtol=0)
        assert profile.means[(layer, kind)].shape == (2, HEAD_DIM)


def test_profile_columns_sorted_by_explained_variance(
    profile: ModelProfile, model: Any, calibration: list[torch.Tensor]
) -> None:
    kv = prefill(model, calibration[0]).kv
    latent = profile.project(kv.values[0], 0, "v", HEAD_DIM)  # (H, T, D)
    variance = latent.pow(2).mean(dim=1)  # (H, D), on a quarter of the calibration data
    assert (variance[:, :4].mean(dim=1) > variance[:, -4:].mean(dim=1)).all()


def test_profile_full_rank_reconstructs_calibration_data(
    profile: ModelProfile, model: Any, calibration: list[torch.Tensor]
) -> None:
    kv = prefill(model, calibration[1]).kv
    for layer in range(kv.num_layers):
        for kind, x in (("k", kv.keys[layer]), ("v", kv.values[layer])):
            latent = profile.project(x, layer, kind, HEAD_DIM)
            assert latent.shape == (2, 96, HEAD_DIM)
            assert rel_err(x, profile.expand(latent, layer, kind)) < 1e-5


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_profile_beats_a_random_basis_on_held_out_data(profile: ModelProfile, model: Any, rank: int) -> None:
    """Unexplained variance of held-out KV: the PCA basis leaves less than the best of 8 random bases."""
    kv = held_out(model)
    for layer in range(kv.num_layers):
        for kind, x in (("k", kv.keys[layer]), ("v", kv.values[layer])):
            centred = x - profile.means[(layer, kind)][:, None, :]
            restored = profile.expand(profile.project(x, layer, kind, rank), layer, kind)
            ours = float((x - restored).norm() / centred.norm())
            best_random = 1.0
            for seed in range(8):
                q = random_basis(2, HEAD_DIM, rank, seed=100 * layer + seed)
                best_random = min(best_random, rel_err(centred, centred @ q @ q.transpose(1, 2)))
            assert ours < 0.8 * best_random, (layer, kind, ours, best_random)


def test_profile_error_decreases_with_rank(profile: ModelProfile, model: Any) -> None:
    x = held_out(model).keys[2]
    errors = [
        rel_err(x, profile.expand(profile.project(x, 2, "k", r), 2, "k")) for r in range(1, HEAD_DIM + 1)
    ]
    assert all(a >= b - 1e-6 for a, b in itertools.pairwise(errors)), errors


def test_calibration_from_strings_matches_token_ids(model: Any) -> None:
    class CharTokenizer:
        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            return {"input_ids": [3 + ord(c) % 200 for c in text]}

    texts = ["the quick brown fox jumps over the lazy dog " * 3, "a second calibration text, shorter"]
    ids = [torch.tensor([3 + ord(c) % 200 for c in t]) for t in texts]
    a = calibrate_profile(model, CharTokenizer(), texts, max_rank=4, fingerprint="x", max_tokens_per_text=50)
    b = calibrate_profile(model, None, ids, max_rank=4, fingerprint="x", max_tokens_per_text=50)
    assert a.tokens == 50 + len(texts[1])
    assert a.hash == b.hash


def test_calibration_bad_inputs(model: Any) -> None:
    ids = [random_ids(8)]
    with pytest.raises(ValueError, match="0"):
        calibrate_profile(model, None, ids, max_rank=0, fingerprint="x")
    with pytest.raises(ValueError, match="17"):
        calibrate_profile(model, None, ids, max_rank=HEAD_DIM + 1, fingerprint="x")
    with pytest.raises(ValueError, match="tokenizer"):
        calibrate_profile(model, None, ["text"], max_rank=4, fingerprint="x")
    with pytest.raises(ValueError, match="at least one text"):
        calibrate_profile(model, None, [], max_rank=4, fingerprint="x")
    with pytest.raises(ValueError, match="empty"):
        calibrate_profile(model, None, [torch.zeros(0, dtype=torch.long)], max_rank=4, fingerprint="x")


@pytest.mark.parametrize("rank", [0, -2, HEAD_DIM + 1])
def test_project_bad_rank_raises_naming_it(profile: ModelProfile, rank: int) -> None:
    with pytest.raises(ValueError, match=str(rank)):
        profile.project(torch.zeros(2, 5, HEAD_DIM), 0, "k", rank)


def test_rank_above_r_max_raises(model: Any, calibration: list[torch.Tensor]) -> None:
    small = calibrate_profile(model, None, calibration[:1], max_rank=4, fingerprint="x")
    assert small.bases[(0, "k")].shape == (2, HEAD_DIM, 4)
    with pytest.raises(ValueError, match="rank 5 exceeds the profile's r_max 4"):
        small.project(torch.zeros(2, 5, HEAD_DIM), 0, "k", 5)
    with pytest.raises(ValueError, match="rank 5 exceeds the profile's r_max 4"):
        small.expand(torch.zeros(2, 5, 5), 0, "k")


def test_project_bad_layer_kind_shape(profile: ModelProfile) -> None:
    x = torch.zeros(2, 5, HEAD_DIM)
    with pytest.raises(ValueError, match="got 3"):
        profile.project(x, 3, "k", 4)
    with pytest.raises(ValueError, match="'q'"):
        profile.project(x, 0, "q", 4)
    with pytest.raises(ValueError, match=r"\(3, 5, 16\)"):
        profile.project(torch.zeros(3, 5, HEAD_DIM), 0, "k", 4)
    with pytest.raises(ValueError, match="3 heads"):
        profile.expand(torch.zeros(3, 5, 4), 0, "k")


# --- the profile file -------------------------------------------------------------


def test_save_load_round_trip_keeps_tensors_and_hash(profile: ModelProfile, tmp_path: Path) -> None:
    path = profile.save(tmp_path / "p.safetensors")
    data = path.read_bytes()
    assert profile.hash == hashlib.sha256(data).hexdigest()
    loaded = ModelProfile.load(path)
    assert loaded.hash == profile.hash
    assert (loaded.fingerprint, loaded.r_max, loaded.tokens) == (
        profile.fingerprint,
        profile.r_max,
        profile.tokens,
    )
    for key in profile.bases:
        assert torch.equal(loaded.bases[key], profile.bases[key])
        assert torch.equal(loaded.means[key], profile.means[key])
    assert loaded.save(tmp_path / "again.safetensors").read_bytes() == data  # canonical bytes


def test_file_is_plain_safetensors_with_string_metadata(profile: ModelProfile, tmp_path: Path) -> None:
    from safetensors import safe_open

    path = profile.save(tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta == {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "fingerprint": "tiny-llama",
            "layers": "3",
            "r_max": str(HEAD_DIM),
            "tokens": str(4 * 96),
        }
        assert len(list(f.keys())) == 3 * 2 * 2
        assert torch.equal(f.get_tensor("layer.2.v.basis"), profile.bases[(2, "v")])


def test_hash_changes_with_one_value(profile: ModelProfile) -> None:
    means = dict(profile.means)
    changed = means[(1, "v")].clone()
    changed[0, 3] += 1e-3
    means[(1, "v")] = changed
    other = ModelProfile(profile.fingerprint, profile.r_max, profile.tokens, profile.bases, means)
    assert other.hash != profile.hash
    renamed = ModelProfile("other", profile.r_max, profile.tokens, profile.bases, profile.means)
    assert renamed.hash != profile.hash


def tensors_of(profile: ModelProfile) -> dict[str, torch.Tensor]:
    out = {}
    for (layer, kind), basis in profile.bases.items():
        out[f"layer.{layer}.{kind}.basis"] = basis
        out[f"layer.{layer}.{kind}.mean"] = profile.means[(layer, kind)]
    return out


def test_load_rejects_a_missing_tensor(profile: ModelProfile, tmp_path: Path) -> None:
    tensors = tensors_of(profile)
    del tensors["layer.2.k.mean"]
    save_file(tensors, str(tmp_path / "p.safetensors"), metadata=profile.metadata())
    with pytest.raises(ValueError, match=r"missing tensors \['layer\.2\.k\.mean'\]"):
        ModelProfile.load(tmp_path / "p.safetensors")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": "2"}, "unsupported profile version '2'"),
        ({"format": "other"}, "not a kvlink profile"),
        ({"r_max": "8"}, r"layer\.0\.k\.basis has shape \(2, 16, 16\), expected \(2, 16, 8\)"),
        ({"r_max": "many"}, "'r_max' must be an integer, got 'many'"),
        ({"layers": "4"}, r"missing tensors \['layer\.3\.k\.basis'"),
        ({"layers": "2"}, r"unexpected tensors \['layer\.2\.k\.basis'"),
    ],
)
def test_load_rejects_bad_metadata(
    profile: ModelProfile, tmp_path: Path, change: dict[str, str], message: str
) -> None:
    save_file(tensors_of(profile), str(tmp_path / "p.safetensors"), metadata={**profile.metadata(), **change})
    with pytest.raises(ValueError, match=message):
        ModelProfile.load(tmp_path / "p.safetensors")


def test_load_rejects_wrong_shape_and_dtype(profile: ModelProfile, tmp_path: Path) -> None:
    tensors = tensors_of(profile)
    tensors["layer.1.v.mean"] = torch.zeros(2, HEAD_DIM + 1)
    save_file(tensors, str(tmp_path / "shape.safetensors"), metadata=profile.metadata())
    with pytest.raises(ValueError, match=r"layer\.1\.v\.mean has shape \(2, 17\), expected \(2, 16\)"):
        ModelProfile.load(tmp_path / "shape.safetensors")
    tensors = tensors_of(profile)
    tensors["layer.0.v.basis"] = tensors["layer.0.v.basis"].half()
    save_file(tensors, str(tmp_path / "dtype.safetensors"), metadata=profile.metadata())
    with pytest.raises(ValueError, match=r"layer\.0\.v\.basis has dtype torch\.float16"):
        ModelProfile.load(tmp_path / "dtype.safetensors")


def test_load_rejects_corrupted_bytes(profile: ModelProfile, tmp_path: Path) -> None:
    data = bytearray(profile.to_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    begin = header["layer.1.k.basis"]["data_offsets"][0]
    value = struct.unpack_from("<f", data, 8 + size + begin)[0]
    struct.pack_into("<f", data, 8 + size + begin, value + 0.5)  # one basis value: no longer orthonormal
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"layer\.1\.k\.basis is not orthonormal"):
        ModelProfile.load(tmp_path / "flip.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(bytes(data[:-7]))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        ModelProfile.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        ModelProfile.load(tmp_path / "junk.safetensors")


def test_nan_is_rejected(profile: ModelProfile) -> None:
    means = dict(profile.means)
    means[(0, "k")] = torch.full((2, HEAD_DIM), float("nan"))
    with pytest.raises(ValueError, match=r"layer\.0\.k\.mean holds non-finite values"):
        ModelProfile(profile.fingerprint, profile.r_max, profile.tokens, profile.bases, means)


def test_default_profile_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVLINK_CACHE", str(tmp_path))
    assert default_profile_path("abc123") == tmp_path / "profiles" / "abc123.safetensors"
    with pytest.raises(ValueError, match=r"'\.\./x'"):
        default_profile_path("../x")
