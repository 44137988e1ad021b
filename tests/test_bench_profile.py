"""kvlink-bench profile: the calibrated profile a config needs, written for `--profile FILE`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kvlink.eval.cli import main
from kvlink.lowrank import ModelProfile
from kvlink.models import load_model
from kvlink.predict import PredictorProfile

TINY = "random:tiny-llama"


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVLINK_CACHE", str(tmp_path / "cache"))


def test_xpred_profile_is_written_and_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.safetensors"
    assert main(["profile", "--model", TINY, "--config", "xpred+kint4c/vint4t-g64", "--out", str(out)]) == 0
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    printed = capsys.readouterr().out
    assert f"sha256 {digest}" in printed and f"kvlink-serve --profile {out}" in printed
    profile = PredictorProfile.load(out)
    assert profile.hash == digest and profile.fingerprint == load_model(TINY).fingerprint
    assert profile.fitted_for == "xpred+kint4c/vint4t-g64"  # fitted through the config's quantization
    # Fitted once and cached: a second file for another selection of the same fit is the same bytes.
    again = tmp_path / "y.safetensors"
    assert (
        main(["profile", "--model", TINY, "--config", "q2c50%+xpred+kint4c/vint4t-g64", "--out", str(again)])
        == 0
    )
    assert again.read_bytes() == out.read_bytes()


def test_low_rank_profile(tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    assert (
        main(["profile", "--model", TINY, "--config", "kint4c/vint4t-g32+profile-r8", "--out", str(out)]) == 0
    )
    profile = ModelProfile.load(out)
    assert profile.hash == hashlib.sha256(out.read_bytes()).hexdigest()
    assert profile.r_max == load_model(TINY).geometry.head_dim  # any rank of the config's family works


def test_refusals(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit, match="needs no profile"):
        main(["profile", "--model", TINY, "--config", "kint4c/vint4t-g32", "--out", str(out)])
    with pytest.raises(SystemExit, match="unknown token"):
        main(["profile", "--model", TINY, "--config", "xpred+kint9", "--out", str(out)])
    out.write_bytes(b"mine")
    with pytest.raises(SystemExit, match="exists"):
        main(["profile", "--model", TINY, "--config", "xpred+kint4c/vint4t-g64", "--out", str(out)])
    assert out.read_bytes() == b"mine"  # nothing lost


def test_transform_coding_profiles_are_written_as_a_pair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvlink.layerbits import Sensitivity, default_path
    from kvlink.predict import load_profile
    from kvlink.residual import ResidualProfile, pair_profiles

    out = tmp_path / "xl.safetensors"
    argv = ["profile", "--model", TINY, "--config", "xpred+fp16+pca1+ans", "--out", str(out)]
    with pytest.raises(SystemExit, match="no sensitivity profile: measure one first"):
        main(argv)
    lm = load_model(TINY)
    layers = lm.geometry.num_layers
    Sensitivity(lm.name, k=tuple(0.1 * (i + 1) for i in range(layers)), v=(0.05,) * layers).save(
        default_path(lm.fingerprint)
    )
    assert main(argv) == 0
    twin = tmp_path / "xl-predictors.safetensors"
    residual, predictors = ResidualProfile.load(out), PredictorProfile.load(twin)
    assert residual.predictors == predictors.hash and residual.fingerprint == lm.fingerprint
    assert predictors.fitted_for == "xpred+kint2c/vint2t-g64+sink1"  # fitted through INT2, as screened
    printed = capsys.readouterr().out
    assert f"sha256 {residual.hash}" in printed and f"--profile {out} --profile {twin}" in printed
    # The files load by their format and pair into what a codec and a receiver hold.
    (paired,) = [p for p in pair_profiles([load_profile(out), load_profile(twin)]) if hasattr(p, "hashes")]
    assert paired.hashes == (predictors.hash, residual.hash)
    again = tmp_path / "again.safetensors"  # cached: the same bytes
    assert main([*argv[:-1], str(again)]) == 0 and again.read_bytes() == out.read_bytes()
    # The benchmark grid encodes a transform-coding config with the same pair; the predictors alone refuse it.
    from kvlink.eval.grid import _profile_for
    from kvlink.predict import cached_predictors
    from kvlink.recipe import Recipe

    fixed = Recipe.from_name("xpred+fp16+pca1-r-32+ans")
    assert _profile_for(lm, fixed, None).hashes == paired.hashes
    with pytest.raises(ValueError, match="is transform coding"):
        cached_predictors(lm, fixed)
