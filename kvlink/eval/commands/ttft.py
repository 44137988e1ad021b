"""`kvlink-bench ttft`: the segmented sender's TTFT through kvlink-serve over paced links (kvlink.eval.bench_ttft)."""

from __future__ import annotations

from kvlink.eval.commands.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    sub.add_parser(
        "ttft", add_help=False,
        help="segmented sending by TTFT: adaptive vs static options, predicted vs measured, a link that slows",
    )  # fmt: skip


def run_argv(argv: list[str]) -> int | None:
    """Its own parser: the real service over paced links."""
    from kvlink.eval.bench_ttft import main

    return main(argv)
