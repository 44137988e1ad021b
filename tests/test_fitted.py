"""Transform coding in the planner's table: a recipe whose rate the planner fits (`xpred+fp16+pca1+ans`) is
measured per budget (`<name>@<budget>%`), looked up only in the length bucket of the context at the largest
measured budget at or below the one asked, weighed by the planner when the sender and the receiver hold its
profiles, and gated on the evaluation split against what the table would send instead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_eval import SMALL, squad2, text_lm, tokenizer  # noqa: F401 (fixtures)
from test_stream import receiver
from test_xl import _fit
from test_xl_stages import CONTEXT, QUESTION
from test_xl_stages import served as served  # a fixture

from conftest import random_ids
from kvlink.budget import (
    Constraints,
    LengthBucket,
    QualityTable,
    fitted_key,
    parse_fitted,
    plan,
    rate_fitted,
)
from kvlink.cache import Observe, prefill
from kvlink.capabilities import local_capabilities
from kvlink.eval import grid, holdout, report
from kvlink.eval.commands.calibrate import quality_table
from kvlink.eval.splits import evaluation_examples
from kvlink.recipe import Recipe

XL = "xpred+fp16+pca1+ans"
PICK = "q2c90%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question"
INT4 = "kint4c/vint4t-g32"


def _table(short: dict[str, float], long_: dict[str, float] | None = None) -> QualityTable:
    buckets = [LengthBucket(0, 1024, short, n=40)]
    if long_ is not None:
        buckets.append(LengthBucket(1024, 4096, long_, n=40))
    return QualityTable(entries=dict(short), buckets=tuple(buckets))


# --- keys -----------------------------------------------------------------------------------------------------
def test_a_fitted_key_names_the_recipe_and_the_budget_its_rate_was_fitted_to() -> None:
    xl = Recipe.from_name(XL)
    assert rate_fitted(xl) and not rate_fitted(Recipe.from_name("xpred+fp16+pca1-r-32+ans"))
    assert fitted_key(xl, 0.125) == f"{XL}@12.5%" and fitted_key(xl, "18.75%") == f"{XL}@18.75%"
    assert parse_fitted(f"{XL}@12.5%") == (XL, 0.125)
    for other in (XL, "q2c25%+kint4c/vint4t-g32", "q2c25%@w32+fp16", PICK):
        assert parse_fitted(other) is None
    with pytest.raises(ValueError, match="no rate for a budget to fit"):
        fitted_key(Recipe.from_name(INT4), 0.25)
    # The grid measures it by that name, one config per budget; unnamed, the budget is asked for.
    configs = grid.resolve([f"{XL}@25%", f"{XL}@12.5%", INT4])
    assert [(c.name, c.budget) for c in configs] == [
        (f"{XL}@25%", 0.25),
        (f"{XL}@12.5%", 0.125),
        (INT4, None),
    ]
    with pytest.raises(ValueError, match=r"fits its rate to a budget; name one, e\.g\. .*@12\.5%"):
        grid.resolve([XL])
    with pytest.raises(ValueError, match="no rate for a budget to fit"):
        grid.resolve([f"{INT4}@25%"])


# --- the table ------------------------------------------------------------------------------------------------
def test_the_table_answers_for_a_fitted_recipe_in_its_bucket_at_or_below_the_budget(tmp_path: Path) -> None:
    xl = Recipe.from_name(XL)
    table = _table({f"{XL}@25%": 0.96, f"{XL}@12.5%": 0.87, INT4: 0.85}, {INT4: 0.9})
    assert table.fitted(xl, 0.25, 200) == (0.96, 0.25)
    assert table.fitted(xl, 0.30, 200) == (0.96, 0.25)  # the nearest measured budget below
    assert table.fitted(xl, 0.20, 200) == (0.87, 0.125)
    assert table.fitted(xl, 0.10, 200) is None  # below every measured budget: nothing promised
    assert table.fitted(xl, 0.25, 2000) is None  # another length: not its short figure
    assert table.fitted(xl, 0.25, None) is None
    assert [r.name for r in table.fitted_recipes(200)] == [XL] and table.fitted_recipes(2000) == []
    flat = QualityTable(entries={f"{XL}@25%": 0.96})
    assert flat.fitted(xl, 0.25, 200) is None  # a table without lengths does not say where it was measured
    table.save(tmp_path / "t.json")
    assert QualityTable.load(tmp_path / "t.json").fitted(xl, 0.2, 300) == (0.87, 0.125)


def test_calibrate_keeps_the_bucket_of_a_fitted_entry_and_the_check_weighs_it() -> None:
    def row(name: str, frac: float, quality: float) -> dict:
        cell = {"mean": quality, "lo": quality, "hi": quality}
        facts = report._config_facts(name)
        return {"task": "squad", "config": name, "n": 10, "T": 200, "fidelity": cell,
                "wire_frac": {"mean": frac, "lo": frac, "hi": frac}, **facts}  # fmt: skip

    rows = [row(f"{XL}@25%", 0.249, 0.96), row(f"{XL}@12.5%", 0.124, 0.87), row(INT4, 0.32, 0.85),
            row("q2c75%+kint4c/vint4t-g32", 0.24, 0.77), row("q2c40%+kint4c/vint4t-g32", 0.12, 0.70)]  # fmt: skip
    assert rows[0]["key"] == f"{XL}@25%" and rows[0]["label"] == f"{XL}@25%"
    table = quality_table({"meta": {}, "summary": rows}, "squad")
    assert [(b.lo, b.hi) for b in table.buckets] == [
        (0, 1024)
    ]  # one bucket, kept: the fitted entries need it
    assert table.fitted(Recipe.from_name(XL), 0.2, 200) == (pytest.approx(0.87), 0.125)
    checks = report.planner_check(rows, table, (0.25, 0.1875, 0.125, 0.1), "squad")
    assert [c["pick"] for c in checks] == [f"{XL}@25%", f"{XL}@12.5%", f"{XL}@12.5%", None]
    assert checks[1]["expected_quality"] == pytest.approx(0.87) and all(c["on_frontier"] for c in checks[:3])
    # Without the fitted rows, as before: the fixed configs only.
    fixed = quality_table({"meta": {}, "summary": rows[2:]}, "squad")
    assert fixed.buckets == () and report.planner_check(rows[2:], fixed, (0.25,), "squad")[0]["pick"] == (
        "q2c75%+kint4c/vint4t-g32"
    )


# --- the planner ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return _fit("llama")


def test_the_planner_sends_transform_coding_where_the_table_measured_it(llama) -> None:
    from kvlink.residual import TransformProfiles

    lm, predictors, residual = llama
    profiles = TransformProfiles(predictors, residual)
    pre = prefill(lm.model, random_ids(300, seed=4), random_ids(8, seed=5), Observe.QUESTION)
    table = _table({f"{XL}@20%": 0.99})

    def chosen(budget: float, **kwargs) -> Recipe:
        kwargs.setdefault("profile", profiles)
        kwargs.setdefault("quality", table)
        picked = plan(pre, lm.geometry, lm.fingerprint, budget, **kwargs)
        assert picked.total_bytes <= picked.budget_bytes
        return picked.recipe

    sent = chosen(0.25)
    pca = next(s for s in sent.stages() if s.name == "pca")
    assert sent.name.startswith("xpred+fp16+pca1-r") and pca.rate is not None
    pinned = plan(pre, lm.geometry, lm.fingerprint, 0.25, constraints=Constraints(recipe=Recipe.from_name(XL)),
                  profile=profiles)  # fmt: skip
    assert pinned.recipe == sent  # the rate a pinned xl gets: the finest that fits
    for budget, kwargs in [
        (0.15, {}),  # below its one measured budget
        (0.25, {"profile": None}),  # the sender holds no profiles
        (0.25, {"profile": predictors}),  # predictors alone code no transform
        (0.25, {"quality": _table({}, {f"{XL}@20%": 0.99})}),  # measured at another length only
        (0.25, {"constraints": Constraints(k_bits=4)}),  # a pinned quantizer it cannot honour
        (0.25, {"constraints": Constraints(zstd=True)}),
        (
            0.25,
            {"constraints": Constraints(capabilities=local_capabilities() - {"pca"})},
        ),  # not decoded there
    ]:
        assert not chosen(budget, **kwargs).has("pca"), (budget, kwargs)
    assert not chosen(0.25, quality=_table({f"{XL}@20%": 0.3})).has("pca")  # rated below a fixed config


def test_the_planner_sends_the_message_it_encoded_to_fit_the_rate(
    llama, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fitting the rate encodes the message at the rate it settles on (its exact size decides); the plan sizes
    and sends that very message rather than encoding it twice more, and it is what a fresh encode of the
    chosen recipe gives, byte for byte."""
    from kvlink.budget import framed_size
    from kvlink.codec import Codec
    from kvlink.residual import TransformProfiles

    lm, predictors, residual = llama
    profiles = TransformProfiles(predictors, residual)
    pre = prefill(lm.model, random_ids(300, seed=4), random_ids(8, seed=5), Observe.QUESTION)
    encodes: list[str] = []
    real = Codec.encode_kv

    def counted(self, *args, **kwargs):
        encodes.append(self.recipe.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Codec, "encode_kv", counted)
    for recipe in (XL, "xpred+fp16+pca1-q0.5+ans"):
        encodes.clear()
        pinned = Constraints(recipe=Recipe.from_name(recipe), zstd=False)
        picked = plan(pre, lm.geometry, lm.fingerprint, 0.25, constraints=pinned, profile=profiles,
                      session_id="s" * 32, message_id="m" * 32)  # fmt: skip
        assert picked.recipe.name.startswith(recipe.split("+ans")[0] + "-r")
        assert encodes.count(picked.recipe.name) == 1, encodes
        again = real(Codec(picked.recipe, lm.geometry, profiles), pre.kv, None, pre.observation)
        for sent, fresh in zip(picked.encoded.tensors, again.tensors, strict=True):
            assert {k: p.data for k, p in sent.parts.items()} == {k: p.data for k, p in fresh.parts.items()}
        size, allowance = framed_size(again, "s" * 32, "m" * 32, lm.fingerprint, 1 << 20)
        assert picked.total_bytes == size.total + allowance <= picked.budget_bytes
        assert picked.encoded.timings["encode_s"] > 0
    encodes.clear()  # a recipe at a fixed rate (nothing to fit) is encoded once too: sized, then sent
    pinned = Constraints(recipe=Recipe.from_name("xpred+fp16+pca1-r-32+ans"), zstd=False)
    fixed = plan(pre, lm.geometry, lm.fingerprint, 0.9, constraints=pinned, profile=profiles)
    assert encodes == [fixed.recipe.name]


async def test_a_sender_sends_transform_coding_only_to_a_receiver_holding_its_profiles(
    served,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kvlink.budget import default_quality_path
    from kvlink.client.sender import send_context
    from kvlink.residual import TransformProfiles

    lm, predictors, residual = served
    monkeypatch.setenv("KVLINK_CACHE", str(tmp_path))
    path = default_quality_path(lm.fingerprint)
    path.parent.mkdir(parents=True)
    _table({f"{XL}@20%": 0.99}).save(path)  # what kvlink-bench calibrate writes for this model
    profiles = TransformProfiles(predictors, residual)
    stages: list[tuple[str, str]] = []
    async with receiver(lm, profiles=[residual, predictors]) as (target, _):
        held = await send_context(target, CONTEXT, QUESTION, 0.25, lm=lm, profile=profiles, max_new_tokens=4)
    async with receiver(lm) as (target, _):
        lacking = await send_context(
            target, CONTEXT, QUESTION, 0.25, lm=lm, profile=profiles, max_new_tokens=4,
            on_stage=lambda name, detail: stages.append((name, detail)),
        )  # fmt: skip
    assert held.plan.recipe.has("pca") and held.plan.total_bytes <= held.plan.budget_bytes
    assert not lacking.plan.recipe.has("pca") and lacking.answer.token_ids
    assert any("does not hold profile" in detail and residual.hash in detail for _, detail in stages)


# --- the benchmark --------------------------------------------------------------------------------------------
def test_the_grid_measures_a_fitted_recipe_at_the_rate_the_planner_fits(text_lm, squad2) -> None:  # noqa: F811
    from kvlink.layerbits import Sensitivity
    from kvlink.predict import fit_predictors
    from kvlink.residual import TransformProfiles, fit_residuals

    texts = [random_ids(64, seed=300 + i, high=2000) for i in range(6)]
    fit = Recipe.from_name("xpred+kint2c/vint2t-g16+sink1")
    predictors = fit_predictors(text_lm.model, texts, fit, text_lm.fingerprint)
    layers = text_lm.geometry.num_layers
    sens = Sensitivity("tiny", k=(0.1,) * layers, v=(0.05,) * layers)
    profiles = TransformProfiles(predictors, fit_residuals(text_lm.model, texts, predictors, fit, sens))
    aware = "xpred+fp16+pca1-q0.5+ans@15%"  # question-aware steps: fitted and encoded from the question's observation
    configs = grid.resolve(["fp16", f"{XL}@30%", f"{XL}@15%", aware], text_lm.geometry)
    records = {r["config"]: r for r in grid.Evaluator(text_lm, configs, SMALL, profiles).evaluate(squad2[0])}
    for budget in (0.30, 0.15):
        rec = records[f"{XL}@{100 * budget:g}%"]
        assert rec["recipe"].startswith("xpred+fp16+pca1-r") and 0.5 * budget < rec["wire_frac"] <= budget
        assert rec["fit_s"] > 0 and 0.0 <= rec["fidelity"] <= 1.0
    rates = [int(records[f"{XL}@{b}%"]["recipe"].split("-r")[1].split("+")[0]) for b in ("30", "15")]
    assert rates[0] < rates[1]  # the larger budget, the finer rate (a lower index)
    assert (
        records[aware]["recipe"].startswith("xpred+fp16+pca1-q0.5-r")
        and 0.075 < records[aware]["wire_frac"] <= 0.15
    )
    summary = report.summarize(list(records.values()), n_boot=50)
    assert {r["key"] for r in summary} == {"fp16", f"{XL}@30%", f"{XL}@15%", aware}


# --- the gate -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eids() -> list[str]:
    return [f"squad:{e.qid}" for e in evaluation_examples()[:60]]


def _samples(by_config: dict[str, tuple[list[float], float]], eids: list[str]) -> list[dict]:
    return [
        {"eid": eid, "task": "squad", "config": name, "fidelity": v, "wire_frac": wire, "T": 200}
        for name, (values, wire) in by_config.items()
        for eid, v in zip(eids, values, strict=True)
    ]


def test_a_fitted_entry_enters_only_where_it_beats_what_the_table_sends_at_its_budget(eids) -> None:
    base = np.linspace(0.3, 0.8, len(eids))
    table = _table({f"{XL}@25%": 0.95, f"{XL}@12.5%": 0.86, f"{XL}@6.25%": 0.7, PICK: 0.88, INT4: 0.85,
                    "q2c40%+kint4c/vint4t-g32": 0.7})  # fmt: skip
    samples = _samples({
        f"{XL}@25%": (list(base + 0.1), 0.249), PICK: (list(base), 0.24), INT4: (list(base + 0.2), 0.32),
        f"{XL}@12.5%": (list(base - 0.02), 0.124), "q2c40%+kint4c/vint4t-g32": (list(base), 0.12),
    }, eids)  # fmt: skip
    cells, pairs = holdout.check(samples, table)
    rival = {p.config: p for p in pairs if parse_fitted(p.config)}
    # Its rival: the best the table rates among the run's fixed configs within its budget (INT4 is larger).
    assert rival[f"{XL}@25%"].twin == PICK and rival[f"{XL}@25%"].holds
    assert rival[f"{XL}@12.5%"].twin == "q2c40%+kint4c/vint4t-g32" and not rival[f"{XL}@12.5%"].holds
    entry = {c.config: c.table for c in cells}
    assert entry[f"{XL}@25%"] == 0.95 and entry[f"{XL}@12.5%"] == 0.86
    kept, dropped = holdout.gate(table, pairs, [200])
    assert {key for key in dropped if parse_fitted(key)} == {f"{XL}@12.5%", f"{XL}@6.25%"}
    assert "does not hold" in dropped[f"{XL}@12.5%"] and "not paired" in dropped[f"{XL}@6.25%"]
    xl = Recipe.from_name(XL)
    assert kept.fitted(xl, 0.25, 200) == (0.95, 0.25) and kept.fitted(xl, 0.2, 200) is None
    assert json.loads(json.dumps(holdout.as_json(cells, pairs)))["pairs"]


def test_calibration_questions_can_leave_out_the_paragraphs_the_profiles_are_fitted_on() -> None:
    from argparse import Namespace
    from types import SimpleNamespace

    from kvlink.eval.commands.common import split_tasks
    from kvlink.predict import fit_texts

    args = Namespace(split="calibration", long_tokens=None, data=None, seed=0, exclude_fit_text=True)
    lm = SimpleNamespace(tokenizer=None)
    kept = split_tasks(args, lm, [("squad", None)])
    fit = set(fit_texts())
    assert kept and not any(e.context in fit for e in kept)
    every = split_tasks(Namespace(**{**vars(args), "exclude_fit_text": False}), lm, [("squad", None)])
    assert {e.eid for e in kept} < {e.eid for e in every} and any(e.context in fit for e in every)


def test_the_planner_sends_question_aware_transform_coding_only_with_the_question_observed(llama) -> None:
    """The long buckets rate `xpred+fp16+pca1-q0.5+ans` (bench/results/eval-longxl-fixed-h100): the planner sends it
    from a prefill that observed the question (its default), its rate fitted within the budget, and weighs
    it not at all from one that did not (it could not code the steps; the plan raised before)."""
    from kvlink.residual import TransformProfiles

    lm, predictors, residual = llama
    profiles = TransformProfiles(predictors, residual)
    table = _table({"xpred+fp16+pca1-q0.5+ans@20%": 0.99})
    ids, question = random_ids(300, seed=4), random_ids(8, seed=5)
    asked = plan(prefill(lm.model, ids, question, Observe.QUESTION), lm.geometry, lm.fingerprint, 0.25,
                 quality=table, profile=profiles)  # fmt: skip
    pca = next(s for s in asked.recipe.stages() if s.name == "pca")
    assert pca.question == 0.5 and pca.rate is not None and asked.total_bytes <= asked.budget_bytes
    blind = plan(prefill(lm.model, ids, question, Observe.NONE), lm.geometry, lm.fingerprint, 0.25,
                 quality=table, profile=profiles, constraints=Constraints(method="none"))  # fmt: skip
    assert not blind.recipe.has("pca") and blind.total_bytes <= blind.budget_bytes
