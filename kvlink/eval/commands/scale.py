"""`kvlink-bench scale`: TTFT through kvlink-serve over paced links at real geometries (kvlink.eval.bench_scale)."""

from __future__ import annotations

from kvlink.eval.commands.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    sub.add_parser(
        "scale", add_help=False,
        help="TTFT through kvlink-serve over paced links at real geometries: text vs FP16 vs compressed KV",
    )  # fmt: skip


def run_argv(argv: list[str]) -> int | None:
    """Its own parser: the real service over paced links."""
    from kvlink.eval.bench_scale import main

    return main(argv)
