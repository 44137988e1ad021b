"""`xl` through the product, as a user sends it: the planner fits `xpred+fp16+pca1+ans`'s rate to each budget,
the codec encodes the message (exact framed wire bytes), a codec holding the same profiles decodes it.

usage: PYTHONPATH=$PWD python research/eval_xl_product.py N [--budgets 25,18.75,12.5] [--name NAME]
           [--split evaluation] [--task squad|long] [--shard K/M] [--resume] [--against RUN:LABEL@]
       PYTHONPATH=$PWD python research/eval_xl_product.py --fit-only   (fit and cache the profiles, once,
           before shards start: bench/gpu_session.sh xlp)

Profiles: kvlink.residual.cached_transform_profiles (what `kvlink-bench profile --config
"xpred+fp16+pca1+ans"` writes): predictors through INT2 on the calibration split's odd paragraphs, the
residual profile on the same paragraphs, step weights from the shipped sensitivity profile. Bytes: the
plan's framed total (kvlink.budget.plan: every frame, signal and byte of the message), reported as the
harness's wire fraction. --against pairs the result, question by question, with another run's config of
the same questions (e.g. the screen's `aqua22-pca@` of research/results/xl-squad-eval-cpu).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Bytes, Context, lm, run_screen

from kvlink.budget import Constraints, plan
from kvlink.cache import ContextKV, Prefill
from kvlink.codec import Codec
from kvlink.eval.report import bootstrap_ci
from kvlink.recipe import Recipe
from kvlink.residual import cached_transform_profiles

RECIPE = "xpred+fp16+pca1+ans"


def pair_runs(mine: dict, other: dict, a: str, b: str) -> dict:
    """b (in `mine`) minus a (in `other`) on the questions both answered, by question id."""
    index = {eid: i for i, eid in enumerate(other["eids"])}
    common = [(i, index[eid]) for i, eid in enumerate(mine["eids"]) if eid in index]
    fb, fa = mine["per_question"][b]["fidelity"], other["per_question"][a]["fidelity"]
    kb, ka = mine["per_question"][b]["kl"], other["per_question"][a]["kl"]
    diff = bootstrap_ci([fb[i] - fa[j] for i, j in common])
    return {
        "a": a, "b": b, "n": len(common), "delta": [round(x, 4) for x in diff],
        "kl": [round(sum(ka[j] for _, j in common) / len(common), 5), round(sum(kb[i] for i, _ in common) / len(common), 5)],
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=0)
    ap.add_argument("--budgets", default="25,18.75,12.5")
    ap.add_argument("--name", default="xl-product")
    ap.add_argument("--split", default="evaluation", choices=("calibration", "evaluation"))
    ap.add_argument("--task", default="squad", choices=("squad", "long"))
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--resume", action="store_true", help="go on after the questions a cut run answered")
    ap.add_argument("--fit-only", action="store_true", help="fit (or load) the profiles and stop")
    ap.add_argument("--against", default=None, help="RUN:PREFIX, e.g. xl-squad-eval-cpu:aqua22-pca@")
    args = ap.parse_args()
    profiles = cached_transform_profiles(lm())
    if args.fit_only:
        print(f"profiles: predictors {profiles.predictors.hash}, residual {profiles.residual.hash}")
        return 0
    recipe = Recipe.from_name(RECIPE)
    budgets = [float(b) for b in args.budgets.split(",")]
    geometry, fingerprint = lm().geometry, lm().fingerprint

    def candidates(c: Context) -> dict[str, tuple[ContextKV, Bytes]]:
        pre = Prefill(c.kv, c.question, c.example.encode(lm().tokenizer)[0], c.q_ids)
        out = {}
        for b in budgets:
            chosen = plan(pre, geometry, fingerprint, b / 100, constraints=Constraints(recipe=recipe, zstd=False),
                          session_id="0" * 32, message_id="1" * 32, profile=profiles)  # fmt: skip
            decoded = Codec(chosen.recipe, geometry, profiles).decode(
                chosen.encoded, lm().device, c.kv.keys[0].dtype
            )
            rate = next(s.rate for s in chosen.recipe.stages() if s.name == "pca")  # type: ignore[attr-defined]
            print(
                f"  {c.example.eid} @{b:g}%: rate {rate}, {chosen.total_bytes / c.fp16_bytes:.2%}", flush=True
            )
            out[f"kvlink-xl@{b:g}"] = (decoded, Bytes(chosen.total_bytes - c.framing))
        return out

    meta = {"recipe": RECIPE, "predictors": profiles.predictors.hash, "residual": profiles.residual.hash}
    result = run_screen(args.name, candidates, args.n, [], 0, meta, split=args.split, task=args.task,
                        shard=tuple(int(x) for x in args.shard.split("/")), resume=args.resume)  # fmt: skip
    if args.against:
        run, prefix = args.against.split(":", 1)
        other = json.loads((ROOT / "results" / run / "results.json").read_text())
        pairs = [pair_runs(result, other, f"{prefix}{b:g}", f"kvlink-xl@{b:g}") for b in budgets]
        for p in pairs:
            print(
                f"{p['b']} - {run}'s {p['a']} on {p['n']} questions: {p['delta']} (KL {p['kl'][0]} -> {p['kl'][1]})"
            )
        out = ROOT / "results" / args.name / "against.json"
        out.write_text(json.dumps(pairs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
