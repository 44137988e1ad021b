"""The budget planner's time (kvlink.budget.plan) against an earlier commit's, side by side in one run: each
version plans the same contexts at the same budgets in its own process, in alternating rounds; the picks and
every candidate weighed (name, estimated bytes, expected quality, fits) must be identical.

usage: python bench/plan_time.py --baseline COMMIT [--baseline-tree DIR] --out FILE.json [--questions 3] [--rounds 2]
           [--recipe NAME --task squad|long --budgets 10,6.25]

The baseline is `git archive COMMIT kvlink` unpacked into a temporary folder (with this checkout's generated
protobuf stubs) and imported from there. Contexts: the first questions of the evaluation split on the
embedded model (float32, one CPU thread; with --device cuda the model and the plan on the GPU), prefilled
with the question observed; budgets 50, 25, 18.75, 12.5 and 6.25%; both versions rank by the same quality table (this checkout's shipped file). With --recipe the plans
are of that recipe pinned (transform coding, `xpred+fp16+pca1[-q<gamma>]+ans`: its rate fitted to each budget
with the embedded model's cached transform profiles, kvlink.residual.cached_transform_profiles), --task long
takes the long task's evaluation contexts (2k-8k tokens) instead.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (0.5, 0.25, 0.1875, 0.125, 0.0625)
TABLE = ROOT / "kvlink" / "data" / "quality" / "smollm2-135m-instruct.json"


def worker(spec: dict) -> None:
    """Plan every (question, budget) with the kvlink on sys.path; one JSON line per plan on stdout."""
    import torch

    torch.set_num_threads(1)
    from kvlink.budget import Constraints, QualityTable, plan
    from kvlink.cache import Observe, prefill
    from kvlink.eval.tasks import long_examples, squad_examples
    from kvlink.models import load_model
    from kvlink.prompt import question_rows

    lm = load_model(None, device=spec.get("device", "cpu"))
    table = QualityTable.load(TABLE)
    constraints, profile = Constraints(), None
    if spec["recipe"]:
        from kvlink.recipe import Recipe
        from kvlink.residual import cached_transform_profiles

        constraints = Constraints(recipe=Recipe.from_name(spec["recipe"]), zstd=False)
        profile = cached_transform_profiles(lm)
    if spec["task"] == "long":
        low, high = spec["long_tokens"]
        examples = long_examples(lm.tokenizer, split="evaluation", min_tokens=low, max_tokens=high)
        examples = examples[: spec["questions"]]
    else:
        examples = squad_examples(None, spec["questions"], (), "evaluation")
    for ex in examples:
        ctx, q = ex.encode(lm.tokenizer)
        pre = prefill(lm.model, ctx, q, Observe.QUESTION, 32, question_rows(lm.tokenizer, ex.question))
        for budget in spec["budgets"]:
            started = time.perf_counter()
            chosen = plan(pre, lm.geometry, lm.fingerprint, budget, quality=table, session_id="s" * 32,
                          message_id="m" * 32, constraints=constraints, profile=profile)  # fmt: skip
            seconds = time.perf_counter() - started
            weighed = [
                [c.recipe.name, c.estimated_bytes, None if c.expected_quality != c.expected_quality
                 else round(c.expected_quality, 12), c.fits]
                for c in chosen.candidates
            ]  # fmt: skip
            digest = hashlib.sha256(json.dumps([chosen.recipe.name, chosen.total_bytes, weighed]).encode())
            print(json.dumps({"eid": ex.eid, "T": int(ctx.numel()), "budget": budget, "s": seconds,
                              "pick": chosen.recipe.name, "bytes": chosen.total_bytes,
                              "candidates": len(weighed), "digest": digest.hexdigest()}), flush=True)  # fmt: skip


def baseline_tree(commit: str, tree: str | None = None) -> Path:
    """`commit`'s kvlink package in a temporary folder (or a copy of `tree`, a folder holding one: where
    there is no git history), with this checkout's protobuf stubs."""
    folder = Path(tempfile.mkdtemp(prefix="kvlink-baseline-"))
    if tree is not None:
        shutil.copytree(Path(tree) / "kvlink", folder / "kvlink")
    else:
        archive = subprocess.run(
            ["git", "archive", commit, "kvlink"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
    for stub in (ROOT / "kvlink" / "_proto").glob("*_pb2*.py*"):
        shutil.copy(stub, folder / "kvlink" / "_proto" / stub.name)
    return folder


def run(tree: Path, spec: dict) -> list[dict]:
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)  # tree's kvlink first
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        cwd=tempfile.gettempdir(), env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="the commit whose planner is the baseline")
    ap.add_argument("--baseline-tree", help="a folder holding that commit's kvlink/ (no git needed)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--recipe", default="", help="plan this recipe pinned (transform coding: with the profiles)"
    )
    ap.add_argument("--task", default="squad", choices=("squad", "long"))
    ap.add_argument("--long-tokens", default="2048-7936", help="the long task's context lengths, LOW-HIGH")
    ap.add_argument(
        "--budgets", default="", help="comma-separated percentages (default 50,25,18.75,12.5,6.25)"
    )
    ap.add_argument(
        "--device", default="cpu", help="where the model and the plan run (cuda: the kernels a GPU sender runs)"
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    budgets = [float(b) / 100 for b in args.budgets.split(",")] if args.budgets else list(BUDGETS)
    long_tokens = [int(x) for x in args.long_tokens.split("-")]
    spec = {"questions": args.questions, "recipe": args.recipe, "task": args.task, "budgets": budgets,
            "long_tokens": long_tokens, "device": args.device}  # fmt: skip
    if not args.baseline or not args.out:
        ap.error("--baseline and --out are required")
    trees = {"baseline": baseline_tree(args.baseline, args.baseline_tree), "current": ROOT}
    times: dict[str, dict[tuple[str, float], list[float]]] = {name: {} for name in trees}
    plans: dict[str, dict[tuple[str, float], dict]] = {name: {} for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            started = time.perf_counter()
            for row in run(tree, spec):
                key = (row["eid"], row["budget"])
                times[name].setdefault(key, []).append(row["s"])
                plans[name][key] = row
            print(f"round {r + 1} {name}: {time.perf_counter() - started:.1f} s", flush=True)
    rows = []
    for key in sorted(plans["current"]):
        new, old = plans["current"][key], plans["baseline"][key]
        t_new, t_old = statistics.median(times["current"][key]), statistics.median(times["baseline"][key])
        rows.append({
            "eid": key[0], "T": new["T"], "budget": key[1], "pick": new["pick"], "bytes": new["bytes"],
            "candidates": new["candidates"], "identical": new["digest"] == old["digest"]
            and new["pick"] == old["pick"] and new["bytes"] == old["bytes"],
            "baseline_s": round(t_old, 3), "current_s": round(t_new, 3), "speedup": round(t_old / t_new, 2),
            "baseline_pick": old["pick"], "baseline_bytes": old["bytes"],
        })  # fmt: skip
    total_old = sum(r["baseline_s"] for r in rows)
    total_new = sum(r["current_s"] for r in rows)
    doc = {
        "baseline": args.baseline,
        "current": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread a process",
        "device": args.device,
        "rounds": args.rounds,
        "recipe": args.recipe or None,
        "task": args.task,
        "long_tokens": long_tokens if args.task == "long" else None,
        "all_identical": all(r["identical"] for r in rows),
        "total_baseline_s": round(total_old, 2),
        "total_current_s": round(total_new, 2),
        "speedup": round(total_old / total_new, 2),
        "plans": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for r in rows:
        print(f"{r['eid']} T={r['T']} {100 * r['budget']:g}%: {r['baseline_s']:.2f} -> {r['current_s']:.2f} s "
              f"({r['speedup']}x), identical {r['identical']}, {r['pick']}")  # fmt: skip
    print(
        f"total {total_old:.1f} -> {total_new:.1f} s ({doc['speedup']}x); all identical: {doc['all_identical']}"
    )
    return 0 if doc["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
