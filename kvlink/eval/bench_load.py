"""Load benchmark of a kvlink receiver: N concurrent senders, M messages, messages/s and latency percentiles.

    python -m kvlink.eval.bench_load --senders 16 --messages 64 --out load.json
    python -m kvlink.eval.bench_load --server 10.0.0.5:50051 --rest http://10.0.0.5:8080 ...

Without --server it starts `kvlink-serve` on free loopback ports (concurrency limits raised to fit the
senders, --max-cached-bytes as given) and stops it at the end. The sender side prepares --contexts
distinct SQuAD contexts once (prefill + encode with --config; not timed) and the answer each gives
when decoded locally from the same bytes. Then --senders workers, one gRPC connection each, take the
--messages jobs from a queue: a Transfer of one context (a new message id every time) and the Ask about
it. Reported (JSON to --out, a table on stdout): messages/s over the wall time, p50/p90/p99/mean/max of
transfer, ask and total latency, errors by gRPC status, NOT_FOUND asks (evicted before the question
came), answers that differ from their context's own (cross-talk: must be 0), and the receiver's store
and call statistics after the run. A benchmark, not a test: it asserts nothing and never gates CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGS = {
    "q2c50-int4": dict(selector="q2c", retention=0.5, k_bits=4, v_bits=4),
    "int4": dict(k_bits=4, v_bits=4),
    "int8": dict(k_bits=8, v_bits=8),
    "fp16": dict(),
}


@dataclass
class Prepared:
    """One context, encoded once, and the answer its bytes give (computed on the sender's side)."""

    question: str
    encoded: Any  # kvlink.codec.EncodedKV
    tokens: list[int]
    context_tokens: int


@dataclass
class Outcome:
    ok: bool
    status: str  # "OK", a gRPC status name, or "NOT_FOUND" for an Ask after eviction
    transfer_s: float = 0.0
    ask_s: float = 0.0
    total_s: float = 0.0
    wire_bytes: int = 0
    mismatch: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvlink.eval.bench_load", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    p.add_argument("--senders", type=int, default=16, help="concurrent senders (one connection each)")
    p.add_argument("--messages", type=int, default=64, help="messages in all (transfer + ask each)")
    p.add_argument(
        "--contexts", type=int, default=16, help="distinct SQuAD contexts the messages cycle through"
    )
    p.add_argument(
        "--config", choices=sorted(CONFIGS), default="q2c50-int4", help="codec config of every message"
    )
    p.add_argument("--max-new-tokens", type=int, default=4, help="answer length")
    p.add_argument(
        "--server", default=None, metavar="HOST:PORT", help="a running receiver (default: start one)"
    )
    p.add_argument("--rest", default=None, metavar="URL", help="its REST address, for the store statistics")
    p.add_argument(
        "--token-file", default=None, help="bearer token for --server/--rest (plaintext gRPC only)"
    )
    p.add_argument(
        "--max-cached-bytes", type=int, default=2 << 30, help="cache cap of a receiver started here"
    )
    p.add_argument(
        "--device", default="cpu", help="device of the sender's model (and of a receiver started here)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call")
    p.add_argument("--out", default="load.json", help="JSON result file")
    return p


# --- the receiver --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def local_receiver(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """kvlink-serve on free loopback ports, sized for the senders; yields (target, rest URL)."""
    from kvlink.server.local import LocalReceiver

    slots = str(max(64, 4 * args.senders))
    flags = ["--device", args.device, "--max-concurrent-sessions", slots, "--per-peer-concurrency", slots,
             "--max-cached-bytes", str(args.max_cached_bytes), "--max-new-tokens", str(args.max_new_tokens),
             "--log-level", "warning"]  # fmt: skip
    with LocalReceiver(flags, keep_log=False) as rx:
        rx.wait_healthy()
        yield rx.target, rx.rest


# --- the senders ----------------------------------------------------------------------------------------------
def prepare(lm: Any, n: int, config_name: str, max_new_tokens: int) -> list[Prepared]:
    """n distinct SQuAD contexts (shortest first), encoded once, with their own answers."""
    from kvlink.cache import prefill
    from kvlink.codec import Codec
    from kvlink.eval.squad import load_squad
    from kvlink.generate import greedy_answer
    from kvlink.prompt import context_ids, question_ids
    from kvlink.recipe import build

    config = build(**CONFIGS[config_name])  # type: ignore[arg-type]
    codec = Codec(config, lm.geometry)
    by_context: dict[str, Any] = {}
    for example in load_squad():
        by_context.setdefault(example.context, example)
    examples = sorted(by_context.values(), key=lambda e: len(e.context))[:n]
    out = []
    for e in examples:
        ctx, q = context_ids(lm.tokenizer, e.context), question_ids(lm.tokenizer, e.question)
        observe = config.needs()
        encoded = codec.encode(prefill(lm.model, ctx, q, observe=observe))
        kv = codec.decode(encoded, lm.device, lm.dtype)
        answer = greedy_answer(lm.model, lm.tokenizer, kv, q, max_new_tokens=max_new_tokens)
        out.append(Prepared(e.question, encoded, list(answer.token_ids), int(ctx.numel())))
    return out


async def run_load(
    target: str, lm: Any, contexts: list[Prepared], senders: int, messages: int, max_new_tokens: int,
    timeout: float, token: str | None = None,
) -> tuple[list[Outcome], float]:  # fmt: skip
    """`messages` jobs over `senders` workers; returns each message's outcome and the wall time."""
    import grpc

    from kvlink import wire
    from kvlink.client.sender import ClientSecurity, SendError, ask, channel_options, transfer

    security = ClientSecurity(token=token)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(messages):
        queue.put_nowait(i)
    outcomes: list[Outcome] = []

    async def worker(w: int) -> None:
        async with security.channel(target, channel_options()) as channel:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                c = contexts[i % len(contexts)]
                session, message_id = f"load-{w}", uuid.uuid4().hex
                frames = wire.to_frames(c.encoded, session, message_id, lm.fingerprint, 1 << 20)
                t0 = time.perf_counter()
                try:
                    result = await transfer(channel, frames, timeout=timeout, metadata=security.metadata)
                except SendError as err:
                    outcomes.append(Outcome(False, err.status.name, total_s=time.perf_counter() - t0))
                    continue
                t1 = time.perf_counter()
                try:
                    answer = await ask(
                        channel, wire.Ask(session, message_id, c.question, max_new_tokens), timeout=timeout,
                        metadata=security.metadata,
                    )  # fmt: skip
                except SendError as err:
                    status = "NOT_FOUND" if err.status == grpc.StatusCode.NOT_FOUND else err.status.name
                    outcomes.append(Outcome(False, status, t1 - t0, time.perf_counter() - t1,
                                            time.perf_counter() - t0, result.receipt.total))  # fmt: skip
                    continue
                t2 = time.perf_counter()
                outcomes.append(Outcome(True, "OK", t1 - t0, t2 - t1, t2 - t0, result.receipt.total,
                                        mismatch=list(answer.token_ids) != c.tokens))  # fmt: skip

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(senders)))
    return outcomes, time.perf_counter() - started


def _stats(values: list[float]) -> dict[str, float | int | None]:
    from kvlink.metrics import percentile

    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    return {
        "n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
        "p99": percentile(values, 99), "mean": sum(values) / len(values), "max": max(values),
    }  # fmt: skip


def report(outcomes: list[Outcome], wall_s: float, args: argparse.Namespace, contexts: list[Prepared],
           prep_s: float, receiver: dict[str, Any] | None, target: str, started_here: bool) -> dict[str, Any]:  # fmt: skip
    done = [o for o in outcomes if o.ok]
    transferred = [o for o in outcomes if o.wire_bytes]
    return {
        "senders": args.senders, "messages": args.messages, "config": args.config,
        "max_new_tokens": args.max_new_tokens, "contexts": len(contexts),
        "context_tokens": [c.context_tokens for c in contexts],
        "ok": len(done), "errors": dict(Counter(o.status for o in outcomes if not o.ok)),
        "answer_mismatches": sum(o.mismatch for o in done),
        "wall_s": wall_s, "messages_per_s": len(done) / wall_s if wall_s > 0 else None,
        "transfers_per_s": len(transferred) / wall_s if wall_s > 0 else None,
        "latency_s": {
            "transfer": _stats([o.transfer_s for o in transferred]),
            "ask": _stats([o.ask_s for o in done]),
            "total": _stats([o.total_s for o in done]),
        },
        "wire_bytes_per_message": (sum(o.wire_bytes for o in transferred) / len(transferred)) if transferred else None,
        "prepare_s": prep_s, "receiver": receiver, "target": target, "receiver_started_here": started_here,
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "device": args.device},
    }  # fmt: skip


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['senders']} senders, {result['messages']} messages ({result['config']}): "
                  f"{result['messages_per_s']:.2f} messages/s, {result['ok']} answered")  # fmt: skip
    table.add_column("latency (s)")
    for q in ("p50", "p90", "p99", "mean", "max"):
        table.add_column(q, justify="right")
    for name, s in result["latency_s"].items():
        table.add_row(
            name, *("-" if s[q] is None else f"{s[q]:.3f}" for q in ("p50", "p90", "p99", "mean", "max"))
        )
    console = Console()
    console.print(table)
    console.print(f"errors: {result['errors'] or 'none'}; answers differing from their context's own: "
                  f"{result['answer_mismatches']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.senders < 1 or args.messages < 1 or args.contexts < 1:
        print("bench_load: --senders, --messages and --contexts must be >= 1", file=sys.stderr)
        return 2
    import httpx

    from kvlink.models import load_model

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    lm = load_model(None, args.device)
    t0 = time.perf_counter()
    contexts = prepare(lm, args.contexts, args.config, args.max_new_tokens)
    prep_s = time.perf_counter() - t0
    with contextlib.ExitStack() as stack:
        if args.server is None:
            target, rest = stack.enter_context(local_receiver(args))
        else:
            target, rest = args.server, args.rest
        outcomes, wall_s = asyncio.run(
            run_load(
                target, lm, contexts, args.senders, args.messages, args.max_new_tokens, args.timeout, token
            )
        )
        receiver = None
        if rest:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            with contextlib.suppress(httpx.HTTPError, ValueError):
                stats = httpx.get(f"{rest}/v1/stats", headers=headers, timeout=10).json()
                receiver = {
                    "store": stats.get("store"),
                    "calls": stats.get("calls"),
                    "errors": stats.get("errors"),
                }
    result = report(outcomes, wall_s, args, contexts, prep_s, receiver, target, args.server is None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
