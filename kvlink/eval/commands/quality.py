"""`kvlink-bench quality`: quality vs wire bytes over the config grid (JSON, Markdown, Pareto PNG).

Writes, under --out: samples.jsonl (one line per (example, config), appended as it goes, so --resume
continues an interrupted run), run.json (settings), results.json (samples + per-config summaries with
bootstrap 95% CIs), results.md and pareto-<task>.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvlink.eval.commands.common import (
    Subparsers,
    add_model_and_task_arguments,
    load_lm,
    make_console,
    resolve_device,
    split_tasks,
    token_range,
)

logger = logging.getLogger(__name__)

DEFAULT_OUT = "bench/results/quality"


def add_parser(sub: Subparsers) -> None:
    q = sub.add_parser("quality", help="quality vs wire bytes over the grid (JSON, Markdown, Pareto PNG)")
    add_model_and_task_arguments(q)
    q.add_argument(
        "--grid", choices=("default", "seeds", "full"), default=None, help="config grid (default: default)"
    )
    q.add_argument(
        "--configs", action="append", metavar="NAMES",
        help="comma-separated config names or presets (reference, seeds, kivi2, streamingllm, default); "
        "e.g. 'q2c50%%+kint4c/vint4t-g32,h2o25%%+kint8c/vint4t-g32,seed-kv-asym' (the config grammar: "
        "docs/stages.md). With --grid: added to it; alone: only these",
    )  # fmt: skip
    q.add_argument("--list-configs", action="store_true", help="print the resolved configs and exit")
    q.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    q.add_argument(
        "--resume", action="store_true", help="continue: skip (example, config) pairs in samples.jsonl"
    )
    q.add_argument("--max-new-tokens", type=int, default=16)
    q.add_argument(
        "--batch", type=int, default=None, help="configs decoded per batch (default 64 on CUDA, 8 on CPU)"
    )
    q.add_argument(
        "--no-ppl", action="store_true", help="skip the held-out perplexity (one prefill less per example)"
    )
    q.add_argument(
        "--ppl-every", type=int, default=1, metavar="N", help="perplexity on every N-th example only"
    )
    q.add_argument(
        "--shard", type=_shard, default=(0, 1), metavar="K/N",
        help="run examples K, K+N, ... only, into samples-KofN.jsonl; start N of these, one per GPU "
        "(--device cuda:K; several on ONE GPU measured no faster), then `kvlink-bench report OUT`",
    )  # fmt: skip
    q.add_argument("--ppl-prefix", type=int, default=512, help="max tokens of the prefilled first half")
    q.add_argument("--ppl-tokens", type=int, default=64, help="max continuation tokens scored")
    q.add_argument(
        "--needle-tokens", type=token_range, default=None, metavar="MIN-MAX",
        help="context tokens of the needle task (default: --long-tokens)",
    )  # fmt: skip
    q.set_defaults(func=run)


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N like 0/4, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def _run_meta(args: argparse.Namespace, lm: Any, settings: Any) -> dict[str, Any]:
    import torch

    return {
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "geometry": vars(lm.geometry),
        "device": str(lm.device),
        "device_name": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu",
        "dtype": str(lm.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "max_new_tokens": settings.max_new_tokens,
        "ppl": settings.ppl,
        "ppl_every": settings.ppl_every,
        "ppl_prefix": settings.ppl_prefix,
        "ppl_tokens": settings.ppl_tokens,
        "window": settings.window,
        "seed": args.seed,
        "data": args.data,
        "split": args.split,
        "command": "kvlink-bench " + " ".join(sys.argv[1:]) if sys.argv[1:] else "",
    }


_RESUME_KEYS = (
    "fingerprint", "dtype", "max_new_tokens", "ppl", "ppl_every", "ppl_prefix", "ppl_tokens", "window", "seed",
    "split",
)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from kvlink.eval import grid, report
    from kvlink.layerbits import Sensitivity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    lm = load_lm(args.model, device, args.dtype)
    # No --grid and no --configs: the default grid. --configs alone: only those (and the full KV).
    chosen_grid = args.grid or (None if args.configs else "default")
    sensitivity = Sensitivity.for_model(lm.fingerprint, lm.name)
    configs = grid.select_configs(chosen_grid, args.configs or (), lm.geometry, sensitivity)
    if args.list_configs:
        for c in configs:
            alias = f" (= {', '.join(c.aliases)})" if c.aliases else ""
            print(f"{c.name:24s} {c.family:18s} {c.config.name}{alias}")
        return 0
    batch = args.batch or (64 if lm.device.type == "cuda" else 8)
    settings = grid.RunSettings(
        max_new_tokens=args.max_new_tokens,
        batch=batch,
        ppl=not args.no_ppl,
        ppl_every=args.ppl_every,
        ppl_prefix=args.ppl_prefix,
        ppl_tokens=args.ppl_tokens,
    )
    k, n = args.shard
    if n > 1:
        import os

        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or n) // n))
    meta = _run_meta(args, lm, settings)
    run_file = out / "run.json"
    # Every config measured into this directory, with its codec (a mix<bits> name alone does not
    # say which bits: the report and calibrate read them from here).
    by_name = {}
    if args.resume and run_file.is_file():
        old = json.loads(run_file.read_text())
        by_name = {c["name"]: c for c in old.get("configs", [])}
        changed = [k for k in _RESUME_KEYS if old.get(k) != meta.get(k)]
        if changed:
            raise SystemExit(
                f"--resume: {run_file} was written with other settings ({', '.join(changed)}: "
                f"{[old.get(k) for k in changed]} vs {[meta.get(k) for k in changed]}); use another --out"
            )
    for c in configs:
        by_name[c.name] = {**c.config.to_dict(), "name": c.name, "aliases": list(c.aliases)}
    meta["configs"] = list(by_name.values())
    run_file.write_text(json.dumps(meta, indent=1))

    specs = [
        (name, limit if limit is not None else args.limit) for name, limit in (args.task or [("squad", None)])
    ]
    examples = split_tasks(args, lm, specs)
    counts = {t: sum(1 for e in examples if e.task == t) for t, _ in specs}
    profile = None
    if grid.needs_profile(configs):
        started = time.perf_counter()
        profile = grid.bench_profile(lm, args.profile)
        logger.info("profile %s ready in %.1f s", profile.hash[:12], time.perf_counter() - started)
    console = make_console()
    console.print(
        f"[bold]kvlink-bench quality[/bold]: {lm.name} on {meta['device_name']} ({meta['dtype']}), "
        f"{len(configs)} configs x {len(examples)} examples {counts} ({args.split} split), batch {batch}, "
        f"out {out}"
    )
    records, stats = grid.run_quality(
        lm,
        examples,
        configs,
        grid.samples_file(out, args.shard),
        settings,
        profile,
        args.resume,
        not args.no_progress,
        args.shard,
    )
    aliases = {c.name: list(c.aliases) for c in configs if c.aliases}
    if n > 1:
        console.print(
            f"shard {k}/{n}: {stats['examples_run']} examples in {stats['seconds_total']:.1f} s "
            f"({stats['seconds_per_example']:.2f} s each); when every shard is done: kvlink-bench report {out}"
        )
        return 0
    meta["stats"] = stats
    run_file.write_text(json.dumps(meta, indent=1))
    result = report.write_report(records, out, meta, aliases)
    print(report.markdown(result["summary"], aliases))
    per_task = stats.get("seconds_per_example_by_task", {})
    console.print(
        f"time per example: {stats['seconds_per_example']:.2f} s over {stats['examples_run']} examples run now "
        f"({', '.join(f'{t}: {s:.2f} s' for t, s in per_task.items())}); {stats['pairs_skipped']} pairs resumed; "
        f"{len(configs)} configs per example"
    )
    _print_stage_times(console, records)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {', '.join(result['plots'])}")
    return 0


def _print_stage_times(console: Any, records: Sequence[dict[str, Any]]) -> None:
    seen: dict[str, dict[str, Any]] = {}
    for rec in records:
        seen.setdefault(rec["eid"], rec)
    if not seen:
        return
    stages = ("prefill_s", "reference_s", "configs_s", "ppl_s", "example_s")
    means = {s: statistics.mean(float(r.get(s, 0.0)) for r in seen.values()) for s in stages}
    console.print(
        "mean per example: " + ", ".join(f"{s.removesuffix('_s')} {v:.2f} s" for s, v in means.items())
    )
