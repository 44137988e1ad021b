"""kvlink-bench holdout: the quality table's entries and gains checked on evaluation-split samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvlink.budget import QualityTable
from kvlink.eval import holdout
from kvlink.eval.cli import main
from kvlink.eval.splits import calibration_examples, evaluation_examples
from kvlink.recipe import Recipe

PICK = "q2c90%/layer+kint4c/vint3t-g64+sink1+round-query+kwidths-question+vwidths-question"
TWIN = "q2c90%+kint4c/vint3t-g64"
INT4 = "kint4c/vint4t-g32"


def _samples(fidelity: dict[str, list[float]], eids: list[str], wire: float = 0.25) -> list[dict]:
    return [
        {"eid": eid, "task": "squad", "config": name, "fidelity": v, "wire_frac": wire, "T": 200}
        for name, values in fidelity.items()
        for eid, v in zip(eids, values, strict=True)
    ]


@pytest.fixture(scope="module")
def eids() -> list[str]:
    return [f"squad:{e.qid}" for e in evaluation_examples()[:60]]


def test_twins_drop_the_refinements():
    assert holdout.plain_twin(Recipe.from_name(PICK)).name == TWIN
    xpred = holdout.twins(Recipe.from_name("xpred+kint2c/vint2t-g64+sink1"))
    assert [t.name for t in xpred] == [
        "kint2c/vint2t-g64+sink1",
        "xpred+kint2c/vint2t-g64",
        "kint2c/vint2t-g64",
    ]
    assert holdout.twins(Recipe.from_name(INT4)) == []
    assert holdout.plain_twin(Recipe.from_name(INT4)).name == INT4
    assert holdout.plain_twin(Recipe.from_name("kint4c/vint4t-g32+sink1+rot")).name == INT4


def test_verdicts_follow_the_interval(eids):
    rng = np.random.default_rng(0)
    pick = list(np.clip(0.8 + 0.1 * rng.standard_normal(len(eids)), 0, 1))
    int4 = list(np.clip(0.7 + 0.1 * rng.standard_normal(len(eids)), 0, 1))
    fp16 = [1.0] * len(eids)
    table = QualityTable(entries={PICK: 0.95, INT4: float(np.mean(int4)), "fp16": 1.0})
    cells, pairs = holdout.check(_samples({PICK: pick, INT4: int4, "fp16": fp16}, eids), table)
    by = {c.config: c for c in cells}
    assert by[PICK].verdict == "overstated" and by[PICK].hi < 0.95  # the table promised more
    assert by[INT4].verdict == "holds" and by[INT4].lo <= by[INT4].table <= by[INT4].hi
    assert by["fp16"].verdict == "holds" and by["fp16"].n == len(eids)
    low = QualityTable(entries={PICK: 0.5})
    cells, _ = holdout.check(_samples({PICK: pick, INT4: int4}, eids), low)
    by = {c.config: c for c in cells}
    assert by[PICK].verdict == "understated" and by[INT4].verdict == "not in table"
    assert pairs == []  # no config met its plain twin


def test_a_table_per_length_is_held_to_each_samples_length(eids):
    """Half the contexts short, half long, the table rating the config 0.6 below 4k tokens and 0.9 above:
    the table promises 0.75 on these samples, which is what they kept. One lookup at a typical length
    would call it understated or overstated."""
    from kvlink.budget import LengthBucket

    half = len(eids) // 2
    samples = [
        {"eid": eid, "task": "squad", "config": PICK, "fidelity": 0.6 if i < half else 0.9,
         "wire_frac": 0.1, "T": 2000 if i < half else 6000}
        for i, eid in enumerate(eids[: 2 * half])
    ]  # fmt: skip
    table = QualityTable(buckets=(LengthBucket(0, 4096, {PICK: 0.6}), LengthBucket(4096, None, {PICK: 0.9})))
    (cell,), _ = holdout.check(samples, table)
    assert cell.table == pytest.approx(0.75) and cell.verdict == "holds"
    only_long = QualityTable(buckets=(LengthBucket(4096, None, {PICK: 0.9}),))
    (cell,), _ = holdout.check(samples, only_long)
    assert cell.table is None and cell.verdict == "not in table"  # nothing measured at 2k tokens


def test_a_gain_over_the_twin_is_paired(eids):
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.8, len(eids))
    samples = _samples({PICK: list(base + 0.05), TWIN: list(base)}, eids)
    _, pairs = holdout.check(samples, QualityTable())
    (pair,) = pairs
    assert (pair.config, pair.twin, pair.n) == (PICK, TWIN, len(eids))
    assert pair.diff == pytest.approx(0.05) and pair.holds  # paired: the spread of `base` cancels
    noise = rng.normal(0, 0.05, len(eids))
    samples = _samples({PICK: list(base + noise - noise.mean()), TWIN: list(base)}, eids)
    (pair,) = holdout.check(samples, QualityTable())[1]
    assert pair.lo < 0 < pair.hi and not pair.holds


def test_calibration_examples_are_refused(eids):
    cal = f"squad:{calibration_examples()[0].qid}"
    samples = _samples({INT4: [0.5] * (len(eids) + 1)}, [*eids, cal])
    with pytest.raises(ValueError, match="evaluation-split examples only") as exc:
        holdout.check(samples, QualityTable())
    assert cal in str(exc.value) and "calibration split" in str(exc.value) and "1 of 61" in str(exc.value)


def test_the_command_writes_json(tmp_path: Path, eids, capsys):
    run = tmp_path / "run"
    run.mkdir()
    samples = _samples({PICK: [0.9] * len(eids), TWIN: [0.8] * len(eids)}, eids)
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    table = tmp_path / "table.json"
    QualityTable(entries={PICK: 0.7, TWIN: 0.8}).save(table)
    out = tmp_path / "holdout.json"
    assert main(["holdout", str(run), "--table", str(table), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    cells = {c["config"]: c for c in doc["cells"]}
    assert cells[PICK]["verdict"] == "understated" and cells[TWIN]["verdict"] == "holds"
    assert doc["verdicts"]["understated"] == 1 and doc["pairs"][0]["holds"] is True
    assert f"`{PICK}`" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--pair takes CONFIG=TWIN"):
        main(["holdout", str(run), "--table", str(table), "--pair", PICK])
    with pytest.raises(SystemExit, match="did not measure"):
        main(["holdout", str(run), "--table", str(table), "--pair", f"{PICK}=fp16"])


def test_the_gate_keeps_a_refinement_only_when_its_gain_holds(eids):
    rng = np.random.default_rng(2)
    base = rng.uniform(0.2, 0.8, len(eids))
    held = "kint4c/vint4t-g32+sink1"  # its gain over INT4 holds below
    unshown = "kint4c/vint4t-g32+sink1+round-query"  # never measured on the evaluation split
    noise = rng.normal(0, 0.05, len(eids))
    samples = _samples(
        {
            PICK: list(base + noise - noise.mean()),
            TWIN: list(base),
            held: list(base + 0.04),
            INT4: list(base),
        },
        eids,
    )
    table = QualityTable(entries={PICK: 0.9, TWIN: 0.8, held: 0.85, INT4: 0.8, unshown: 0.9, "fp16": 1.0})
    gated, dropped = holdout.gate(table, holdout.check(samples, table)[1])
    assert set(gated.entries) == {TWIN, held, INT4, "fp16"}  # plain configs always stay
    assert set(dropped) == {PICK, unshown}
    assert "does not hold" in dropped[PICK] and "not paired" in dropped[unshown]
    # Left out, the pick is looked up through its twin (the table's discount per difference), not 0.9.
    assert gated.expected(Recipe.from_name(PICK)) < 0.8


def test_the_gate_asks_for_the_gain_over_the_plain_twin_only(eids):
    """A pick whose gain over its plain twin holds stays though it does not beat an intermediate twin (the
    same config less its last refinement); a config paired only with an intermediate twin is left out."""
    middle = "q2c90%/layer+kint4c/vint3t-g64+sink1+round-query"  # the pick less its widths
    base = np.linspace(0.2, 0.8, len(eids))
    samples = _samples({PICK: list(base + 0.08), middle: list(base + 0.08), TWIN: list(base)}, eids)
    _, pairs = holdout.check(samples, QualityTable(entries={}))
    assert {(p.config, p.twin): p.holds for p in pairs} == {(PICK, middle): False, (PICK, TWIN): True,
                                                            (middle, TWIN): True}  # fmt: skip
    table = QualityTable(entries={PICK: 0.9, middle: 0.88, TWIN: 0.8})
    kept, dropped = holdout.gate(table, pairs)
    assert set(kept.entries) == {PICK, middle, TWIN} and dropped == {}
    no_plain = [p for p in pairs if p.twin != TWIN]
    kept, dropped = holdout.gate(table, no_plain)
    assert set(dropped) == {PICK, middle} and f"its plain twin {TWIN!r}" in dropped[PICK]


def test_the_gate_leaves_the_lengths_it_did_not_see(eids):
    """SQuAD pairs (~200 tokens) gate the table's short bucket only: the same refinement's entry at 4k+
    tokens, where nothing paired it, stays, and the short bucket's lookup does not fall back to it."""
    from kvlink.budget import LengthBucket

    base = np.linspace(0.2, 0.8, len(eids))
    samples = _samples({PICK: list(base - 0.05), TWIN: list(base)}, eids)  # the gain does not hold
    short = LengthBucket(0, 1024, {PICK: 0.9, TWIN: 0.8}, n=60)
    long_ = LengthBucket(4096, 16384, {PICK: 0.88, TWIN: 0.79}, n=60)
    table = QualityTable(entries={PICK: 0.89, TWIN: 0.795}, buckets=(short, long_))
    pairs = holdout.check(samples, table)[1]
    kept, dropped = holdout.gate(table, pairs, [s["T"] for s in samples])
    assert set(dropped) == {PICK}
    assert set(kept.buckets[0].entries) == {TWIN} and kept.buckets[1].entries == long_.entries
    assert PICK not in kept.entries and "buckets 0-1024 tokens" in kept.source
    pick = Recipe.from_name(PICK)
    assert kept.measured(pick, 6000) == 0.88  # its long-context figure stands
    assert kept.measured(pick, 200) is None and kept.expected(pick, tokens=200) < 0.8  # through its twin
    everywhere, _ = holdout.gate(table, pairs)  # no lengths: every bucket gated, as before
    assert all(PICK not in b.entries for b in everywhere.buckets)


def test_calibrate_takes_a_holdout_run(tmp_path: Path, eids):
    from kvlink.eval.commands.calibrate import gated

    run = tmp_path / "eval"
    run.mkdir()
    base = np.linspace(0.2, 0.8, len(eids))
    samples = _samples({PICK: list(base - 0.05), TWIN: list(base)}, eids)
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    table = QualityTable(entries={PICK: 0.9, TWIN: 0.8})
    kept, dropped = gated(table, [run], ["squad"], "fidelity")
    assert set(kept.entries) == {TWIN} and "squad: gain over" in dropped[PICK] and "-0.050" in dropped[PICK]
    assert gated(table, [], ["squad"], "fidelity") == (table, {})
    cal = tmp_path / "cal"
    cal.mkdir()
    (cal / "samples.jsonl").write_text(
        json.dumps({**samples[0], "eid": f"squad:{calibration_examples()[0].qid}"}) + "\n"
    )
    with pytest.raises(ValueError, match="evaluation-split examples only"):
        gated(table, [cal], ["squad"], "fidelity")


def test_runs_pair_across_each_other_where_their_full_kv_answers_agree(eids):
    """A config measured in one run pairs with its twin measured in another, question by question, but
    only on the questions both runs answered alike at full KV (each fidelity scores against its own run's
    full-KV answer); a config in both runs keeps the first run's samples."""
    base = np.linspace(0.2, 0.8, len(eids))
    first = [
        {**s, "ref_answer": "Paris"}
        for s in _samples({PICK: list(base + 0.1), "fp16": [1.0] * len(eids)}, eids)
    ]
    second = [
        {**s, "ref_answer": "Paris"} for s in _samples({TWIN: list(base), "fp16": [0.5] * len(eids)}, eids)
    ]
    for s in second:
        if s["eid"] in eids[:5]:
            s["ref_answer"] = "Lyon"  # these five questions came out differently at full KV
    records, split = holdout.combine([first, second])
    assert split == sorted(eids[:5])
    assert {r["eid"] for r in records} == set(eids[5:])
    assert all(r["fidelity"] == 1.0 for r in records if r["config"] == "fp16")  # the first run's
    assert len(records) == 3 * (len(eids) - 5)
    pairs = holdout.check(records, QualityTable(entries={}))[1]
    assert [(p.config, p.twin, p.n) for p in pairs] == [(PICK, TWIN, len(eids) - 5)]
    assert pairs[0].diff == pytest.approx(0.1) and pairs[0].holds


def test_calibrate_gates_each_task_in_the_buckets_its_samples_fall_in(tmp_path: Path, eids):
    """A SQuAD run gates the short bucket and a long run the long one, each by its own pairs: the pick's
    gain holds on SQuAD and not at 5k tokens, so it leaves the long bucket only; a refined config no long
    run paired leaves the long bucket too, and keeps its SQuAD place."""
    from kvlink.budget import LengthBucket
    from kvlink.eval.commands.calibrate import gated

    other = "q2c40%/layer+kint4c/vint3t-g64+sink1"  # twin q2c40%+kint4c/vint3t-g64
    base = np.linspace(0.2, 0.8, len(eids))
    squad = _samples({PICK: list(base + 0.1), TWIN: list(base), other: list(base + 0.1),
                      "q2c40%+kint4c/vint3t-g64": list(base)}, eids)  # fmt: skip
    long_eids = [e.replace("squad:", "long:") for e in eids]
    long_ = [
        {**s, "task": "long", "T": 5000}
        for s in _samples({PICK: list(base - 0.05), TWIN: list(base)}, long_eids)
    ]
    runs = []
    for name, samples in (("squad", squad), ("long", long_)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        runs.append(tmp_path / name)
    entries = {PICK: 0.9, TWIN: 0.8, other: 0.85}
    table = QualityTable(
        entries=dict(entries),
        buckets=(LengthBucket(0, 1024, dict(entries), n=60), LengthBucket(4096, 16384, dict(entries), n=60)),
    )
    kept, dropped = gated(table, runs, ["squad", "long"], "fidelity")
    assert set(kept.buckets[0].entries) == {PICK, TWIN, other}
    assert set(kept.buckets[1].entries) == {TWIN}
    assert dropped[PICK].startswith("long: gain over") and dropped[other].startswith("long: not paired")
    only_squad, _ = gated(table, runs[:1], ["squad", "long"], "fidelity")  # no long run: long ungated
    assert only_squad.buckets[1].entries == entries
    with pytest.raises(ValueError, match="no samples of needle"):
        gated(table, runs, ["needle"], "fidelity")


def test_samples_are_read_from_a_kept_results_file(tmp_path: Path, eids):
    import gzip

    samples = _samples({INT4: [0.5] * len(eids)}, eids)
    (tmp_path / "results.json.gz").write_bytes(
        gzip.compress(json.dumps({"summary": [], "samples": samples}).encode())
    )
    assert holdout.read_samples(tmp_path) == samples
    with pytest.raises(ValueError, match="no samples in"):
        holdout.read_samples(tmp_path / "absent")


def test_a_table_is_held_only_to_the_metric_it_rates(tmp_path: Path, eids, capsys):
    """The shipped table rates answer fidelity; checked with `--quality needle` (how often the hidden number
    is found) its entries would be compared with a different quantity. They are not, the pairs still are;
    a table calibrated on the needle rate (`calibrate --quality needle`) is held to it."""
    base = np.linspace(0.2, 0.8, len(eids))
    samples = [
        {**s, "needle": s["fidelity"] - 0.5}
        for s in _samples({PICK: list(base + 0.05), TWIN: list(base)}, eids)
    ]
    fidelity_table = QualityTable(entries={PICK: 0.55, TWIN: 0.5})
    cells, pairs = holdout.check(samples, fidelity_table, quality="needle")
    assert {c.verdict for c in cells} == {"table rates another metric"} and {c.table for c in cells} == {None}
    (pair,) = pairs
    assert pair.diff == pytest.approx(0.05) and pair.holds
    assert {c.verdict for c in holdout.check(samples, fidelity_table)[0]} == {"holds"}  # its own metric
    needle_table = QualityTable(entries={PICK: 0.9, TWIN: 0.0}, metric="needle")
    path = tmp_path / "needle.json"
    needle_table.save(path)
    loaded = QualityTable.load(path)
    assert loaded.metric == "needle" and json.loads(path.read_text())["metric"] == "needle"
    by = {c.config: c for c in holdout.check(samples, loaded, quality="needle")[0]}
    assert by[PICK].verdict == "overstated" and by[TWIN].verdict == "holds"
    fidelity_table.save(path)  # a fidelity table's file is as before the metric was named
    assert "metric" not in json.loads(path.read_text()) and QualityTable.load(path).metric == "fidelity"
    run = tmp_path / "run"
    run.mkdir()
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    out = tmp_path / "holdout.json"
    assert main(["holdout", str(run), "--table", str(path), "--quality", "needle", "--json", str(out)]) == 0
    assert "rates fidelity, not needle" in capsys.readouterr().out
    assert json.loads(out.read_text())["verdicts"]["table rates another metric"] == 2


def test_calibrate_names_the_metric_its_table_rates():
    from kvlink.eval.commands.calibrate import quality_table

    row = {
        "task": "squad",
        "config": TWIN,
        "key": TWIN,
        "n": 3,
        "fidelity": {"mean": 0.9},
        "needle": {"mean": 0.4},
    }
    assert quality_table({"meta": {}, "summary": [row]}, "squad").metric == "fidelity"
    table = quality_table({"meta": {}, "summary": [row]}, "squad", "needle")
    assert table.metric == "needle" and table.entries == {TWIN: 0.4}
