"""kvlink.residual: the residual profile of transform coding (bases, scales, weights, tables), fitted
through the predictors' closed loop, read back exactly, refused when damaged, and usable with
kvlink.ans to code a residual within half a step per component."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_FAMILIES, ToyTokenizer, random_ids, tiny_model
from kvlink import ans
from kvlink.cache import prefill
from kvlink.layerbits import Sensitivity
from kvlink.models import LoadedModel, wrap
from kvlink.predict import PredictorProfile, fit_predictors, rows
from kvlink.recipe import Recipe
from kvlink.residual import ResidualProfile, fit_residuals
from kvlink.stages.predict import PredictState

FIT = "xpred+kint2c/vint2t-g16+sink1"


def _fit(family: str = "llama") -> tuple[LoadedModel, PredictorProfile, ResidualProfile]:
    lm = wrap(tiny_model(family, seed=TINY_FAMILIES.index(family)), ToyTokenizer(), name=f"tiny-{family}")
    texts = [random_ids(64, seed=100 + i) for i in range(6)]
    recipe = Recipe.from_name(FIT)
    predictors = fit_predictors(lm.model, texts, recipe, lm.fingerprint)
    layers = lm.geometry.num_layers
    sens = Sensitivity("tiny", k=tuple(0.1 * (i + 1) for i in range(layers)), v=(0.05,) * layers)
    return lm, predictors, fit_residuals(lm.model, texts, predictors, recipe, sens)


@pytest.fixture(scope="module")
def fitted() -> tuple[LoadedModel, PredictorProfile, ResidualProfile]:
    return _fit()


def test_bases_are_orthonormal_components_by_decreasing_variance(fitted) -> None:
    _, predictors, profile = fitted
    assert profile.predictors == predictors.hash
    f = profile.features
    for key, basis in profile.bases.items():
        torch.testing.assert_close(basis.T @ basis, torch.eye(f), atol=1e-4, rtol=0)
        scale = profile.scales[key]
        assert bool((scale[:-1] >= scale[1:]).all()), key  # variances sorted, so their scale indices
        assert scale[0] > scale[-1], key  # the residual is not white: PCA concentrates it
    # more sensitive keys (a larger KL at the same error) get a larger weight, so finer steps
    assert profile.weight[-1, 0] > profile.weight[0, 0] or profile.layers == 1
    assert profile.step(0, "k", 0) > profile.step(profile.layers - 1, "k", 0) or profile.layers == 1


def test_the_file_reads_back_to_the_same_hash_and_fitting_is_deterministic(fitted, tmp_path: Path) -> None:
    _, _, profile = fitted
    path = profile.save(tmp_path / "r.safetensors")
    again = ResidualProfile.load(path)
    assert again.hash == profile.hash
    np.testing.assert_array_equal(again.tables.freq, ans.laplace_tables().freq)
    assert _fit()[2].hash == profile.hash


def _without(table: dict, key: tuple[int, str]) -> dict:
    return {k: v for k, v in table.items() if k != key}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda p: {"means": _without(p.means, (0, "k"))}, "needs a mean"),
        (lambda p: {"scales": {**p.scales, (1, "v"): p.scales[(1, "v")] + 0.5}}, "integers"),
        (lambda p: {"bases": {**p.bases, (0, "v"): p.bases[(0, "v")][:, :3]}}, "basis"),
        (lambda p: {"bases": {**p.bases, (0, "v"): p.bases[(0, "v")] * float("nan")}}, "finite"),
        (lambda p: {"weight": p.weight[:1]}, "weight"),
        (lambda p: {"predictors": "abc"}, "sha256"),
    ],
)
def test_a_damaged_profile_is_refused_naming_the_part(fitted, change, needle: str) -> None:
    _, _, profile = fitted
    with pytest.raises(ValueError, match=needle):
        replace(profile, **change(profile))


def test_a_damaged_file_is_refused_naming_it(fitted) -> None:
    _, _, profile = fitted
    data = profile.to_bytes()
    header = data.index(b'"version":"1"')
    with pytest.raises(ValueError, match=r"damaged\.safetensors: unsupported residual profile version"):
        ResidualProfile.from_bytes(
            data[:header] + b'"version":"9"' + data[header + 13 :], "damaged.safetensors"
        )


def test_other_files_and_other_predictors_are_refused(fitted) -> None:
    _, predictors, profile = fitted
    with pytest.raises(ValueError, match="not a kvlink residual profile"):
        ResidualProfile.from_bytes(predictors.to_bytes(), source="predictors.safetensors")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        ResidualProfile.from_bytes(b"\x08" + b"\0" * 20)
    other = _fit("qwen2")[1]
    with pytest.raises(ValueError, match="belongs to predictors"):
        profile.check_for(other)


def test_a_residual_codes_within_half_a_step_and_a_higher_rate_costs_fewer_bytes(fitted) -> None:
    lm, predictors, profile = fitted
    kv = prefill(lm.model, random_ids(80, seed=7)).kv.to(dtype=torch.float32)
    state = PredictState(predictors, kv.positions[0])
    state.record(0, "k", state.unrope(kv.keys[0]))
    w = predictors.weight(0, "v")
    assert w is not None
    residual = rows(kv.values[0] - state.predict(0, "v", w))  # (N, F)
    y = (residual - profile.means[(0, "v")]) @ profile.bases[(0, "v")]
    sizes = []
    for rate in (-32, 32):
        step = profile.step(0, "v", rate)
        sym = torch.round(y / step).long().numpy()[None]
        tables = profile.tables_for(0, "v", rate)[None]
        stream = ans.encode(sym, tables, profile.tables)
        back = torch.from_numpy(ans.decode(stream, sym.shape[1], tables, profile.tables)[0]).float()
        decoded = back * step @ profile.bases[(0, "v")].T + profile.means[(0, "v")]
        assert float((back * step - y).abs().max()) <= step / 2 + 1e-5
        assert float((decoded - residual).norm(dim=1).max()) <= step / 2 * profile.features**0.5 + 1e-4
        sizes.append(len(stream[0]))
    assert sizes[1] < sizes[0]
