"""Summaries with bootstrap confidence intervals, the Pareto frontier, Markdown tables and plots.

Input: the per-sample records of a quality run (kvlink.eval.grid.run_quality), one per
(example, config). Output of `write_report(records, out_dir)`:

    results.json   {"meta", "summary": [...], "frontier": {task: [names]}, "samples": [...]}
                   (read back gzip'd too, as results.json.gz: how bench/results/ keeps large runs)
    results.md     one Markdown table per task (and "all" when several tasks ran)
    pareto-<task>.png  quality (answer fidelity) vs wire bytes (% of FP16), one marker per
                   method family, the measured frontier drawn

Confidence intervals are percentile bootstraps (numpy, seeded: the same records give the
same intervals). "F1 % of full" is a ratio of means, bootstrapped over examples in pairs
(the config's F1 and the full-KV F1 of the same example).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvlink.eval.grid import family, parse_name
from kvlink.recipe import Recipe

logger = logging.getLogger(__name__)

N_BOOT = 2000
ALPHA = 0.05
# Metrics summarized with a CI (mean over samples that have a finite value).
CI_METRICS: tuple[str, ...] = (
    "fidelity", "agree", "kl", "f1", "em", "nll_gold", "ppl", "ppl_ratio", "needle",
    "k_rel_err", "v_rel_err", "k_cos", "v_cos", "k_energy", "v_energy", "k_rel_err_all", "v_rel_err_all",
    "wire_frac", "encoded_frac",
)  # fmt: skip
# Plain means (bytes, times, the reference's own scores).
MEAN_FIELDS: tuple[str, ...] = (
    "T", "n_kept", "fp16_bytes", "wire_bytes", "encoded_bytes", "payload_bytes", "metadata_bytes",
    "scale_bytes", "factor_bytes", "position_bytes", "wire_framing", "wire_signaling", "http2",
    "ref_f1", "ref_em", "ref_nll_gold", "ref_ppl", "ref_needle",
    "select_s", "encode_s", "wire_s", "decode_s", "answer_s", "example_s",
)  # fmt: skip
BUDGETS: tuple[float, ...] = (0.1875, 0.125, 0.0625)


# --- statistics ---------------------------------------------------------------------
def _finite(values: Iterable[Any]) -> np.ndarray:
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


def bootstrap_ci(
    values: Iterable[Any], n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean and a percentile-bootstrap (1 - alpha) interval; None/NaN dropped.

    One value gives (v, v, v); none gives NaNs.
    """
    x = _finite(values)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if x.size == 1:
        return (mean, mean, mean)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (mean, float(min(lo, mean)), float(max(hi, mean)))


def bootstrap_ratio_ci(
    numerator: Sequence[Any],
    denominator: Sequence[Any],
    n_boot: int = N_BOOT,
    seed: int = 0,
    alpha: float = ALPHA,
) -> tuple[float, float, float]:
    """(ratio, lo, hi) of mean(numerator) / mean(denominator), resampling the pairs together."""
    pairs = np.array(
        [(float(a), float(b)) for a, b in zip(numerator, denominator) if a is not None and b is not None],
        dtype=np.float64,
    ).reshape(-1, 2)
    pairs = pairs[np.isfinite(pairs).all(axis=1)]
    if pairs.shape[0] == 0 or pairs[:, 1].mean() == 0:
        return (math.nan, math.nan, math.nan)
    ratio = float(pairs[:, 0].mean() / pairs[:, 1].mean())
    if pairs.shape[0] == 1:
        return (ratio, ratio, ratio)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, pairs.shape[0], size=(n_boot, pairs.shape[0]))
    num, den = pairs[:, 0][idx].mean(axis=1), pairs[:, 1][idx].mean(axis=1)
    ratios = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    ratios = ratios[np.isfinite(ratios)]
    lo, hi = np.quantile(ratios, [alpha / 2, 1 - alpha / 2]) if ratios.size else (ratio, ratio)
    return (ratio, float(min(lo, ratio)), float(max(hi, ratio)))


# --- frontier --------------------------------------------------------------------------
def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (cost x lower-or-equal AND quality y
    higher-or-equal, one of them strictly), sorted by cost. NaN points are never on it."""
    ok = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    order = sorted(ok, key=lambda i: (points[i][0], -points[i][1]))
    frontier: list[int] = []
    best = -math.inf
    for i in order:
        x, y = points[i]
        if y > best:
            if frontier and points[frontier[-1]][0] == x:  # same cost, better quality: replace
                frontier.pop()
            frontier.append(i)
            best = y
    return frontier


# --- summaries ---------------------------------------------------------------------------
def _config_facts(name: str, codec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Family, label and quality-table key of config `name`: from the run's codec dict when known
    (a `mix` name needs the profile its bits were allocated from), else parsed from the name."""
    from kvlink.budget import fitted_key, quality_key, rate_fitted, split_fitted

    base, budget = split_fitted(name)  # '<name>@<budget>%': the rate fitted to that budget
    try:
        config = Recipe.from_dict(codec) if codec is not None else parse_name(base)
    except (TypeError, ValueError):
        return {"family": "other", "label": name, "key": name}
    key = fitted_key(config, budget) if budget is not None and rate_fitted(config) else quality_key(config)
    return {
        "family": family(config),
        "label": key if budget is not None else config.name,
        "key": key,
        "codec": config.to_dict(),
    }


def summarize(
    records: Sequence[dict[str, Any]],
    seed: int = 0,
    n_boot: int = N_BOOT,
    codecs: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (task, config), plus task "all" when the records hold several tasks.

    `codecs`: config name -> Recipe.to_dict() as the run used it (run.json's "configs").

    Each row: task, config, family, label, key, n (examples), for every CI metric
    {"mean", "lo", "hi"}, f1_pct_full / em_pct_full (ratio of means vs the full KV, with CI),
    plain means of byte counts and timings, and `frontier` (on the task's fidelity frontier).
    """
    for rec in records:
        if rec.get("ppl") is not None and rec.get("ref_ppl"):
            ratio = float(rec["ppl"]) / float(rec["ref_ppl"])
            rec.setdefault("ppl_ratio", ratio)
    tasks = sorted({r["task"] for r in records})
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    order: list[str] = []
    for rec in records:
        if rec["config"] not in order:
            order.append(rec["config"])
        groups.setdefault((rec["task"], rec["config"]), []).append(rec)
        if len(tasks) > 1:
            groups.setdefault(("all", rec["config"]), []).append(rec)
    rows: list[dict[str, Any]] = []
    for task in [*tasks, *(["all"] if len(tasks) > 1 else [])]:
        for name in order:
            recs = groups.get((task, name))
            if not recs:
                continue
            facts = _config_facts(name, (codecs or {}).get(name))
            row: dict[str, Any] = {"task": task, "config": name, "n": len(recs), **facts}
            for metric in CI_METRICS:
                mean, lo, hi = bootstrap_ci((r.get(metric) for r in recs), n_boot, seed)
                row[metric] = {"mean": mean, "lo": lo, "hi": hi}
            for metric, ref in (("f1", "ref_f1"), ("em", "ref_em"), ("needle", "ref_needle")):
                num = [r.get(metric) for r in recs]
                den = [r.get(ref) for r in recs]
                ratio, lo, hi = bootstrap_ratio_ci(num, den, n_boot, seed)
                row[f"{metric}_pct_full"] = {"mean": 100 * ratio, "lo": 100 * lo, "hi": 100 * hi}
            for fld in MEAN_FIELDS:
                vals = _finite(r.get(fld) for r in recs)
                row[fld] = float(vals.mean()) if vals.size else math.nan
            rows.append(row)
        task_rows = [r for r in rows if r["task"] == task]
        on = set(pareto_frontier([(r["wire_frac"]["mean"], r["fidelity"]["mean"]) for r in task_rows]))
        for i, r in enumerate(task_rows):
            r["frontier"] = i in on
    return rows


def frontier_names(summary: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Per task, the configs on the fidelity-vs-wire-bytes frontier, cheapest first."""
    out: dict[str, list[str]] = {}
    for row in sorted(summary, key=lambda r: r["wire_frac"]["mean"]):
        if row.get("frontier"):
            out.setdefault(row["task"], []).append(row["config"])
    return out


# --- planner check ---------------------------------------------------------------------------
def _row_config(row: dict[str, Any]) -> Recipe:
    """A summary row's codec: as the run used it when recorded, else parsed from its name (a rate-fitted
    one's recipe, its rate unset)."""
    from kvlink.budget import split_fitted

    if "codec" in row:
        return Recipe.from_dict(row["codec"])
    return parse_name(split_fitted(row["config"])[0])


def _row_tokens(row: dict[str, Any]) -> int | None:
    """A summary row's mean context length in tokens (None when the row does not say)."""
    tokens = row.get("T")
    return round(tokens) if isinstance(tokens, (int, float)) and math.isfinite(tokens) else None


def planner_check(
    summary: Sequence[dict[str, Any]],
    table: Any,
    budgets: Sequence[float] = BUDGETS,
    task: str = "squad",
    quality: str = "fidelity",
) -> list[dict[str, Any]]:
    """For each budget: the planner's pick among the measured configs and whether it is on the frontier.

    The pick mirrors kvlink.budget.plan: among the configs of the planner's search space
    (kvlink.budget.plannable) whose measured mean wire fraction fits the budget, the highest
    expected quality from `table` (a QualityTable, looked up at the row's mean context length; ties go to the
    smaller message). The frontier is the measured one (mean `quality` vs mean wire
    fraction over all configs of `task`). Each result: budget, pick, its fraction and
    measured quality, on_frontier, and the best measured config that fits (for comparison).
    """
    from kvlink.budget import plannable

    rows = [r for r in summary if r["task"] == task]
    if not rows:
        raise ValueError(f"no summary rows for task {task!r}; tasks: {sorted({r['task'] for r in summary})}")
    points = [(r["wire_frac"]["mean"], r[quality]["mean"]) for r in rows]
    on = {rows[i]["config"] for i in pareto_frontier(points)}
    out = []
    for budget in budgets:
        fits = [r for r in rows if math.isfinite(r["wire_frac"]["mean"]) and r["wire_frac"]["mean"] <= budget]
        result: dict[str, Any] = {"budget": budget, "fits": len(fits)}
        expected = {  # what the planner expects of each config it would weigh at this budget
            r["config"]: table.expected(_row_config(r), tokens=_row_tokens(r))
            for r in fits
            if plannable(_row_config(r))  # the planner never sends the others (nor rate-fitted ones this way)
        }
        for r, value in _fitted_weighed(rows, table, budget):
            expected[r["config"]] = value
        planned = [r for r in fits if r["config"] in expected]
        if not planned:
            result.update(pick=None, on_frontier=False, note="no measured config the planner weighs fits")
            out.append(result)
            continue
        pick = max(planned, key=lambda r: (expected[r["config"]], -r["wire_frac"]["mean"]))
        best = max(fits, key=lambda r: (r[quality]["mean"], -r["wire_frac"]["mean"]))
        result.update(
            pick=pick["config"],
            pick_fraction=pick["wire_frac"]["mean"],
            pick_quality=pick[quality]["mean"],
            expected_quality=expected[pick["config"]],
            on_frontier=pick["config"] in on,
            best=best["config"],
            best_quality=best[quality]["mean"],
        )
        out.append(result)
    return out


def _fitted_weighed(
    rows: Sequence[dict[str, Any]], table: Any, budget: float
) -> list[tuple[dict[str, Any], float]]:
    """The rate-fitted rows (key '<name>@<b>%') the planner's table answers for at `budget`, each with what
    it expects (QualityTable.fitted at the row's mean length): of each recipe, the row measured at the
    largest b <= budget, the one that entry came from; its rate was fitted to b, the planner's to `budget`."""
    from kvlink.budget import parse_fitted

    best: dict[str, tuple[float, dict[str, Any]]] = {}
    for r in rows:
        parsed = parse_fitted(str(r.get("key")))
        if (
            parsed is not None
            and parsed[1] <= budget + 1e-12
            and parsed[1] > best.get(parsed[0], (-1.0, r))[0]
        ):
            best[parsed[0]] = (parsed[1], r)
    out = []
    for _, r in best.values():
        found = table.fitted(_row_config(r), budget, _row_tokens(r))
        if found is not None:
            out.append((r, found[0]))
    return out


# --- tables and plots ---------------------------------------------------------------------------
def _ci(cell: dict[str, float], fmt: str = "{:.3f}") -> str:
    if not math.isfinite(cell["mean"]):
        return "–"
    return f"{fmt.format(cell['mean'])} [{fmt.format(cell['lo'])}, {fmt.format(cell['hi'])}]"


def _num(value: float, fmt: str = "{:.3f}") -> str:
    return fmt.format(value) if value is not None and math.isfinite(value) else "–"


def markdown(summary: Sequence[dict[str, Any]], aliases: dict[str, list[str]] | None = None) -> str:
    """One table per task, configs by decreasing wire bytes; * marks the fidelity frontier."""
    aliases = aliases or {}
    lines: list[str] = []
    for task in dict.fromkeys(r["task"] for r in summary):
        rows = sorted((r for r in summary if r["task"] == task), key=lambda r: -r["wire_frac"]["mean"])
        n = max(r["n"] for r in rows)
        ref = rows[0]
        lines += [
            f"### task: {task} ({n} examples; full-KV F1 {_num(ref['ref_f1'])}, EM {_num(ref['ref_em'])})",
            "",
            "| config | family | wire % FP16 | wire KiB | payload KiB | metadata KiB | answer fidelity [95% CI] "
            "| agree | KL | F1 % of full [95% CI] | EM | NLL gold | PPL / full | needle | K rel err | V rel err "
            "| K cos | V cos | K energy | V energy |",
            "|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            name = r["config"] + (f" ({', '.join(aliases[r['config']])})" if aliases.get(r["config"]) else "")
            lines.append(
                f"| {'*' if r.get('frontier') else ''}{name} | {r['family']} "
                f"| {_num(100 * r['wire_frac']['mean'], '{:.2f}')} | {_num(r['wire_bytes'] / 1024, '{:.1f}')} "
                f"| {_num(r['payload_bytes'] / 1024, '{:.1f}')} | {_num(r['metadata_bytes'] / 1024, '{:.1f}')} "
                f"| {_ci(r['fidelity'])} | {_num(r['agree']['mean'], '{:.2f}')} | {_num(r['kl']['mean'], '{:.4f}')} "
                f"| {_ci(r['f1_pct_full'], '{:.0f}')} | {_num(r['em']['mean'], '{:.2f}')} "
                f"| {_num(r['nll_gold']['mean'], '{:.2f}')} | {_num(r['ppl_ratio']['mean'], '{:.3f}')} "
                f"| {_num(r['needle']['mean'], '{:.2f}')} | {_num(r['k_rel_err']['mean'])} "
                f"| {_num(r['v_rel_err']['mean'])} | {_num(r['k_cos']['mean'])} | {_num(r['v_cos']['mean'])} "
                f"| {_num(r['k_energy']['mean'])} | {_num(r['v_energy']['mean'])} |"
            )
        lines.append("")
    lines.append(
        "`*` on the measured Pareto frontier of answer fidelity vs wire bytes. Wire bytes: every byte of "
        "the message as kvlink.wire frames it (payload, positions, scales/zeros, factors, protobuf framing, "
        "gRPC prefixes, acks, receipt allowance) plus the HTTP/2 allowance, as kvlink.budget counts them. "
        "Errors and cosines are on the kept positions; energy = share of the full cache's squared norm sent."
    )
    return "\n".join(lines) + "\n"


_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "d", "8")


def pareto_plot(
    summary: Sequence[dict[str, Any]], path: str | Path, task: str, quality: str = "fidelity", title: str = ""
) -> Path:
    """Quality vs wire bytes (% of FP16, log axis) for one task: a marker per family, frontier drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary if r["task"] == task and math.isfinite(r[quality]["mean"])]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    families = sorted({r["family"] for r in rows})
    cmap = plt.get_cmap("tab20")
    for i, fam in enumerate(families):
        pts = [r for r in rows if r["family"] == fam]
        xs = [100 * r["wire_frac"]["mean"] for r in pts]
        ys = [r[quality]["mean"] for r in pts]
        err = [
            [y - r[quality]["lo"] for y, r in zip(ys, pts)],
            [r[quality]["hi"] - y for y, r in zip(ys, pts)],
        ]
        ax.errorbar(
            xs, ys, yerr=err, fmt=_MARKERS[i % len(_MARKERS)], color=cmap(i % 20), label=fam,
            markersize=7, capsize=2, elinewidth=0.8, alpha=0.9,
        )  # fmt: skip
    front = [rows[i] for i in pareto_frontier([(r["wire_frac"]["mean"], r[quality]["mean"]) for r in rows])]
    if front:
        ax.step(
            [100 * r["wire_frac"]["mean"] for r in front], [r[quality]["mean"] for r in front],
            where="post", color="black", linewidth=1.2, label="frontier",
        )  # fmt: skip
        for r in front:
            ax.annotate(
                r["config"], (100 * r["wire_frac"]["mean"], r[quality]["mean"]),
                textcoords="offset points", xytext=(4, -10), fontsize=7,
            )  # fmt: skip
    for budget in BUDGETS:
        ax.axvline(100 * budget, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.xaxis.set_major_locator(FixedLocator([1, 2, 3, 5, 6.25, 10, 12.5, 18.75, 25, 37.5, 50, 75, 100]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.set_xlabel("wire bytes, % of the FP16 context KV (log)")
    ax.set_ylabel({"fidelity": "answer fidelity (token F1 vs full-KV answer)"}.get(quality, quality))
    n = max((r["n"] for r in rows), default=0)
    ax.set_title(title or f"{task}: {quality} vs wire bytes ({n} examples, 95% bootstrap CI)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(
    records: Sequence[dict[str, Any]],
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    aliases: dict[str, list[str]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write results.json, results.md and pareto-<task>.png into `out_dir`; returns the JSON object."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, seed=seed, codecs=run_codecs(meta or {}))
    result = {
        "meta": meta or {},
        "aliases": aliases or {},
        "summary": summary,
        "frontier": frontier_names(summary),
        "samples": list(records),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, allow_nan=True, default=str))
    (out / "results.md").write_text(markdown(summary, aliases))
    plots = []
    for task in dict.fromkeys(r["task"] for r in summary):
        plots.append(str(pareto_plot(summary, out / f"pareto-{task}.png", task)))
    result["plots"] = plots
    logger.info("wrote %s, %s and %d plots", out / "results.json", out / "results.md", len(plots))
    return result


def run_codecs(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Config name -> codec dict from a run's meta ("configs", as kvlink-bench quality writes it)."""
    out = {}
    for entry in meta.get("configs", []):
        out[entry["name"]] = {k: v for k, v in entry.items() if k not in ("name", "aliases")}
    return out


def load_results(path: str | Path) -> dict[str, Any]:
    """A results.json, gzip'd or not (results.json.gz), or the directory holding one."""
    path = Path(path)
    if path.is_dir():
        candidates = (path / "results.json", path / "results.json.gz")
        path = next((p for p in candidates if p.is_file()), candidates[0])
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        data = json.loads(raw)
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read quality results {str(path)!r}: {exc}") from None
    if not isinstance(data, dict) or "summary" not in data:
        raise ValueError(f"{str(path)!r} is not a kvlink-bench quality results file (no 'summary')")
    return data


def merge_results(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Several quality runs of ONE model as one results object (summary rows only, no samples).

    A config measured by several runs (same task and key) keeps the row with the most examples,
    the first given on a tie. Runs of models with other fingerprints are refused.
    """
    if not paths:
        raise ValueError("no quality results given")
    return merge_runs([load_results(p) for p in paths])


def merge_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """merge_results of runs already loaded (load_results)."""
    if not runs:
        raise ValueError("no quality results given")
    prints = {r.get("meta", {}).get("fingerprint") for r in runs}
    if len(prints) > 1:
        raise ValueError(
            f"quality results of different models (fingerprints {sorted(map(str, prints))}) do not merge"
        )
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        for row in run["summary"]:
            key = (row["task"], row.get("key", row["config"]))
            if key not in rows or row["n"] > rows[key]["n"]:
                rows[key] = row
    return {"meta": runs[0].get("meta", {}), "summary": list(rows.values())}
