"""`python -m kvlink.demo --inprocess`: sender -> receiver round trip in one process on the embedded model.

The sender prefills a SQuAD context, selects and quantizes its KV cache; the
receiver decodes ONLY the encoded bytes into a fresh cache and answers. The
table shows, per configuration, the answer and the encoded sizes against the
FP16 size of the full context KV. (`make demo` runs the networked version.)
"""

from __future__ import annotations

import argparse
import logging
import time

from rich.console import Console
from rich.table import Table

from kvlink.cache import Observe, prefill
from kvlink.codec import Codec, CodecConfig
from kvlink.eval.squad import best_scores, load_squad
from kvlink.generate import greedy_answer
from kvlink.models import load_model
from kvlink.prompt import context_ids, question_ids
from kvlink.select import get_selector

DEMO_CONFIGS = (
    CodecConfig(),
    CodecConfig(k_bits=8, v_bits=8),
    CodecConfig(k_bits=4, v_bits=4),
    CodecConfig(selector="q2c", retention=0.5, k_bits=8, v_bits=8),
    CodecConfig(selector="q2c", retention=0.75, k_bits=4, v_bits=4),
    CodecConfig(selector="q2c", retention=0.25, k_bits=2, v_bits=2),
)


def run_inprocess(example_index: int = 0, max_new_tokens: int = 24) -> None:
    console = Console()
    console.print("[bold]kvlink in-process demo[/bold]: loading the embedded model (first run converts it, ~30 s)")
    lm = load_model()
    example = load_squad()[example_index]
    ctx_ids = context_ids(lm.tokenizer, example.context)
    q_ids = question_ids(lm.tokenizer, example.question)
    console.print(f"context: {example.title!r}, {ctx_ids.numel()} tokens; question: {example.question!r}")
    console.print(f"gold answers: {list(dict.fromkeys(example.answers))}")

    table = Table(title="sender -> receiver, in process")
    for col in ("config", "answer", "F1", "payload B", "metadata B", "total B", "% of FP16", "encode s", "answer s"):
        table.add_column(col, justify="left" if col in ("config", "answer") else "right")
    for config in DEMO_CONFIGS:
        observe = get_selector(config.selector).observes if config.selector != "none" else Observe.NONE
        pre = prefill(lm.model, ctx_ids, q_ids, observe=observe)
        codec = Codec(config, lm.geometry)
        started = time.perf_counter()
        encoded = codec.encode(pre)
        encode_s = time.perf_counter() - started
        received = codec.decode(encoded)  # the receiver sees only `encoded`
        answer = greedy_answer(lm.model, lm.tokenizer, received, q_ids, max_new_tokens=max_new_tokens)
        sizes = encoded.sizes()
        f1, _ = best_scores(answer.text, example.answers)
        table.add_row(config.label, answer.text, f"{f1:.2f}", f"{sizes.payload:,}", f"{sizes.metadata:,}",
                      f"{sizes.total:,}", f"{100 * sizes.total / encoded.fp16_bytes():.1f}%",
                      f"{encode_s:.2f}", f"{answer.timings['answer_s']:.2f}")
    console.print(table)
    console.print(f"FP16 size of the full context KV: {lm.geometry.fp16_bytes(ctx_ids.numel()):,} bytes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvlink.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inprocess", action="store_true", help="run sender and receiver in this process")
    parser.add_argument("--example", type=int, default=0, help="index of the SQuAD answerable question")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run_inprocess(args.example)


if __name__ == "__main__":
    main()
