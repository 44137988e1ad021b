"""Transform coding chosen by the planner, end to end: `kvlink-serve --profile xl.safetensors --profile
xl-predictors.safetensors` in a subprocess, a sender holding the same two files and no pinned config
(kvlink.client.sender.send_context, as `kvlink-send --profile ... --profile ...`), real gRPC on loopback.

usage: python bench/xl_planned.py --profiles DIR --out FILE.json [--device cuda] [--questions 3]

DIR holds xl.safetensors and xl-predictors.safetensors (`kvlink-bench profile --config xpred+fp16+pca1+ans
--out DIR/xl.safetensors`). Sends the first evaluation questions at 25, 12.5 and 6.25%, and the first long
evaluation question (2k-8k tokens) at 12.5%, where the table holds no transform-coding entry: what the
planner chose, its bytes against the budget, the receiver's answer and fidelity to the full-KV answer
computed here, and the receiver's decode time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

BUDGETS = ("25%", "12.5%", "6.25%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--questions", type=int, default=3)
    args = ap.parse_args()

    from kvlink.cache import prefill
    from kvlink.client.main import read_profile
    from kvlink.client.sender import send_context
    from kvlink.eval import fidelity
    from kvlink.eval.tasks import build_tasks
    from kvlink.generate import greedy_answer
    from kvlink.models import load_model
    from kvlink.server.local import LocalReceiver

    files = [str(args.profiles / "xl.safetensors"), str(args.profiles / "xl-predictors.safetensors")]
    lm = load_model(None, device=args.device)
    profile = read_profile(files)
    examples = build_tasks(lm.tokenizer, [("squad", args.questions), ("long", 1)], split="evaluation")
    rows = []
    rx = LocalReceiver(["--device", args.device, "--profile", files[0], "--profile", files[1]])
    with rx:
        rx.wait_healthy()
        for ex in examples:
            ctx, q = ex.encode(lm.tokenizer)
            kv = prefill(lm.model, ctx.to(lm.device)).kv
            full = greedy_answer(lm.model, lm.tokenizer, kv, q.to(lm.device), max_new_tokens=16)
            reference = full.text
            for budget in BUDGETS if ex.task == "squad" else ("12.5%",):
                started = time.perf_counter()
                result = asyncio.run(
                    send_context(rx.target, ex.context, ex.question, budget, lm=lm, profile=profile,
                                 max_new_tokens=16, keep=False)
                )  # fmt: skip
                row = {
                    "eid": ex.eid, "task": ex.task, "T": int(ctx.numel()), "budget": budget,
                    "recipe": result.plan.recipe.name, "total_bytes": result.plan.total_bytes,
                    "budget_bytes": result.plan.budget_bytes, "fraction": result.plan.fraction,
                    "answer": result.answer.text, "full_kv_answer": reference,
                    "fidelity": fidelity.answer_fidelity(result.answer.text, reference),
                    "decode_s": result.timings.get("decode_s"), "plan_s": result.timings.get("plan_s"),
                    "seconds": round(time.perf_counter() - started, 3),
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
