"""Does the planner's quality table hold on data nobody tuned on?

The quality table (kvlink.budget.QualityTable) is measured on the CALIBRATION split; the planner ranks
configs by it. This module checks it against a quality run on the EVALUATION split
(kvlink.eval.splits), config by config:

- each config the run measured and the table holds: the evaluation mean with its bootstrap 95% CI
  next to the table's entry, and a verdict: `holds` (the entry lies in the CI), `overstated` (above
  it: the table promises more than unseen data give) or `understated` (below it);
- each config against each of its twins measured in the same run (the same recipe less one or more of
  its refinements: cross-layer prediction, sink entries, per-layer sets, rotation, question-aware
  rounding and widths), the paired difference over the same questions with its CI: a refinement's
  gain `holds` when the interval lies above 0.

    kvlink-bench holdout bench/results/eval-squad320-cpu --json bench/results/eval-squad320-cpu/holdout.json

Only evaluation-split samples are read: a run holding any other example is refused (a check on
calibration data would be the winner's curse the split exists to avoid).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvlink.budget import LengthBucket, QualityTable, fitted_key, quality_key, split_fitted
from kvlink.eval.report import bootstrap_ci
from kvlink.eval.splits import EVALUATION, article_of_eid, split_of_eid
from kvlink.recipe import Recipe

VERDICTS: tuple[str, ...] = (
    "holds",
    "overstated",
    "understated",
    "not in table",
    "table rates another metric",
)
TOLERANCE = 1e-9
"""How far outside the interval an entry may lie and still hold (float sums of equal samples)."""


def verdict_of(entry: float, lo: float, hi: float) -> str:
    """An entry against the interval [lo, hi] of what it promises: `holds` within it (up to TOLERANCE),
    `overstated` above it, `understated` below."""
    if entry > hi + TOLERANCE:
        return "overstated"
    if entry < lo - TOLERANCE:
        return "understated"
    return "holds"


@dataclass(frozen=True)
class Cell:
    """One config on the evaluation split against its table entry."""

    config: str
    n: int
    mean: float
    lo: float
    hi: float
    wire_pct: float  # mean wire bytes, % of FP16
    table: float | None  # mean of the table's measured entry at each sample's length; None: not measured
    verdict: str


@dataclass(frozen=True)
class Pair:
    """A config against a twin (or any other config named), paired over the same evaluation questions."""

    config: str
    twin: str
    n: int
    diff: float  # mean of config - twin
    lo: float
    hi: float

    @property
    def holds(self) -> bool:
        return self.lo > 0


REFINEMENTS: tuple[str, ...] = ("predict", "sink", "rotate", "round", "kwidths", "vwidths", "layer-scope")
"""What a twin drops (Recipe.without): cross-layer prediction, sink entries, rotation, question-aware
rounding and widths, per-layer kept sets (the differences QualityTable's twin lookup discounts, and xpred)."""


def twins(recipe: Recipe) -> list[Recipe]:
    """Every simpler version of `recipe`: it less one or more of the REFINEMENTS it has, plainest last."""
    found: dict[str, Recipe] = {}
    frontier = [recipe]
    while frontier:
        nxt = []
        for r in frontier:
            for name in REFINEMENTS:
                t = r.without(name)
                if t.name != r.name and t.name not in found:
                    found[t.name] = t
                    nxt.append(t)
        frontier = nxt
    return list(found.values())


def plain_twin(recipe: Recipe) -> Recipe:
    """`recipe` without any of its refinements (itself when it has none)."""
    found = twins(recipe)
    return found[-1] if found else recipe


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """The samples of a quality run: its samples*.jsonl, else those its results.json(.gz) holds (the form
    runs are kept in under bench/results/). ValueError when it has none."""
    from kvlink.eval import grid, report

    records, _ = grid.read_done(Path(path))
    if records:
        return records
    try:
        records = list(report.load_results(path).get("samples") or [])
    except ValueError:
        records = []
    if not records:
        raise ValueError(
            f"no samples in {str(path)!r} ({grid.SAMPLES_GLOB} or a results.json(.gz) holding them)"
        )
    return records


def combine(runs: Sequence[Iterable[Mapping[str, Any]]]) -> tuple[list[Mapping[str, Any]], list[str]]:
    """The samples of several quality runs over the same questions, to pair configs across runs.

    A config's fidelity scores its answer against the full-KV answer of its own run, so two runs' samples
    of a question pair only when both runs gave that question the same full-KV answer (`ref_answer`).
    Questions the runs answered differently are left out of every run (their ids returned, sorted); a
    config a question has in more than one run keeps the first run's sample."""
    lists = [list(records) for records in runs]
    refs: dict[tuple[str, str], set[str | None]] = defaultdict(set)
    for records in lists:
        for r in records:
            ref = r.get("ref_answer")
            refs[str(r["task"]), str(r["eid"])].add(None if ref is None else str(ref))
    split = {key for key, seen in refs.items() if len(seen) > 1}
    out: list[Mapping[str, Any]] = []
    taken: set[tuple[str, str, str]] = set()
    for records in lists:
        for r in records:
            key = (str(r["task"]), str(r["eid"]))
            sample = (*key, str(r["config"]))
            if key in split or sample in taken:
                continue
            taken.add(sample)
            out.append(r)
    return out, sorted(eid for _, eid in split)


def evaluation_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """`records`, all of them evaluation-split examples; else ValueError naming the first that is not."""
    chosen = list(records)
    others = [r for r in chosen if split_of_eid(str(r["eid"])) != EVALUATION]
    if others:
        eid = str(others[0]["eid"])
        split, title = split_of_eid(eid), article_of_eid(eid)
        where = f" (article {title!r}, {split or 'no'} split)" if title else f" ({split or 'no'} split)"
        raise ValueError(
            f"the holdout check reads evaluation-split examples only: {eid!r}{where}; "
            f"{len(others)} of {len(chosen)} samples are not. Rerun `kvlink-bench quality --split evaluation`"
        )
    return chosen


def check(
    records: Iterable[Mapping[str, Any]],
    table: QualityTable,
    task: str = "squad",
    quality: str = "fidelity",
    pairs: Sequence[tuple[str, str]] = (),
) -> tuple[list[Cell], list[Pair]]:
    """The cells and pairs of one task's samples (evaluation split only) against `table`.

    `pairs`: (config, other) names to compare besides each config's twins (kvlink.recipe names). A
    rate-fitted config ('<recipe>@<budget>%', kvlink.budget.fitted_key) has no twins: it is held to the
    table's entry at its budget and paired with the fixed config of the run that the table rates best
    among those whose mean wire bytes fit its budget (what the planner would send instead).

    A `quality` other than the table's metric (QualityTable.metric) is paired all the same, but no entry is
    held to it: every cell's verdict is "table rates another metric" (a fidelity entry says nothing of, say,
    how often the needle's number is found).
    """
    rows = [r for r in evaluation_records(records) if r["task"] == task]
    if not rows:
        raise ValueError(f"no samples of task {task!r}")
    by_config: dict[str, dict[str, float]] = defaultdict(dict)
    wire: dict[str, list[float]] = defaultdict(list)
    lengths: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        value = r.get(quality)
        if value is None:
            raise ValueError(f"sample {r['eid']!r} of {r['config']!r} has no {quality!r}")
        by_config[str(r["config"])][str(r["eid"])] = float(value)
        wire[str(r["config"])].append(100.0 * float(r["wire_frac"]))
        lengths[str(r["config"])].append(int(r["T"]))
    recipes = {name: _recipe(name) for name in by_config}
    fitted = {name: fit for name in by_config if (fit := _budget(name)) is not None}

    def promised(name: str) -> float | None:
        """What the table promises `name`'s samples: its entry at each one's context length (a table per
        length bucket rates a 3k-token and a 6k-token context differently), averaged like the samples."""
        if name in fitted:
            found = [table.fitted(recipes[name], fitted[name], t) for t in lengths[name]]
            entries = [None if f is None or f[1] != fitted[name] else f[0] for f in found]
        else:
            entries = [table.measured(recipes[name], t) for t in lengths[name]]
        return None if None in entries else statistics.fmean(e for e in entries if e is not None)

    cells = []
    for name, values in by_config.items():
        mean, lo, hi = bootstrap_ci(values.values())
        entry = None
        if quality != table.metric:
            verdict = "table rates another metric"
        elif (entry := promised(name)) is None:
            verdict = "not in table"
        else:
            verdict = verdict_of(entry, lo, hi)
        cells.append(Cell(name, len(values), mean, lo, hi, statistics.fmean(wire[name]), entry, verdict))
    cells.sort(key=lambda c: -c.wire_pct)
    names = {r.name: n for n, r in recipes.items() if n not in fitted}  # canonical name -> the run's name
    wanted = [
        (n, names[t.name]) for n, r in recipes.items() if n not in fitted for t in twins(r) if t.name in names
    ]
    for name, budget in fitted.items():  # against what the table would send instead: its best within budget
        rivals = [
            (value, n) for n in names.values()
            if statistics.fmean(wire[n]) <= 100.0 * budget and (value := promised(n)) is not None
        ]  # fmt: skip
        if rivals:
            wanted.append((name, max(rivals)[1]))
    wanted += [(a, b) for a, b in pairs if (a, b) not in wanted]
    out = []
    for a, b in wanted:
        if a == b:
            continue
        if a not in by_config or b not in by_config:
            missing = [x for x in (a, b) if x not in by_config]
            raise ValueError(
                f"pair {a!r} = {b!r}: the run did not measure {missing}; it has {sorted(by_config)}"
            )
        common = sorted(set(by_config[a]) & set(by_config[b]))
        diff, lo, hi = bootstrap_ci(by_config[a][e] - by_config[b][e] for e in common)
        out.append(Pair(a, b, len(common), diff, lo, hi))
    return cells, out


def _budget(name: str) -> float | None:
    """The budget a rate-fitted config name ('<recipe>@<budget>%') fits its rate to; None for the others."""
    return split_fitted(name)[1]


def _recipe(name: str) -> Recipe:
    """The recipe a config or table key names (a rate-fitted one's, its rate unset)."""
    return Recipe.from_name(split_fitted(name)[0])


def markdown(cells: Sequence[Cell], pairs: Sequence[Pair], quality: str = "fidelity") -> str:
    """The check as two Markdown tables."""
    lines = [
        f"| config | wire % of FP16 | n | evaluation {quality} [95% CI] | table (calibration) | verdict |",
        "|---|---:|---:|---|---:|---|",
    ]
    for c in cells:
        entry = "–" if c.table is None else f"{c.table:.3f}"
        lines.append(
            f"| `{c.config}` | {c.wire_pct:.2f} | {c.n} | {c.mean:.3f} [{c.lo:.3f}, {c.hi:.3f}] | {entry} "
            f"| {c.verdict} |"
        )
    if pairs:
        lines += [
            "",
            f"| config | against | n | Δ {quality} [95% CI] | gain holds |",
            "|---|---|---:|---|---|",
        ]
        for p in pairs:
            lines.append(
                f"| `{p.config}` | `{p.twin}` | {p.n} | {p.diff:+.3f} [{p.lo:+.3f}, {p.hi:+.3f}] "
                f"| {'yes' if p.holds else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def as_json(cells: Sequence[Cell], pairs: Sequence[Pair], **meta: Any) -> dict[str, Any]:
    return {
        **meta,
        "cells": [asdict(c) for c in cells],
        "pairs": [{**asdict(p), "holds": p.holds} for p in pairs],
        "verdicts": {v: sum(c.verdict == v for c in cells) for v in VERDICTS},
    }


def gate(
    table: QualityTable, pairs: Sequence[Pair], lengths: Iterable[int] | None = None
) -> tuple[QualityTable, dict[str, str]]:
    """`table` less every refined entry whose gain over its plain twin is not shown on the evaluation
    split, and why each was left out (key -> reason).

    A refined entry (one with twins) enters only when `pairs` pairs it with its plain twin (plain_twin: it
    less every refinement) and that pair holds (paired interval above 0); one the evaluation run did not
    pair with its plain twin is left out too (its gain is unshown). Left out, it is looked up as the table
    looks up any unmeasured config: through its twins. Pairs with intermediate twins (less some of its
    refinements) are reported by `check` but do not gate: requiring every one of them to hold left the
    25% and 12.5% picks out on the 320 gating questions for configs that did worse on the evaluation
    split's other 322 (bench/results/eval-gated-squad642-cpu), and would make each further twin
    measured a further chance to drop a config by noise.

    A rate-fitted entry ('<recipe>@<budget>%') enters only when `pairs` pairs it with a fixed config (check
    pairs it with the one the table rates best within its budget) and every such pair holds.

    `lengths`: the context lengths of the evaluation samples behind `pairs`. A table per length then
    loses the entries only in the buckets those lengths fall in (and in its mean over every length): a
    gain shown or not on ~200-token SQuAD paragraphs says nothing of the same refinement at 6k tokens,
    where selection keeps far more. Without them, every bucket is gated.
    """
    from dataclasses import replace

    shown: dict[str, Pair] = {}  # quality key -> its pair against its plain twin
    rivalled: dict[str, list[Pair]] = defaultdict(list)  # rate-fitted key -> its pairs against fixed configs
    for p in pairs:
        budget = _budget(p.config)
        if budget is not None:
            if _budget(p.twin) is None:
                rivalled[fitted_key(_recipe(p.config), budget)].append(p)
            continue
        config = Recipe.from_name(p.config)
        if twins(config) and quality_key(_recipe(p.twin)) == quality_key(plain_twin(config)):
            shown[quality_key(config)] = p
    held = None if lengths is None else sorted(set(lengths))

    def gated_here(b: LengthBucket) -> bool:
        return held is None or any(b.lo <= t and (b.hi is None or t < b.hi) for t in held)

    if table.buckets:  # the entries of the buckets gated here (a key only longer contexts measured stays)
        keys = {k for b in table.buckets if gated_here(b) for k in b.entries}
    else:
        keys = set(table.entries)
    dropped: dict[str, str] = {}
    for key in sorted(keys):
        if _budget(key) is not None:  # transform coding at a budget: it must beat what the table sends there
            against = rivalled.get(key, [])
            if not against:
                dropped[key] = (
                    "not paired on the evaluation split with a config the table sends at its budget"
                )
            elif not all(p.holds for p in against):
                p = next(p for p in against if not p.holds)
                dropped[key] = (
                    f"gain over {p.twin!r} does not hold: {p.diff:+.3f} [{p.lo:+.3f}, {p.hi:+.3f}], n={p.n}"
                )
            continue
        recipe = Recipe.from_name(key)
        if not twins(recipe):
            continue
        pair = shown.get(quality_key(recipe))
        if pair is None:
            dropped[key] = (
                f"not paired with its plain twin {plain_twin(recipe).name!r} on the evaluation split"
            )
        elif not pair.holds:
            dropped[key] = (
                f"gain over {pair.twin!r} does not hold: {pair.diff:+.3f} [{pair.lo:+.3f}, {pair.hi:+.3f}], "
                f"n={pair.n}"
            )
    if not dropped:
        return table, dropped
    buckets = tuple(
        replace(b, entries={k: v for k, v in b.entries.items() if k not in dropped}) if gated_here(b) else b
        for b in table.buckets
    )
    kept = {k: v for k, v in table.entries.items() if k not in dropped}
    where = ""
    if held is not None and table.buckets:
        spans = [f"{b.lo}-{'' if b.hi is None else b.hi}" for b in table.buckets if gated_here(b)]
        where = f" (buckets {', '.join(spans) or 'none'} tokens)"
    source = f"{table.source}; {len(dropped)} refinements left out by the evaluation-split gate{where}"
    return QualityTable(table.model, kept, source, table.fingerprints, buckets, table.metric), dropped
