"""How far selection x quantization can go on measured ceilings (issue 7), not part of the package.

usage: python bench/ceiling.py SELECTION_RUN QUANT_RUN [QUANT_RUN ...] [--budgets 25,12.5] [--out ceiling.json]

SELECTION_RUN: a `kvlink-bench quality` run of Q2C per layer at FP16 (`q2cR-layer` configs: selection
alone, nothing quantized). QUANT_RUN: runs (or merged reports) holding caches quantized with every position
kept (retention 1) and the combinations of both. Per retention r, S(r) is the fidelity of keeping r of the
positions exactly; Q(x) is the best fidelity measured for a quantizer that keeps every position in at most
x % of FP16. A config that keeps r of the positions with some quantizer needs about r times that
quantizer's bytes, so at a budget B its fidelity is bounded by

    max over r of min(S(r), Q(B / r))

if combining never beats either part alone. The script checks that premise on every measured combination
whose quantizer was also measured alone (same bits, groups, sink, rounding, widths) and prints the bound.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from kvlink.eval.report import load_results


def _rows(run: Path) -> list[dict]:
    """The squad summary rows of a quality run's results.json(.gz) or a merged report's summary.json(.gz)."""
    summaries = [p for p in (run / "summary.json", run / "summary.json.gz") if p.is_file()]
    if summaries:
        raw = summaries[0].read_bytes()
        rows = json.loads(gzip.decompress(raw) if summaries[0].suffix == ".gz" else raw)["summary"]
    else:
        rows = load_results(run)["summary"]
    return [r for r in rows if r["task"] == "squad"]


def _quantizer(name: str) -> str:
    """The part of a config name after its selection: 'q2c90-layer-k3v4-g64-sink1' -> 'k3v4-g64-sink1'."""
    if not name.startswith("q2c"):
        return name
    parts = name.split("-")[1:]
    if parts and parts[0] in ("layer", "global"):
        parts = parts[1:]
    return "-".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("selection_run", type=Path)
    ap.add_argument("quant_runs", type=Path, nargs="+")
    ap.add_argument("--budgets", default="25,12.5")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    selection = {
        r["codec"]["retention"]: (r["fidelity"]["mean"], 100 * r["wire_frac"]["mean"])
        for r in _rows(args.selection_run)
        if r["codec"]["selector"] == "q2c" and r["codec"]["scope"] == "layer" and r["codec"]["k_bits"] == 16
    }
    selection[1.0] = (1.0, 100.0)
    by_config: dict[str, dict] = {}
    for run in args.quant_runs:  # a config measured by several runs: the row with the most questions
        for r in _rows(run):
            if r["config"] not in by_config or r["n"] > by_config[r["config"]]["n"]:
                by_config[r["config"]] = r
    rows = list(by_config.values())
    alone = {
        r["config"]: (r["fidelity"]["mean"], 100 * r["wire_frac"]["mean"])
        for r in rows
        if r["codec"]["retention"] == 1.0
    }
    quant = sorted((pct, fid, name) for name, (fid, pct) in alone.items() if name != "fp16")

    def best_quant(limit: float) -> tuple[float, str]:
        fits = [(fid, name) for pct, fid, name in quant if pct <= limit]
        return max(fits) if fits else (0.0, "none fits")

    checks = []
    for r in rows:
        ret, name = r["codec"]["retention"], r["config"]
        q = _quantizer(name)
        if ret < 1.0 and q in alone and ret in selection:
            fid = r["fidelity"]["mean"]
            cap = min(selection[ret][0], alone[q][0])
            checks.append(
                {
                    "config": name,
                    "fidelity": fid,
                    "selection_alone": selection[ret][0],
                    "quantizer_alone": alone[q][0],
                    "bytes_pct": 100 * r["wire_frac"]["mean"],
                    "retention_x_quantizer_pct": ret * alone[q][1],
                    "within_cap": fid <= cap + 1e-9,
                }
            )

    print("selection alone (Q2C per layer, FP16):")
    for ret in sorted(selection):
        print(f"  r={ret:<6g} fidelity {selection[ret][0]:.3f}  ({selection[ret][1]:.1f}% of FP16)")
    print("premise: a combination does no better than its parts")
    for c in checks:
        print(
            f"  {c['config']:42s} {c['fidelity']:.3f} <= min({c['selection_alone']:.3f}, "
            f"{c['quantizer_alone']:.3f}): {c['within_cap']}; bytes {c['bytes_pct']:.1f}% vs r x alone "
            f"{c['retention_x_quantizer_pct']:.1f}%"
        )
    bounds = {}
    for budget in (float(b) for b in args.budgets.split(",")):
        options = []
        for ret, (s, _) in sorted(selection.items()):
            q_fid, q_name = best_quant(budget / ret)
            options.append(
                {
                    "retention": ret,
                    "selection_alone": s,
                    "per_entry_pct": budget / ret,
                    "best_quantizer": q_name,
                    "quantizer_alone": q_fid,
                    "cap": min(s, q_fid),
                }
            )
        top = max(options, key=lambda o: o["cap"])
        bounds[budget] = {"bound": top["cap"], "at": top, "options": options}
        print(f"budget {budget:g}%: bound {top['cap']:.3f} (r={top['retention']:g}, {top['best_quantizer']})")
        for o in options:
            print(
                f"  r={o['retention']:<6g} S={o['selection_alone']:.3f}  <= {o['per_entry_pct']:.1f}% per entry: "
                f"{o['best_quantizer']} {o['quantizer_alone']:.3f}  -> {o['cap']:.3f}"
            )
    if args.out:
        args.out.write_text(
            json.dumps({"selection": selection, "checks": checks, "bounds": bounds}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
