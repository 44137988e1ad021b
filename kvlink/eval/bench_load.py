"""Load benchmark of kvlink receivers: N concurrent senders, M messages, messages/s and latency percentiles;
over one receiver, or over a fleet of replicas sharing one store, beside one receiver as the baseline.

    python -m kvlink.eval.bench_load --senders 16 --messages 64 --out load.json
    python -m kvlink.eval.bench_load --senders 16 --messages 64 --replicas 2 --out load-fleet.json
    python -m kvlink.eval.bench_load --server 10.0.0.5:50051 --rest http://10.0.0.5:8080 ...
    python -m kvlink.eval.bench_load --server rx-a:50051 --server rx-b:50051 ...   # a running fleet

Without --server it starts `kvlink-serve` on free loopback ports (concurrency limits raised to fit the
senders, --max-cached-bytes as given) and stops them at the end. With --replicas N (N >= 2) it starts N
replicas that share --store (default: a redis-server started here, kvlink.server.local.LocalRedis,
whose URL with its password reaches them by --store-url-file), and one more receiver without a store,
the baseline, measured first with the same jobs (--no-baseline skips it). The sender side prepares
--contexts distinct SQuAD contexts once (prefill + encode with --config; not timed) and the answer each
gives when decoded locally from the same bytes. Then --senders workers, one gRPC connection to each
replica each, take the --messages jobs from a queue: a Transfer of one context (a new message id every
time) and the Ask about it. Over a fleet, job i transfers to replica i mod N and asks replica
(i + 1) mod N: every Ask reaches a replica that did not receive the message, which fetches it from
the store, verifies it and decodes it. Every receiver is healthy before the first run starts, and each
run begins with --warmup jobs per receiver that are not counted.

Reported (JSON to --out, tables on stdout), per run: messages/s over the wall time, p50/p90/p99/mean/max
of transfer, ask and total latency, lost messages (a transfer or an ask that failed), errors by gRPC
status, NOT_FOUND asks (evicted before the question came), answers that differ from their context's own
(answered from another context: must be 0; `distinct_answers` says how many of the contexts' own answers
differ, i.e. how sharp that check is), the jobs each replica took, and each receiver's store and call
statistics after the run (a fleet's also `/v1/stats?scope=fleet`). A fleet run adds the comparison with
the baseline: each figure for both and the ratio fleet / single. A benchmark, not a test: it asserts
nothing and never gates CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIGS = {
    "q2c50-int4": dict(selector="q2c", retention=0.5, k_bits=4, v_bits=4),
    "int4": dict(k_bits=4, v_bits=4),
    "int8": dict(k_bits=8, v_bits=8),
    "fp16": dict(),
}
ROUTING = "job i: Transfer to replica i mod N, Ask to replica (i + 1) mod N"


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
    transfer_to: int = 0  # the replica (index in the run's targets) that took the Transfer
    ask_at: int = 0  # and the one that took the Ask


@dataclass
class Run:
    """One measured run: `name` (single, fleet), the receivers' gRPC targets and REST addresses."""

    name: str
    targets: list[str]
    rests: list[str | None]
    started: list[Any] = field(default_factory=list)  # kvlink.server.local.LocalReceiver, to wait for


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
        "--model", default=None,
        help="the sender's model and that of the receivers started here (default: the embedded one); "
        "random:tiny-llama for a quick run of the mechanics",
    )  # fmt: skip
    p.add_argument(
        "--server", default=[], action="append", metavar="HOST:PORT",
        help="a running receiver (default: start them here); repeat it for the replicas of a running "
        "fleet, which must share a store",
    )  # fmt: skip
    p.add_argument(
        "--rest", default=None, metavar="URL", help="REST address of the first --server, for statistics"
    )
    p.add_argument(
        "--token-file", default=None, help="bearer token for --server/--rest (plaintext gRPC only)"
    )
    p.add_argument(
        "--replicas", type=int, default=1,
        help="receivers started here; 2 or more: a fleet sharing --store, measured after one receiver "
        "without a store (the baseline)",
    )  # fmt: skip
    p.add_argument(
        "--store", default=None, metavar="URL",
        help="the fleet's Redis/Valkey (redis://[:PASSWORD@]HOST:PORT/DB; default: a redis-server started "
        "here on a free loopback port, emptied by its end)",
    )  # fmt: skip
    p.add_argument("--no-baseline", action="store_true", help="with --replicas: skip the single receiver")
    p.add_argument(
        "--warmup", type=int, default=2,
        help="jobs per receiver before each run is measured (first calls pay one-off costs), not counted",
    )  # fmt: skip
    p.add_argument(
        "--max-cached-bytes", type=int, default=2 << 30, help="cache cap of each receiver started here"
    )
    p.add_argument(
        "--device", default="cpu", help="device of the sender's model (and of the receivers started here)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call")
    p.add_argument("--out", default="load.json", help="JSON result file")
    return p


# --- the receivers -------------------------------------------------------------------------------------------
def _receiver_flags(args: argparse.Namespace) -> list[str]:
    slots = str(max(64, 4 * args.senders))
    flags = ["--device", args.device, "--max-concurrent-sessions", slots, "--per-peer-concurrency", slots,
             "--max-cached-bytes", str(args.max_cached_bytes), "--max-new-tokens", str(args.max_new_tokens),
             "--log-level", "warning"]  # fmt: skip
    return flags + (["--model", args.model] if args.model else [])


def start_runs(
    args: argparse.Namespace, stack: contextlib.ExitStack
) -> tuple[list[Run], dict[str, Any] | None]:
    """The runs to measure, their receivers started (not yet waited for: they load while the sender
    prepares), and what the fleet's store is (None without a fleet). Stopped when `stack` closes.
    RuntimeError when the fleet's store cannot be had (no redis-server here, or --store does not answer)."""
    if args.server:
        name = "fleet" if len(args.server) > 1 else "single"
        return [Run(name, list(args.server), [args.rest] + [None] * (len(args.server) - 1))], None
    from kvlink.server.local import LocalReceiver, LocalRedis
    from kvlink.server.shared import SharedStore, StoreUnavailable, redacted

    store: dict[str, Any] | None = None
    if args.replicas > 1:  # the store first: without one, nothing else starts
        if args.store:
            url = args.store
            try:
                server = SharedStore.from_url(url).ping()
            except StoreUnavailable as exc:
                raise RuntimeError(exc.message) from None
        else:
            redis = stack.enter_context(LocalRedis())
            url, server = redis.url(), redis.wait_ready()
        store = {"url": redacted(url), "server": server, "started_here": not args.store}
        # The URL holds the password: to the replicas in a file (0600), as a deployment hands it over.
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvlink-bench-")))
        url_file = folder / "store-url"
        with os.fdopen(os.open(url_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(url + "\n")
    runs: list[Run] = []
    if store is None or not args.no_baseline:
        rx = stack.enter_context(LocalReceiver(_receiver_flags(args), keep_log=False))
        runs.append(Run("single", [rx.target], [rx.rest], [rx]))
    if store is not None:
        flags = [*_receiver_flags(args), "--store-url-file", str(url_file)]
        replicas = [stack.enter_context(LocalReceiver(flags, keep_log=False)) for _ in range(args.replicas)]
        runs.append(Run("fleet", [r.target for r in replicas], [r.rest for r in replicas], replicas))
    return runs, store


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
    targets: str | list[str], lm: Any, contexts: list[Prepared], senders: int, messages: int,
    max_new_tokens: int, timeout: float, token: str | None = None,
) -> tuple[list[Outcome], float]:  # fmt: skip
    """`messages` jobs over `senders` workers, each with one channel to every target (ROUTING over
    several); returns each message's outcome and the wall time."""
    import grpc

    from kvlink import wire
    from kvlink.client.sender import ClientSecurity, SendError, ask, channel_options, transfer

    targets = [targets] if isinstance(targets, str) else list(targets)
    n = len(targets)
    security = ClientSecurity(token=token)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(messages):
        queue.put_nowait(i)
    outcomes: list[Outcome] = []

    async def worker(w: int) -> None:
        async with contextlib.AsyncExitStack() as stack:
            channels = [
                await stack.enter_async_context(security.channel(t, channel_options())) for t in targets
            ]
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                c = contexts[i % len(contexts)]
                to, at = i % n, (i + 1) % n
                session, message_id = f"load-{w}", uuid.uuid4().hex
                frames = wire.to_frames(c.encoded, session, message_id, lm.fingerprint, 1 << 20)
                t0 = time.perf_counter()
                try:
                    result = await transfer(channels[to], frames, timeout=timeout, metadata=security.metadata)
                except SendError as err:
                    outcomes.append(Outcome(False, err.status.name, total_s=time.perf_counter() - t0,
                                            transfer_to=to, ask_at=at))  # fmt: skip
                    continue
                t1 = time.perf_counter()
                try:
                    answer = await ask(
                        channels[at], wire.Ask(session, message_id, c.question, max_new_tokens), timeout=timeout,
                        metadata=security.metadata,
                    )  # fmt: skip
                except SendError as err:
                    status = "NOT_FOUND" if err.status == grpc.StatusCode.NOT_FOUND else err.status.name
                    outcomes.append(Outcome(False, status, t1 - t0, time.perf_counter() - t1,
                                            time.perf_counter() - t0, result.receipt.total, transfer_to=to,
                                            ask_at=at))  # fmt: skip
                    continue
                t2 = time.perf_counter()
                outcomes.append(Outcome(True, "OK", t1 - t0, t2 - t1, t2 - t0, result.receipt.total,
                                        mismatch=list(answer.token_ids) != c.tokens, transfer_to=to, ask_at=at))  # fmt: skip

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
           prep_s: float, receiver: dict[str, Any] | None, target: str | list[str], started_here: bool,
           load: tuple[float, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """One run's figures (the module docstring lists them). receiver: the receiver's statistics after the
    run; over several targets, {"replicas": [each one's], "fleet": the fleet-wide section}. load: the
    host's 1-minute load average before and after the run (other work on a shared machine shows there)."""
    done = [o for o in outcomes if o.ok]
    transferred = [o for o in outcomes if o.wire_bytes]
    targets = [target] if isinstance(target, str) else list(target)
    out = {
        "senders": args.senders, "messages": args.messages, "config": args.config,
        "max_new_tokens": args.max_new_tokens, "model": args.model or "embedded", "contexts": len(contexts),
        "context_tokens": [c.context_tokens for c in contexts],
        "distinct_answers": len({tuple(c.tokens) for c in contexts}),
        "replicas": len(targets), "routing": ROUTING if len(targets) > 1 else "one receiver",
        "warmup_messages": args.warmup * len(targets),
        "ok": len(done), "lost": len(outcomes) - len(done),
        "errors": dict(Counter(o.status for o in outcomes if not o.ok)),
        "answer_mismatches": sum(o.mismatch for o in done),
        "wall_s": wall_s, "messages_per_s": len(done) / wall_s if wall_s > 0 else None,
        "transfers_per_s": len(transferred) / wall_s if wall_s > 0 else None,
        "latency_s": {
            "transfer": _stats([o.transfer_s for o in transferred]),
            "ask": _stats([o.ask_s for o in done]),
            "total": _stats([o.total_s for o in done]),
        },
        "jobs_per_replica": {
            "transfers": [sum(o.transfer_to == r for o in outcomes) for r in range(len(targets))],
            "asks": [sum(o.ask_at == r and o.wire_bytes > 0 for o in outcomes) for r in range(len(targets))],
        },
        "wire_bytes_per_message": (sum(o.wire_bytes for o in transferred) / len(transferred)) if transferred else None,
        "prepare_s": prep_s, "receiver": receiver, "target": target if isinstance(target, str) else targets,
        "receiver_started_here": started_here,
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "device": args.device,
                 "loadavg_1m": None if load is None else {"before": load[0], "after": load[1]}},
    }  # fmt: skip
    return out


def receiver_stats(rest: str | None, token: str | None, fleet: bool = False) -> dict[str, Any] | None:
    """A receiver's store, call and error statistics from its REST /v1/stats (None when unreachable);
    with `fleet`, the fleet-wide section of ?scope=fleet instead."""
    import httpx

    if not rest:
        return None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    params = {"scope": "fleet"} if fleet else {}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        stats = httpx.get(f"{rest}/v1/stats", headers=headers, params=params, timeout=10).json()
        if fleet:
            return dict(stats.get("fleet") or {}) or None
        return {"store": stats.get("store"), "calls": stats.get("calls"), "errors": stats.get("errors")}
    return None


def compare(single: dict[str, Any], fleet: dict[str, Any]) -> dict[str, Any]:
    """Each headline figure of both runs, and the ratio fleet / single where both are numbers > 0."""

    def pair(a: float | None, b: float | None) -> dict[str, float | None]:
        ratio = b / a if a and b is not None else None
        return {"single": a, "fleet": b, "ratio": ratio}

    latency = {
        kind: {q: pair(single["latency_s"][kind][q], fleet["latency_s"][kind][q]) for q in ("p50", "p99")}
        for kind in ("transfer", "ask", "total")
    }
    return {
        "lost": {"single": single["lost"], "fleet": fleet["lost"]},
        "answer_mismatches": {"single": single["answer_mismatches"], "fleet": fleet["answer_mismatches"]},
        "latency_s": latency,
        "messages_per_s": pair(single["messages_per_s"], fleet["messages_per_s"]),
    }


def print_table(result: dict[str, Any], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title}{result['senders']} senders, {result['messages']} messages ({result['config']}), "
                  f"{result['replicas']} receiver(s): {result['messages_per_s']:.2f} messages/s, "
                  f"{result['ok']} answered")  # fmt: skip
    table.add_column("latency (s)")
    for q in ("p50", "p90", "p99", "mean", "max"):
        table.add_column(q, justify="right")
    for name, s in result["latency_s"].items():
        table.add_row(
            name, *("-" if s[q] is None else f"{s[q]:.3f}" for q in ("p50", "p90", "p99", "mean", "max"))
        )
    console = Console()
    console.print(table)
    console.print(f"lost: {result['lost']}; errors: {result['errors'] or 'none'}; answers differing from their "
                  f"context's own: {result['answer_mismatches']} (of {result['distinct_answers']} distinct "
                  f"answers over {result['contexts']} contexts)")  # fmt: skip


def print_comparison(comparison: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fleet against one receiver (ratio: fleet / single)")
    for column in ("latency (s)", "single", "fleet", "ratio"):
        table.add_column(column, justify="left" if column == "latency (s)" else "right")

    def cell(x: float | None, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    for kind, quantiles in comparison["latency_s"].items():
        for q, p in quantiles.items():
            table.add_row(f"{kind} {q}", cell(p["single"]), cell(p["fleet"]), cell(p["ratio"], ".2f"))
    m = comparison["messages_per_s"]
    table.add_row("messages/s", cell(m["single"], ".2f"), cell(m["fleet"], ".2f"), cell(m["ratio"], ".2f"))
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.senders < 1 or args.messages < 1 or args.contexts < 1 or args.replicas < 1:
        print("bench_load: --senders, --messages, --contexts and --replicas must be >= 1", file=sys.stderr)
        return 2
    if args.server and (args.replicas > 1 or args.store):
        print("bench_load: --replicas and --store start receivers here; a running fleet is --server, "
              "repeated", file=sys.stderr)  # fmt: skip
        return 2
    from kvlink.models import load_model

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    with contextlib.ExitStack() as stack:
        try:
            runs, store = start_runs(args, stack)
        except RuntimeError as exc:  # no redis-server here, or it did not start
            print(f"bench_load: {exc}", file=sys.stderr)
            return 2
        lm = load_model(args.model, args.device)  # while the receivers load theirs
        t0 = time.perf_counter()
        contexts = prepare(lm, args.contexts, args.config, args.max_new_tokens)
        prep_s = time.perf_counter() - t0
        for rx in (rx for run in runs for rx in run.started):  # none still loading while another is measured
            rx.wait_healthy()
        results: dict[str, dict[str, Any]] = {}
        for run in runs:
            if args.warmup > 0:
                n = len(run.targets)
                asyncio.run(run_load(run.targets, lm, contexts, n, args.warmup * n, args.max_new_tokens,
                                     args.timeout, token))  # fmt: skip
            load_before = os.getloadavg()[0]
            outcomes, wall_s = asyncio.run(
                run_load(run.targets, lm, contexts, args.senders, args.messages, args.max_new_tokens,
                         args.timeout, token)
            )  # fmt: skip
            load = (load_before, os.getloadavg()[0])
            if len(run.targets) == 1:
                receiver = receiver_stats(run.rests[0], token)
            else:
                receiver = {
                    "replicas": [receiver_stats(rest, token) for rest in run.rests],
                    "fleet": receiver_stats(run.rests[0], token, fleet=True),
                }
            target = run.targets[0] if len(run.targets) == 1 else run.targets
            results[run.name] = report(
                outcomes, wall_s, args, contexts, prep_s, receiver, target, not args.server, load
            )
    if set(results) == {"single"}:
        result = results["single"]  # one receiver: the report itself, as before fleets
        print_table(result)
    else:
        result = {
            "command": shlex.join(["python", "-m", "kvlink.eval.bench_load", *argv]),
            "store": store, "single": results.get("single"), "fleet": results["fleet"],
            "comparison": compare(results["single"], results["fleet"]) if "single" in results else None,
        }  # fmt: skip
        for name, run_result in results.items():
            print_table(run_result, f"{name}: ")
        if result["comparison"]:
            print_comparison(result["comparison"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
