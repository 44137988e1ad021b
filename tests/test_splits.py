"""kvlink.eval.splits: the calibration/evaluation split by article, the tasks built on it, and the refusals.

Text tasks use the embedded model's tokenizer; the CLI round trip uses a tiny random Llama of the same
vocabulary (no test loads the 135M weights).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kvlink.eval import cli, splits, tasks
from kvlink.eval.commands.report import split_records
from kvlink.eval.squad import load_squad


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from kvlink.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


# --- the split ---------------------------------------------------------------------------------------
def test_split_is_by_article_disjoint_and_covers_every_question() -> None:
    file_titles = list(dict.fromkeys(qa.title for qa in load_squad(answerable_only=False)))
    cal, ev = set(splits.CALIBRATION_TITLES), set(splits.EVALUATION_TITLES)
    assert len(cal) == len(ev) == 4 and not cal & ev and cal | ev == set(file_titles)
    calibration, evaluation = splits.calibration_examples(), splits.evaluation_examples()
    assert {qa.title for qa in calibration} == cal and {qa.title for qa in evaluation} == ev
    cal_ids, ev_ids = {qa.qid for qa in calibration}, {qa.qid for qa in evaluation}
    assert not cal_ids & ev_ids
    assert cal_ids | ev_ids == {qa.qid for qa in load_squad()}  # every answerable question, once
    assert (len(cal_ids), len(ev_ids)) == (636, 642)
    # no paragraph is on both sides (questions share paragraphs, never across the split)
    assert not {qa.context for qa in calibration} & {qa.context for qa in evaluation}
    all_cal = splits.calibration_examples(answerable_only=False)
    all_ev = splits.evaluation_examples(answerable_only=False)
    assert len(all_cal) + len(all_ev) == len(load_squad(answerable_only=False)) == 2805
    assert splits.split_titles("calibration") == splits.CALIBRATION_TITLES
    with pytest.raises(ValueError, match="split must be one of"):
        splits.split_titles("test")


def test_split_is_balanced_and_keeps_the_tuned_questions_on_the_calibration_side() -> None:
    counts = {t: n for side in splits.split_counts().values() for t, (n, _) in side.items()}
    titles = list(counts)
    total = sum(counts.values())
    diffs = sorted(
        abs(total - 2 * sum(counts[t] for t in four)) for four in itertools.combinations(titles, 4)
    )  # each 4/4 split appears twice (either side first)
    ours = abs(total - 2 * sum(counts[t] for t in splits.CALIBRATION_TITLES))
    assert ours == 6 and diffs[:4] == [2, 2, 6, 6]  # only one split is closer (640 / 638)
    # what issue 7 tuned on (the first 300 answerable questions) and the profiles' reserved article
    first300 = [qa.title for qa in load_squad()[:300]]
    assert sum(splits.split_of_title(t) == "calibration" for t in first300) == 293
    assert set(tasks.reserved_contexts()) <= {
        qa.context for qa in splits.calibration_examples(answerable_only=False)
    }


def test_split_of_an_example_id() -> None:
    cal, ev = splits.calibration_examples()[0], splits.evaluation_examples()[0]
    assert splits.split_of_eid(f"squad:{cal.qid}") == "calibration"
    assert splits.split_of_eid(f"long:{ev.qid}") == "evaluation"
    assert splits.article_of_eid(f"long:{ev.qid}") == ev.title
    assert splits.split_of_eid(splits.needle_eid("calibration", 0, 3)) == "calibration"
    assert splits.split_of_eid("needle:0-3") is None  # built from every article
    assert splits.split_of_eid("squad:not-a-question") is None and splits.split_of_eid("t:1") is None


def test_refusal_names_the_example_and_its_article() -> None:
    cal = tasks.squad_examples(limit=3, split="calibration")
    assert splits.require_calibration(cal) == 3
    assert splits.require_calibration([{"eid": e.eid} for e in cal]) == 3  # sample records too
    ev = tasks.squad_examples(limit=2, split="evaluation")
    with pytest.raises(ValueError) as exc:
        splits.require_calibration([*cal, *ev], "a quality table")
    text = str(exc.value)
    assert ev[0].eid in text and repr(ev[0].title) in text and "evaluation split" in text
    assert "a quality table" in text and "2 such examples" in text
    with pytest.raises(ValueError, match="belongs to no split"):
        splits.require_calibration([{"eid": "needle:0-1"}])


def test_a_file_with_other_articles_has_no_split(tmp_path: Path) -> None:
    other = {"data": [{"title": "Amazon_rainforest", "paragraphs": [
        {"context": "The Amazon is wet.", "qas": [{"id": "x1", "question": "Is it wet?",
                                                  "answers": [{"text": "wet", "answer_start": 14}]}]}]}]}  # fmt: skip
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="Amazon_rainforest"):
        tasks.squad_examples(path, split="evaluation")
    assert len(tasks.squad_examples(path)) == 1  # without a split: every article, as before


# --- tasks on a split ----------------------------------------------------------------------------------
def _paragraph_split() -> dict[str, str]:
    return {qa.context: splits.split_of_title(qa.title) or "" for qa in load_squad(answerable_only=False)}


def test_squad_and_long_tasks_draw_from_their_split_only(tokenizer: Any) -> None:
    squad = tasks.squad_examples(split="evaluation")
    assert len(squad) == 642 and {e.meta["split"] for e in squad} == {"evaluation"}
    where = _paragraph_split()
    lo, hi = tasks.LONG_TOKENS
    assert (lo, hi) == (2048, 7936)
    # the last articles of the split are the short ones: their questions need the split's other articles
    long = tasks.long_examples(tokenizer, split="evaluation", seed=1)
    assert len(long) == 642  # every question reaches every length with the split's filler
    assert tasks.long_examples(tokenizer, limit=2, split="evaluation", seed=1) == long[:2]
    for e in long[::97]:
        ctx, _ = e.encode(tokenizer)
        assert lo <= ctx.numel() <= hi and ctx.numel() == e.meta["tokens"]
        paragraphs = e.context.split("\n\n")
        assert all(where[p] == "evaluation" for p in paragraphs)  # nothing from the calibration split
        assert splits.split_of_eid(e.eid) == "evaluation" and e.meta["split"] == "evaluation"
    short = [e for e in long if e.title == "1973_oil_crisis" and e.meta["tokens"] > 5000]
    assert short and all(e.meta["articles"] > 1 for e in short)  # ~4.5k tokens of its own


def test_examples_option_runs_only_the_named_examples_of_the_draw(tokenizer: Any, tmp_path: Path) -> None:
    """--examples keeps the draw's examples (the very contexts, in the draw's order) whose ids it names,
    from a list or a file, and refuses an id the draw does not hold, naming it."""
    from argparse import Namespace
    from types import SimpleNamespace

    from kvlink.eval.commands.common import example_ids, split_tasks

    lm = SimpleNamespace(tokenizer=tokenizer)
    args = Namespace(split="evaluation", long_tokens=None, data=None, seed=0, exclude_fit_text=False)
    specs = [("squad", 6), ("long", 4)]
    drawn = split_tasks(args, lm, specs)
    wanted = [drawn[7].eid, drawn[1].eid]  # out of order: the draw's order is kept
    (tmp_path / "ids").write_text(f"# re-run these\n{wanted[0]}\n\n{wanted[1]}  # a comment\n")
    for text in (",".join(wanted), f"@{tmp_path / 'ids'}"):
        chosen = split_tasks(Namespace(**vars(args), examples=example_ids(text)), lm, specs)
        assert chosen == [drawn[1], drawn[7]]
    foreign = tasks.squad_examples(split="calibration")[0].eid
    with pytest.raises(
        SystemExit, match=f"1 of 2 ids are not among the 10 examples squad:6, long:4 .*{foreign}"
    ):
        split_tasks(Namespace(**vars(args), examples=(wanted[0], foreign)), lm, specs)
    with pytest.raises(argparse.ArgumentTypeError, match="names no example id"):
        example_ids(" , ")
    with pytest.raises(argparse.ArgumentTypeError, match="No such file"):
        example_ids(f"@{tmp_path / 'none'}")


def test_needle_filler_comes_from_the_split(tokenizer: Any) -> None:
    where = _paragraph_split()
    items = tasks.needle_examples(tokenizer, 3, seed=5, split="calibration")
    assert items == tasks.needle_examples(tokenizer, 3, seed=5, split="calibration")
    for e in items:
        assert e.eid.startswith("needle:calibration:5-") and splits.split_of_eid(e.eid) == "calibration"
        assert tasks.LONG_TOKENS[0] <= e.meta["tokens"] <= tasks.LONG_TOKENS[1]
        needle = tasks.NEEDLE_TEMPLATE.format(name=e.meta["name"], number=e.needle)
        for p in e.context.split("\n\n"):
            if needle not in p:
                assert where[p] == "calibration"
    assert splits.require_calibration(items) == 3


# --- through the CLI ---------------------------------------------------------------------------------------
def _tiny_model_dir(tokenizer: Any, path: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8192, eos_token_id=2, bos_token_id=1, pad_token_id=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_calibrate_refuses_evaluation_examples_through_the_cli(tokenizer: Any, tmp_path: Path) -> None:
    model_dir = _tiny_model_dir(tokenizer, tmp_path / "model")
    base = [
        "quality", "--model", str(model_dir), "--device", "cpu", "--task", "squad:1", "--configs", "kint4c/vint4t-g32",
        "--no-progress", "--no-ppl", "--max-new-tokens", "2",
    ]  # fmt: skip
    evaluation, calibration = tmp_path / "ev", tmp_path / "cal"
    assert cli.main([*base, "--out", str(evaluation)]) == 0  # the default split: evaluation
    assert cli.main([*base, "--out", str(calibration), "--split", "calibration"]) == 0
    first = splits.evaluation_examples()[0]
    with pytest.raises(SystemExit) as exc:
        cli.main(["calibrate", str(evaluation), "--out", str(tmp_path / "t.json"), "--budgets", "50%"])
    assert f"squad:{first.qid}" in str(exc.value) and repr(first.title) in str(exc.value)
    assert "evaluation split" in str(exc.value) and not (tmp_path / "t.json").exists()
    with pytest.raises(SystemExit, match="evaluation split"):  # one bad run among good ones is enough
        cli.main(["calibrate", str(calibration), str(evaluation), "--out", str(tmp_path / "t.json")])
    assert cli.main(
        ["calibrate", str(calibration), "--out", str(tmp_path / "t.json"), "--budgets", "50%"]
    ) in (0, 1)
    assert (tmp_path / "t.json").is_file()
    # a results file without samples is taken only when its meta says calibration
    data = json.loads((calibration / "results.json").read_text())
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"meta": {**data["meta"], "split": "evaluation"}, "summary": data["summary"]}))
    with pytest.raises(SystemExit, match="no samples"):
        cli.main(["calibrate", str(bare), "--out", str(tmp_path / "t2.json")])
    # reports: the evaluation split by default; a run of the other split says what it holds
    assert cli.main(["report", str(evaluation)]) == 0
    with pytest.raises(SystemExit, match="1 calibration"):
        cli.main(["report", str(calibration)])
    records = [json.loads(line) for line in (evaluation / "samples.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"evaluation"}
    assert split_records(records, "calibration") == [] and split_records(records, "all") == records
