"""kvlink-send: send a context's KV cache to a kvlink-serve receiver within a bandwidth budget, then ask.

    kvlink-send --server 127.0.0.1:50051 --budget 18.75% --context paper.txt --question "Who wrote it?"
    kvlink-send --server rx.example:50051 --tls-ca ca.crt --auth-token-file token ...   # TLS + token

Prefills the context locally, lets the budget planner (kvlink.budget) choose
the best configuration whose exact wire size fits the budget, streams it,
asks the question, and prints the answer with the byte split and the time
per stage. Exit status: 0 on success, 1 when a call fails, 2 for a bad
argument or an unsatisfiable budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

# torch and the library are imported when a command runs, not for --help.
if TYPE_CHECKING:
    from client.sender import SendResult
    from kvlink.budget import Candidate, Constraints
    from kvlink.recipe import Recipe

STAGES: tuple[tuple[str, str], ...] = (
    ("prefill_s", "prefill (sender)"),
    ("select_s", "select (sender)"),
    ("quantize_s", "quantize (sender)"),
    ("pack_s", "pack + zstd + frame (sender)"),
    ("plan_s", "plan, all tries incl. select/quantize (sender)"),
    ("transfer_s", "transfer (first frame to receipt)"),
    ("receive_s", "receive (receiver: first to last frame)"),
    ("decode_s", "decode (receiver)"),
    ("answer_s", "answer (receiver)"),
)


class UsageError(Exception):
    """A bad argument: reported in one line, exit status 2."""


def _bits(text: str) -> tuple[int | str, int | str]:
    parts = [p.strip().lower() for p in text.split(",")]
    if len(parts) not in (1, 2) or not all(parts):
        raise argparse.ArgumentTypeError(f"--bits takes K or K,V (16, 8, 4, 3, 2, nf4), got {text!r}")
    values = [p if p == "nf4" else _int(p, "--bits") for p in parts]
    return (values[0], values[-1])


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} takes integers, got {text!r}") from None


def _rate(text: str) -> float:
    """'100M', '1G', '2.5e9' -> bits per second."""
    raw = text.strip().lower().removesuffix("bit/s").removesuffix("bps")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(raw[-1:], 1.0)
    try:
        value = float(raw[:-1] if scale != 1.0 else raw) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"--min-rate takes a rate like 100M or 1G, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"--min-rate must be a positive rate, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvlink-send",
        description="Send a context's KV cache to a kvlink-serve receiver within a bandwidth budget "
        "(a fraction of the FP16 size of the full context KV that bounds every byte on the wire), "
        "then ask a question that the receiver answers from the transferred cache alone.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the receiver's gRPC address")
    p.add_argument("--budget", required=True, help="e.g. 18.75%% or 0.1875; in (0, 100%%]")
    p.add_argument("--context", required=True, metavar="FILE|-", help="context text file, or - for stdin")
    p.add_argument("--question", required=True, help="the question the receiver answers")
    p.add_argument(
        "--model",
        default=None,
        help="model alias, HF id or local path (the receiver's); default: the embedded model",
    )
    p.add_argument("--device", default="cpu", help="where the sender prefills")
    p.add_argument("--method", default=None, help="position selection method (default: the planner's, q2c)")
    p.add_argument(
        "--bits", type=_bits, default=None, metavar="K[,V]", help="K/V precision: 16, 8, 4, 3, 2, nf4"
    )
    p.add_argument("--retention", type=float, default=None, help="fraction of context positions kept, (0, 1]")
    p.add_argument("--lowrank", choices=("none", "svd"), default=None, help="low-rank projection of K/V")
    p.add_argument("--rank", type=int, default=None, help="low-rank rank (implies --lowrank svd)")
    p.add_argument("--group-size", type=int, default=None, help="quantization group size")
    p.add_argument(
        "--scope", choices=("global", "layer"), default=None,
        help="one kept position set for all layers (default), or one per layer",
    )  # fmt: skip
    p.add_argument(
        "--rotate", choices=("none", "k", "v", "kv"), default=None,
        help="Hadamard rotation of K/V before quantization (default: the planner decides)",
    )  # fmt: skip
    p.add_argument(
        "--sink", type=int, default=None, metavar="N",
        help="send the first N kept positions of every quantized tensor at fp16, outside the "
        "quantization groups (attention sinks; default: the planner decides)",
    )  # fmt: skip
    p.add_argument(
        "--round-k", choices=("nearest", "query"), default=None,
        help="round INT keys to their nearest level, or for the question's attention logits (same "
        "bytes; default: query where the measured quality table says it helps)",
    )  # fmt: skip
    p.add_argument(
        "--key-widths", dest="k_widths", choices=("uniform", "question"), default=None,
        help="one bit width for all channels of an INT key tensor, or a width per channel allocated from "
        "the question's queries (4 bits per channel and head more; default: question where the measured "
        "quality table says it helps and the receiver decodes it)",
    )  # fmt: skip
    p.add_argument(
        "--value-widths", dest="v_widths", choices=("uniform", "question"), default=None,
        help="one bit width for all token rows of an INT value tensor, or a width per row allocated from "
        "the question's attention (4 bits per row and head more; default: question where the measured "
        "quality table says it helps and the receiver decodes it)",
    )  # fmt: skip
    p.add_argument(
        "--no-layer-bits", dest="layer_bits", action="store_false",
        help="one bit width per K/V for all layers (default: bits per layer from the model's sensitivity "
        "profile where the measured quality table says they help)",
    )  # fmt: skip
    p.add_argument(
        "--config", dest="recipe", metavar="NAME", default=None,
        help="send exactly this recipe, named in the config grammar (e.g. 'q2c50%%+kint4c/vint4t-g32'; "
        "kvlink.recipe); it must fit the budget. Default: the planner chooses",
    )  # fmt: skip
    zstd = p.add_mutually_exclusive_group()
    zstd.add_argument("--zstd", dest="zstd", action="store_true", default=None, help="always use zstd")
    zstd.add_argument("--no-zstd", dest="zstd", action="store_false", help="never use zstd")
    p.add_argument(
        "--reference-answer", action="append", default=[], metavar="TEXT",
        help="a gold answer (repeatable): the receiver records F1/EM",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer")
    p.add_argument(
        "--timeout", type=float, default=120.0,
        help="seconds per call; the Transfer gets this plus the time its bytes take at --min-rate",
    )  # fmt: skip
    p.add_argument(
        "--min-rate", type=_rate, default=100e6, metavar="BITS/S",
        help="the slowest link the Transfer's deadline allows for, e.g. 100M, 1G (a 4 GB message at "
        "1 Gbit/s takes 34 s)",
    )  # fmt: skip
    p.add_argument(
        "--attempts", type=int, default=3,
        help="tries of the transfer, each on a new connection, when the connection breaks or the "
        "message is damaged in transit",
    )  # fmt: skip
    sec = p.add_argument_group("security")
    sec.add_argument("--tls", action="store_true", help="TLS, verifying the receiver with the system's CAs")
    sec.add_argument("--tls-ca", metavar="PEM", default=None, help="TLS, verifying the receiver with this CA")
    sec.add_argument("--tls-cert", metavar="PEM", default=None, help="client certificate for mutual TLS")
    sec.add_argument("--tls-key", metavar="PEM", default=None, help="private key of --tls-cert")
    sec.add_argument(
        "--tls-server-name", metavar="NAME", default=None,
        help="the name the receiver's certificate must carry, when it differs from --server's host",
    )  # fmt: skip
    sec.add_argument(
        "--auth-token-file", metavar="FILE", default=None,
        help="bearer token for the receiver; default: $KVLINK_AUTH_TOKEN if set",
    )  # fmt: skip
    p.add_argument("--explain", action="store_true", help="print the configurations the planner weighed")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")
    return p


def constraints_from_args(args: argparse.Namespace) -> Constraints:
    from kvlink.budget import Constraints
    from kvlink.recipe import Recipe

    lowrank = args.lowrank
    if args.rank is not None and lowrank is None:
        lowrank = "svd"
    k_bits, v_bits = args.bits if args.bits is not None else (None, None)
    try:
        return Constraints(
            method=args.method, k_bits=k_bits, v_bits=v_bits, retention=args.retention, lowrank=lowrank,
            rank=args.rank, zstd=args.zstd, group_size=args.group_size, rotate=args.rotate, scope=args.scope,
            sink=args.sink, round_k=args.round_k, k_widths=args.k_widths, v_widths=args.v_widths,
            layer_bits=args.layer_bits, recipe=Recipe.from_name(args.recipe) if args.recipe else None,
        )  # fmt: skip
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def read_context(source: str) -> str:
    if source == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read the context file {source!r}: {exc.strerror or exc}") from None
    if not text.strip():
        raise UsageError("the context is empty")
    return text


def _n(x: int) -> str:
    return f"{x:,}"


def byte_table(result: SendResult) -> Table:
    """Bytes of the message on the wire by category, against the FP16 size of the full context KV."""
    r, p = result.receipt, result.plan
    fp16 = result.fp16_bytes
    kept = p.encoded.tensors[0].shape[1] if p.encoded.tensors else 0
    table = Table(title=f"{p.recipe.name}: {result.context_tokens} context tokens, {kept} kept")
    table.add_column("wire bytes", no_wrap=True)
    table.add_column("bytes", justify="right")
    table.add_column("% of FP16", justify="right")

    def row(name: str, n: int, style: str | None = None) -> None:
        table.add_row(name, _n(n), f"{100 * n / fp16:.3f}%", style=style)

    row("FP16 size of the full context KV", fp16, style="dim")
    row("payload (quantized codes)", r.payload)
    row("metadata", r.metadata)
    row("  positions", r.positions, style="dim")
    row("  scales + zero points", r.scales, style="dim")
    row("  low-rank factors", r.factors, style="dim")
    row("framing (protobuf, gRPC prefixes)", r.framing)
    row("signaling (acks, nacks, receipt)", r.signaling)
    row("total on the wire (receipt)", r.total, style="bold")
    row("planned, incl. HTTP/2 allowance", p.total_bytes, style="dim")
    row("budget", p.budget_bytes, style="dim")
    if result.transfer.resends:
        row(f"  of which resent ({result.transfer.resends} chunks)", r.retransmitted_bytes, style="dim")
    return table


def timing_table(result: SendResult) -> Table:
    table = Table(title="time per stage")
    table.add_column("stage", no_wrap=True)
    table.add_column("seconds", justify="right")
    for key, name in STAGES:
        if key in result.timings:
            table.add_row(name, f"{result.timings[key]:.3f}")
    return table


def _quality(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def candidate_table(candidates: Sequence[Candidate], chosen: Recipe, limit: int = 30) -> Table:
    """The planner's candidates, best expected quality first: the top ones and every one it encoded."""
    shown = [c for i, c in enumerate(candidates) if c.note or i < 10][:limit]
    table = Table(title=f"planner: {len(shown)} of {len(candidates)} candidates, best expected quality first")
    table.add_column("config", no_wrap=True)
    table.add_column("estimate", justify="right")
    table.add_column("quality", justify="right")
    table.add_column("encoded: exact bytes", no_wrap=True)
    base = chosen.with_zstd(None)
    for c in shown:
        style = "bold green" if c.recipe in (chosen, base) else None
        exact = c.note.split(": ", 1)[-1] if c.note else ("fits" if c.fits else "over budget")
        table.add_row(
            c.recipe.name, f"{100 * c.fraction:.2f}%", _quality(c.expected_quality), exact, style=style
        )
    return table


def print_result(console: Console, result: SendResult, explain: bool = False) -> None:
    """The answer, the byte table and the timing table (and the planner's candidates)."""
    if explain:
        console.print(candidate_table(result.plan.candidates, result.plan.recipe))
    console.print(byte_table(result))
    console.print(timing_table(result))
    a = result.answer
    scores = (
        f"  (F1 {a.f1:.2f}, EM {a.exact_match:.0f})" if a.f1 is not None and a.exact_match is not None else ""
    )
    console.print(f"[bold]answer:[/bold] {a.text}{scores}")
    console.print(
        f"{_n(result.receipt.total)} wire bytes = {100 * result.fraction:.2f}% of FP16 "
        f"({_n(result.fp16_bytes)}), budget {100 * result.budget:.2f}%"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from client.sender import ClientSecurity, SendError, send_context
    from kvlink import models
    from kvlink.budget import BudgetError, parse_budget

    err = Console(stderr=True)
    out = Console()
    try:
        budget = parse_budget(args.budget)
        constraints = constraints_from_args(args)
        if not args.question.strip():
            raise UsageError("the question is empty")
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.attempts < 1:
            raise UsageError(f"--attempts must be >= 1, got {args.attempts}")
        security = ClientSecurity.from_files(
            tls=args.tls, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
            token_file=args.auth_token_file, server_name=args.tls_server_name,
        )  # fmt: skip
        context = read_context(args.context)
    except (ValueError, UsageError) as exc:
        print(f"kvlink-send: error: {exc}", file=sys.stderr)
        return 2
    try:
        with err.status(f"loading {args.model or 'the embedded model'}"):
            lm = models.load_model(args.model, args.device)
        with err.status(f"sending to {args.server}"):
            result = asyncio.run(
                send_context(
                    args.server,
                    context,
                    args.question,
                    budget,
                    lm=lm,
                    constraints=constraints,
                    reference_answers=args.reference_answer,
                    max_new_tokens=args.max_new_tokens,
                    timeout=args.timeout,
                    security=security,
                    attempts=args.attempts,
                    min_rate_bps=args.min_rate,
                )
            )
    except BudgetError as exc:
        print(f"kvlink-send: error: {exc}", file=sys.stderr)
        return 2
    except SendError as exc:
        print(f"kvlink-send: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"kvlink-send: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    if args.json:
        data = result.as_dict()
        if args.explain:
            data["candidates"] = [
                {"config": c.recipe.name, "estimated_bytes": c.estimated_bytes, "fraction": c.fraction,
                 "expected_quality": None if math.isnan(c.expected_quality) else c.expected_quality,
                 "fits": c.fits, "note": c.note}
                for c in result.plan.candidates
            ]  # fmt: skip
        print(json.dumps(data, default=str))
    else:
        print_result(out, result, explain=args.explain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
