"""`kvlink-bench e2e`: time to first token over a paced loopback link, compressed KV vs FP16 KV vs text
(the measurement: kvlink.eval.e2e)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from kvlink.eval.commands.common import (
    Subparsers,
    add_model_and_task_arguments,
    load_lm,
    make_console,
    resolve_device,
    split_tasks,
)
from kvlink.eval.e2e import e2e_example, e2e_summary
from kvlink.eval.link import parse_bandwidth

BANDWIDTHS = "100M,1G,10G"


def add_parser(sub: Subparsers) -> None:
    e = sub.add_parser(
        "e2e", help="time to first token over a paced loopback link: compressed KV vs FP16 KV vs text"
    )
    add_model_and_task_arguments(e)
    e.add_argument(
        "--configs",
        action="append",
        metavar="NAMES",
        help="compressed configs (default q2c50%%+kint4c/vint4t-g32)",
    )
    e.add_argument(
        "--bandwidth", default=BANDWIDTHS, help=f"comma-separated link rates (default {BANDWIDTHS})"
    )
    e.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    e.add_argument("--out", default="bench/results/e2e.json", help="JSON output path")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from kvlink.eval import grid

    if args.limit is None:  # --limit is shared with quality, where None means every example
        args.limit = 3
    device = resolve_device(args.device)
    lm = load_lm(args.model, device, args.dtype)
    configs = [
        c for c in grid.resolve(args.configs or ["q2c50%+kint4c/vint4t-g32"], lm.geometry) if c.name != "fp16"
    ]
    bandwidths = [parse_bandwidth(b) for b in args.bandwidth.split(",")]
    specs = [
        (name, limit if limit is not None else args.limit) for name, limit in (args.task or [("long", None)])
    ]
    examples = split_tasks(args, lm, specs)
    profile = grid.bench_profile(lm, args.profile) if grid.needs_profile(configs) else None
    rows: list[dict[str, Any]] = []
    from tqdm import tqdm

    for example in tqdm(examples, desc="e2e", unit="ex", disable=args.no_progress):
        rows += e2e_example(lm, example, configs, bandwidths, args.repeats, profile)
    summary = e2e_summary(rows)
    result: dict[str, Any] = {
        "meta": {
            "model": lm.name,
            "fingerprint": lm.fingerprint,
            "device": str(lm.device),
            "device_name": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu",
            "dtype": str(lm.dtype).removeprefix("torch."),
            "repeats": args.repeats,
            "configs": [c.name for c in configs],
            "bandwidths_bps": bandwidths,
        },
        "summary": summary,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

    from rich.table import Table

    view = Table(
        title=f"time to first answer token at the receiver ({lm.name}, {result['meta']['device_name']})"
    )
    for col in (
        "link",
        "method",
        "bytes",
        "encode",
        "transfer",
        "decode/prefill",
        "first token",
        "TTFT",
        "FP16-KV / this",
        "text / this",
    ):
        view.add_column(col, justify="right")
    for e in summary:
        view.add_row(
            f"{e['bandwidth_bps'] / 1e9:g} Gbit/s",
            e["method"],
            f"{e['bytes']:,.0f}",
            f"{1e3 * e.get('encode_s', 0.0):.1f} ms",
            f"{1e3 * e['transfer_s']:.1f} ms",
            f"{1e3 * e.get('decode_s', e.get('prefill_s', 0.0)):.1f} ms",
            f"{1e3 * e['first_token_s']:.1f} ms",
            f"{1e3 * e['ttft_s']:.1f} ms",
            f"{e.get('fp16_over_this', math.nan):.2f}x",
            f"{e.get('text_over_this', math.nan):.2f}x",
        )
    console = make_console()
    console.print(view)
    console.print(f"wrote {out}")
    return 0
