"""`kvlink-bench kernels`: Triton kernels vs the torch reference, on a GPU (kvlink.eval.bench_kernels)."""

from __future__ import annotations

from kvlink.eval.commands.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    from kvlink.eval import bench_kernels

    k = sub.add_parser("kernels", help="Triton kernels vs the torch reference (GPU)")
    bench_kernels.build_parser(k)
    k.set_defaults(func=None)


def run_argv(argv: list[str]) -> int | None:
    """bench_kernels' own parser runs it; --help is left to kvlink-bench's subparser (the same arguments)."""
    if {"-h", "--help"} & set(argv):
        return None
    from kvlink.eval.bench_kernels import main_kernels

    return main_kernels(argv)
