"""Abuse benchmark: good senders alongside one hostile authenticated peer, and what it costs them.

    kvlink-bench abuse --seconds 40 --senders 4 --out bench/results/abuse-cpu/abuse.json

It starts `kvlink-serve` on free loopback ports with one token per tenant (the good senders "good0..",
the attacker "mallory", an operator), then runs two phases of --seconds each in one process:

1. unloaded: the good senders loop (a Transfer of a real SQuAD context at INT4, then the Ask about it,
   checking the answer is the one its own bytes give) while /healthz is polled every 20 ms;
2. under attack: the same, while mallory cycles through ATTACKS (a decompression bomb, a header of too
   many rows, position sets of millions, oversized reference answers, a flood of small messages that
   decode to hundreds of MiB, an over-long question, ids that would forge log lines, a trickling
   transfer, duplicate Authorization headers, and reads and overwrites of the good senders' messages).

Reported (JSON to --out, a table on stdout): /healthz latency p50/p99 per phase (goal p99 <= 100 ms),
the good senders' end-to-end p50/p99 per phase and their ratio (goal <= 1.5x), the receiver's resident
memory before, at its peak and after (goal: back within 100 MB of the start), cross-tenant reads and
overwrites (goal 0), wrong answers, and each attack's outcomes by code. A benchmark: it asserts
nothing and never gates CI. The attack builders are also what tests/test_hostile.py sends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20
ATTACKER = "mallory"
ATTACKS = (
    "decompression_bomb", "header_rows", "position_sets", "reference_answers", "decode_flood", "long_question",
    "forged_ids", "trickle", "duplicate_authorization", "cross_tenant",
)  # fmt: skip
SESSION_TTL_S = 4.0
"""The bench's receiver keeps contexts this long, so that memory after a phase shows what calls left behind."""


# --- attack payloads (also used by tests/test_hostile.py) ------------------------------------------------------
def bomb_frames(lm: Any, message_id: str, claimed: int = 512 * MIB) -> list[Any]:
    """A real FP16 message whose first part is replaced by a zstd frame that claims `claimed` bytes of
    content in a few KiB: a decompression bomb. The header's sizes stay valid."""
    import zstandard

    from kvlink import wire
    from kvlink.cache import prefill
    from kvlink.codec import Codec, Part
    from kvlink.prompt import context_ids
    from kvlink.recipe import build

    encoded = Codec(build(), lm.geometry).encode(
        prefill(lm.model, context_ids(lm.tokenizer, "x " * 120), None)
    )
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(claimed))
    first = encoded.tensors[0]
    if len(bomb) >= first.parts["codes"].raw_size:
        raise ValueError(
            f"a bomb of {len(bomb)} bytes does not fit a part of {first.parts['codes'].raw_size}"
        )
    first.parts["codes"] = Part(bomb, first.parts["codes"].raw_size, zstd=True)
    return wire.to_frames(encoded, "s", message_id, lm.fingerprint, 1 << 20)


def rows_frames(frames: list[Any], rows: int = 300_000) -> list[Any]:
    """`frames` (a real message) with `rows` bogus payload table rows added to its header."""
    from kvlink import wire

    header = frames[0].header
    n = len(header.payload)
    for i in range(rows):
        header.payload.add(chunk_id=n + i, layer=0, kind=wire.pb.TENSOR_KIND_K, part=wire.pb.PART_KIND_CODES,
                           size=1, raw_size=1, crc32c=0)  # fmt: skip
    return frames


def positions_frames(lm: Any, message_id: str, length: int = 900_000) -> list[Any]:
    """A per-layer Q2C 50% message of a real context whose header claims T=`length`, with one valid
    position set of length/2 delta varints per layer (~13 MB in all): validation must decode them."""
    from kvlink import wire
    from kvlink.cache import Observe, prefill
    from kvlink.codec import Codec
    from kvlink.eval.squad import load_squad
    from kvlink.prompt import context_ids, question_ids
    from kvlink.recipe import build
    from kvlink.select import keep_count

    example = load_squad()[0]
    config = build(selector="q2c", retention=0.5, scope="layer", k_bits=4, v_bits=4)
    q = question_ids(lm.tokenizer, example.question)
    pre = prefill(lm.model, context_ids(lm.tokenizer, example.context), q, observe=Observe.QUESTION)
    frames = wire.to_frames(Codec(config, lm.geometry).encode(pre), "s", message_id, lm.fingerprint, 1 << 20)
    header = frames[0].header
    header.length = length
    count = keep_count(0.5, length)
    for p in header.positions:
        p.encoding, p.count, p.data = wire.pb.POSITION_ENCODING_DELTA_VARINT, count, b"\x01" * count
    return frames


def decode_bomb(lm: Any, tokens: int) -> Any:
    """A message of a few KiB on the wire (INT2 of zeros, zstd) that decodes to hundreds of MiB."""
    import torch

    from kvlink.cache import ContextKV
    from kvlink.codec import Codec
    from kvlink.recipe import build

    g = lm.geometry
    zeros = [torch.zeros(g.kv_heads, tokens, g.head_dim) for _ in range(g.num_layers)]
    kv = ContextKV(zeros, [z.clone() for z in zeros], [torch.arange(tokens)] * g.num_layers, tokens)
    return Codec(build(k_bits=2, v_bits=2, zstd_level=3), g).encode_kv(kv)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def send_raw(
    target: str, frames: list[Any] | list[bytes], metadata: Any, pace_s: float = 0.0, timeout: float = 120
) -> str:
    """Send frames (or their bytes) as they are, with no sender-side checks, `pace_s` apart; the outcome's
    code ("OK", or the receiver's kvlink code, or the gRPC status)."""
    import grpc

    from kvlink import wire

    async def stream() -> AsyncIterator[bytes]:
        for frame in frames:
            yield frame if isinstance(frame, bytes) else wire.frame_bytes(frame)
            if pace_s:
                await asyncio.sleep(pace_s)

    async with grpc.aio.insecure_channel(target, [("grpc.max_send_message_length", 64 * MIB)]) as ch:
        call = ch.stream_stream(wire.TRANSFER_METHOD, response_deserializer=wire.parse_signal)(
            stream(), timeout=timeout, metadata=metadata
        )
        try:
            async for signal in call:
                kind = signal.WhichOneof("signal")
                if kind == "receipt":
                    return "OK"
                if kind == "error":  # the receiver's verdict, before the status (which a write may race)
                    return str(signal.error.code)
        except grpc.aio.AioRpcError as exc:
            err = wire.error_from_rpc(exc)
            return err.code if err is not None else exc.code().name
    return "OK"


# --- the run ------------------------------------------------------------------------------------------------
@dataclass
class Good:
    """One good sender's prepared message and what it measured."""

    name: str
    token: str
    question: str
    encoded: Any
    tokens: list[int]
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wrong_answers: int = 0
    live: set[str] = field(default_factory=set)  # message ids it holds on the receiver


@dataclass
class Payloads:
    """The attacks' bytes, built once before the phases so that the attacker spends no CPU on them."""

    bomb: list[bytes]
    rows: list[bytes]
    positions: list[bytes]
    decode_bomb: Any  # EncodedKV
    forged: list[bytes]


FORGED_ID = "m\n2026-12-04 00:00:00 INFO kvlink.serve: FORGED operator login"
"""A message id that, logged raw, would write a line of its own."""


def prepare_payloads(lm: Any, goods: list[Good]) -> Payloads:
    from kvlink import wire

    def raw(frames: list[Any]) -> list[bytes]:
        return [wire.frame_bytes(f) for f in frames]

    good = goods[0].encoded
    return Payloads(
        bomb=raw(bomb_frames(lm, "bomb")),
        rows=raw(rows_frames(wire.to_frames(good, "s", "rows", lm.fingerprint, 1 << 20))),
        positions=raw(positions_frames(lm, "positions")),
        decode_bomb=decode_bomb(lm, 5000),
        forged=raw(wire.to_frames(good, "s", FORGED_ID, lm.fingerprint, 1 << 20)),
    )


@dataclass
class Run:
    target: str
    rest: str
    lm: Any
    goods: list[Good]
    attacker_token: str
    operator_token: str
    pid: int
    payloads: Payloads
    attack_names: tuple[str, ...] = ()
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    cross_reads: int = 0
    cross_overwrites: int = 0


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


async def good_loop(run: Run, good: Good, stop: asyncio.Event) -> None:
    import grpc

    from kvlink import wire
    from kvlink.client.sender import SendError, ask, channel_options, transfer

    async with grpc.aio.insecure_channel(run.target, channel_options()) as ch:
        while not stop.is_set():
            message_id = uuid.uuid4().hex
            frames = wire.to_frames(good.encoded, "good", message_id, run.lm.fingerprint, 1 << 20)
            started = time.perf_counter()
            try:
                await transfer(ch, frames, timeout=120, metadata=bearer(good.token))
                good.live.add(message_id)
                answer = await ask(ch, wire.Ask("good", message_id, good.question, 4), timeout=120,
                                   metadata=bearer(good.token))  # fmt: skip
            except SendError as err:
                good.errors[err.code or err.status.name] += 1
                continue
            good.latencies.append(time.perf_counter() - started)
            if list(answer.token_ids) != good.tokens:
                good.wrong_answers += 1


async def probe_loop(rest: str, latencies: list[float], stop: asyncio.Event) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=60) as http:
        while not stop.is_set():
            started = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                await http.get(f"{rest}/healthz")
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)


def _attacks(run: Run) -> dict[str, Callable[[], Awaitable[str]]]:
    """Each attack once, by name: returns the receiver's answer code."""
    import grpc
    import httpx

    from kvlink import wire
    from kvlink.client.sender import SendError, ask, channel_options, transfer

    lm, me = run.lm, bearer(run.attacker_token)
    good = run.goods[0]

    async def asking(request: wire.Ask) -> str:
        async with grpc.aio.insecure_channel(run.target, channel_options()) as ch:
            try:
                await ask(ch, request, timeout=60, metadata=me)
            except SendError as err:
                return err.code or err.status.name
        return "OK"

    payloads = run.payloads

    async def bomb() -> str:  # refused messages keep nothing, so their ids can be sent again
        return await send_raw(run.target, payloads.bomb, me)

    async def rows() -> str:
        return await send_raw(run.target, payloads.rows, me)

    async def positions() -> str:
        return await send_raw(run.target, payloads.positions, me)

    async def references() -> str:
        mine = uuid.uuid4().hex
        frames = wire.to_frames(good.encoded, "s", mine, lm.fingerprint, 1 << 20)
        await send_raw(run.target, frames, me)
        return await asking(wire.Ask("s", mine, good.question, 4, reference_answers=("word " * 20_000,) * 64))

    async def decode_flood() -> str:
        bomb_kv = payloads.decode_bomb
        codes = await asyncio.gather(
            *(send_raw(run.target, wire.to_frames(bomb_kv, "s", uuid.uuid4().hex, lm.fingerprint, 1 << 20), me)
              for _ in range(4))
        )  # fmt: skip
        return "+".join(sorted(set(codes)))

    async def long_question() -> str:
        mine = uuid.uuid4().hex
        await send_raw(run.target, wire.to_frames(good.encoded, "s", mine, lm.fingerprint, 1 << 20), me)
        return await asking(
            wire.Ask("s", mine, "Which comes first? " + " ".join(f"w{i}" for i in range(8000)), 64)
        )

    async def forged_ids() -> str:
        return await send_raw(run.target, payloads.forged, me)

    async def trickle() -> str:
        frames = wire.to_frames(good.encoded, "s", uuid.uuid4().hex, lm.fingerprint, 1 << 20)
        return await send_raw(run.target, frames, me, pace_s=1.5)

    async def duplicate_auth() -> str:
        headers = [
            ("Authorization", f"Bearer {run.attacker_token}"),
            ("Authorization", f"Bearer {run.operator_token}"),
        ]
        async with httpx.AsyncClient(timeout=30) as http:
            reply = await http.get(f"{run.rest}/v1/messages?limit=1000", headers=headers)
        return str(reply.status_code)

    taken: set[str] = set()  # victims' ids mallory has stored a message of her own under

    async def cross_tenant() -> str:
        """Read the good senders' latest messages (gRPC Ask and REST) by their ids, then send a message
        of her own under each id, and check the victim still gets its own context's answer."""
        codes = []
        for victim in run.goods:
            fresh = [m for m in list(victim.live)[-4:] if m not in taken][-2:]
            for message_id in fresh:
                code = await asking(wire.Ask("good", message_id, victim.question, 4))
                run.cross_reads += code != "NOT_FOUND"  # anything but "no such message" tells her something
                async with httpx.AsyncClient(timeout=30) as http:
                    reply = await http.get(f"{run.rest}/v1/messages/{message_id}", headers=dict(me))
                run.cross_reads += reply.status_code != 404
                other = run.goods[(run.goods.index(victim) + 1) % len(run.goods)]
                frames = wire.to_frames(other.encoded, "good", message_id, lm.fingerprint, 1 << 20)
                async with grpc.aio.insecure_channel(run.target, channel_options()) as ch:
                    try:
                        await transfer(ch, frames, timeout=60, metadata=me)
                        codes.append("OK (her own namespace)")
                        taken.add(message_id)
                    except SendError as err:
                        codes.append(err.code or err.status.name)
                async with grpc.aio.insecure_channel(run.target, channel_options()) as ch:
                    with contextlib.suppress(SendError):  # NOT_FOUND once it expired: not an overwrite
                        answer = await ask(ch, wire.Ask("good", message_id, victim.question, 4), timeout=60,
                                           metadata=bearer(victim.token))  # fmt: skip
                        run.cross_overwrites += list(answer.token_ids) != victim.tokens
        return "+".join(sorted(set(codes))) or "no target"

    return {
        "decompression_bomb": bomb, "header_rows": rows, "position_sets": positions,
        "reference_answers": references, "decode_flood": decode_flood, "long_question": long_question,
        "forged_ids": forged_ids, "trickle": trickle, "duplicate_authorization": duplicate_auth,
        "cross_tenant": cross_tenant,
    }  # fmt: skip


async def attack_loop(run: Run, stop: asyncio.Event) -> None:
    attacks = {name: fn for name, fn in _attacks(run).items() if name in run.attack_names}
    while not stop.is_set():
        for name, attack in attacks.items():
            if stop.is_set():
                return
            try:
                code = await attack()
            except Exception as exc:  # an attack that fails on our side is reported, not fatal
                code = f"attacker error: {type(exc).__name__}"
            run.outcomes.setdefault(name, Counter())[code] += 1


async def phase(run: Run, seconds: float, hostile: bool) -> dict[str, Any]:
    from kvlink.metrics import percentile

    for good in run.goods:
        good.latencies.clear()
    stop = asyncio.Event()
    health: list[float] = []
    Path(f"/proc/{run.pid}/clear_refs").write_text("5")  # the peak below is this phase's
    before = _status(run.pid, "VmRSS")
    tasks = [asyncio.create_task(good_loop(run, g, stop)) for g in run.goods]
    tasks.append(asyncio.create_task(probe_loop(run.rest, health, stop)))
    if hostile:
        tasks.append(asyncio.create_task(attack_loop(run, stop)))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    peak = _status(run.pid, "VmHWM")
    await asyncio.sleep(SESSION_TTL_S + 2.0)  # every context of the phase expires and is purged
    after = _status(run.pid, "VmRSS")
    e2e = [x for g in run.goods for x in g.latencies]

    def q(values: list[float], p: float) -> float | None:
        return percentile(values, p) if values else None

    return {
        "seconds": seconds, "healthz_s": {"n": len(health), "p50": q(health, 50), "p99": q(health, 99),
                                          "max": max(health, default=None)},
        "good_e2e_s": {"n": len(e2e), "p50": q(e2e, 50), "p99": q(e2e, 99)},
        "rss_bytes": {"before": before, "peak": peak, "after": after},
    }  # fmt: skip


def prepare_goods(lm: Any, n: int, tokens: dict[str, str]) -> list[Good]:
    from kvlink.cache import prefill
    from kvlink.codec import Codec
    from kvlink.eval.squad import load_squad
    from kvlink.generate import greedy_answer
    from kvlink.prompt import context_ids, question_ids
    from kvlink.recipe import build

    codec = Codec(build(k_bits=4, v_bits=4), lm.geometry)
    by_context: dict[str, Any] = {}
    for example in load_squad():
        by_context.setdefault(example.context, example)
    goods = []
    for i, e in enumerate(list(by_context.values())[:n]):
        q = question_ids(lm.tokenizer, e.question)
        encoded = codec.encode(prefill(lm.model, context_ids(lm.tokenizer, e.context), None))
        answer = greedy_answer(lm.model, lm.tokenizer, codec.decode(encoded), q, max_new_tokens=4)
        goods.append(Good(f"good{i}", tokens[f"good{i}"], e.question, encoded, list(answer.token_ids)))
    return goods


@contextlib.contextmanager
def receiver(tokens: dict[str, str], operator_token: str, args: argparse.Namespace) -> Iterator[Any]:
    from kvlink.server.local import LocalReceiver

    with tempfile.TemporaryDirectory(prefix="kvlink-abuse-") as d:
        tenants = Path(d) / "tenants"
        tenants.write_text(
            "\n".join([*(f"{n} {t}" for n, t in tokens.items()), f"ops {operator_token} operator"]) + "\n"
        )
        flags = ["--tenants-file", str(tenants), "--max-cached-bytes", str(args.max_cached_bytes),
                 "--max-new-tokens", "8", "--stall-timeout", "3", "--message-deadline", "6",
                 "--session-ttl", str(SESSION_TTL_S),
                 "--max-question-tokens", "1024", "--log-level", "warning"]  # fmt: skip
        with LocalReceiver(flags, log=Path(d) / "serve.log") as rx:
            rx.wait_healthy()
            yield rx


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvlink-bench abuse", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    p.add_argument("--seconds", type=float, default=40.0, help="length of each phase")
    p.add_argument("--senders", type=int, default=4, help="good senders (one tenant and connection each)")
    p.add_argument(
        "--max-cached-bytes", type=int, default=1 << 30, help="the receiver's memory budget for contexts"
    )
    p.add_argument(
        "--attacks",
        default=",".join(ATTACKS),
        help=f"comma-separated attacks to cycle through, of: {', '.join(ATTACKS)}",
    )
    p.add_argument("--out", default="abuse.json", help="JSON result file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds <= 0 or args.senders < 1:
        print("kvlink-bench abuse: --seconds must be > 0 and --senders >= 1", file=sys.stderr)
        return 2
    names = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown or not names:
        print(f"kvlink-bench abuse: unknown attacks {unknown}; known: {', '.join(ATTACKS)}", file=sys.stderr)
        return 2
    if not sys.platform.startswith("linux"):
        print("kvlink-bench abuse: reads the receiver's memory from /proc (Linux only)", file=sys.stderr)
        return 2
    from kvlink.models import load_model

    tokens = {f"good{i}": uuid.uuid4().hex for i in range(args.senders)} | {ATTACKER: uuid.uuid4().hex}
    operator_token = uuid.uuid4().hex
    lm = load_model(None)
    goods = prepare_goods(lm, args.senders, tokens)
    payloads = prepare_payloads(lm, goods)
    with receiver(tokens, operator_token, args) as rx:
        run = Run(
            rx.target, rx.rest, lm, goods, tokens[ATTACKER], operator_token, rx.proc.pid, payloads, names
        )
        asyncio.run(phase(run, 3.0, hostile=False))  # warm-up: first-call costs, not measured
        start_rss = _status(run.pid, "VmRSS")
        unloaded = asyncio.run(phase(run, args.seconds, hostile=False))
        attacked = asyncio.run(phase(run, args.seconds, hostile=True))
        end_rss = _status(run.pid, "VmRSS")
    ratio = None
    if unloaded["good_e2e_s"]["p99"] and attacked["good_e2e_s"]["p99"]:
        ratio = attacked["good_e2e_s"]["p99"] / unloaded["good_e2e_s"]["p99"]
    result = {
        "date": time.strftime("%Y-%m-%d"), "command": "kvlink-bench abuse " + " ".join(argv or sys.argv[1:]),
        "senders": args.senders, "seconds_per_phase": args.seconds, "max_cached_bytes": args.max_cached_bytes,
        "attack_names": list(names),
        "unloaded": unloaded, "under_attack": attacked, "good_e2e_p99_ratio": ratio,
        "rss_bytes": {"start": start_rss, "peak_under_attack": attacked["rss_bytes"]["peak"], "end": end_rss,
                      "end_minus_start": end_rss - start_rss},
        "cross_tenant_reads": run.cross_reads, "cross_tenant_overwrites": run.cross_overwrites,
        "wrong_answers": sum(g.wrong_answers for g in goods),
        "good_errors": dict(sum((g.errors for g in goods), Counter())),
        "attacks": {name: dict(c) for name, c in run.outcomes.items()},
        "goals": {"healthz_p99_s": 0.1, "good_e2e_p99_ratio": 1.5, "rss_end_minus_start_bytes": 100 * MIB,
                  "cross_tenant": 0},
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    return 0


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1000 * x:.0f}"

    table = Table(title=f"{result['senders']} good senders, {result['seconds_per_phase']:g} s per phase")
    for column in (
        "phase",
        "/healthz p50 ms",
        "p99 ms",
        "good e2e p50 ms",
        "p99 ms",
        "RSS before/peak/after MiB",
    ):
        table.add_column(column, justify="right")
    for name in ("unloaded", "under_attack"):
        r = result[name]
        rss = "/".join(str(r["rss_bytes"][k] // MIB) for k in ("before", "peak", "after"))
        table.add_row(name, ms(r["healthz_s"]["p50"]), ms(r["healthz_s"]["p99"]), ms(r["good_e2e_s"]["p50"]),
                      ms(r["good_e2e_s"]["p99"]), rss)  # fmt: skip
    console = Console()
    console.print(table)
    ratio = result["good_e2e_p99_ratio"]
    console.print(
        f"good e2e p99 under attack / unloaded: {'-' if ratio is None else f'{ratio:.2f}x'}; RSS end - start: "
        f"{result['rss_bytes']['end_minus_start'] / MIB:+.0f} MiB; cross-tenant reads "
        f"{result['cross_tenant_reads']}, overwrites {result['cross_tenant_overwrites']}; wrong answers "
        f"{result['wrong_answers']}; good senders' errors {result['good_errors'] or 'none'}"
    )
    for name, codes in result["attacks"].items():
        console.print(f"  {name}: {codes}")


if __name__ == "__main__":
    sys.exit(main())
