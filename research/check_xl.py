"""The product's `xl` core (kvlink.xl: kvlink.predict + kvlink.residual + kvlink.ans) against the screen
that chose it (research/screen_combo.py, `aqua22-pca@<budget>`): the same questions, paired.

usage: PYTHONPATH=$PWD python research/check_xl.py N [--budgets 25,12.5] [--name NAME] [--split calibration]

Profiles: the predictors fitted through `xpred+kint2c/vint2t-g64+sink1` (kvlink.predict.cached_predictors,
the calibration split's odd paragraphs) and the residual profile fitted on the same paragraphs through
them (kvlink.residual.fit_residuals), cached under KVLINK_RESEARCH_CACHE. Bytes: the coded body (sinks and
rANS streams) plus 8 bytes of header (rate, sink, rows), plus the FP16 message's framing (the harness).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, Bytes, Context, lm, run_screen, sensitivity  # noqa: E402

from kvlink import xl  # noqa: E402
from kvlink.cache import ContextKV  # noqa: E402
from kvlink.predict import cached_predictors, fit_texts  # noqa: E402
from kvlink.prompt import context_ids  # noqa: E402
from kvlink.recipe import Recipe  # noqa: E402
from kvlink.residual import ResidualProfile, fit_residuals  # noqa: E402

FIT = "xpred+kint2c/vint2t-g64+sink1"
HEADER = 8


def profiles() -> tuple[object, ResidualProfile]:
    recipe = Recipe.from_name(FIT)
    predictors = cached_predictors(lm(), recipe)
    path = CACHE / f"residual-{predictors.hash[:12]}.safetensors"
    if path.is_file():
        residual = ResidualProfile.load(path)
    else:
        ids = [context_ids(lm().tokenizer, t).to(lm().device) for t in fit_texts()]
        residual = fit_residuals(lm().model, ids, predictors, recipe, sensitivity())
        residual.save(path)
    residual.check_for(predictors)
    return predictors, residual


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("--budgets", default="25,12.5")
    ap.add_argument("--name", default="check-xl")
    ap.add_argument("--split", default="calibration", choices=("calibration", "evaluation"))
    ap.add_argument("--shard", default="0/1")
    args = ap.parse_args()
    predictors, residual = profiles()
    budgets = [float(b) for b in args.budgets.split(",")]

    def candidates(c: Context) -> dict[str, tuple[ContextKV, Bytes]]:
        out = {}
        for b in budgets:
            target = int(b / 100 * c.fp16_bytes - c.framing - HEADER)
            coded = xl.fit_rate(c.kv, predictors, residual, target)
            out[f"kvlink-xl@{b:g}"] = (xl.decode(coded, predictors, residual, c.kv.positions[0], lm().device.type),
                                       Bytes(coded.nbytes, HEADER))  # fmt: skip
        return out

    meta = {"predictors": predictors.hash, "residual": residual.hash}
    run_screen(args.name, candidates, args.n, [], 0, meta, split=args.split,
               shard=tuple(int(x) for x in args.shard.split("/")))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
