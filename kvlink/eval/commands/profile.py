"""`kvlink-bench profile`: write the calibrated profile a config needs, for `--profile FILE` on both sides.

A config with `xpred` needs cross-layer predictors (kvlink.predict, fitted through the config's
quantization on the calibration split's odd paragraphs); one with `profile-r*` a low-rank projection
(kvlink.lowrank, calibrated on reserved calibration-split paragraphs). Each is fitted once per model and
cached under $KVLINK_CACHE/profiles; this command writes it to --out and prints its hash, the value a
receiver lists in its Welcome.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvlink.eval.commands.common import Subparsers

EPILOG = """\
    kvlink-bench profile --config "xpred+kint3c/vint3t-g64+sink1" --out xpred.safetensors
    kvlink-serve --profile xpred.safetensors ...
    kvlink-send --config "xpred+kint3c/vint3t-g64+sink1" --profile xpred.safetensors ...
"""


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "profile", help="write the calibrated profile (xpred predictors, profile-r* projection) a config needs",
        description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "--config", required=True, help="the config the profile is for, e.g. 'xpred+kint3c/vint3t-g64'"
    )
    p.add_argument("--out", required=True, help="the safetensors file to write")
    p.add_argument(
        "--model", default=None, help="model alias, HF id, local path or random:NAME (default: embedded)"
    )
    p.add_argument(
        "--device", default="cpu", help="where to fit (default cpu; both sides need the same file)"
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlink.predict import cached_predictors
    from kvlink.recipe import Recipe
    from kvlink.stages.lowrank import LowRank
    from kvlink.stages.predict import Predict

    try:
        recipe = Recipe.from_name(args.config)
    except ValueError as exc:
        raise SystemExit(f"kvlink-bench profile: {exc}") from None
    predicts = any(isinstance(s, Predict) for s in recipe.stages())
    projects = any(isinstance(s, LowRank) and s.mode == "profile" for s in recipe.stages())
    if not (predicts or projects):
        raise SystemExit(
            f"kvlink-bench profile: {recipe.name!r} needs no profile (only 'xpred' and 'profile-r*' configs do)"
        )
    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"kvlink-bench profile: {out} exists (--force to overwrite)")
    from kvlink.eval import grid
    from kvlink.models import load_model

    lm = load_model(args.model, args.device)
    started = time.perf_counter()
    # Fitted once per model (and fit recipe) and cached; saved here as the same canonical bytes, same hash.
    profile = cached_predictors(lm, recipe) if predicts else grid.bench_profile(lm)
    kind = "cross-layer predictors" if predicts else "low-rank projection"
    profile.save(out)
    print(
        f"{out}: {kind} for {recipe.name!r} on {lm.name} ({out.stat().st_size:,} B, sha256 {profile.hash}; "
        f"{time.perf_counter() - started:.0f} s)\n"
        f"  receiver: kvlink-serve --profile {out} ...\n"
        f"  sender:   kvlink-send --config {recipe.name!r} --profile {out} ..."
    )
    return 0
