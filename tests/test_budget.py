"""The budget planner: exact wire bytes within budget, constraints honored, clear refusals."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from digests import FLAT_TABLE

from conftest import random_ids
from kvlink import wire
from kvlink.budget import (
    MAX_ZSTD_TRIES,
    BudgetError,
    Constraints,
    QualityTable,
    candidate_recipes,
    default_quality,
    observe_for,
    parse_budget,
    parse_fitted,
    plan,
    quality_key,
    with_rounding,
    with_widths,
)
from kvlink.cache import Observe, prefill
from kvlink.capabilities import formats, local_capabilities
from kvlink.models import Geometry
from kvlink.recipe import Recipe, build
from kvlink.stages import Rotate, Sink


def _old_receiver(fmts: tuple[str, ...], selectors: tuple[str, ...] = ()) -> frozenset[str]:
    """The capabilities of a receiver that decodes `fmts` and `selectors`, zstd, and nothing else (no
    rotation, no sink entries, no low rank)."""
    return frozenset({*(f"format:{f}" for f in fmts), *(f"select:{m}" for m in selectors), "zstd"})


def _rotation(recipe: Recipe) -> str:
    """Which tensors the recipe rotates: "none", "k", "v" or "kv"."""
    kinds = "".join(kind for kind in "kv" if recipe.has("rotate", kind))
    return kinds or "none"


def _round_k(recipe: Recipe) -> str:
    """'query' when the recipe rounds (INT) keys for the question's logits, else 'nearest'."""
    return "query" if any(q.rounding == "query" for q in recipe.quantizers("k")) else "nearest"


def _widths(recipe: Recipe, kind: str) -> str:
    """'question' when the recipe's `kind` tensors get a width per line, else 'uniform'."""
    return "question" if any(q.widths == "question" for q in recipe.quantizers(kind)) else "uniform"


@pytest.mark.parametrize(
    ("text", "value"), [("18.75%", 0.1875), ("100%", 1.0), ("0.5", 0.5), (" 6.25% ", 0.0625)]
)
def test_parse_budget(text: str, value: float) -> None:
    assert parse_budget(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0%", "0", "-5%", "100.01%", "1.5", "abc", "nan", ""])
def test_parse_budget_refuses_outside_the_open_closed_unit_interval(text: str) -> None:
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


@pytest.fixture(scope="module")
def prefilled() -> tuple[Any, Any]:
    from conftest import ToyTokenizer, tiny_model
    from kvlink.models import wrap

    lm = wrap(tiny_model("llama", seed=0), ToyTokenizer())
    pre = prefill(lm.model, random_ids(200, seed=1), random_ids(8, seed=2), observe=observe_for(None))
    return lm, pre


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.1875, 0.1])
def test_plan_fits_exactly_counted_bytes(prefilled: tuple[Any, Any], budget: float) -> None:
    lm, pre = prefilled
    p = plan(pre, lm.geometry, lm.fingerprint, budget, session_id="s1", message_id="m1")
    fp16 = lm.geometry.fp16_bytes(pre.kv.length)
    frames = wire.to_frames(p.encoded, "s1", "m1", lm.fingerprint, 1 << 20)
    exact = sum(wire.frame_size(f) for f in frames)
    assert exact == p.wire.frames
    assert p.total_bytes == p.wire.total + p.allowance
    assert p.total_bytes <= p.budget_bytes == int(budget * fp16)
    assert p.fraction <= budget
    # Better budgets never plan a worse expected quality.
    assert p.candidates and p.recipe in {c.recipe.with_zstd(p.recipe.zstd_level) for c in p.candidates} | {
        c.recipe for c in p.candidates
    }


def test_full_budget_keeps_everything_losslessly(prefilled: tuple[Any, Any]) -> None:
    lm, pre = prefilled
    p = plan(pre, lm.geometry, lm.fingerprint, 1.0)
    assert p.recipe.select is None and p.recipe.format("k") == p.recipe.format("v") == "fp16"
    assert p.recipe.zstd_level > 0  # framing makes plain FP16 overflow 100%; zstd pays for it


def test_budget_quality_is_monotonic(prefilled: tuple[Any, Any]) -> None:
    lm, pre = prefilled
    table = QualityTable()
    qualities = [
        table.expected(plan(pre, lm.geometry, lm.fingerprint, b).recipe) for b in (0.1, 0.2, 0.4, 0.8)
    ]
    assert qualities == sorted(qualities)


def test_unsatisfiable_budget_names_the_smallest_fraction(prefilled: tuple[Any, Any]) -> None:
    lm, pre = prefilled
    with pytest.raises(BudgetError, match=r"smallest achievable message is [0-9.]+% of FP16") as info:
        plan(pre, lm.geometry, lm.fingerprint, 0.001)
    assert 0.001 < info.value.smallest_fraction < 0.2
    # A budget just above the smallest fraction is satisfiable.
    ok = plan(pre, lm.geometry, lm.fingerprint, min(1.0, info.value.smallest_fraction * 1.05))
    assert ok.total_bytes <= ok.budget_bytes


def test_constraints_are_honored(prefilled: tuple[Any, Any]) -> None:
    lm, pre = prefilled
    p = plan(pre, lm.geometry, lm.fingerprint, 0.3, constraints=Constraints(k_bits=8, v_bits=4, zstd=False))
    assert (p.recipe.format("k"), p.recipe.format("v"), p.recipe.zstd_level) == ("int8", "int4", 0)
    with pytest.raises(BudgetError):
        plan(
            pre,
            lm.geometry,
            lm.fingerprint,
            0.1,
            constraints=Constraints(retention=1.0, k_bits=16, v_bits=16),
        )
    assert all(
        c.method in ("none", "random") for c in candidate_recipes(lm.geometry, Constraints(method="random"))
    )
    assert observe_for(Constraints(method="snapkv")) is Observe.WINDOW
    with pytest.raises(ValueError, match="unknown selection method 'bogus'"):
        Constraints(method="bogus")
    with pytest.raises(ValueError, match="got 5"):
        Constraints(k_bits=5)


def test_measured_quality_table_drives_the_choice(prefilled: tuple[Any, Any], tmp_path: Any) -> None:
    """With measurements saying INT2 is perfect and everything else useless, the planner picks INT2."""
    lm, pre = prefilled
    configs = candidate_recipes(lm.geometry, Constraints(zstd=False))
    entries = {quality_key(c): (1.0 if c.format("k") == c.format("v") == "int2" else 0.01) for c in configs}
    table = QualityTable(model="tiny", entries=entries)
    table.save(tmp_path / "q.json")
    loaded = QualityTable.load(tmp_path / "q.json")
    assert loaded.entries == entries
    p = plan(pre, lm.geometry, lm.fingerprint, 0.5, quality=loaded, constraints=Constraints(zstd=False))
    assert p.recipe.format("k") == p.recipe.format("v") == "int2"
    with pytest.raises(ValueError, match="cannot read quality table"):
        QualityTable.load(tmp_path / "missing.json")


def test_default_prior_orders_the_seed_findings() -> None:
    q = default_quality
    assert q(build(k_bits=8, v_bits=8)) > q(build(k_bits=4, v_bits=4)) > q(build(k_bits=3, v_bits=3))
    assert q(build(k_bits=3, v_bits=3)) > q(build(k_bits=2, v_bits=2))
    sel = {m: q(build(selector=m, retention=0.5)) for m in ("q2c", "h2o", "snapkv", "random")}
    assert sel["q2c"] > sel["h2o"] > sel["snapkv"] > sel["random"]


def test_plan_uses_the_calibrated_table_for_the_model(
    prefilled: tuple[Any, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kvlink-bench calibrate` writes <cache>/quality/<fingerprint>.json; plan() picks it up by itself."""
    from kvlink.budget import default_quality_path

    lm, pre = prefilled
    monkeypatch.setenv("KVLINK_CACHE", str(tmp_path))
    assert QualityTable.for_model(lm.fingerprint).entries == {}
    configs = candidate_recipes(lm.geometry, Constraints(zstd=False))
    entries = {quality_key(c): (1.0 if c.format("k") == c.format("v") == "int3" else 0.01) for c in configs}
    path = default_quality_path(lm.fingerprint)
    path.parent.mkdir(parents=True)
    QualityTable(model="tiny", entries=entries).save(path)
    p = plan(pre, lm.geometry, lm.fingerprint, 0.5, constraints=Constraints(zstd=False))
    assert p.recipe.format("k") == p.recipe.format("v") == "int3"


def test_shipped_measured_table_is_found_by_model_name(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a calibrated table for the exact fingerprint, the table shipped for the model's name rules;
    one calibrated on this machine for the fingerprint comes first; unknown models get the prior."""
    from kvlink.budget import default_quality_path, shipped_quality_path

    monkeypatch.setenv("KVLINK_CACHE", str(tmp_path))
    shipped = QualityTable.load(shipped_quality_path("smollm2-135m-instruct"))
    assert len(shipped.entries) >= 20 and shipped.entries["fp16"] == 1.0
    table = QualityTable.for_model("f" * 64, "smollm2-135m-instruct")
    assert table.entries == shipped.entries
    assert QualityTable.for_model("f" * 64, "some/other-model").entries == {}  # the built-in prior

    q2c50_int4 = build(selector="q2c", retention=0.5, k_bits=4, v_bits=4)
    assert (
        table.expected(q2c50_int4) == shipped.entries[quality_key(q2c50_int4)] != default_quality(q2c50_int4)
    )
    mine = QualityTable(model="f" * 64, entries={"fp16": 0.5})
    path = default_quality_path("f" * 64)
    path.parent.mkdir(parents=True)
    mine.save(path)
    assert QualityTable.for_model("f" * 64, "smollm2-135m-instruct").entries == {"fp16": 0.5}


@pytest.mark.slow
def test_a_local_copy_of_the_embedded_model_keeps_its_calibration(
    embedded: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_pretrained of the embedded model and tokenizer, loaded from that folder (another name, the same
    fingerprint): the shipped quality table and sensitivity profile are found by fingerprint, and the
    planner picks the embedded model's config."""
    from kvlink.budget import shipped_quality_path
    from kvlink.eval.squad import load_squad
    from kvlink.layerbits import Sensitivity, shipped_path
    from kvlink.models import calibration_name, load_model
    from kvlink.prompt import context_ids, question_ids

    monkeypatch.setenv("KVLINK_CACHE", str(tmp_path / "cache"))  # nothing calibrated on this machine
    folder = tmp_path / "my-smollm"
    embedded.model.save_pretrained(folder)
    embedded.tokenizer.save_pretrained(folder)
    copy = load_model(str(folder), download=False)
    assert copy.name == str(folder) and copy.fingerprint == embedded.fingerprint
    assert calibration_name(copy.fingerprint, copy.name) == "smollm2-135m-instruct"
    assert calibration_name("f" * 64, "some-name") == "some-name"  # unknown fingerprints: by name

    table = QualityTable.for_model(copy.fingerprint, copy.name)
    assert table.source == str(shipped_quality_path("smollm2-135m-instruct")) and table.entries
    profile = Sensitivity.for_model(copy.fingerprint, copy.name)
    assert profile is not None and profile.source == str(shipped_path("smollm2-135m-instruct"))

    example = load_squad()[0]
    q = question_ids(embedded.tokenizer, example.question)
    pre = prefill(
        embedded.model, context_ids(embedded.tokenizer, example.context), q, observe=observe_for(None)
    )
    chosen = [
        plan(pre, embedded.geometry, fp, 0.1875, model_name=name, session_id="s", message_id="m").recipe
        for fp, name in (
            (embedded.fingerprint, embedded.name), (copy.fingerprint, copy.name), ("f" * 64, str(folder))
        )
    ]  # fmt: skip
    # The copy plans what the embedded model plans: a config only a measured table picks (query-aware
    # rounding is weighed only where measured), not what the prior would pick for an unknown model.
    assert chosen[0] == chosen[1] != chosen[2] and _round_k(chosen[0]) == "query" != _round_k(chosen[2])


def test_rotation_is_planned_only_where_measured_and_decodable(prefilled: tuple[Any, Any]) -> None:
    """Unmeasured, a rotated config ranks just below itself unrotated; a table that measured it
    better makes the planner pick it, unless the receiver does not decode rotations."""
    lm, pre = prefilled
    prior = plan(pre, lm.geometry, lm.fingerprint, 0.2)
    assert not prior.recipe.has("rotate")
    assert any(c.recipe.has("rotate") for c in prior.candidates)  # weighed, not chosen
    rotated = prior.recipe.with_zstd(None).with_transform(Rotate(), kinds=("v",))
    table = QualityTable(entries={quality_key(rotated): 0.999})
    picked = plan(pre, lm.geometry, lm.fingerprint, 0.2, quality=table)
    assert picked.recipe.with_zstd(None) == rotated
    no_rotations = local_capabilities() - {"rotate"}
    old_receiver = Constraints(capabilities=no_rotations)
    assert not plan(
        pre, lm.geometry, lm.fingerprint, 0.2, quality=table, constraints=old_receiver
    ).recipe.has("rotate")
    with pytest.raises(ValueError, match="the receiver does not decode rotation"):
        Constraints(rotate="kv", capabilities=no_rotations)


def test_sink_entries_are_planned_only_where_measured_and_readable(prefilled: tuple[Any, Any]) -> None:
    """Like a rotation: weighed, picked once a table measured it better, never for a receiver without."""
    lm, pre = prefilled
    prior = plan(pre, lm.geometry, lm.fingerprint, 0.2)
    assert not prior.recipe.has("sink") and any(c.recipe.has("sink") for c in prior.candidates)
    with_sink = prior.recipe.with_zstd(None).with_transform(Sink(1))
    table = QualityTable(entries={quality_key(with_sink): 0.999})
    picked = plan(pre, lm.geometry, lm.fingerprint, 0.2, quality=table)
    assert picked.recipe.with_zstd(None) == with_sink
    assert picked.total_bytes <= picked.budget_bytes
    old_receiver = Constraints(capabilities=local_capabilities() - {"sink"})
    assert not plan(
        pre, lm.geometry, lm.fingerprint, 0.2, quality=table, constraints=old_receiver
    ).recipe.has("sink")


def test_sender_narrows_constraints_to_the_receivers_rotations() -> None:
    from kvlink.client.sender import SendError, _for_receiver

    g = Geometry(num_layers=2, kv_heads=1, head_dim=64, q_heads=1)
    old = _old_receiver(("int4",))
    assert {_rotation(c) for c in candidate_recipes(g, _for_receiver(None, old))} == {"none"}
    local = _for_receiver(Constraints(k_bits=4), wire.local_capabilities())
    assert {_rotation(c) for c in candidate_recipes(g, local)} == {"none", "v", "kv"}
    with pytest.raises(SendError, match="does not decode rotation 'kv'"):
        _for_receiver(Constraints(rotate="kv"), old)


def test_planner_sends_only_formats_the_receiver_decodes(prefilled: tuple[Any, Any]) -> None:
    from kvlink.client.sender import SendError, _for_receiver

    lm, pre = prefilled
    no_int3 = _old_receiver(("fp16", "int8", "int4", "int2"), ("q2c",))
    c = _for_receiver(None, no_int3)
    assert formats(c.capabilities) == sorted(("fp16", "int8", "int4", "int2"))
    configs = candidate_recipes(lm.geometry, c)
    assert configs and not any(
        "int3" in (x.format("k"), x.format("v")) or "nf4" in (x.format("k"), x.format("v")) for x in configs
    )
    # an int3 table entry cannot make the planner send int3 to this receiver
    int3 = build(selector="q2c", retention=0.5, k_bits=3, v_bits=3)
    table = QualityTable(entries={quality_key(int3): 0.999})
    assert (
        plan(pre, lm.geometry, lm.fingerprint, 0.45, quality=table, constraints=c).recipe.format("k")
        != "int3"
    )
    assert plan(pre, lm.geometry, lm.fingerprint, 0.45, quality=table).recipe.with_zstd(None) == int3
    with pytest.raises(SendError, match="does not decode int3"):
        _for_receiver(Constraints(k_bits=3), no_int3)
    with pytest.raises(ValueError, match="the receiver does not decode int3"):
        Constraints(v_bits=3, capabilities=frozenset({"format:int4"}))


def test_kvlink_send_flags_become_planner_constraints() -> None:
    from kvlink.client.main import build_parser, constraints_from_args

    args = build_parser().parse_args(
        ["--server", "h:1", "--budget", "10%", "--context", "-", "--question", "q",
         "--bits", "4", "--scope", "layer", "--rotate", "v", "--group-size", "64"]
    )  # fmt: skip
    c = constraints_from_args(args)
    assert (c.k_bits, c.v_bits, c.scope, c.rotate, c.group_size) == (4, 4, "layer", "v", 64)
    configs = candidate_recipes(Geometry(num_layers=2, kv_heads=1, head_dim=64, q_heads=1), c)
    selective = [x for x in configs if x.select is not None]
    assert selective and all(
        (x.scope, _rotation(x), x.format("k")) == ("layer", "v", "int4") for x in selective
    )


def test_query_rounding_is_planned_only_where_measured_better(prefilled: tuple[Any, Any]) -> None:
    """Same bytes as nearest rounding: taken when the table measured it better, never from a prior."""
    lm, pre = prefilled
    int4 = Constraints(k_bits=4, v_bits=4)

    def planned(quality: QualityTable | None = None, round_k: str | None = None) -> Any:
        c = Constraints(k_bits=4, v_bits=4, round_k=round_k)
        return plan(pre, lm.geometry, lm.fingerprint, 0.2, quality=quality, constraints=c)

    prior = plan(pre, lm.geometry, lm.fingerprint, 0.2, constraints=int4)
    assert _round_k(prior.recipe) == "nearest"
    nearest = prior.recipe.with_zstd(None)
    aware = with_rounding(nearest)
    assert aware is not None
    worse = QualityTable(entries={quality_key(nearest): 0.999, quality_key(aware): 0.99})
    assert _round_k(planned(worse).recipe) == "nearest"
    better = QualityTable(entries={quality_key(nearest): 0.99, quality_key(aware): 0.999})
    picked = planned(better)
    assert picked.recipe.with_zstd(None) == aware
    assert _round_k(picked.encoded.recipe) == "query" and picked.total_bytes <= picked.budget_bytes
    # the same bytes as the nearest-rounded message of the same config
    twin = planned(better, "nearest")
    assert twin.recipe.with_zstd(None) == nearest
    # (raw sizes: zstd, where the planner adds it, shrinks differently rounded codes by a few bytes more or less)
    raw = [[{n: p.raw_size for n, p in t.parts.items()} for t in x.encoded.tensors] for x in (picked, twin)]
    assert raw[0] == raw[1]
    assert [t.parts.keys() for t in picked.encoded.tensors] == [t.parts.keys() for t in twin.encoded.tensors]
    # pinned: every INT-key candidate rounds for the queries (unmeasured ones rank just below their twin)
    pinned = planned(round_k="query")
    assert _round_k(pinned.recipe) == "query"
    assert all(_round_k(c.recipe) == "query" for c in pinned.candidates if c.recipe.format("k") != "fp16")


def test_round_k_constraint_and_observation() -> None:
    from kvlink.client.main import build_parser, constraints_from_args

    with pytest.raises(ValueError, match="round_k must be one of"):
        Constraints(round_k="stochastic")
    args = build_parser().parse_args(
        ["--server", "h:1", "--budget", "10%", "--context", "-", "--question", "q", "--round-k", "query"]
    )  # fmt: skip
    assert constraints_from_args(args).round_k == "query"
    assert observe_for(Constraints(method="none")) is Observe.QUESTION  # the queries round the keys
    assert observe_for(Constraints(method="none", round_k="nearest")) is Observe.QUESTION  # key widths may
    assert (
        observe_for(Constraints(method="none", round_k="nearest", k_widths="uniform", v_widths="uniform"))
        is Observe.NONE
    )
    assert observe_for(Constraints(method="random", round_k="query")) is Observe.QUESTION
    assert observe_for(Constraints(method="random", k_widths="question")) is Observe.QUESTION
    assert observe_for(Constraints(method="random")) is Observe.NONE
    assert observe_for(Constraints(method="snapkv", round_k="query")) is Observe.WINDOW


def test_planner_sends_key_widths_only_where_measured_and_decoded(prefilled: tuple[Any, Any]) -> None:
    """Per-channel key widths cost 4 bits per channel and head: taken only where the table measured the
    twin better, never from a prior, never to a receiver without the formats, never when ruled out."""
    from kvlink.client.sender import SendError, _for_receiver

    lm, pre = prefilled
    base = build(selector="q2c", retention=0.5, scope="layer", k_bits=4, v_bits=4)
    widths = build(selector="q2c", retention=0.5, scope="layer", k_bits=4, v_bits=4, k_widths="question")
    both = build(selector="q2c", retention=0.5, scope="layer", k_bits=4, v_bits=4, k_widths="question",
                 round_k="query")  # fmt: skip
    assert (widths, both) == (with_widths(base, "k"), with_rounding(widths))  # the planner's twins

    def picked(table: QualityTable, constraints: Constraints | None = None) -> Recipe:
        return plan(pre, lm.geometry, lm.fingerprint, 0.4, quality=table, constraints=constraints).recipe

    unmeasured = QualityTable(entries={quality_key(base): 0.99})
    assert _widths(picked(unmeasured), "k") == "uniform"
    table = QualityTable(entries={quality_key(base): 0.99, quality_key(widths): 0.995})
    chosen = picked(table)
    assert chosen.with_zstd(None) == widths
    result = plan(pre, lm.geometry, lm.fingerprint, 0.4, quality=table)
    assert result.total_bytes <= result.budget_bytes and result.encoded.tensors[0].spec.format == "int4cw"
    assert picked(QualityTable(entries={**table.entries, quality_key(both): 0.996})).with_zstd(None) == both
    assert _widths(picked(table, Constraints(k_widths="uniform")), "k") == "uniform"
    old = _old_receiver(("fp16", "int8", "int4", "int3", "int2"), ("q2c",))
    assert _widths(picked(table, _for_receiver(None, old)), "k") == "uniform"
    with pytest.raises(SendError, match="per-channel key widths"):
        _for_receiver(Constraints(k_widths="question"), old)
    with pytest.raises(ValueError, match="k_widths must be one of"):
        Constraints(k_widths="always")
    pinned = candidate_recipes(lm.geometry, Constraints(k_widths="question", k_bits=3, v_bits=3))
    unrotated = [c for c in pinned if _rotation(c) in ("none", "v")]
    assert unrotated and all(_widths(c, "k") == "question" for c in unrotated)  # rotated keys keep one width
    assert all(_widths(c, "k") == "uniform" for c in pinned if _rotation(c) in ("k", "kv"))


def test_planner_sends_value_widths_only_where_measured_and_decoded(prefilled: tuple[Any, Any]) -> None:
    """Per-token value widths (4 bits per row and head): like key widths, taken only where the table
    measured the twin better, alone or with the key twins, and never to a receiver without the formats."""
    from kvlink.client.main import build_parser, constraints_from_args
    from kvlink.client.sender import SendError, _for_receiver

    lm, pre = prefilled
    base = build(selector="q2c", retention=0.5, scope="layer", k_bits=4, v_bits=3)
    vw = build(selector="q2c", retention=0.5, scope="layer", k_bits=4, v_bits=3, v_widths="question")
    all3 = build(selector="q2c", retention=0.5, scope="layer", k_bits=4, v_bits=3, round_k="query",
                 k_widths="question", v_widths="question")  # fmt: skip
    assert vw == with_widths(base, "v")  # the planner's twin

    def picked(table: QualityTable, constraints: Constraints | None = None) -> Recipe:
        recipe = plan(pre, lm.geometry, lm.fingerprint, 0.4, quality=table, constraints=constraints).recipe
        return recipe.with_zstd(None)

    assert _widths(picked(QualityTable(entries={quality_key(base): 0.99})), "v") == "uniform"
    table = QualityTable(entries={quality_key(base): 0.99, quality_key(vw): 0.995})
    assert picked(table) == vw
    result = plan(pre, lm.geometry, lm.fingerprint, 0.4, quality=table)
    assert result.total_bytes <= result.budget_bytes and result.encoded.tensors[1].spec.format.endswith("rw")
    assert picked(QualityTable(entries={**table.entries, quality_key(all3): 0.999})) == all3
    assert _widths(picked(table, Constraints(v_widths="uniform")), "v") == "uniform"
    old = _old_receiver(("fp16", "int8", "int4", "int3", "int2", "int4cw", "int3cw", "int2cw"), ("q2c",))
    assert _widths(picked(table, _for_receiver(None, old)), "v") == "uniform"
    with pytest.raises(SendError, match="per-row value widths"):
        _for_receiver(Constraints(v_widths="question"), old)
    with pytest.raises(ValueError, match="v_widths must be one of"):
        Constraints(v_widths="query")
    assert observe_for(
        Constraints(method="none", round_k="nearest", k_widths="uniform", v_widths="question")
    ) is (Observe.QUESTION)
    pinned = candidate_recipes(lm.geometry, Constraints(v_widths="question", k_bits=4, v_bits=3))
    assert pinned and all(_widths(c, "v") == "question" for c in pinned)
    args = build_parser().parse_args(
        ["--server", "h:1", "--budget", "10%", "--context", "-", "--question", "q", "--value-widths", "question"]
    )  # fmt: skip
    assert constraints_from_args(args).v_widths == "question"


def test_size_estimate_bounds_the_encoded_message(prefilled: tuple[Any, Any]) -> None:
    """The planner's pre-encoding estimate is an upper bound of the exact framed size it then checks."""
    from kvlink.budget import _estimate
    from kvlink.codec import Codec

    lm, pre = prefilled
    configs = [
        build(k_bits=4, v_bits=4),
        build(selector="q2c", retention=0.5, scope="layer", k_bits=3, v_bits=4, group_size=64, sink=1),
        build(selector="q2c", retention=0.9, scope="layer", k_bits=3, v_bits=4, group_size=64, sink=1,
                    round_k="query", k_widths="question"),
        build(k_bits=2, v_bits=2, k_widths="question"),
        build(k_bits=8, v_bits=4, lowrank="svd", k_rank=8, v_rank=8),
        build(k_layer_bits=(8, 2, 4), v_layer_bits=(3, 4, 2), sink=1, k_widths="question"),
        build(selector="q2c", retention=0.9, scope="layer", k_bits=4, v_bits=3, group_size=64, sink=1,
                    round_k="query", k_widths="question", v_widths="question"),
        build(k_bits=3, v_bits=2, v_widths="question"),
    ]  # fmt: skip
    for config in configs:
        codec = Codec(config, lm.geometry)
        encoded = codec.encode_kv(pre.kv, codec.select(pre), pre.observation)
        size = wire.message_wire_size(encoded, "s" * 32, "m" * 32, lm.fingerprint, 1 << 20)
        n_frames = 2 + sum(
            max(1, -(-len(p.data) // (1 << 20))) for t in encoded.tensors for p in t.parts.values()
        )
        total = size.total + wire.http2_overhead(n_frames, size.frames, n_signals=lm.geometry.num_layers + 2)
        assert total <= _estimate(codec, pre.kv.length), config.name


def test_zstd_is_not_tried_again_for_savings_no_try_came_near() -> None:
    """Noise does not compress: after a zstd try saved too little, the planner does not encode and compress
    whole messages again for candidates that need ZSTD_SPREAD more saving than any try got."""
    from kvlink.cache import ContextKV, LayerObservation, Observation, Prefill

    g = Geometry(2, 2, 16, 4)
    gen = torch.Generator().manual_seed(0)
    t, q = 512, 8
    keys = [torch.randn(g.kv_heads, t, g.head_dim, generator=gen) for _ in range(g.num_layers)]
    values = [torch.randn(g.kv_heads, t, g.head_dim, generator=gen) for _ in range(g.num_layers)]
    qpos = torch.arange(t, t + q)
    observed = [LayerObservation(torch.randn(g.q_heads, q, g.head_dim, generator=gen), qpos, k, torch.arange(t))
                for k in keys]  # fmt: skip
    pre = Prefill(
        ContextKV(keys, values, [torch.arange(t)] * g.num_layers, t),
        Observation(Observe.QUESTION, t, observed, g.head_dim**-0.5, g.num_layers),
        torch.zeros(t, dtype=torch.long), torch.zeros(q, dtype=torch.long),
    )  # fmt: skip
    p = plan(pre, g, "f" * 64, 0.125, constraints=Constraints(layer_bits=False))
    assert p.total_bytes <= p.budget_bytes
    tried = [c for c in p.candidates if c.note and "zstd3:" in c.note]
    skipped = [c for c in p.candidates if c.note.startswith("zstd not tried")]
    assert skipped, [c.note for c in p.candidates if c.note]
    assert len(tried) < MAX_ZSTD_TRIES  # the first try showed what zstd does to this message


# --- quality by context length -------------------------------------------------------------
def test_length_buckets_cover_every_length_once() -> None:
    from kvlink.budget import LENGTH_EDGES, length_bucket

    assert LENGTH_EDGES[0] == 0 and list(LENGTH_EDGES) == sorted(set(LENGTH_EDGES))
    assert length_bucket(0) == length_bucket(199) == length_bucket(1023) == (0, 1024)  # SQuAD: the first
    assert length_bucket(1024) == length_bucket(4095) == (1024, 4096)
    assert length_bucket(8000) == (4096, 16384)  # the long task's 2k-8k spans two buckets
    assert length_bucket(16384) == length_bucket(10**6) == (16384, None)
    with pytest.raises(ValueError, match="-1"):
        length_bucket(-1)


def _bucketed(**buckets: dict[str, float]) -> Any:
    """Buckets named like `b0_1024` (lo_hi, hi 'inf' for none)."""
    from kvlink.budget import LengthBucket

    out = []
    for name, entries in buckets.items():
        lo, hi = name.removeprefix("b").split("_")
        out.append(LengthBucket(int(lo), None if hi == "inf" else int(hi), entries, n=10))
    return out


A = build(selector="q2c", retention=0.5, k_bits=4, v_bits=4)
B = build(selector="q2c", retention=0.25, k_bits=4, v_bits=4)
C = build(k_bits=8, v_bits=4)
D = build(k_bits=4, v_bits=4)


def test_quality_lookup_takes_the_bucket_of_the_context_length_then_a_shorter_one() -> None:
    from kvlink.budget import UNMEASURED_ROTATION

    ka, kb, kc, kd = (quality_key(r) for r in (A, B, C, D))
    table = QualityTable(
        entries={ka: 0.7, kb: 0.75, kc: 0.6, kd: 0.55},  # over every length
        buckets=_bucketed(
            b4096_16384={kc: 0.65},
            b0_1024={ka: 0.9},
            b1024_4096={ka: 0.5, kb: 0.8},
        ),  # given in any order, kept shortest first
    )
    assert [b.lo for b in table.buckets] == [0, 1024, 4096]
    assert [table.expected(A, tokens=t) for t in (1, 200, 1023, 1024, 4095)] == [0.9, 0.9, 0.9, 0.5, 0.5]
    assert table.expected(A, tokens=5000) == 0.5  # not measured at 4k-16k: the nearer 1k-4k
    assert table.expected(A, tokens=10**6) == 0.5
    # Only 1k-4k measured B: from there on, not below (a longer context's figure would overrate it: its
    # selection keeps more there); below, B is rated as if unmeasured, not by `entries` (a mean over lengths).
    assert table.expected(B, tokens=2000) == table.expected(B, tokens=9000) == 0.8
    assert table.measured(B, 200) is None and table.expected(B, tokens=200) == default_quality(B)
    assert table.measured(C, 200) is None and table.expected(C, tokens=5000) == 0.65  # only 4k-16k has C
    assert table.expected(D, tokens=200) == table.expected(D, tokens=5000) == 0.55  # no bucket: all lengths
    assert table.expected(A) == 0.7 and table.measured(A) == 0.7  # no length given: all lengths
    assert table.measured(A, 3000) == 0.5 and table.measured(build(k_bits=2, v_bits=2), 3000) is None
    unmeasured = build(selector="q2c", retention=0.1, k_bits=3, v_bits=3)
    assert {table.expected(unmeasured, tokens=t) for t in (None, 200, 3000)} == {default_quality(unmeasured)}
    # The config itself from the length's bucket or a shorter one comes before a twin: a sink twin of A
    # measured only at 4k-16k answers for it there; below, its twin A of the length's bucket does.
    a_sink = A.with_transform(Sink(1))
    assert table.expected(a_sink, tokens=200) == pytest.approx(0.9 * UNMEASURED_ROTATION)
    assert table.expected(a_sink, tokens=2000) == pytest.approx(0.5 * UNMEASURED_ROTATION)
    sinked = QualityTable(entries=table.entries, buckets=[*table.buckets[:2], *_bucketed(b4096_inf={
        quality_key(a_sink): 0.95})])  # fmt: skip
    assert sinked.expected(a_sink, tokens=5000) == 0.95 and sinked.is_measured(a_sink)
    assert sinked.expected(a_sink, tokens=200) == pytest.approx(0.9 * UNMEASURED_ROTATION)
    assert sinked.expected(a_sink) == pytest.approx(0.7 * UNMEASURED_ROTATION)  # all lengths: only the twin


def test_a_length_between_buckets_takes_the_shorter_one() -> None:
    table = QualityTable(buckets=_bucketed(b0_1024={quality_key(A): 0.9}, b2048_inf={quality_key(A): 0.4}))
    assert [table.expected(A, tokens=t) for t in (1100, 2047, 2048, 10**6)] == [0.9, 0.9, 0.4, 0.4]
    late = QualityTable(buckets=_bucketed(b1024_inf={quality_key(A): 0.9}))
    assert late.measured(A, 500) is None and late.expected(A, tokens=500) == default_quality(A)


def test_length_buckets_are_checked() -> None:
    from kvlink.budget import LengthBucket

    with pytest.raises(ValueError, match=r"\[1024, 1024\)"):
        LengthBucket(1024, 1024)
    with pytest.raises(ValueError, match="-5"):
        LengthBucket(-5, 10)
    with pytest.raises(ValueError, match="overlap"):
        QualityTable(buckets=_bucketed(b0_2048={}, b1024_4096={}))
    with pytest.raises(ValueError, match="overlap"):
        QualityTable(buckets=_bucketed(b0_inf={}, b1024_4096={}))


def test_bucketed_table_round_trips_and_flat_files_stay_flat(tmp_path: Any) -> None:
    import json

    from kvlink.budget import GRAMMAR, shipped_quality_path

    table = QualityTable(
        model="m", entries={quality_key(A): 0.7}, fingerprints=("f" * 64,),
        buckets=_bucketed(b0_1024={quality_key(A): 0.9}, b1024_4096={quality_key(B): 0.8}, b16384_inf={}),
    )  # fmt: skip
    table.save(tmp_path / "q.json")
    doc = json.loads((tmp_path / "q.json").read_text())
    assert doc["grammar"] == GRAMMAR and doc["entries"] == {quality_key(A): 0.7}
    assert doc["buckets"] == [
        {"min_tokens": 0, "max_tokens": 1024, "n": 10, "entries": {quality_key(A): 0.9}},
        {"min_tokens": 1024, "max_tokens": 4096, "n": 10, "entries": {quality_key(B): 0.8}},
        {"min_tokens": 16384, "max_tokens": None, "n": 10, "entries": {}},
    ]
    loaded = QualityTable.load(tmp_path / "q.json")
    assert (loaded.buckets, loaded.entries) == (table.buckets, table.entries)
    assert loaded.fingerprints == table.fingerprints
    assert [loaded.expected(r, tokens=t) for r in (A, B) for t in (None, 100, 2000, 50000)] == [
        table.expected(r, tokens=t) for r in (A, B) for t in (None, 100, 2000, 50000)
    ]
    # A flat table writes the file it always wrote (no "buckets"): the one shipped until 2026-12-05.
    frozen_doc = json.loads(FLAT_TABLE.read_text())
    QualityTable.load(FLAT_TABLE).save(tmp_path / "flat.json")
    flat_doc = json.loads((tmp_path / "flat.json").read_text())
    assert "buckets" not in flat_doc and "buckets" not in frozen_doc
    assert {k: v for k, v in flat_doc.items() if k != "source"} == {
        k: v for k, v in frozen_doc.items() if k != "source"
    }
    # The shipped table, per context length now, writes back what it was read from.
    bucketed_doc = json.loads(shipped_quality_path("smollm2-135m-instruct").read_text())
    QualityTable.load(shipped_quality_path("smollm2-135m-instruct")).save(tmp_path / "shipped.json")
    assert json.loads((tmp_path / "shipped.json").read_text())["buckets"] == bucketed_doc["buckets"]
    doc["buckets"][1]["max_tokens"] = 512  # ends before it starts
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"cannot read quality table .*bad\.json"):
        QualityTable.load(tmp_path / "bad.json")
    del doc["buckets"][1]["entries"]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"cannot read quality table .*entries"):
        QualityTable.load(tmp_path / "bad.json")


FLAT_EXPECTED_DIGEST = "208399a3592bbae9ca4adbe6f1f00b83ab6287083c8b36f710a67c46e6a10ab8"
"""sha256 over "<name>=<repr(expected(recipe, 64))>\\n" of every candidate recipe of the embedded model's
geometry (with its shipped sensitivity profile), in candidate order, with FLAT_TABLE: printed by kvlink at
b05f17b, before tables had length buckets."""


def test_flat_table_looks_up_as_before_at_every_length() -> None:
    import hashlib

    from kvlink.eval.grid import parse_name
    from kvlink.layerbits import Sensitivity, shipped_path

    table = QualityTable.load(FLAT_TABLE)
    sensitivity = Sensitivity.load(shipped_path("smollm2-135m-instruct"))
    assert not table.buckets and len(table.entries) > 60
    for label in table.entries:
        recipe = parse_name(label, sensitivity)
        assert quality_key(recipe) == label
        for tokens in (None, 1, 199, 1024, 5000, 10**6):
            assert table.expected(recipe, 64, tokens=tokens) == table.entries[label]
            assert table.measured(recipe, tokens) == table.entries[label]
    recipes = candidate_recipes(
        Geometry(num_layers=30, kv_heads=3, head_dim=64, q_heads=9), None, sensitivity
    )
    assert len(recipes) == 26363
    for tokens in (None, 199, 5000):
        h = hashlib.sha256()
        for r in recipes:
            h.update(f"{r.name}={table.expected(r, 64, tokens=tokens)!r}\n".encode())
        assert h.hexdigest() == FLAT_EXPECTED_DIGEST, tokens


@pytest.fixture(scope="module")
def head64() -> Any:
    """A 2-layer random Llama of head_dim 64 (the embedded model's) with positions to 4k: contexts on both
    sides of the 1k bucket edge plan in seconds."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import ToyTokenizer
    from kvlink.models import wrap

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=4096, eos_token_id=2, bos_token_id=1,
        pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return wrap(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), ToyTokenizer())


def _head64_prefill(lm: Any, tokens: int, seed: int) -> Any:
    return prefill(lm.model, random_ids(tokens, seed=seed), random_ids(8, seed=2), observe=observe_for(None))


# (context tokens, context seed, budget) -> (pick, sha256 over "<name>=<repr(expected_quality)>\n" of every
# candidate in ranked order), with FLAT_TABLE and ids "0"*32 / "1"*32: printed by kvlink at b05f17b, before
# tables had length buckets, running these same plans.
FLAT_PICKS: dict[tuple[int, int, str], tuple[str, str]] = {
    (300, 10, "25%"): (
        "q2c90%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question+zstd3",
        "6f57dee3798dff48b1ed7344edbf86768a0a1b6c08778e724865ae2d6490ec38",
    ),
    (300, 10, "12.5%"): (
        "q2c25%/layer+kint4c/vint4t-g32+sink1+round-query",
        "90eeb8e44b75f1c35a9eef4cd869d06620c5c35e530fcc74160668ab14c2cc0b",
    ),
    (1500, 11, "6.25%"): (
        "q2c12.5%/layer+kint3c/vint4t-g64+sink1+round-query+kwidths-question",
        "862a306cf0f66df0de79a3beb87daa36d55c0cb5592b758baf9f4ec6e3aec8ff",
    ),
}


@pytest.mark.slow
def test_planner_picks_with_a_flat_table_are_unchanged(head64: Any) -> None:
    """~8 s a plan: the whole search with FLAT_TABLE, on both sides of the 1k bucket edge."""
    import hashlib

    table = QualityTable.load(FLAT_TABLE)
    pres: dict[tuple[int, int], Any] = {}
    for (tokens, seed, budget), (name, digest) in FLAT_PICKS.items():
        if (tokens, seed) not in pres:
            pres[tokens, seed] = _head64_prefill(head64, tokens, seed)
        pre = pres[tokens, seed]
        p = plan(pre, head64.geometry, head64.fingerprint, budget, quality=table, session_id="0" * 32,
                 message_id="1" * 32)  # fmt: skip
        h = hashlib.sha256()
        for c in p.candidates:
            h.update(f"{c.recipe.name}={c.expected_quality!r}\n".encode())
        assert (p.recipe.name, h.hexdigest()) == (name, digest), (tokens, budget)


@pytest.mark.slow
def test_the_shipped_table_is_per_context_length_from_calibration_questions(head64: Any) -> None:
    """The shipped table (2026-12-05): `kvlink-bench calibrate --task squad,long --holdout
    bench/results/eval-gate-squad320-cpu --holdout bench/results/eval-long300-h100 --holdout
    bench/results/eval-long300-twins-h100` over the flat table's runs cut to their calibration-split
    questions (bench/calibration_only.py: 293 of each 300) and the long task on the calibration split.
    Its SQuAD bucket rates every config it kept as the flat table did, within 0.01 (since 2026-12-07 the five
    picks without profiles from the whole calibration split: bench/results/calib-squad636-picks), and keeps a refined
    config only where the evaluation run showed its gain over its plain twin: the flat table's 6.25% pick
    is left out there (+0.021 [-0.007, +0.050]), its 25% and 12.5% picks on a short context stay
    (FLAT_PICKS). The long buckets, which no SQuAD pair speaks for, are gated by the long task's
    evaluation runs (bench/results/eval-long300-h100 with its twins in eval-long300-twins-h100; since
    2026-12-06 also eval-long99-full-h100 with eval-long99-twins-h100, for the full-retention configs of
    calib-long100-full-h100): the refinements whose gain held there stay (+0.083 to +0.092; +0.034 to
    +0.158), the xpred config, which no long run paired with its twin, is left out. Since 2026-12-06 the
    long buckets also rate question-aware transform coding at 12.5, 10 and 6.25% (calib-longxl-fixed-h100 and,
    for 10%, calib-longxl10-300; gated by the eval-longxl-* runs). On a 1.5k-token context it rates each
    candidate by the 1k-4k bucket wherever that measured it."""
    from pathlib import Path

    from kvlink.budget import shipped_quality_path
    from kvlink.eval import holdout
    from kvlink.eval.report import load_results

    shipped = QualityTable.load(shipped_quality_path("smollm2-135m-instruct"))
    flat = QualityTable.load(FLAT_TABLE)
    assert [(b.lo, b.hi) for b in shipped.buckets] == [(0, 1024), (1024, 4096), (4096, 16384)]
    short, middle, long = (b.entries for b in shipped.buckets)
    assert len(middle) > 5 and len(long) >= 5
    source = json.loads(shipped_quality_path("smollm2-135m-instruct").read_text())["source"]
    assert "left out by the evaluation-split gate (buckets 0-1024 tokens)" in source
    assert "left out by the evaluation-split gate (buckets 1024-4096, 4096-16384 tokens)" in source
    # the five picks without profiles measured again on the whole calibration split (2026-12-07: 293 + 343
    # questions, bench/results/calib-squad636-picks) hold that run's means; the rest the flat table's, within 0.01
    whole = load_results(Path(__file__).parents[1] / "bench/results/calib-squad636-picks")
    remeasured = {
        r["key"]: r["fidelity"]["mean"] for r in whole["summary"] if r["task"] == "squad" and r["n"] == 636
    }
    assert len(remeasured) == 6  # with fp16
    assert all(abs(short[key] - value) < 1e-9 for key, value in remeasured.items())
    assert (
        max(abs(short[k] - v) for k, v in flat.entries.items() if k in short and k not in remeasured) < 0.01
    )
    plain = {k for k in flat.entries if not holdout.twins(Recipe.from_name(k))}
    assert plain <= set(short)  # a config with no simpler twin is never gated
    left_out = set(flat.entries) - set(short)
    assert quality_key(Recipe.from_name(FLAT_PICKS[1500, 11, "6.25%"][0])) in left_out
    xpred = "q2c40%+xpred+kint3c/vint3t-g64+sink1"  # no long run paired it with its plain twin
    assert xpred not in long and xpred not in middle
    fitted = {k for k in long if parse_fitted(k) is not None}  # transform coding at a budget
    # question-aware transform coding, gated by the eval-longxl-* runs against what the table sent at each
    # budget before (on all 300 evaluation questions: +0.094 at 12.5%, +0.120 at 10%, +0.109 at 6.25%)
    assert fitted == {f"xpred+fp16+pca1-q0.5+ans@{b}%" for b in ("12.5", "10", "6.25")}
    assert fitted <= set(middle) and not fitted & set(short)
    held = {k for k in set(long) - fitted if holdout.twins(Recipe.from_name(k))}  # each gained over its twin
    assert held == {
        "q2c25%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question",
        "q2c40%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question",
        "q2c40%+kint3c/vint3t-g64+sink1",
        # full retention, gated by eval-long99-full-h100 against its twins in eval-long99-twins-h100
        "kint8c/vint4t-g64+sink1+vwidths-question",
        "kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question",
        "kint3c/vint3t-g64+sink1+round-query",
        "q2c60%/layer+kint4c/vint3t-g64+sink1+round-query",
    }
    # its gain over its twin did not hold there (+0.006 [-0.022, +0.034])
    assert "q2c90%/layer+kint8c/vint4t-g64+sink1+vwidths-question" not in long
    pre = _head64_prefill(head64, 300, 10)
    for budget in ("25%", "12.5%"):
        p = plan(pre, head64.geometry, head64.fingerprint, budget, quality=shipped, session_id="0" * 32,
                 message_id="1" * 32)  # fmt: skip
        assert p.recipe.name == FLAT_PICKS[300, 10, budget][0]
    p = plan(_head64_prefill(head64, 1500, 11), head64.geometry, head64.fingerprint, "12.5%", quality=shipped,
             session_id="0" * 32, message_id="1" * 32)  # fmt: skip
    rated = [
        (quality_key(c.recipe), c.expected_quality)
        for c in p.candidates
        if not math.isnan(c.expected_quality)  # NaN: a candidate the search did not rate
    ]
    in_middle = [(key, q) for key, q in rated if key in middle]
    assert in_middle and all(q == middle[key] for key, q in in_middle)
    assert any(middle[key] != short.get(key) for key, _ in in_middle)  # not the SQuAD figure


def test_planner_choice_follows_the_context_length(head64: Any) -> None:
    """A table that measured Q2C 75% good only on long contexts and Q2C 50% good only on short ones: the
    planner sends the one measured good at the context's length; a flat table of the short measurements
    sends the same at both lengths."""
    short_good = build(selector="q2c", retention=0.5, k_bits=4, v_bits=4)
    long_good = build(selector="q2c", retention=0.75, k_bits=4, v_bits=4)
    short_entries = {quality_key(short_good): 0.95, quality_key(long_good): 0.5}
    long_entries = {quality_key(short_good): 0.4, quality_key(long_good): 0.95}
    table = QualityTable(buckets=_bucketed(b0_1024=short_entries, b1024_inf=long_entries))
    pinned = Constraints(
        k_bits=4, v_bits=4, group_size=32, scope="global", rotate="none", sink=0, round_k="nearest",
        k_widths="uniform", v_widths="uniform", zstd=False,
    )  # fmt: skip

    def picked(quality: QualityTable, tokens: int) -> Recipe:
        pre = _head64_prefill(head64, tokens, seed=tokens)
        return plan(pre, head64.geometry, head64.fingerprint, 0.5, constraints=pinned, quality=quality).recipe

    assert picked(table, 300) == short_good
    assert picked(table, 1500) == long_good
    flat = QualityTable(entries=short_entries)
    assert picked(flat, 300) == picked(flat, 1500) == short_good


def test_skipping_twins_no_table_can_hold_changes_no_lookup() -> None:
    """QualityTable.might_measure lets lookups skip the twins of configs no entry shares a shape with: every
    expectation and every twin the planner takes is what the full search over twins gives."""
    from kvlink.budget import _measured_best, shipped_quality_path
    from kvlink.eval.holdout import twins
    from kvlink.layerbits import Sensitivity

    geometry = Geometry(num_layers=30, kv_heads=3, head_dim=64, q_heads=9)
    sensitivity = Sensitivity.for_model("", "smollm2-135m-instruct")
    candidates = candidate_recipes(geometry, None, sensitivity)[::37]
    for path in (shipped_quality_path("smollm2-135m-instruct"), FLAT_TABLE):
        fast, full = QualityTable.load(path), QualityTable.load(path)
        full._shapes, full._shapes_known = None, True  # never rules anything out: every twin is built
        measured = [Recipe.from_name(k) for k in fast.entries if "@" not in k]
        recipes = [*candidates, *measured, *(t for r in measured for t in twins(r))]
        skipped = sum(not fast.might_measure(r) for r in recipes)
        assert 0 < skipped < len(recipes)
        for recipe in recipes:
            for tokens in (None, 200, 6000):
                assert fast.expected(recipe, tokens=tokens) == full.expected(recipe, tokens=tokens), (
                    recipe.name
                )
                for free in ((True, True, True), (True, False, True)):
                    got = _measured_best(fast, recipe, 0.5, free, tokens)
                    assert got == _measured_best(full, recipe, 0.5, free, tokens), recipe.name


def test_a_stage_of_no_bytes_leaves_the_size_key_alone(prefilled: tuple[Any, Any]) -> None:
    """The planner sizes a rotated config by its unrotated twin's estimate: rotation adds no byte."""
    from kvlink.codec import Codec

    lm, pre = prefilled
    plain, rotated = (
        build(k_bits=4, v_bits=3, group_size=32),
        build(k_bits=4, v_bits=3, group_size=32, rotate="kv"),
    )
    assert rotated != plain and rotated.size_key() == plain.size_key()
    assert build(k_bits=4, v_bits=3, group_size=32, sink=1).size_key() != plain.size_key()
    sizes = [Codec(r, lm.geometry).encode(pre).sizes().total for r in (plain, rotated)]
    assert sizes[0] == sizes[1]


def test_the_search_space_is_built_once_per_geometry_constraints_and_profile() -> None:
    from kvlink.layerbits import Sensitivity

    g = Geometry(num_layers=3, kv_heads=1, head_dim=64, q_heads=2)
    first = candidate_recipes(g, Constraints(zstd=False))
    first.clear()  # a caller's list is its own: the next plan gets the whole space again
    again = candidate_recipes(
        Geometry(num_layers=3, kv_heads=1, head_dim=64, q_heads=2), Constraints(zstd=False)
    )
    assert again and again == candidate_recipes(g, Constraints(zstd=False))
    assert any(r.has("rotate") for r in again)
    # Another geometry, other constraints, another profile: each its own space, never a remembered one.
    odd = candidate_recipes(
        Geometry(num_layers=3, kv_heads=1, head_dim=48, q_heads=2), Constraints(zstd=False)
    )
    assert odd and not any(r.has("rotate") for r in odd)  # no Hadamard of 48
    pinned = candidate_recipes(g, Constraints(zstd=False, k_bits=4, v_bits=4))
    assert pinned and {(r.format("k"), r.format("v")) for r in pinned} == {("int4", "int4")}
    profile = Sensitivity(model="toy", k=(1.0, 5.0, 1.0), v=(1.0, 1.0, 2.0))
    mixed = candidate_recipes(g, Constraints(zstd=False), profile)
    assert len(mixed) > len(again) and any(r.per_layer("k") for r in mixed)
    assert not any(r.per_layer("k") for r in again)
