"""`kvlink-bench sensitivity`: KL per layer and K/V at low bits on held-out questions (for mix<bits> configs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvlink.eval.commands.common import Subparsers, load_lm, make_console, resolve_device


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(
        "sensitivity", help="KL per layer and K/V at low bits on held-out questions (for mix<bits> configs)"
    )
    s.add_argument("--model", default=None, help="model alias, HF id or local path (default: embedded)")
    s.add_argument("--device", default=None)
    s.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    s.add_argument("--data", default=None, help="SQuAD-format JSON (default: the packaged dev set)")
    s.add_argument("--limit", type=int, default=16, help="held-out questions (default 16)")
    s.add_argument("--bits", type=int, default=2, choices=(2, 3, 4), help="width of the tensor under test")
    s.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    s.add_argument("--sink", type=int, default=1, help="fp16 sink entries per tensor (default 1)")
    s.add_argument("--batch", type=int, default=16, help="variant caches per forward (default 16)")
    s.add_argument(
        "--out", default=None, help="profile path (default <cache_dir>/sensitivity/<fingerprint>.json)"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """KL per layer and K/V at low bits on held-out questions: the profile `mix<bits>` configs allocate from."""
    from rich.table import Table
    from tqdm import tqdm

    from kvlink.eval import sensitivity
    from kvlink.layerbits import default_path

    lm = load_lm(args.model, resolve_device(args.device), args.dtype)
    examples = sensitivity.held_out_examples(args.limit, args.data)
    bar = tqdm(total=len(examples), desc="sensitivity", unit="ex", disable=args.no_progress)

    def advance(_: int) -> None:
        bar.update()

    profile = sensitivity.measure(
        lm, examples, args.bits, args.group_size, args.sink, batch=args.batch, on_example=advance
    )
    bar.close()
    out = Path(args.out) if args.out else default_path(lm.fingerprint)
    profile.save(out)
    view = Table(title=f"KL of each tensor alone at INT{args.bits} (rest INT8), {profile.examples} questions")
    for col in ("layer", "K", "V"):
        view.add_column(col, justify="right")
    for layer, (k, v) in enumerate(zip(profile.k, profile.v, strict=True)):
        view.add_row(str(layer), f"{k:.4f}", f"{v:.4f}")
    make_console().print(view)
    from kvlink.recipe import build

    for average in (3.0, 3.5):
        kb, vb = profile.allocate(average)
        recipe = build(k_layer_bits=kb, v_layer_bits=vb, group_size=args.group_size, sink=args.sink)
        print(f"mix{average:g}: K {list(kb)}  V {list(vb)}  name {recipe.name}")
    print(f"wrote {out}")
    return 0
