"""`kvlink-bench abuse`: good senders beside one hostile authenticated peer (kvlink.eval.bench_abuse)."""

from __future__ import annotations

from kvlink.eval.commands.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    sub.add_parser(
        "abuse", help="good senders beside one hostile authenticated peer: what it costs them", add_help=False
    )


def run_argv(argv: list[str]) -> int | None:
    """Its own parser: good senders beside one hostile peer, on a receiver it starts."""
    from kvlink.eval.bench_abuse import main

    return main(argv)
