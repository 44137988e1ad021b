"""What several kvlink-bench commands share: argument types, the model arguments, loading, the examples."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvlink.eval.splits import SPLITS

Subparsers = argparse._SubParsersAction  # what add_subparsers() returns: each command adds its parser to it


def task_spec(text: str) -> tuple[str, int | None]:
    """'long' or 'long:50' -> ('long', None) / ('long', 50)."""
    from kvlink.eval.tasks import TASKS

    name, _, limit = text.partition(":")
    if name not in TASKS:
        raise argparse.ArgumentTypeError(f"--task must be one of {TASKS} (optionally task:N), got {text!r}")
    if limit:
        try:
            n = int(limit)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--task {name}:N needs an integer N, got {text!r}") from None
        if n < 0:
            raise argparse.ArgumentTypeError(f"--task limit must be >= 0, got {text!r}")
        return name, n
    return name, None


def token_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX tokens like 1024-4096, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def example_ids(text: str) -> tuple[str, ...]:
    """'squad:ab12,long:cd34' or '@FILE' (an id a line; blank lines and # comments skipped) -> the ids."""
    if text.startswith("@"):
        try:
            lines = Path(text[1:]).read_text().splitlines()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"--examples {text}: {exc.strerror or exc}") from None
        ids = [line.split("#", 1)[0].strip() for line in lines]
    else:
        ids = [part.strip() for part in text.split(",")]
    ids = [i for i in ids if i]
    if not ids:
        raise argparse.ArgumentTypeError(f"--examples names no example id: {text!r}")
    return tuple(dict.fromkeys(ids))


def add_model_and_task_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the examples and the run's device of `quality` and `e2e`."""
    p.add_argument(
        "--model", default=None, help="HF id or path (default: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--task", action="append", type=task_spec, metavar="TASK[:N]",
        help="squad, long or needle; repeatable; TASK:N overrides --limit for that task",
    )  # fmt: skip
    p.add_argument(
        "--data", default=None, help="a SQuAD-format JSON file (default: the shipped SQuAD v2 dev split)"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="examples per task (quality: all, needle 50; e2e: 3)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="model dtype (default fp32)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the long-context and needle tasks")
    p.add_argument(
        "--long-tokens", type=token_range, default=None, metavar="MIN-MAX",
        help="context tokens of the long task (default 2048-7936: kvlink.eval.tasks.LONG_TOKENS)",
    )  # fmt: skip
    p.add_argument(
        "--split", choices=(*SPLITS, "all"), default="evaluation",
        help="articles to draw examples from (kvlink.eval.splits): evaluation (default; reporting), calibration "
        "(what calibrate takes), all (every article; any other --data file)",
    )  # fmt: skip
    p.add_argument(
        "--exclude-fit-text", action="store_true",
        help="leave out the calibration paragraphs the predictor and transform-coding profiles are fitted on "
        "(kvlink.predict.fit_texts: the odd paragraphs of each calibration article), so that configs using "
        "those profiles are not measured on their own fitting text",
    )  # fmt: skip
    p.add_argument(
        "--examples", type=example_ids, default=None, metavar="IDS",
        help="only these of the examples --task and --split draw, in their order: comma-separated ids as a "
        "run's samples name them (e.g. long:3515bf7dff5db33d051bffd96) or @FILE, one a line; an id not "
        "drawn is an error",
    )  # fmt: skip
    p.add_argument(
        "--profile", default=None, help="calibrated projection profile (default: calibrated and cached)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_lm(model: str | None, device: str, dtype: str) -> Any:
    from kvlink.models import load_model

    return load_model(model, device=device, dtype=dtype)


def make_console() -> Any:
    from rich.console import Console

    return Console(width=160)


def split_tasks(args: argparse.Namespace, lm: Any, specs: Sequence[tuple[str, int | None]]) -> list[Any]:
    """The examples of `specs` on args.split: one split's articles, or every article (`all`: the reserved
    article, whose paragraphs fit the benchmark's projection profile, left out as before the split)."""
    from kvlink.eval import tasks

    split = None if args.split == "all" else args.split
    long_range = args.long_tokens or tasks.LONG_TOKENS
    exclude = list(tasks.reserved_contexts()) if split is None else []
    if getattr(args, "exclude_fit_text", False):
        from kvlink.predict import fit_texts

        exclude += fit_texts()
    try:
        examples = tasks.build_tasks(
            lm.tokenizer, specs, data=args.data, seed=args.seed, long_range=long_range,
            needle_range=getattr(args, "needle_tokens", None) or long_range, exclude=exclude, split=split,
        )  # fmt: skip
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    wanted = getattr(args, "examples", None)
    if not wanted:
        return examples
    drawn = {e.eid for e in examples}
    missing = [eid for eid in wanted if eid not in drawn]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SystemExit(
            f"--examples: {len(missing)} of {len(wanted)} ids are not among the {len(examples)} examples "
            f"{', '.join(f'{t}:{n}' if n is not None else t for t, n in specs)} draws on the {args.split} split "
            f"(seed {args.seed}): {shown}"
        )
    chosen = set(wanted)
    return [e for e in examples if e.eid in chosen]
