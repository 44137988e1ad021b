"""`xl` composed with ONE global Q2C kept set (the only selection cross-layer prediction composes with),
against selection + INT at the same budget: does the transform coding pay on long contexts once it keeps
the positions the question reads? (xl alone lost there: research/results/xl-long-eval-h200/.)

usage: PYTHONPATH=$PWD python research/screen_xl_select.py N [--task long] [--configs q2c35%+xl@10,...]
       [--baselines RECIPE,...] [--name NAME] [--shard K/N]

Candidates `q2c<r>%+xl@<budget %>`: kept = Q2C(question) at retention r, global; the kept entries coded
by kvlink.xl at the rate that fills the budget (kvlink.xl.fit_rate). Bytes: the coded body + 8 bytes of
header + the kept positions (kvlink.positions.encoded_size) + the FP16 message's framing (the harness).
Calibration split only (a screen); profiles as research/check_xl.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_xl import HEADER, profiles  # noqa: E402
from common import Bytes, Context, lm, run_screen, write_paired  # noqa: E402

from kvlink import xl  # noqa: E402
from kvlink.cache import ContextKV  # noqa: E402
from kvlink.positions import encoded_size  # noqa: E402
from kvlink.select.q2c import Q2C  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("--task", default="long", choices=("squad", "long"))
    ap.add_argument("--configs", default="q2c35%+xl@10,q2c50%+xl@10")
    ap.add_argument("--baselines", default="")
    ap.add_argument("--name", default="xl-select")
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--pairs", default="", help="BASE:CANDIDATE,... to pair when the run is whole")
    args = ap.parse_args()
    predictors, residual = profiles()
    configs = [c for c in args.configs.split(",") if c]

    def candidates(c: Context) -> dict[str, tuple[ContextKV, Bytes]]:
        out = {}
        for name in configs:
            head, budget = name.split("+xl@")
            retention = float(head.removeprefix("q2c").removesuffix("%")) / 100
            kept = Q2C().keep(c.question, retention, "global")
            kv = c.kv.select(kept)
            positions = encoded_size(kept[0], c.kv.length)
            target = int(float(budget) / 100 * c.fp16_bytes - c.framing - HEADER - positions)
            coded = xl.fit_rate(kv, predictors, residual, target)
            decoded = xl.decode(coded, predictors, residual, kept[0], lm().device.type)
            out[name] = (decoded, Bytes(coded.nbytes, HEADER, positions))
        return out

    meta = {"predictors": predictors.hash, "residual": residual.hash}
    shard = tuple(int(x) for x in args.shard.split("/"))
    run_screen(args.name, candidates, args.n, [b for b in args.baselines.split(",") if b], 0, meta,
               task=args.task, shard=shard)  # fmt: skip
    if shard == (0, 1) and args.pairs:
        write_paired(args.name, [tuple(p.split(":", 1)) for p in args.pairs.split(",")])  # type: ignore[misc]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
