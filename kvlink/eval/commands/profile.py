"""`kvlink-bench profile`: write the calibrated profile a config needs, for `--profile FILE` on both sides.

A config with `xpred` needs cross-layer predictors (kvlink.predict, fitted through the config's
quantization on the calibration split's odd paragraphs); one with `profile-r*` a low-rank projection
(kvlink.lowrank, calibrated on reserved calibration-split paragraphs); one with `pca` (transform coding)
a residual profile and the predictors it was fitted on (kvlink.residual: predictors through INT2, the
residual's bases and step weights from the model's sensitivity profile), written as --out and its
`-predictors` twin. Each is fitted once per model and cached under $KVLINK_CACHE/profiles; this command
writes it to --out and prints its hash, the value a receiver lists in its Welcome.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from kvlink.eval.commands.common import Subparsers

EPILOG = """\
    kvlink-bench profile --config "xpred+kint3c/vint3t-g64+sink1" --out xpred.safetensors
    kvlink-serve --profile xpred.safetensors ...
    kvlink-send --config "xpred+kint3c/vint3t-g64+sink1" --profile xpred.safetensors ...

    kvlink-bench profile --config "xpred+fp16+pca1+ans" --out xl.safetensors   # + xl-predictors.safetensors
    kvlink-serve --profile xl.safetensors --profile xl-predictors.safetensors ...
    kvlink-send --config "xpred+fp16+pca1+ans" --budget 12.5% \\
        --profile xl.safetensors --profile xl-predictors.safetensors ...
"""


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "profile", help="write the calibrated profile (xpred predictors, profile-r* projection, pca residual) "
        "a config needs",
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
            f"kvlink-bench profile: {recipe.name!r} needs no profile (only 'xpred', 'pca' and 'profile-r*' "
            "configs do)"
        )
    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"kvlink-bench profile: {out} exists (--force to overwrite)")
    from kvlink.eval import grid
    from kvlink.models import load_model

    lm = load_model(args.model, args.device)
    started = time.perf_counter()
    if recipe.has("pca"):
        return _transform_profiles(lm, recipe, out, started)
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


def _transform_profiles(lm: Any, recipe: Any, out: Path, started: float) -> int:
    """Write transform coding's residual profile to `out` and its predictors beside it."""
    from kvlink.residual import cached_transform_profiles

    try:
        profiles = cached_transform_profiles(lm)
    except ValueError as exc:
        raise SystemExit(f"kvlink-bench profile: {exc}") from None
    twin = out.with_name(f"{out.stem}-predictors{out.suffix}")
    profiles.residual.save(out)
    profiles.predictors.save(twin)
    print(
        f"{out}: residual profile for {recipe.name!r} on {lm.name} ({out.stat().st_size:,} B, sha256 "
        f"{profiles.residual.hash})\n{twin}: its predictors ({twin.stat().st_size:,} B, sha256 "
        f"{profiles.predictors.hash}; {time.perf_counter() - started:.0f} s)\n"
        f"  receiver: kvlink-serve --profile {out} --profile {twin} ...\n"
        f"  sender:   kvlink-send --config {recipe.name!r} --profile {out} --profile {twin} ..."
    )
    return 0
