"""`make demo` (`python -m kvlink.demo`): the networked round trip on the embedded model.

Starts a receiver (`kvlink-serve`) in a subprocess on free ports, waits until
it is healthy, sends a SQuAD context and question at an 18.75% budget through
the sender library (kvlink.client.sender: prefill, plan, stream, ask), prints the
answer and the byte/time tables, prints a line of the receiver's REST
/v1/stats, and stops the receiver.

`python -m kvlink.demo --inprocess`: sender -> receiver in one process, for a
few fixed configurations side by side (no network): the sender prefills a
SQuAD context, selects and quantizes its KV cache; the receiver decodes ONLY
the encoded bytes into a fresh cache and answers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

from kvlink.cache import prefill
from kvlink.cli import console as make_console
from kvlink.codec import Codec
from kvlink.eval.squad import load_squad
from kvlink.generate import greedy_answer
from kvlink.models import load_model
from kvlink.prompt import context_ids, question_ids, question_rows
from kvlink.recipe import build
from kvlink.scoring import best_scores

DEMO_CONFIGS = (
    build(),
    build(k_bits=8, v_bits=8),
    build(k_bits=4, v_bits=4),
    build(selector="q2c", retention=0.5, k_bits=8, v_bits=8),
    build(selector="q2c", retention=0.75, k_bits=4, v_bits=4),
    build(selector="q2c", retention=0.25, k_bits=2, v_bits=2),
)


def run_inprocess(example_index: int = 0, max_new_tokens: int = 24) -> None:
    console = make_console()  # piped (make demo in CI): complete lines, never cut to 80 columns
    console.print(
        "[bold]kvlink in-process demo[/bold]: loading the embedded model (first run converts it, ~30 s)"
    )
    lm = load_model()
    example = load_squad()[example_index]
    ctx_ids = context_ids(lm.tokenizer, example.context)
    q_ids = question_ids(lm.tokenizer, example.question)
    console.print(f"context: {example.title!r}, {ctx_ids.numel()} tokens; question: {example.question!r}")
    console.print(f"gold answers: {list(dict.fromkeys(example.answers))}")

    table = Table(title="sender -> receiver, in process")
    for col in (
        "config",
        "answer",
        "F1",
        "payload B",
        "metadata B",
        "total B",
        "% of FP16",
        "encode s",
        "answer s",
    ):
        table.add_column(col, justify="left" if col in ("config", "answer") else "right")
    for config in DEMO_CONFIGS:
        observe = config.needs()
        pre = prefill(
            lm.model,
            ctx_ids,
            q_ids,
            observe=observe,
            question_rows=question_rows(lm.tokenizer, example.question),
        )
        codec = Codec(config, lm.geometry)
        started = time.perf_counter()
        encoded = codec.encode(pre)
        encode_s = time.perf_counter() - started
        received = codec.decode(encoded)  # the receiver sees only `encoded`
        answer = greedy_answer(lm.model, lm.tokenizer, received, q_ids, max_new_tokens=max_new_tokens)
        sizes = encoded.sizes()
        f1, _ = best_scores(answer.text, example.answers)
        table.add_row(
            config.name,
            answer.text,
            f"{f1:.2f}",
            f"{sizes.payload:,}",
            f"{sizes.metadata:,}",
            f"{sizes.total:,}",
            f"{100 * sizes.total / encoded.fp16_bytes():.1f}%",
            f"{encode_s:.2f}",
            f"{answer.timings['answer_s']:.2f}",
        )
    console.print(table)
    console.print(f"FP16 size of the full context KV: {lm.geometry.fp16_bytes(ctx_ids.numel()):,} bytes")


def run_networked(example_index: int = 0, budget: str = "18.75%", max_new_tokens: int = 24) -> int:
    """Receiver in a subprocess, sender here; returns the receiver's exit status."""
    import httpx

    from kvlink.client.main import print_result
    from kvlink.client.sender import send_context
    from kvlink.server.local import LocalReceiver

    console = make_console()  # piped (make demo in CI): complete lines, never cut to 80 columns
    log = Path(tempfile.mkdtemp(prefix="kvlink-demo-")) / "kvlink-serve.log"
    rx = LocalReceiver(log=log)
    console.print(
        f"[bold]kvlink demo[/bold]: starting the receiver: kvlink-serve --port {rx.port} --rest-port {rx.rest_port}"
    )
    with rx:
        with console.status("loading the embedded model on both sides (the first run converts it, ~30 s)"):
            lm = load_model()
            rx.wait_healthy()
        target, rest = rx.target, rx.rest
        console.print(f"receiver healthy: gRPC {target}, REST {rest} (OpenAPI docs at {rest}/docs)")
        example = load_squad()[example_index]
        console.print(f"context: {example.title!r} (SQuAD); question: {example.question!r}")
        console.print(f"gold answers: {list(dict.fromkeys(example.answers))}")
        with console.status(f"sending at a {budget} budget"):
            result = asyncio.run(
                send_context(
                    target,
                    example.context,
                    example.question,
                    budget,
                    lm=lm,
                    reference_answers=example.answers,
                    max_new_tokens=max_new_tokens,
                    keep=False,  # the receiver stops right after: no follow-up questions here
                )
            )
        print_result(console, result)
        stats = httpx.get(f"{rest}/v1/stats", timeout=10).json()
        group = stats["configs"][result.plan.recipe.name]
        decode = group["timings"].get("decode_s", {})
        console.print(
            f"[bold]GET {rest}/v1/stats[/bold] {result.plan.recipe.name}: {group['messages']} message(s), "
            f"{group['bytes']['total']:,} wire bytes = {group['percent_of_fp16']:.2f}% of FP16 "
            f"(ratio {group['compression_ratio']:.2f}x), decode p50 {decode.get('p50', 0.0):.3f} s, "
            f"F1 mean {group['f1_mean']:.2f}, EM mean {group['exact_match_mean']:.2f}"
        )
    console.print(f"receiver stopped (exit status {rx.returncode}); its log: {log}")
    return int(rx.returncode or 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kvlink.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--inprocess", action="store_true", help="run sender and receiver in this process")
    parser.add_argument("--example", type=int, default=0, help="index of the SQuAD answerable question")
    parser.add_argument("--budget", default="18.75%", help="networked demo: the bandwidth budget")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="longest answer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.inprocess:
        run_inprocess(args.example, args.max_new_tokens)
        return
    sys.exit(run_networked(args.example, args.budget, args.max_new_tokens))


if __name__ == "__main__":
    main()
