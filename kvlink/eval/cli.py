"""kvlink-bench: quality per wire byte, the planner's quality table, end-to-end latency, kernels.

    kvlink-bench quality --task squad --task long:100 --task needle:100 --limit 300 --grid default \\
        --device cuda --out bench/results/quality         # the evaluation split: figures to report
    kvlink-bench quality --split calibration --task squad --configs ... --out bench/results/quality-cal
    kvlink-bench calibrate bench/results/quality-cal [more runs]   # quality table + planner-on-frontier check
    kvlink-bench holdout bench/results/quality           # the table's entries and gains on the evaluation split
    kvlink-bench sensitivity --limit 16                   # KL per layer and K/V at INT2: bits per layer (mix3.5)
    kvlink-bench e2e --task long --limit 3 --configs 'q2c50%+kint4c/vint4t-g32' --out bench/results/e2e.json
    kvlink-bench report bench/results/quality             # rebuild JSON/Markdown/plots from samples.jsonl
    kvlink-bench kernels --out bench/results/kernels.json # Triton kernels vs the torch reference
    kvlink-bench scale --model random:llama-3.1-8b --tokens 8k,32k   # TTFT through kvlink-serve, paced links
    kvlink-bench ttft --tokens 2k --rates 3M,30M,1G --out bench/results/ttft   # segmented sending: adaptive vs static

Data are split by article (kvlink.eval.splits): `--split calibration` for anything that is tuned
(`calibrate` refuses results holding any other example), `--split evaluation` (the default of
`quality`, `e2e` and `report`) for figures to report, `--split all` for every article (the
layout before the split, and any other SQuAD-format --data file).

`quality` writes, under --out: samples.jsonl (one line per (example, config), appended as
it goes, so --resume continues an interrupted run), run.json (settings), results.json
(samples + per-config summaries with bootstrap 95% CIs), results.md and pareto-<task>.png.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from kvlink.eval.commands import (
    abuse,
    calibrate,
    e2e,
    entropy,
    holdout,
    kernels,
    profile,
    quality,
    report,
    scale,
    sensitivity,
    ttft,
)

COMMANDS: dict[str, ModuleType] = {
    "quality": quality,
    "calibrate": calibrate,
    "holdout": holdout,
    "profile": profile,
    "e2e": e2e,
    "entropy": entropy,
    "sensitivity": sensitivity,
    "report": report,
    "abuse": abuse,
    "scale": scale,
    "ttft": ttft,
    "kernels": kernels,
}
"""kvlink-bench's commands (kvlink.eval.commands), in the order --help lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvlink-bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `kvlink-bench`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")  # kvlink-bench -v COMMAND ...
    rest = argv[1:] if verbose else argv
    command = COMMANDS.get(rest[0]) if rest else None
    run_argv = getattr(command, "run_argv", None)  # its benchmark module parses the arguments itself
    if run_argv is not None:
        _log(verbose)
        if (code := run_argv(rest[1:])) is not None:
            return code
    args = build_parser().parse_args(argv)
    _log(args.verbose)
    return int(args.func(args))


def _log(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )


if __name__ == "__main__":
    raise SystemExit(main())
