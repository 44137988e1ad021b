"""`kvlink-bench entropy`: how much an entropy coder could save on the quantized codes, vs zstd."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvlink.eval.commands.common import Subparsers, load_lm, make_console, resolve_device, task_spec


def add_parser(sub: Subparsers) -> None:
    n = sub.add_parser("entropy", help="how much an entropy coder could save on the codes, vs zstd")
    n.add_argument("--task", type=task_spec, action="append", help="task[:N] (default squad:20)")
    n.add_argument("--configs", default="int8,int4,int3,int2,int4-sink1", help="comma-separated config names")
    n.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    n.add_argument("--model", default=None, help="model alias, HF id or local path (default: embedded)")
    n.add_argument("--device", default=None)
    n.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    n.add_argument("--data", default=None, help="SQuAD-format JSON (default: the packaged dev set)")
    n.add_argument("--out", default=None, help="write the per-message rows and the summary as JSON")
    n.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entropy of the quantized codes vs zstd over real contexts (kvlink.eval.entropy)."""
    import torch
    from rich.table import Table

    from kvlink.cache import prefill
    from kvlink.eval import entropy, grid
    from kvlink.eval.tasks import build_tasks
    from kvlink.layerbits import Sensitivity

    lm = load_lm(args.model, resolve_device(args.device), args.dtype)
    examples = build_tasks(lm.tokenizer, args.task or [("squad", 20)], args.data)
    sensitivity = Sensitivity.for_model(lm.fingerprint, lm.name)
    configs = grid.resolve(grid.expand_names(args.configs.split(",")), lm.geometry, sensitivity)
    seen: set[str] = set()
    rows: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    for example in examples:
        if example.context in seen:  # SQuAD asks several questions about one paragraph
            continue
        seen.add(example.context)
        kv = prefill(lm.model, example.encode(lm.tokenizer)[0]).kv.to("cpu", torch.float32)
        for c in configs:
            rows[c.name].append(entropy.code_statistics(kv, c.config, lm.geometry, args.level))
    summary = {name: entropy.summarize(r) for name, r in rows.items()}
    view = Table(
        title=f"entropy coding vs zstd{args.level}, {len(seen)} contexts (savings in % of the message)"
    )
    for col in (
        "config",
        "codes % of msg",
        "order-0 coder",
        "order-1 bound",
        f"zstd{args.level}",
        "zstd ms/msg",
    ):
        view.add_column(col)
    for name, s in summary.items():
        view.add_row(
            name, f"{100 * s['codes_share']:.1f}", f"{100 * s['order0_saving']:.1f}",
            f"{100 * s['order1_saving']:.1f}", f"{100 * s['zstd_saving']:.1f}", f"{s['zstd_ms_per_message']:.1f}",
        )  # fmt: skip
    make_console().print(view)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": lm.name, "fingerprint": lm.fingerprint, "contexts": len(seen), "zstd_level": args.level,
                "command": "kvlink-bench " + " ".join(sys.argv[1:])}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary, "messages": rows}, indent=1))
    return 0
