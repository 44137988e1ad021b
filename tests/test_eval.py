"""kvlink.eval: tasks, metrics, the grid runner (resume), reports, the planner check and the CLI.

Mechanics run on tiny random-weight models; text tasks use the embedded model's tokenizer
with a tiny Llama of the same vocabulary (49152), so no test loads the 135M weights.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import ToyTokenizer, random_ids, tiny_model
from kvlink.cache import ContextKV, Observe, prefill, prefill_observations
from kvlink.codec import Codec
from kvlink.eval import cli, fidelity, grid, report, tasks
from kvlink.eval.commands.calibrate import quality_table
from kvlink.eval.e2e import e2e_example, e2e_summary
from kvlink.eval.link import PacedSocketPair, framed_transfer, parse_bandwidth
from kvlink.generate import greedy_answer, teacher_forced_logits
from kvlink.models import LoadedModel, wrap
from kvlink.recipe import Recipe, build
from kvlink.scoring import best_scores, exact_match, f1_score, normalize_answer
from kvlink.stages import LowRank


# --- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from kvlink.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


def _text_model(seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        eos_token_id=2, bos_token_id=1, pad_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # as conftest.tiny_model: sharper attention so positions matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module")
def text_lm(tokenizer: Any) -> LoadedModel:
    """A 2-layer Llama (head_dim 16) with the embedded model's tokenizer."""
    return wrap(_text_model(), tokenizer, name="tiny-text")


@pytest.fixture(scope="module")
def squad2() -> list[tasks.Example]:
    return tasks.squad_examples(limit=2, exclude=tasks.reserved_contexts())


@pytest.fixture(scope="module")
def toy_lm() -> LoadedModel:
    return wrap(tiny_model("llama"), ToyTokenizer(), name="tiny-llama")


SMALL = grid.RunSettings(max_new_tokens=4, batch=4, ppl_prefix=48, ppl_tokens=8)


# --- scoring -------------------------------------------------------------------------------
def test_squad_normalization_and_scores() -> None:
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("an Apple.", "apple") == 1.0
    assert exact_match("apples", "apple") == 0.0
    assert f1_score("x b c", "b c d") == pytest.approx(2 / 3)
    assert f1_score("a b c", "b c d") == pytest.approx(0.8)  # "a" is an article: dropped
    assert f1_score("", "") == 1.0 and f1_score("x", "") == 0.0
    assert best_scores("Paris, France", ("France", "Paris")) == (pytest.approx(2 / 3), 0.0)
    assert best_scores("anything", ()) == (0.0, 0.0)
    assert fidelity.answer_fidelity("The Normans", "normans") == 1.0
    assert fidelity.agreement("10th century", "the 10th century.") == 1.0
    assert fidelity.needle_accuracy("The code is 48213.", "48213") == 1.0
    assert fidelity.needle_accuracy("The code is 482134.", "48213") == 0.0
    assert fidelity.needle_accuracy("whatever", None) is None


def test_kl_and_nll() -> None:
    logits = torch.randn(5, 11)
    assert fidelity.mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-7)
    assert fidelity.mean_kl(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    assert fidelity.mean_kl(logits, torch.randn(5, 11)) > 0.01
    assert fidelity.mean_kl(torch.empty(0, 11), torch.empty(0, 11)) == 0.0
    targets = [1, 4, 0, 10, 3]
    expected = float(torch.nn.functional.cross_entropy(logits, torch.tensor(targets)))
    assert fidelity.mean_nll(logits, targets) == pytest.approx(expected)
    assert fidelity.perplexity(math.log(7.0)) == pytest.approx(7.0)


def test_reconstruction_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(2, 10, 4, generator=g) for _ in range(2)]
    values = [torch.randn(2, 10, 4, generator=g) for _ in range(2)]
    full = ContextKV(keys, values, [torch.arange(10)] * 2, 10)
    kept = [torch.tensor([0, 3, 4, 9])] * 2
    exact = full.select(kept)
    r = fidelity.reconstruction(full, exact)
    energy = sum(float(k[:, kept[0]].pow(2).sum()) for k in keys) / sum(float(k.pow(2).sum()) for k in keys)
    assert r["k_rel_err"] == 0.0 and r["k_cos"] == pytest.approx(1.0)
    assert r["k_energy"] == pytest.approx(energy)
    assert r["k_rel_err_all"] == pytest.approx(math.sqrt(1 - energy))
    noisy = ContextKV([k * 1.1 for k in exact.keys], exact.values, exact.positions, 10)
    r = fidelity.reconstruction(full, noisy)
    assert r["k_rel_err"] == pytest.approx(0.1, rel=1e-4) and r["v_rel_err"] == 0.0
    assert r["k_cos"] == pytest.approx(1.0)  # scaling keeps the direction: cosine and error disagree
    zeros = ContextKV([k * 0 for k in keys], [v * 0 for v in values], full.positions, 10)
    assert fidelity.reconstruction(zeros, zeros)["v_cos"] == 1.0


# --- the cache addition ------------------------------------------------------------------------
def test_prefill_observations_match_prefill(toy_lm: LoadedModel) -> None:
    ctx, q = random_ids(40, seed=1), random_ids(6, seed=2)
    kv, obs = prefill_observations(toy_lm.model, ctx, q, set(Observe), window=8)
    for kind in Observe:
        ref = prefill(toy_lm.model, ctx, q, observe=kind, window=8)
        for layer in range(kv.num_layers):
            torch.testing.assert_close(kv.keys[layer], ref.kv.keys[layer])
        assert obs[kind].kind is kind and obs[kind].length == 40 and obs[kind].num_layers == kv.num_layers
        assert len(obs[kind].layers) == len(ref.observation.layers)
        for mine, theirs in zip(obs[kind].layers, ref.observation.layers):
            torch.testing.assert_close(mine.queries, theirs.queries)
            torch.testing.assert_close(mine.keys, theirs.keys)
            assert torch.equal(mine.query_positions, theirs.query_positions)
    with pytest.raises(ValueError, match="question"):
        prefill_observations(toy_lm.model, ctx, None, {Observe.QUESTION})


# --- batched decoding against the receiver's loop -----------------------------------------------
def test_batched_answers_match_greedy_answer(toy_lm: LoadedModel) -> None:
    model, tok, g = toy_lm.model, toy_lm.tokenizer, toy_lm.geometry
    ctx, q = random_ids(48, seed=3), random_ids(5, seed=4)
    pre = prefill(model, ctx, q, observe=Observe.QUESTION)
    kvs = []
    for config in (build(), build(selector="q2c", retention=0.5, k_bits=4, v_bits=4)):
        codec = Codec(config, g)
        kvs.append(codec.decode(codec.encode(pre)))
    singles = [greedy_answer(model, tok, kv, q, max_new_tokens=6, stop_at_eos=False) for kv in kvs]
    gold = [7, 8, 9]
    out = fidelity.batched_answers(model, tok, kvs, q, [singles[0].token_ids, gold], max_new_tokens=6)
    for row, single in enumerate(singles):
        eos = tok.eos_token_id
        expected = (
            single.token_ids[: single.token_ids.index(eos) + 1]
            if eos in single.token_ids
            else single.token_ids
        )
        assert out.tokens[row] == expected
        tf = teacher_forced_logits(model, kvs[row], q, singles[0].token_ids)
        torch.testing.assert_close(out.forced[0][row].cpu(), tf, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            out.forced[1][row].cpu(), teacher_forced_logits(model, kvs[row], q, gold), atol=1e-4, rtol=1e-4
        )
    only_forced = fidelity.batched_answers(model, tok, kvs, q, [gold], max_new_tokens=0)
    assert only_forced.tokens == [[], []] and only_forced.forced[0].shape[:2] == (2, 3)


# --- the evaluator -------------------------------------------------------------------------------
def test_fidelity_sanity_full_precision_and_int2(text_lm: LoadedModel, squad2: list[tasks.Example]) -> None:
    configs = grid.resolve(["fp16", "kint2c/vint2t-g32", "q2c50%+fp16"], text_lm.geometry)
    records = {r["config"]: r for r in grid.Evaluator(text_lm, configs, SMALL).evaluate(squad2[0])}
    full, int2, q2c = records["fp16"], records["kint2c/vint2t-g32"], records["q2c50%+fp16"]
    assert full["fidelity"] == 1.0 and full["agree"] == 1.0 and full["answer"] == full["ref_answer"]
    assert full["kl"] < 1e-6 and full["f1"] == full["ref_f1"]
    assert full["k_rel_err"] < 1e-3 and full["k_cos"] > 0.99999 and full["k_energy"] == 1.0
    assert full["ppl"] == pytest.approx(full["ref_ppl"], rel=1e-4)
    assert int2["kl"] > 1e-4 and int2["k_rel_err"] > 0.05 and int2["v_cos"] < 0.999
    assert q2c["n_kept"] == math.ceil(0.5 * q2c["T"]) and q2c["k_energy"] < 1.0 and q2c["k_rel_err"] < 1e-3
    assert q2c["k_rel_err_all"] > 0.01 and q2c["needle"] is None
    for rec in records.values():
        assert rec["wire_bytes"] > rec["encoded_bytes"] == rec["payload_bytes"] + rec["metadata_bytes"]
        assert rec["wire_frac"] == pytest.approx(rec["wire_bytes"] / rec["fp16_bytes"])
        assert rec["fp16_bytes"] == text_lm.geometry.fp16_bytes(rec["T"])
    assert int2["wire_bytes"] < q2c["wire_bytes"] < full["wire_bytes"]


def test_kept_sets_are_the_senders(text_lm: LoadedModel, squad2: list[tasks.Example]) -> None:
    """One prefill for all selectors gives each the kept set the sender would compute alone."""
    from kvlink.prompt import question_rows

    configs = grid.resolve(
        ["q2c50%+fp16", "snapkv25%+fp16", "h2o50%+fp16", "streaming25%+fp16", "random50%/layer+fp16"],
        text_lm.geometry,
    )
    example = squad2[0]
    ctx, q = example.encode(text_lm.tokenizer)
    rows = question_rows(text_lm.tokenizer, example.question)
    _, kept = grid.Evaluator(text_lm, configs, SMALL)._prefill(ctx, q, configs, rows)
    for c in configs:
        observe = grid._observes(c.config)
        alone = prefill(text_lm.model, ctx, q, observe=observe, question_rows=rows)
        expected = Codec(c.config, text_lm.geometry).select(alone)
        assert expected is not None
        got = kept[grid._kept_key(c.config)]
        assert got is not None and all(torch.equal(a, b) for a, b in zip(got, expected)), c.name


def test_wire_bytes_is_the_planners_count(text_lm: LoadedModel) -> None:
    from kvlink import wire

    ctx = random_ids(30, seed=5, high=1000)
    pre = prefill(text_lm.model, ctx)
    encoded = Codec(build(k_bits=4, v_bits=4), text_lm.geometry).encode(pre)
    counted = grid.wire_bytes(encoded, text_lm.fingerprint, 1 << 20)
    size = wire.message_wire_size(encoded, grid.SESSION_ID, grid.MESSAGE_ID, text_lm.fingerprint, 1 << 20)
    frames = wire.to_frames(encoded, grid.SESSION_ID, grid.MESSAGE_ID, text_lm.fingerprint, 1 << 20)
    assert counted["wire_frames"] == sum(f.ByteSize() + 5 for f in frames)
    assert counted["wire_bytes"] == size.total + wire.http2_overhead(len(frames), size.frames)


# --- the grid ---------------------------------------------------------------------------------------
def test_config_names_presets_and_grids() -> None:
    assert grid.parse_name("q2c50%+kint4c/vint4t-g32") == build(
        selector="q2c", retention=0.5, k_bits=4, v_bits=4
    )
    assert grid.parse_name("seed-kv-asym") == build(k_bits=8, v_bits=4)
    assert grid.parse_name("h2o25%/layer+knf4c/vint8c-g64+zstd3") == build(
        selector="h2o", retention=0.25, scope="layer", k_bits="nf4", v_bits=8, group_size=64,
        v_axis="channel", zstd_level=3,
    )  # fmt: skip
    proj = grid.parse_name("profile-r32+kint4c/vint4t-g32")
    assert {s.mode for s in proj.stages() if isinstance(s, LowRank)} == {"profile"}
    assert grid.parse_name("q2c50%+kint4c/vint3t-g32+sink4+v-rot") == build(
        selector="q2c", retention=0.5, k_bits=4, v_bits=3, rotate="v", sink=4
    )
    kivi = grid.parse_name("kivi2")
    (kq,), (vq,) = kivi.quantizers("k"), kivi.quantizers("v")
    assert (kivi.format("k"), kq.axis, vq.axis, kq.group, vq.group) == ("int2", "channel", "token", 32, 32)
    with pytest.raises(ValueError, match="unknown selection method 'q2x'"):
        grid.parse_name("q2x50%+kint4c/vint4t-g32")
    default = grid.select_configs("default")
    assert 30 <= len(default) <= 45 and default[0].name == "fp16"
    names = {c.name for c in default}
    for sel in ("q2c", "snapkv", "h2o", "streaming", "random"):
        assert {f"{sel}50%+fp16", f"{sel}25%+fp16"} <= names
    assert {
        "kint8c/vint8t-g32", "kint4c/vint4t-g32", "kint3c/vint3t-g32", "kint2c/vint2t-g32", "knf4c/vnf4t-g32",
        "svd-r16+fp16", "svd-r32+fp16", "profile-r16+fp16", "profile-r32+fp16",
    } <= names  # fmt: skip
    by_name = {c.name: c for c in default}
    assert "kivi2" in by_name["kint2c/vint2t-g32"].aliases
    assert "seed-q2c75-int4" in by_name["q2c75%+kint4c/vint4t-g32"].aliases
    tiny = grid.Geometry(2, 2, 16, 4)
    ranks = [
        s.rank
        for c in grid.select_configs("default", geometry=tiny)
        for s in c.config.stages()
        if isinstance(s, LowRank)
    ]
    assert ranks and all(rank <= 16 for rank in ranks)
    full = grid.select_configs("full")
    assert len(full) >= 16 * 6 * 5
    assert [c.name for c in grid.select_configs(None, ["reference"])][:3] == [
        "fp16", "kint8c/vint8t-g32", "kint4c/vint4t-g32",
    ]  # fmt: skip
    assert grid.family(grid.parse_name("q2c50%+profile-r32+kint4c/vint4t-g32")) == "q2c+proj+quant"


def test_resume_skips_done_pairs(text_lm: LoadedModel, squad2: list[tasks.Example], tmp_path: Path) -> None:
    configs = grid.resolve(["fp16", "kint4c/vint4t-g32", "streaming50%+fp16"], text_lm.geometry)
    samples = tmp_path / "samples.jsonl"
    first, stats = grid.run_quality(text_lm, squad2, configs, samples, SMALL, resume=True, progress=False)
    assert stats["pairs_run"] == 6 and len(first) == 6
    lines = samples.read_text().splitlines()
    assert len(lines) == 6
    again, stats = grid.run_quality(text_lm, squad2, configs, samples, SMALL, resume=True, progress=False)
    assert stats["pairs_run"] == 0 and stats["examples_run"] == 0 and stats["pairs_skipped"] == 6
    assert len(again) == 6 and samples.read_text().splitlines() == lines
    # An interrupted run: the last pair lost and a torn line left; only that pair runs again.
    samples.write_text("\n".join(lines[:-1]) + '\n{"eid": "squad:')
    fixed, stats = grid.run_quality(text_lm, squad2, configs, samples, SMALL, resume=True, progress=False)
    assert stats["pairs_run"] == 1 and len(fixed) == 6
    assert {(r["eid"], r["config"]) for r in fixed} == {(r["eid"], r["config"]) for r in first}


def test_shards_merge_and_resume(text_lm: LoadedModel, squad2: list[tasks.Example], tmp_path: Path) -> None:
    configs = grid.resolve(["fp16", "kint4c/vint4t-g32"], text_lm.geometry)
    settings = grid.RunSettings(max_new_tokens=3, batch=4, ppl_every=2, ppl_prefix=48, ppl_tokens=8)
    for k in (0, 1):
        path = grid.samples_file(tmp_path, (k, 2))
        records, stats = grid.run_quality(
            text_lm, squad2, configs, path, settings, resume=True, progress=False, shard=(k, 2)
        )
        assert stats["examples_run"] == 1 and path.name == f"samples-{k}of2.jsonl"
    records, done = grid.read_done(tmp_path)
    assert len(records) == 4 and set(done) == {e.eid for e in squad2}
    by_example = {r["eid"]: r for r in records}
    assert math.isfinite(by_example[squad2[0].eid]["ppl"]) and math.isnan(by_example[squad2[1].eid]["ppl"])
    _, stats = grid.run_quality(
        text_lm, squad2, configs, grid.samples_file(tmp_path), settings, resume=True, progress=False
    )
    assert stats["pairs_run"] == 0 and stats["pairs_skipped"] == 4


# --- statistics, frontier, planner check ------------------------------------------------------------
def test_bootstrap_ci_contains_mean_and_narrows() -> None:
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.5, 0.2, 20), rng.normal(0.5, 0.2, 2000)
    m1, lo1, hi1 = report.bootstrap_ci(small, seed=0)
    m2, lo2, hi2 = report.bootstrap_ci(large, seed=0)
    assert lo1 <= m1 <= hi1 and lo2 <= m2 <= hi2
    assert m1 == pytest.approx(small.mean()) and (hi2 - lo2) < (hi1 - lo1) / 3
    assert report.bootstrap_ci(small, seed=0) == (m1, lo1, hi1)  # seeded
    assert report.bootstrap_ci([1.0, None, float("nan"), 3.0])[0] == 2.0
    assert report.bootstrap_ci([4.0]) == (4.0, 4.0, 4.0)
    assert all(math.isnan(x) for x in report.bootstrap_ci([]))
    ratio, lo, hi = report.bootstrap_ratio_ci([0.5, 0.4, 0.6, 0.5], [1.0, 0.8, 1.0, 1.2])
    assert ratio == pytest.approx(0.5) and lo <= ratio <= hi


def test_pareto_frontier_hand_made() -> None:
    points = [
        (1.0, 0.9),
        (0.5, 0.8),
        (0.5, 0.7),
        (0.25, 0.85),
        (0.1, 0.2),
        (0.3, 0.85),
        (2.0, 0.9),
        (0.6, float("nan")),
    ]
    # (0.25, .85) dominates (0.5, .8), (0.5, .7) and (0.3, .85); (2.0, .9) is dominated by (1.0, .9).
    assert report.pareto_frontier(points) == [4, 3, 0]
    assert report.pareto_frontier([]) == []
    assert report.pareto_frontier([(0.1, 0.5), (0.1, 0.6)]) == [1]


def _row(task: str, name: str, frac: float, quality: float) -> dict[str, Any]:
    from kvlink.budget import quality_key

    cell = {"mean": quality, "lo": quality, "hi": quality}
    return {
        "task": task, "config": name, "n": 10, "key": quality_key(grid.parse_name(name)),
        "fidelity": cell, "wire_frac": {"mean": frac, "lo": frac, "hi": frac},
    }  # fmt: skip


def test_calibrate_check_on_synthetic_results(tmp_path: Path) -> None:
    from kvlink.budget import QualityTable

    rows = [
        _row("squad", "fp16", 1.0, 1.0), _row("squad", "kint4c/vint4t-g32", 0.32, 0.76),
        _row("squad", "kint2c/vint2t-g32", 0.19, 0.23), _row("squad", "q2c75%+kint4c/vint4t-g32", 0.235, 0.68),
        _row("squad", "q2c50%+kint4c/vint4t-g32", 0.157, 0.61), _row("squad", "q2c50%+kint2c/vint2t-g32", 0.10, 0.45),
        _row("squad", "q2c25%+kint4c/vint4t-g32", 0.08, 0.15), _row("squad", "h2o50%+kint4c/vint4t-g32", 0.157, 0.58),
        _row("squad", "q2c25%+kint3c/vint3t-g32", 0.06, 0.30),
    ]  # fmt: skip
    results = {"meta": {"fingerprint": "abc", "split": "calibration"}, "summary": rows}
    table = quality_table(results, "squad")
    assert table.entries[grid.parse_name("q2c50%+kint4c/vint4t-g32").name] == 0.61
    checks = report.planner_check(rows, table, (0.1875, 0.125, 0.0625), "squad")
    assert [c["pick"] for c in checks] == [
        "q2c50%+kint4c/vint4t-g32", "q2c50%+kint2c/vint2t-g32", "q2c25%+kint3c/vint3t-g32",
    ]  # fmt: skip
    assert all(c["on_frontier"] for c in checks)
    assert [c["pick"] for c in checks] == [c["best"] for c in checks]
    # The built-in prior ranks by its own guesses: at 12.5% it picks a config the measurements dominate.
    prior = report.planner_check(rows, QualityTable(), (0.125,), "squad")[0]
    assert prior["pick"] == "q2c25%+kint4c/vint4t-g32" and not prior["on_frontier"]
    assert report.planner_check(rows, table, (0.01,), "squad")[0]["pick"] is None
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "quality.json"
    assert cli.main(["calibrate", str(path), "--out", str(out), "--json", str(tmp_path / "check.json")]) == 0
    assert QualityTable.load(out).entries == table.entries
    assert len(json.loads((tmp_path / "check.json").read_text())["checks"]) == 3
    # a second run of the same model adds configs; a config in both keeps the row with more examples
    second = [
        {**_row("squad", "kint4c/vint4t-g32", 0.32, 0.80), "n": 300},
        _row("squad", "q2c50%+kint4c/vint4t-g32+sink1", 0.16, 0.70),
    ]
    path2 = tmp_path / "second.json"
    path2.write_text(json.dumps({"meta": {"fingerprint": "abc", "split": "calibration"}, "summary": second}))
    merged = report.merge_results([path, path2])
    assert len(merged["summary"]) == len(rows) + 1
    assert quality_table(merged).entries[grid.parse_name("kint4c/vint4t-g32").name] == 0.80
    assert cli.main(["calibrate", str(path), str(path2), "--out", str(out)]) == 0
    assert QualityTable.load(out).expected(grid.parse_name("q2c50%+kint4c/vint4t-g32+sink1")) == 0.70
    path2.write_text(json.dumps({"meta": {"fingerprint": "other"}, "summary": second}))
    with pytest.raises(ValueError, match="different models"):
        report.merge_results([path, path2])


def test_planner_check_picks_only_what_the_planner_can_send() -> None:
    """A measured config outside the planner's search space (a retention it never tries) is not its pick."""
    from kvlink.budget import plannable

    rows = [
        _row("squad", "q2c42.5%+kint4c/vint4t-g32", 0.14, 0.70),
        _row("squad", "q2c40%+kint4c/vint4t-g32", 0.13, 0.65),
    ]
    assert not plannable(grid.parse_name("q2c42.5%+kint4c/vint4t-g32")) and plannable(
        grid.parse_name("q2c40%+kint4c/vint4t-g32")
    )
    assert not plannable(grid.parse_name("kint4t/vint4t-g32"))  # keys per token: never searched
    table = quality_table({"meta": {}, "summary": rows}, "squad")
    check = report.planner_check(rows, table, (0.15,), "squad")[0]
    assert (check["pick"], check["best"]) == ("q2c40%+kint4c/vint4t-g32", "q2c42.5%+kint4c/vint4t-g32")


def test_gzipped_results_read_like_plain_ones(tmp_path: Path) -> None:
    import gzip

    meta = {"fingerprint": "abc", "split": "calibration"}
    results = {"meta": meta, "summary": [_row("squad", "kint4c/vint4t-g32", 0.32, 0.76)], "samples": []}
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json.gz").write_bytes(gzip.compress(json.dumps(results).encode()))
    assert report.load_results(run) == results == report.load_results(run / "results.json.gz")
    out = tmp_path / "quality.json"
    assert cli.main(["calibrate", str(run), "--out", str(out), "--budgets", "50%"]) == 0
    (run / "results.json.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="cannot read quality results"):
        report.load_results(run)


def _mixed_length_records() -> list[dict[str, Any]]:
    """Calibration-split samples of two configs: 4 SQuAD questions (~200 tokens), 3 long contexts of 2-3k
    and 2 of 5-6k tokens. Q2C 50% is good on the short ones only, Q2C 75% on the long ones only."""
    from kvlink.eval.splits import calibration_examples

    qids = [qa.qid for qa in calibration_examples()[:6]]
    short, long_ = "q2c50%+kint4c/vint4t-g32", "q2c75%+kint4c/vint4t-g32"
    fidelity = {  # (task, T) -> (short config's, long config's)
        ("squad", 180): (0.9, 0.6), ("squad", 190): (0.8, 0.5), ("squad", 210): (1.0, 0.7),
        ("squad", 230): (0.9, 0.6), ("long", 2100): (0.3, 0.8), ("long", 2600): (0.4, 0.9),
        ("long", 3100): (0.2, 0.7), ("long", 5000): (0.1, 0.6), ("long", 6000): (0.3, 0.8),
    }  # fmt: skip
    records = []
    for i, ((task, tokens), values) in enumerate(fidelity.items()):
        for config, value in zip((short, long_), values):
            frac = 0.16 if config == short else 0.235
            records.append({
                "eid": f"{task}:{qids[i % len(qids)]}", "task": task, "config": config, "T": tokens,
                "fidelity": value, "wire_frac": frac,
            })  # fmt: skip
    return records


def test_calibrate_gives_a_quality_per_context_length_bucket(tmp_path: Path) -> None:
    from kvlink.budget import QualityTable, quality_key

    records = _mixed_length_records()
    results = {
        "meta": {"fingerprint": "abc", "split": "calibration"},
        "summary": report.summarize(records, n_boot=20),
        "samples": records,
    }
    short, long_ = (grid.parse_name(n) for n in ("q2c50%+kint4c/vint4t-g32", "q2c75%+kint4c/vint4t-g32"))
    ks, kl = quality_key(short), quality_key(long_)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out, check = tmp_path / "quality.json", tmp_path / "check.json"
    argv = ["calibrate", str(path), "--task", "squad,long", "--budgets", "25%,18.75%", "--out", str(out)]
    assert cli.main([*argv, "--json", str(check)]) == 0
    table = QualityTable.load(out)
    assert [(b.lo, b.hi, b.n) for b in table.buckets] == [(0, 1024, 4), (1024, 4096, 3), (4096, 16384, 2)]
    means = [b.entries for b in table.buckets]
    assert means[0] == pytest.approx({ks: 0.9, kl: 0.6})  # the four SQuAD questions
    assert means[1] == pytest.approx({ks: 0.3, kl: 0.8})  # the three long contexts of 2-3k tokens
    assert means[2] == pytest.approx({ks: 0.2, kl: 0.7})
    # every length: the tasks' means weighted by their examples
    assert table.entries == pytest.approx({ks: (4 * 0.9 + 5 * 0.26) / 9, kl: (4 * 0.6 + 5 * 0.76) / 9})
    assert table.expected(short, tokens=200) > table.expected(long_, tokens=200)
    assert table.expected(short, tokens=2500) < table.expected(long_, tokens=2500)
    doc = json.loads(out.read_text())
    assert doc["grammar"] == 2 and [b["min_tokens"] for b in doc["buckets"]] == [0, 1024, 4096]
    checked = json.loads(check.read_text())
    assert checked["task"] == "squad,long" and {c["task"] for c in checked["checks"]} == {"squad", "long"}
    # The planner check looks quality up at each task's mean length: at 25% each task's pick is its own best.
    picks = {(c["task"], c["budget"]): c["pick"] for c in checked["checks"]}
    assert (
        picks["squad", 0.25] == "q2c50%+kint4c/vint4t-g32"
        and picks["long", 0.25] == "q2c75%+kint4c/vint4t-g32"
    )

    # SQuAD alone: one bucket, a flat table, as calibrate wrote before buckets.
    assert cli.main(["calibrate", str(path), "--task", "squad", "--out", str(out), "--budgets", "25%"]) == 0
    doc = json.loads(out.read_text())
    assert "buckets" not in doc and doc["entries"] == pytest.approx({ks: 0.9, kl: 0.6})
    assert doc["source"] == "kvlink-bench quality (squad, fidelity, n=4)"
    # The long task alone spans two buckets.
    long_only = quality_table(results, "long")
    assert [(b.lo, b.n) for b in long_only.buckets] == [(1024, 3), (4096, 2)]
    with pytest.raises(SystemExit, match="'needle'"):
        cli.main(["calibrate", str(path), "--task", "squad,needle", "--out", str(out)])


def test_length_buckets_from_summary_rows_without_samples() -> None:
    """Runs without samples count each row whole, in the bucket of its mean length; a row that does not say
    its length counts in none; a config two runs measured comes from the one with more examples."""
    from kvlink.budget import quality_key
    from kvlink.eval.commands.calibrate import length_buckets, task_list

    key = quality_key(grid.parse_name("kint4c/vint4t-g32"))
    first = {"summary": [
        {**_row("squad", "kint4c/vint4t-g32", 0.32, 0.8), "T": 199.4},
        {**_row("long", "kint4c/vint4t-g32", 0.32, 0.6), "T": 2400.0},
        _row("needle", "kint4c/vint4t-g32", 0.32, 0.5),
    ]}  # fmt: skip
    second = {"summary": [{**_row("long", "kint4c/vint4t-g32", 0.32, 0.7), "T": 2400.0, "n": 30}]}
    buckets = length_buckets([first, second], ["squad", "long", "needle"])
    assert [(b.lo, b.hi, b.entries, b.n) for b in buckets] == [
        (0, 1024, {key: 0.8}, 10),
        (1024, 4096, {key: pytest.approx(0.7)}, 30),
    ]
    table = quality_table({"meta": {}, "summary": first["summary"]}, "squad,long")
    assert [b.entries for b in table.buckets] == [{key: pytest.approx(0.8)}, {key: pytest.approx(0.6)}]
    assert table.entries == {key: pytest.approx(0.7)}  # 10 examples each
    assert task_list(" squad, long,squad ") == ["squad", "long"]
    with pytest.raises(ValueError, match="alone"):
        task_list("squad,all")


# --- tasks ---------------------------------------------------------------------------------------------
def test_needle_is_deterministic_and_present(tokenizer: Any) -> None:
    a = tasks.needle_examples(tokenizer, 3, seed=7, min_tokens=300, max_tokens=600)
    b = tasks.needle_examples(tokenizer, 3, seed=7, min_tokens=300, max_tokens=600)
    c = tasks.needle_examples(tokenizer, 3, seed=8, min_tokens=300, max_tokens=600)
    assert a == b and [e.meta for e in a] == [e.meta for e in b]
    assert [e.context for e in a] != [e.context for e in c]
    for e in a:
        sentence = tasks.NEEDLE_TEMPLATE.format(name=e.meta["name"], number=e.needle)
        assert e.context.count(sentence) == 1 and e.context.index(sentence) == e.meta["char_offset"]
        assert e.answers == (e.needle,) and e.meta["name"] in e.question
        assert 300 <= e.meta["tokens"] <= 600 and e.meta["tokens"] == e.encode(tokenizer)[0].numel()
    text, offset = tasks.insert_at_depth("One. Two. Three.", "Needle.", 0.0)
    assert text.startswith("Needle. One.") and offset == 0
    assert tasks.insert_at_depth("One. Two. Three.", "Needle.", 1.0)[0].endswith("Three. Needle.")


def test_long_context_lengths(tokenizer: Any) -> None:
    """Without a split (every article): paragraphs of the question's own article only."""
    kw: dict[str, Any] = {
        "limit": 3,
        "exclude": tasks.reserved_contexts(),
        "min_tokens": 1024,
        "max_tokens": 4096,
    }
    examples = tasks.long_examples(tokenizer, **kw)
    squad = {e.eid.split(":")[1]: e for e in tasks.squad_examples()}
    assert len(examples) == 3
    assert tasks.long_examples(tokenizer, **kw) == examples
    for e in examples:
        ctx, _ = e.encode(tokenizer)
        assert 1024 <= ctx.numel() <= 4096 and ctx.numel() == e.meta["tokens"]
        source = squad[e.eid.split(":")[1]]
        assert source.context in e.context and e.answers == source.answers
        assert e.meta["paragraphs"] >= 3 and e.meta["articles"] == 1 and "split" not in e.meta


def test_reserved_contexts_are_not_evaluated() -> None:
    reserved = set(tasks.reserved_contexts())
    assert set(tasks.calibration_texts(4)) <= reserved
    assert not any(e.context in reserved for e in tasks.squad_examples(exclude=reserved))


# --- reports and the CLI ----------------------------------------------------------------------------
def test_report_outputs_parse(text_lm: LoadedModel, squad2: list[tasks.Example], tmp_path: Path) -> None:
    configs = grid.resolve(
        ["fp16", "kint3c/vint3t-g32", "random50%+fp16", "q2c25%+kint4c/vint4t-g32"], text_lm.geometry
    )
    records, _ = grid.run_quality(text_lm, squad2, configs, tmp_path / "samples.jsonl", SMALL, progress=False)
    result = report.write_report(records, tmp_path, {"model": "tiny"}, {"kint3c/vint3t-g32": ["three"]})
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["samples"]) == 8 and {r["config"] for r in data["summary"]} == {c.name for c in configs}
    row = next(r for r in data["summary"] if r["config"] == "fp16")
    assert row["fidelity"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0} and row["n"] == 2
    f1_pct = row["f1_pct_full"]["mean"]
    assert math.isnan(f1_pct) or f1_pct == pytest.approx(100.0)  # NaN when the full KV scores 0
    assert data["frontier"]["squad"] and all(isinstance(r["frontier"], bool) for r in data["summary"])
    md = (tmp_path / "results.md").read_text()
    assert "| kint3c/vint3t-g32 (three) |" in md or "| *kint3c/vint3t-g32 (three) |" in md
    png = tmp_path / "pareto-squad.png"
    assert result["plots"] == [str(png)] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "command",
    [[], ["quality"], ["calibrate"], ["e2e"], ["report"], ["kernels"], ["scale"], ["-v", "kernels"]],
)
def test_cli_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: kvlink-bench" in capsys.readouterr().out


def test_cli_quality_report_calibrate(
    text_lm: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "model"
    text_lm.model.save_pretrained(model_dir)
    text_lm.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    listing = ["quality", "--model", str(model_dir), "--device", "cpu", "--out", str(out), "--list-configs"]
    assert cli.main(listing) == 0  # no --grid, no --configs: the default grid (ranks > head_dim 16 dropped)
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert names[0] == "fp16" and len(names) == len(grid.select_configs("default", geometry=text_lm.geometry))
    assert cli.main([*listing, "--configs", "seeds"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    # svd-r32/svd-r64 exceed head_dim 16
    assert names == ["fp16", "q2c75%+kint4c/vint4t-g32", "q2c50%+kint8c/vint8t-g32", "kint8c/vint4t-g32"]
    argv = [
        "quality", "--model", str(model_dir), "--task", "squad:2", "--device", "cpu",
        "--configs", "kint4c/vint4t-g32,q2c50%+kint8c/vint8t-g32", "--split", "calibration",
        "--out", str(out), "--no-progress", "--max-new-tokens", "3", "--ppl-tokens", "4",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 6  # fp16 is always run
    assert cli.main([*argv, "--resume"]) == 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 6
    with pytest.raises(SystemExit, match="no samples of the evaluation split"):
        cli.main(["report", str(out)])  # reports default to the evaluation split
    assert cli.main(["report", str(out), "--split", "calibration"]) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["max_new_tokens"] == 3 and meta["stats"]["pairs_run"] == 0 and meta["split"] == "calibration"
    table = tmp_path / "table.json"
    code = cli.main(["calibrate", str(out), "--out", str(table), "--budgets", "50%,30%"])
    assert code in (0, 1) and table.is_file()
    with pytest.raises(SystemExit, match="other settings"):
        cli.main([*argv[:-2], "--ppl-tokens", "5", "--resume"])


def test_cli_sensitivity_then_mix_configs(
    text_lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """kvlink-bench sensitivity writes the model's profile where `quality` finds it for per-layer
    (kmix.../vmix...+bits-<id>) names."""
    from kvlink.layerbits import Sensitivity, default_path

    monkeypatch.setenv("KVLINK_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    text_lm.model.save_pretrained(model_dir)
    text_lm.tokenizer.save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--device", "cpu", "--no-progress"]
    assert cli.main(["sensitivity", *common, "--limit", "2", "--group-size", "16", "--batch", "3"]) == 0
    [path] = (tmp_path / "cache" / "sensitivity").iterdir()  # <cache>/sensitivity/<fingerprint>.json
    assert path == default_path(path.stem)
    profile = Sensitivity.load(path)
    assert profile.examples == 2 and profile.num_layers == 2 and profile.group_size == 16
    assert "mix3:" in capsys.readouterr().out
    k_bits, v_bits = profile.allocate(3.0)
    expected = build(group_size=16, sink=1, k_layer_bits=k_bits, v_layer_bits=v_bits)
    # the recipe name of the allocation at 3 bits on average: its bits-<id> comes from the profile
    name = expected.name
    assert "+bits-" in name
    argv = ["quality", *common, "--task", "squad:1", "--configs", name, "--out", str(tmp_path / "q")]
    monkeypatch.setenv("KVLINK_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match="kvlink-bench sensitivity"):
        cli.main(argv)  # no profile for this model here
    monkeypatch.setenv("KVLINK_CACHE", str(tmp_path / "cache"))
    assert cli.main(argv) == 0
    meta = json.loads((tmp_path / "q" / "run.json").read_text())
    mix = next(c for c in meta["configs"] if c["name"] == name)
    recorded = Recipe.from_dict(mix)
    assert recorded == expected
    bits = {
        kind: tuple(int(q.format.removeprefix("int")) for q in recorded.quantizers(kind)) for kind in "kv"
    }
    assert (bits["k"], bits["v"]) == profile.allocate(3.0)
    row = next(r for r in report.load_results(tmp_path / "q")["summary"] if r["config"] == name)
    assert "+bits-" in row["key"] and row["family"] == "quant"


# --- e2e ---------------------------------------------------------------------------------------------
def test_paced_link_paces() -> None:
    link = PacedSocketPair(8e6)  # 1 MB/s
    try:
        received: list[bytes] = []
        seconds = framed_transfer(link, [b"x" * 100_000, b"y" * 50_000], received.append)
    finally:
        link.close()
    assert [len(r) for r in received] == [100_000, 50_000]
    assert 0.13 <= seconds < 1.0
    assert parse_bandwidth("100M") == 1e8 and parse_bandwidth("10Gbit") == 1e10


def test_e2e_example(text_lm: LoadedModel, squad2: list[tasks.Example]) -> None:
    configs = grid.resolve(["q2c50%+kint4c/vint4t-g32", "kint4c/vint4t-g32+round-query"], text_lm.geometry)
    started = time.perf_counter()
    rows = e2e_example(text_lm, squad2[0], configs, [1e9], repeats=1)
    assert time.perf_counter() - started < 30
    by = {r["method"]: r for r in rows}
    q2c50, qround = "q2c50%+kint4c/vint4t-g32", "kint4c/vint4t-g32+round-query"
    assert set(by) == {q2c50, qround, "fp16-kv", "text"}
    assert by[q2c50]["bytes"] < by[qround]["bytes"] < by["fp16-kv"]["bytes"]  # observed queries, no selection
    assert by[q2c50]["bytes"] < by["fp16-kv"]["bytes"] and by["text"]["bytes"] < by[q2c50]["bytes"]
    assert by["fp16-kv"]["token"] == by["text"]["token"]  # the full KV answers as a re-prefill does
    for r in rows:
        assert r["ttft_s"] > 0 and r["transfer_s"] > 0
    summary = e2e_summary(rows)
    entry = next(e for e in summary if e["method"] == q2c50)
    assert entry["fp16_over_this"] > 0 and entry["text_over_this"] > 0


# --- entropy coding bound ------------------------------------------------------------------------------
def test_entropy_of_codes_is_measured_against_zstd() -> None:
    from kvlink.cache import ContextKV
    from kvlink.eval import entropy
    from kvlink.models import Geometry

    assert entropy.entropy_bits(torch.zeros(100)) == 0.0
    assert entropy.entropy_bits(torch.arange(4).repeat(25)) == pytest.approx(200.0)  # 2 bits x 100
    x = torch.tensor([0, 1, 0, 1, 0, 1])  # each symbol fixed by its predecessor: 0 bits given it
    assert entropy.conditional_entropy_bits(x[1:], x[:-1], 2) == pytest.approx(0.0)
    g = Geometry(num_layers=2, kv_heads=1, head_dim=8, q_heads=1)
    torch.manual_seed(0)
    noise = ContextKV([torch.rand(1, 64, 8) for _ in range(2)], [torch.rand(1, 64, 8) for _ in range(2)],
                      [torch.arange(64)] * 2, 64)  # fmt: skip
    smooth = ContextKV([torch.linspace(0, 1, 64).view(1, 64, 1).expand(1, 64, 8).contiguous()] * 2,
                       [torch.ones(1, 64, 8)] * 2, [torch.arange(64)] * 2, 64)  # fmt: skip
    config = build(k_bits=4, v_bits=4)
    a = entropy.code_statistics(noise, config, g)
    b = entropy.code_statistics(smooth, config, g)
    assert a["codes_bytes"] == b["codes_bytes"] == 4 * 64 * 8 // 2
    assert a["order0_bytes"] > 0.9 * a["codes_bytes"]  # uniform noise: nothing to gain
    assert b["order1_bytes"] < 0.5 * b["order0_bytes"] <= b["codes_bytes"]  # a ramp: predictable
    s = entropy.summarize([a, b])
    assert s["messages"] == 2 and 0 < s["codes_share"] < 1 and s["zstd_saving"] >= 0
