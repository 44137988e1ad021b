"""kvlink.xl: the transform-coding core codes a whole cache through the predictors, the residual
profile and rANS; the receiver decodes exactly what the sender's closed loop decoded; the rate fits a
byte budget; what does not belong is refused."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import TINY_FAMILIES, ToyTokenizer, random_ids, tiny_model
from kvlink import ans, xl
from kvlink.cache import prefill
from kvlink.layerbits import Sensitivity
from kvlink.models import LoadedModel, wrap
from kvlink.predict import PredictorProfile, fit_predictors
from kvlink.recipe import Recipe
from kvlink.residual import ResidualProfile, fit_residuals

FIT = "xpred+kint2c/vint2t-g16+sink1"


def _fit(family: str) -> tuple[LoadedModel, PredictorProfile, ResidualProfile]:
    lm = wrap(tiny_model(family, seed=TINY_FAMILIES.index(family)), ToyTokenizer(), name=f"tiny-{family}")
    texts = [random_ids(64, seed=100 + i) for i in range(6)]
    recipe = Recipe.from_name(FIT)
    predictors = fit_predictors(lm.model, texts, recipe, lm.fingerprint)
    layers = lm.geometry.num_layers
    sens = Sensitivity("tiny", k=(0.1,) * layers, v=(0.05,) * layers)
    return lm, predictors, fit_residuals(lm.model, texts, predictors, recipe, sens)


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def fitted(request: pytest.FixtureRequest) -> tuple[LoadedModel, PredictorProfile, ResidualProfile]:
    return _fit(request.param)


def _kv(lm: LoadedModel, n: int = 70, seed: int = 9):
    return prefill(lm.model, random_ids(n, seed=seed)).kv.to(dtype=torch.float32)


def _rel(decoded, kv) -> float:
    err = sum(float((d - k).norm() ** 2) for d, k in zip(decoded.keys + decoded.values, kv.keys + kv.values))
    return (err / sum(float(k.norm() ** 2) for k in kv.keys + kv.values)) ** 0.5


def test_the_receiver_decodes_what_the_senders_closed_loop_decoded(fitted) -> None:
    lm, predictors, residual = fitted
    kv = _kv(lm)
    coded = xl.encode(kv, predictors, residual, rate=-32)
    sent_keys, sent_values, _, _, _ = xl._chain(predictors, residual, -32, kv.positions[0], 1, kv=kv)
    decoded = xl.decode(coded, predictors, residual, kv.positions[0])
    for a, b in zip(decoded.keys + decoded.values, sent_keys + sent_values, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert decoded.length == kv.length and torch.equal(decoded.positions[-1], kv.positions[0])
    # the sink rows are the cache's own, at float16
    torch.testing.assert_close(decoded.values[0][:, :1], kv.values[0][:, :1], rtol=1e-3, atol=1e-3)


def test_a_finer_rate_costs_more_bytes_and_errs_less(fitted) -> None:
    lm, predictors, residual = fitted
    kv = _kv(lm)
    coarse, fine = (xl.encode(kv, predictors, residual, rate=r) for r in (64, -160))
    assert fine.nbytes > coarse.nbytes
    err_fine = _rel(xl.decode(fine, predictors, residual, kv.positions[0]), kv)
    err_coarse = _rel(xl.decode(coarse, predictors, residual, kv.positions[0]), kv)
    assert err_fine < err_coarse / 4 and err_fine < 0.05


def test_the_rate_fits_the_budget_as_finely_as_it_can(fitted) -> None:
    lm, predictors, residual = fitted
    kv = _kv(lm)
    fp16 = sum(k.numel() + v.numel() for k, v in zip(kv.keys, kv.values)) * 2
    budget = fp16 // 4
    coded = xl.fit_rate(kv, predictors, residual, budget)
    assert coded.nbytes <= budget
    assert xl.encode(kv, predictors, residual, coded.rate - 1).nbytes > budget
    assert xl.estimated_bytes(kv, predictors, residual, coded.rate) == pytest.approx(coded.nbytes, rel=0.05)
    with pytest.raises(ValueError, match="no rate fits"):
        xl.fit_rate(kv, predictors, residual, 100)


def test_what_does_not_belong_is_refused(fitted) -> None:
    lm, predictors, residual = fitted
    kv = _kv(lm)
    coded = xl.encode(kv, predictors, residual, rate=0)
    other = _fit("qwen2" if lm.name != "tiny-qwen2" else "llama")[1]
    with pytest.raises(ValueError, match="belongs to predictors"):
        xl.decode(coded, other, residual, kv.positions[0])
    with pytest.raises(ValueError, match="does not fit"):
        xl.decode(coded, predictors, residual, kv.positions[0][:-1])
    coded.sinks[3] = coded.sinks[3][:-2]
    with pytest.raises(ValueError, match="tensor 3: sink part"):
        xl.decode(coded, predictors, residual, kv.positions[0])
    good = xl.encode(kv, predictors, residual, rate=0)
    good.streams[5] = good.streams[5][:-3] + bytes([good.streams[5][-3] ^ 0xFF]) + good.streams[5][-2:]
    with pytest.raises(ans.AnsError, match="stream 5"):
        xl.decode(good, predictors, residual, kv.positions[0])
    with pytest.raises(ValueError, match="rate must be"):
        xl.encode(kv, predictors, residual, rate=1000)


def test_the_search_asks_for_no_exact_size_it_can_rule_out_and_finds_the_same_rate() -> None:
    rates = range(-100, 101)

    def estimate(rate: int) -> float:
        return 1e5 * 2 ** (-rate / 32)  # ~2% (2 kB) a step, as a message's size

    saved = 0
    for offset in (-30.0, -3.0, 0.0, 2.5):  # exact sizes a little below / above the estimate
        for budget in (9e4, 1e5, 123456.7, 2e5):
            asked: list[list[int]] = [[], []]

            def exact(rate: int, log: list[int], offset: float = offset) -> float:
                log.append(rate)
                return estimate(rate) + offset

            plain = xl.search_rate(estimate, functools.partial(exact, log=asked[0]), budget, rates)
            bounded = xl.search_rate(
                estimate, functools.partial(exact, log=asked[1]), budget, rates, under=40.0
            )
            assert plain == bounded and exact(plain, []) <= budget < exact(plain - 1, [])
            assert set(asked[1]) <= set(asked[0])
            saved += len(asked[0]) - len(asked[1])
    assert saved >= 14  # of 16 searches: the step finer's estimate rules it out (once it was asked anyway)
