"""kvlink-send: send a context's KV cache to a kvlink-serve receiver within a bandwidth budget, then ask.

    kvlink-send --server 127.0.0.1:50051 --budget 18.75% --context paper.txt --question "Who wrote it?"
    kvlink-send --server rx.example:50051 --tls-ca ca.crt --auth-token-file token ...   # TLS + token
    kvlink-ask --server 127.0.0.1:50051 --message MESSAGE_ID "And when?"                # a follow-up

Checks its arguments and that the receiver answers, loads the model, prefills
the context locally, lets the budget planner (kvlink.budget) choose the best
configuration whose exact wire size fits the budget, streams it, asks the
question, and prints the answer, the session and message ids (for kvlink-ask),
the byte split and the time per stage. The receiver keeps the context for
follow-up questions until its --session-ttl (--no-keep frees it after the
answer). On a terminal each stage shows while it runs; piped, the output is
plain complete lines. Exit status: 0 on success, 1 when a call fails or the
receiver cannot be reached, 2 for a bad argument or file, an unavailable model
or an unsatisfiable budget (kvlink.client.common); with --json, errors too are one JSON
object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from kvlink.cli import HelpFormatter, JsonErrorParser, configure_logging, consoles
from kvlink.client.common import (
    LOG_LEVELS,
    Failed,
    UsageError,
    add_connection_flags,
    add_generation_flags,
    explain_rows,
    options_from_args,
    read_text_file,
    report,
    security_from_args,
    server_from_args,
)

# torch and the library are imported when a command runs, not for --help.
if TYPE_CHECKING:
    from kvlink.budget import Candidate, Constraints
    from kvlink.client.sender import SendResult
    from kvlink.recipe import Recipe

STAGES: tuple[tuple[str, str], ...] = (
    ("prefill_s", "prefill (sender)"),
    ("select_s", "select (sender)"),
    ("quantize_s", "quantize (sender)"),
    ("pack_s", "pack + zstd or rANS + frame (sender)"),
    ("plan_s", "plan, all tries incl. select/quantize (sender)"),
    ("transfer_s", "transfer (first frame to receipt)"),
    ("receive_s", "receive (receiver: first to last frame)"),
    ("decode_s", "decode (receiver)"),
    ("answer_s", "answer (receiver)"),
)


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
    p = JsonErrorParser(
        prog="kvlink-send",
        description="Send a context's KV cache to a kvlink-serve receiver within a bandwidth budget "
        "(a fraction of the FP16 size of the full context KV that bounds every byte on the wire), "
        "then ask a question that the receiver answers from the transferred cache alone.",
        formatter_class=HelpFormatter,
    )
    add_connection_flags(p)
    p.add_argument(
        "--budget", default=None,
        help="a percentage like 18.75%%, or a fraction like 0.1875; in (0, 100%%]; required with --goal bytes, "
        "an upper bound on every byte with --goal ttft (default there: none)",
    )  # fmt: skip
    goal = p.add_argument_group("time to first token (kvlink.stream): --goal ttft")
    goal.add_argument(
        "--goal", choices=("bytes", "ttft"), default="bytes",
        help="bytes: the best expected quality within --budget, one config for the whole message; ttft: "
        "the context in segments, each sent as text (the receiver recomputes it), FP16 or a quality-table "
        "config, chosen to minimize the predicted time to first token from the receiver's measured costs "
        "and the link rate measured while sending, re-planned after every segment",
    )  # fmt: skip
    goal.add_argument(
        "--segment-tokens", type=int, default=1024, metavar="N",
        help="with --goal ttft: tokens per segment (the last one shorter)",
    )  # fmt: skip
    goal.add_argument(
        "--min-quality", type=float, default=0.0, metavar="Q",
        help="with --goal ttft: a KV segment's config must have an expected quality (the quality table's "
        "answer fidelity) of at least Q, in [0, 1]; text and FP16 count as 1",
    )  # fmt: skip
    goal.add_argument(
        "--link-rate", type=_rate, default=None, metavar="BITS/S",
        help="with --goal ttft: the link rate to assume before the first segment's receipt (default: what "
        "earlier sends measured to this receiver, else 1G)",
    )  # fmt: skip
    p.add_argument(
        "--context", required=True, metavar="FILE|-", help="context text file (UTF-8), or - for stdin"
    )
    p.add_argument("--question", required=True, help="the question the receiver answers")
    p.add_argument(
        "--model",
        default=None,
        help="model alias, HF id or local path (the receiver's; default: the embedded SmolLM2-135M)",
    )
    p.add_argument(
        "--download", action="store_true",
        help="fetch an HF model id from the Hub when it is not in the local cache (off: fail at once)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="where the sender prefills: cpu, cuda, cuda:N")
    p.add_argument(
        "--truncate", action="store_true",
        help="cut a context longer than the model's positions to its first tokens that fit (off: refuse it)",
    )  # fmt: skip
    p.add_argument(
        "--keep", action=argparse.BooleanOptionalAction, default=True,
        help="the receiver keeps the context for follow-up questions (kvlink-ask) until its --session-ttl; "
        "--no-keep frees it right after the answer",
    )  # fmt: skip
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
    p.add_argument(
        "--profile", metavar="FILE", action="append", default=[],
        help="the calibrated profile a --config recipe needs: the low-rank projection of 'profile-r<n>', "
        "the predictors of 'xpred', or for 'pca' the residual profile and its predictors (this option twice); "
        "the receiver must hold the same: kvlink-serve --profile FILE. Without --config, a residual profile and "
        "its predictors let the planner weigh transform coding where the quality table measured it at the "
        "context's length, if the receiver holds them",
    )  # fmt: skip
    zstd = p.add_mutually_exclusive_group()
    zstd.add_argument("--zstd", dest="zstd", action="store_true", default=None, help="always use zstd")
    zstd.add_argument("--no-zstd", dest="zstd", action="store_false", help="never use zstd")
    p.add_argument(
        "--reference-answer", action="append", default=[], metavar="TEXT",
        help="a gold answer (repeatable): the receiver records F1/EM",
    )  # fmt: skip
    add_generation_flags(p)
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
    p.add_argument("--explain", action="store_true", help="print the configurations the planner weighed")
    p.add_argument(
        "--explain-top", type=int, default=20, metavar="N",
        help="with --explain: the N best candidates and every one the planner encoded (0: all of them)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables (errors too)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="of the messages on stderr")
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


def read_profile(paths: list[str]) -> Any:
    """The calibrated profile in `paths` (each file by its format: kvlink.lowrank.ModelProfile,
    kvlink.predict.PredictorProfile, or a kvlink.residual.ResidualProfile with its predictors, joined into
    one TransformProfiles), or None for none; UsageError naming the file, or when they are not one profile."""
    from kvlink.predict import load_profile
    from kvlink.residual import TransformProfiles, pair_profiles

    loaded = []
    for path in paths:
        try:
            loaded.append(load_profile(path))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--profile {path!r}: {exc}") from None
    try:
        profiles = pair_profiles(loaded)
    except ValueError as exc:
        raise UsageError(f"--profile: {exc}") from None
    bundles = [p for p in profiles if isinstance(p, TransformProfiles)]
    if bundles:  # the predictors that came with a residual profile belong to it
        inside = {b.predictors.hash for b in bundles}
        profiles = [
            *bundles,
            *(p for p in profiles if not isinstance(p, TransformProfiles) and p.hash not in inside),
        ]
    if len(profiles) > 1:
        raise UsageError(f"--profile: {len(profiles)} profiles given, a message uses one (or a residual profile "
                         "and its predictors)")  # fmt: skip
    return profiles[0] if profiles else None


def read_context(source: str) -> str:
    return read_text_file(source, "context")


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


def candidate_table(candidates: Sequence[Candidate], chosen: Recipe, top: int = 20) -> Table:
    """The planner's candidates, best expected quality first: the `top` ones and every one it encoded."""
    shown = explain_rows(candidates, top)
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


def candidates_json(candidates: Sequence[Candidate], top: int) -> list[dict[str, Any]]:
    return [
        {"config": c.recipe.name, "estimated_bytes": c.estimated_bytes, "fraction": c.fraction,
         "expected_quality": None if math.isnan(c.expected_quality) else c.expected_quality,
         "fits": c.fits, "note": c.note}
        for c in explain_rows(candidates, top)
    ]  # fmt: skip


def print_answer(console: Console, answer: Any) -> None:
    """The answer's text (never read as markup) and, when it did not end by itself, why it ended."""
    from rich.markup import escape

    scores = (
        f"  (F1 {answer.f1:.2f}, EM {answer.exact_match:.0f})"
        if answer.f1 is not None and answer.exact_match is not None
        else ""
    )
    ended = {"length": "  [dim](cut at --max-new-tokens)[/dim]", "stop": "  [dim](at a --stop text)[/dim]"}
    console.print(f"[bold]answer:[/bold] {escape(answer.text)}{scores}{ended.get(answer.finish_reason, '')}")


def print_result(console: Console, result: SendResult, explain: bool = False, top: int = 20) -> None:
    """The planner's candidates (with explain), the byte table, the timing table, the answer and the ids."""
    if explain:
        console.print(candidate_table(result.plan.candidates, result.plan.recipe, top))
    console.print(byte_table(result))
    console.print(timing_table(result))
    print_answer(console, result.answer)
    console.print(
        f"{_n(result.receipt.total)} wire bytes = {100 * result.fraction:.2f}% of FP16 "
        f"({_n(result.fp16_bytes)}), budget {100 * result.budget:.2f}%"
    )
    if result.truncated_tokens:
        console.print(f"the context was cut: its last {_n(result.truncated_tokens)} tokens were not sent")
    console.print(f"session {result.session_id}  message {result.message_id}")
    if result.kept_on_receiver:
        console.print(
            f'ask again: kvlink-ask --server {result.server} --message {result.message_id} "QUESTION"'
        )
    else:
        console.print(f"released on the receiver ({_n(result.released_bytes or 0)} bytes)")


def parse_budget_arg(text: str) -> float:
    """The budget as a fraction; a bare number above 1 asks whether a percentage was meant."""
    from kvlink.budget import parse_budget

    try:
        return parse_budget(text)
    except ValueError as exc:
        bare = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*", text)
        if bare and 1 < float(bare.group(1)) <= 100:
            raise UsageError(
                f"--budget {text.strip()}: a bare number is a fraction in (0, 1]; did you mean {text.strip()}%?"
            ) from None
        raise UsageError(str(exc)) from None


@contextlib.contextmanager
def _progress(console: Console, enabled: bool) -> Iterator[Any]:
    """A live status line on a terminal (`update(stage, detail)`), nothing otherwise."""
    if not enabled:
        yield lambda stage, detail: None
        return
    with console.status("starting") as status:

        def update(stage: str, detail: str) -> None:
            status.update(f"{stage}: {detail}")

        yield update


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return _run(args)
    except KeyboardInterrupt:
        report("kvlink-send", Failed("interrupted", 130, "interrupted"), args.json)
        return 130
    except Exception as exc:  # every failure is one line (or one JSON object), never a traceback
        return report("kvlink-send", exc, args.json)


def _run(args: argparse.Namespace) -> int:
    from kvlink import models
    from kvlink.client.sender import probe, send_context

    out, err = consoles()
    # Everything that can be checked without the model, first.
    target = server_from_args(args)
    if args.budget is None and args.goal == "bytes":
        raise UsageError("--budget is required (or --goal ttft, where it is an optional bound)")
    budget = None if args.budget is None else parse_budget_arg(args.budget)
    if args.goal == "ttft":
        if args.segment_tokens < 1:
            raise UsageError(f"--segment-tokens must be >= 1, got {args.segment_tokens}")
        if not 0.0 <= args.min_quality <= 1.0:
            raise UsageError(f"--min-quality must be in [0, 1], got {args.min_quality}")
        if args.profile:
            raise UsageError(
                "--profile is for --goal bytes: the segmented sender (--goal ttft) plans its segments without "
                "calibrated profiles"
            )
    constraints = constraints_from_args(args)
    if not args.question.strip():
        raise UsageError("the question is empty")
    options = options_from_args(args)
    if args.attempts < 1:
        raise UsageError(f"--attempts must be >= 1, got {args.attempts}")
    if args.explain_top < 0:
        raise UsageError(f"--explain-top must be >= 0, got {args.explain_top}")
    security = security_from_args(args)
    context = read_context(args.context)
    profile = read_profile(args.profile)
    try:
        models.check_device(args.device)
        models.check_model(args.model, args.download)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with _progress(err, err.is_terminal and not args.json) as stage:
        stage("connect", f"checking that the receiver at {target} answers")
        try:
            asyncio.run(probe(target, security, timeout=min(args.timeout, 15.0)))
        except Exception as exc:
            raise Failed(
                f"cannot reach the receiver at {target}: {exc}; nothing was loaded or sent", 1, "UNREACHABLE"
            ) from None
        stage("load", f"tokenizer of {args.model or 'the embedded model'}")
        tokenizer, limit = models.load_tokenizer(args.model, args.download)
        _check_length(tokenizer, context, args, options.max_new_tokens, limit)
        stage("load", f"{args.model or 'the embedded model'} on {args.device}")
        lm = models.load_model(args.model, args.device, download=args.download)
        if args.goal == "ttft":
            return _send_ttft(args, target, context, budget, lm, options, security, stage, out)
        assert budget is not None
        result = asyncio.run(
            send_context(
                target, context, args.question, budget, lm=lm, constraints=constraints,
                reference_answers=args.reference_answer, options=options, timeout=args.timeout,
                security=security, attempts=args.attempts, keep=args.keep, truncate=args.truncate,
                on_stage=stage, min_rate_bps=args.min_rate, profile=profile,
            )
        )  # fmt: skip
    if args.json:
        data = result.as_dict()
        if args.explain:
            data["candidates"] = candidates_json(result.plan.candidates, args.explain_top)
            data["candidates_total"] = len(result.plan.candidates)
        print(json.dumps(data, default=str))
    else:
        print_result(out, result, explain=args.explain, top=args.explain_top)
    return 0


def _send_ttft(
    args: argparse.Namespace, target: str, context: str, budget: float | None, lm: Any, options: Any,
    security: Any, stage: Any, out: Console,
) -> int:  # fmt: skip
    """kvlink-send --goal ttft: the context in segments (kvlink.client.stream.send_streamed)."""
    from kvlink.client.stream import send_streamed
    from kvlink.models import cache_dir
    from kvlink.stream import LinkMemory

    result = asyncio.run(
        send_streamed(
            target, context, args.question, lm=lm, budget=budget, segment_tokens=args.segment_tokens,
            min_quality=args.min_quality, reference_answers=args.reference_answer, options=options,
            timeout=args.timeout, security=security, link_bps=args.link_rate, truncate=args.truncate,
            links=LinkMemory(cache_dir() / "links.json"), on_stage=stage,
            fixed=args.recipe,
        )
    )  # fmt: skip
    if args.json:
        print(json.dumps(result.as_dict(), default=str))
        return 0
    if args.explain:
        table = Table(title="segments: chosen, predicted and measured")
        columns = ["#", "tokens", "sent as", "link est.", "call est.", "TTFT pred.", "wire bytes"]
        columns.append("on receiver")
        for name in columns:
            table.add_column(name, justify="left" if name == "sent as" else "right")
        for s in result.segments:
            receiver = s.transfer.receipt.timings if s.transfer is not None else {}
            work = receiver.get("recompute_s", receiver.get("decode_s", 0.0))
            table.add_row(
                str(s.index), f"{s.start}-{s.stop}", s.option, f"{s.link_bps / 1e9:.2f} Gb/s",
                f"{1e3 * s.call_s:.1f} ms", f"{s.predicted_ttft_s:.3f} s", _n(s.wire_bytes), f"{work:.3f} s",
            )  # fmt: skip
        out.print(table)
        statics = ", ".join(
            f"{name} {t:.3f} s" for name, t in sorted(result.static_predictions.items(), key=lambda x: x[1])
        )
        out.print(f"predicted TTFT if every segment went alike: {statics}")
        st = result.stages()
        out.print(
            f"stages, summed over the segments: prefill {st['prefill_s']:.3f} s, choosing {st['plan_s']:.3f} s, "
            f"encode {st['encode_s']:.3f} s, "
            f"link {st['link_s']:.3f} s, receiver {st['receiver_s']:.3f} s = {st['sum_s']:.3f} s; they took "
            f"{st['wall_s']:.3f} s together (pipelined)"
        )
        text_scale, kv_scale = result.work_scales
        out.print(
            f"the receiver's work as measured, against its advertised rates: x{text_scale:.2f} recomputing "
            f"text, x{kv_scale:.2f} decoding KV (kept for the next send)"
        )
    print_answer(out, result.answer)
    out.print(
        f"TTFT {result.ttft_s:.3f} s (predicted {result.predicted_ttft_s:.3f} s); {_n(result.total_bytes)} wire "
        f"bytes = {100 * result.fraction:.2f}% of FP16 ({_n(result.fp16_bytes)}) in {len(result.segments)} segments"
    )
    out.print(f"session {result.session_id}  message {result.stream_id}")
    return 0


def _check_length(
    tokenizer: Any, context: str, args: argparse.Namespace, max_new: int, limit: int | None
) -> None:
    """ContextTooLong (exit 2) before the model loads, unless --truncate (then send_context cuts it)."""
    from kvlink.client.sender import fit_context
    from kvlink.prompt import context_ids, question_ids

    if limit is None:
        return
    n_ctx = int(context_ids(tokenizer, context).numel())
    fit_context(n_ctx, int(question_ids(tokenizer, args.question).numel()), max_new, limit, args.truncate)


if __name__ == "__main__":
    sys.exit(main())
