"""kvlink-bench ttft: the segmented sender's time to first token (kvlink.client.stream.send_streamed)
through the real service over paced links, adaptive against static, predicted against measured.

    kvlink-bench ttft --tokens 2k --rates 3M,10M,30M,100M,1G --cold-rates 30M,1G --drop 30M:3M \\
        --out bench/results/ttft-cpu
    kvlink-bench ttft --model random:tiny-llama --tokens 256 --segment-tokens 64 --rates 50M --out /tmp/ttft

The receiver is kvlink-serve in a subprocess (kvlink.server.local.LocalReceiver), which measures its own
prefill and decode rates at start-up (--cost-probe-tokens, kvlink.server.main.measure_receiver) and
advertises them in its Welcome, as it does in production. Between sender and receiver runs a paced TCP
proxy (kvlink.eval.link.PacedProxy, threads of this process, so that its rate can change mid-message),
a fresh one per cell, carrying gRPC's HTTP/2 bytes both ways.

For each context (long-context QA of kvlink.eval.tasks.long_examples, evaluation split, one per
--tokens length), sender and link rate, one cell per method:

- "adaptive": send_streamed(fixed=None): each segment's option chosen by kvlink.stream.Planner;
- each static option (fixed="text", "fp16", or a config: the options the sender would choose from,
  kvlink.client.stream.kv_options, or --statics). A static whose TTFT the planner predicts above
  --max-cell-s is not run (recorded as skipped, with its prediction); text is always run.

Two senders (--senders): "cold" reads the context on the path, as kvlink-send does (its prefill overlaps
the first segments); "warm" already holds the context's prefill (send_streamed(prefilled=...)), the
case where a sender kept the cache of a context it served before. The sender is told the link's rate
before its first receipt (link_bps: what it remembers of this receiver); each cell starts with a fresh
memory of link rates, but keeps the per-segment call cost learned from the receipts of the cells before
it (`Learned`: what a sender that sent to this receiver before keeps in links.json; the first cell
starts from what the warm-up sends learned).

Per cell: measured TTFT (from the Welcome to the receiver's first answer token), the TTFT predicted
before sending, wire bytes, each segment's option, link estimate and receiver timings, and every
static's predicted TTFT. Per (context, sender, rate): adaptive / best measured static (target <= 1.1)
and the prediction error (target within 20%). The link-change run (--drop START:END) sends through a
proxy at START whose rate becomes END once --drop-after of the segments' receipts are in: the adaptive
sender, and the best static at START under the same drop; it records the segment from which the
adaptive's option changed (target: within 2 segments of the drop) and the TTFT ratio (target >= 1.3).

Before the first cell, the first context is sent once as text, once as INT4 KV and once as each other
static predicted to fit --max-cell-s at the fastest rate, not recorded (first calls: allocations and
kernels at the full length). Each side computes on --threads CPU threads (torch's intra-op threads here, OMP_NUM_THREADS for the
receiver), so that on one CPU machine sender and receiver do not take each other's cores.

Writes results.json (every cell), results.md and ttft.png (TTFT against link rate) under --out.
Random-weight models: timing only. A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlink.eval.link import PacedProxy, parse_rate, rate_label

logger = logging.getLogger(__name__)

ADAPTIVE = "adaptive"
SENDERS = ("cold", "warm")
RANDOM_NOTE = "random weights: timing only"
WARM_UP = ("text", "kint4c/vint4t-g32")
"""What is sent once, unrecorded, before the first cell: the recompute and the decode paths."""
TARGETS = {
    "adaptive_over_best_static": 1.1,
    "prediction_error": 0.2,
    "drop_lag_segments": 2,
    "drop_speedup": 1.3,
}
OUT_OF_TIME = "--time-budget spent before it started"


# --- contexts -----------------------------------------------------------------------------------------
@dataclass
class Context:
    """One context: its text and question, the ids the sender reads, and (warm sender) its prefill."""

    eid: str
    text: str
    question: str
    answers: tuple[str, ...]
    tokens: int  # context ids the sender sends
    prefilled: Any = None  # kvlink.cache.Prefill, read once for the warm sender
    prefill_s: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.eid.rpartition(':')[2][:8]} ({self.tokens:,} tok)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.eid, "label": self.label, "tokens": self.tokens, "question": self.question, "answers": list(self.answers),
            "sender_prefill_s": self.prefill_s,
        }  # fmt: skip


def parse_tokens(text: str) -> list[int]:
    """'2k,4k' -> [2048, 4096]; plain integers are tokens."""
    out = []
    for raw in (r.strip().lower() for r in text.split(",") if r.strip()):
        try:
            value = int(float(raw.removesuffix("k")) * (1024 if raw.endswith("k") else 1))
        except ValueError:
            raise ValueError(f"context lengths like 2k,4k or 1500, got {raw!r}") from None
        if value < 32:
            raise ValueError(f"a context must have at least 32 tokens, got {raw!r}")
        out.append(value)
    if not out:
        raise ValueError(f"no context length in {text!r}")
    return out


def parse_rates(text: str) -> list[float]:
    """'10M,1G' -> [1e7, 1e9] bits/s (paced only: a rate to change needs a paced proxy)."""
    rates = []
    for raw in (r for r in text.split(",") if r.strip()):
        rate = parse_rate(raw)
        if rate is None:
            raise ValueError(f"every link of this benchmark is paced, got {raw!r}")
        rates.append(rate)
    return rates


def parse_drop(text: str) -> tuple[float, float] | None:
    """'30M:3M' -> (3e7, 3e6); '' -> None."""
    if not text.strip():
        return None
    start, sep, end = text.partition(":")
    rates = parse_rates(f"{start},{end}") if sep else []
    if len(rates) != 2:
        raise ValueError(f"--drop is START:END, like 30M:3M, got {text!r}")
    return rates[0], rates[1]


def load_contexts(lm: Any, lengths: Sequence[int], per_length: int, seed: int = 0) -> list[Context]:
    """`per_length` long-context QA examples (evaluation split) of 90-100% of each length in tokens."""
    from kvlink.eval.tasks import long_examples
    from kvlink.prompt import context_ids

    out = []
    for n in lengths:
        examples = long_examples(
            lm.tokenizer,
            limit=per_length,
            min_tokens=int(0.9 * n),
            max_tokens=n,
            seed=seed,
            split="evaluation",
        )
        if not examples and lm.random_weights:
            out += _cycled(lm, n)  # longer than the split's articles (~23k tokens): answers do not matter
            continue
        if not examples:
            raise ValueError(
                f"no long-context example of {int(0.9 * n)}-{n} tokens in the evaluation split "
                "(its four articles hold ~23k tokens; longer contexts need a random:... model)"
            )
        for e in examples:
            ids = context_ids(lm.tokenizer, e.context)
            out.append(Context(e.eid, e.context, e.question, e.answers, int(ids.numel())))
    return out


def _cycled(lm: Any, n: int) -> list[Context]:
    """One context of `n` tokens cut from every shipped SQuAD paragraph in file order, cycled
    (kvlink.eval.bench_scale.context_text): for random-weight models, whose answers are not read."""
    from kvlink.eval.bench_scale import context_text
    from kvlink.prompt import context_ids

    text, question = context_text(lm.tokenizer, n)
    logger.warning(
        "%d tokens: longer than the evaluation split holds; cycled SQuAD paragraphs (%s)", n, RANDOM_NOTE
    )
    ids = context_ids(lm.tokenizer, text)
    return [Context(f"cycled:{n}", text, question, (), int(ids.numel()))]


def read_prefill(lm: Any, ctx: Context) -> None:
    """The warm sender's prefill of `ctx`, exactly as send_streamed reads it."""
    from kvlink.cache import Observe, prefill
    from kvlink.prompt import context_ids, question_ids, question_rows

    ids = context_ids(lm.tokenizer, ctx.text)
    q = question_ids(lm.tokenizer, ctx.question)
    started = time.perf_counter()
    ctx.prefilled = prefill(lm.model, ids, q, Observe.QUESTION, 32, question_rows(lm.tokenizer, ctx.question))
    ctx.prefill_s = time.perf_counter() - started


# --- one cell -------------------------------------------------------------------------------------------
@dataclass
class Learned:
    """What the sender keeps of this receiver from cell to cell: the per-segment call cost (seconds,
    kvlink.stream.LinkEstimate.segment_s; None until a receipt measured it) and how its recompute and
    decode compare with its advertised rates (the estimate's scales, with their sample counts). Link
    rates are not kept."""

    segment_s: float | None = None
    scales: tuple[float, int, float, int] | None = (
        None  # recompute_scale, its samples, decode_scale, its samples
    )


@dataclass
class Receipts:
    """on_segment: each receipt's arrival and the link estimate right after it; with `drop`, the proxy's
    rate becomes drop[1] once drop[0] receipts are in."""

    links: Any  # kvlink.stream.LinkMemory
    target: str
    started: float
    proxy: PacedProxy | None = None
    drop: tuple[int, float] | None = None
    seen: list[dict[str, Any]] = field(default_factory=list)
    dropped_after: int | None = None  # receipts in when the rate changed
    dropped_at_s: float | None = None

    def __call__(self, seg: Any) -> None:
        now = time.perf_counter() - self.started
        self.seen.append(
            {"index": seg.index, "at_s": now, "estimate_gbps": self.links.get(self.target).bps / 1e9}
        )
        if self.drop is not None and self.proxy is not None and self.dropped_after is None:
            after, rate = self.drop
            if len(self.seen) >= after:
                self.proxy.set_rate(rate)
                self.dropped_after, self.dropped_at_s = len(self.seen), now


async def run_cell(
    lm: Any,
    upstream: tuple[str, int],
    ctx: Context,
    sender: str,
    rate: float,
    method: str,
    segment_tokens: int,
    max_new_tokens: int,
    drop: tuple[int, float] | None = None,
    learned: Learned | None = None,
) -> dict[str, Any]:
    """Send `ctx` once through a fresh proxy at `rate` with `method` (ADAPTIVE or a static option);
    `learned`: the call cost to start from, updated with what this cell's receipts taught."""
    from kvlink.answer import GenerationOptions
    from kvlink.client.sender import SendError
    from kvlink.client.stream import send_streamed
    from kvlink.stream import LinkMemory

    proxy = PacedProxy(upstream, rate).start()
    links = LinkMemory()
    estimate = links.get(proxy.target, rate)
    if learned is not None and learned.segment_s is not None:
        estimate.segment_s, estimate.segment_samples = learned.segment_s, 1
    if learned is not None and learned.scales is not None:
        (estimate.recompute_scale, estimate.recompute_samples, estimate.decode_scale,
         estimate.decode_samples) = learned.scales  # fmt: skip
    planned_segment_s = estimate.segment_s
    receipts = Receipts(links, proxy.target, time.perf_counter(), proxy, drop)
    load = os.getloadavg()[0]
    try:
        result = await send_streamed(
            proxy.target, ctx.text, ctx.question, lm=lm, segment_tokens=segment_tokens,
            fixed=None if method == ADAPTIVE else method, link_bps=rate, links=links,
            reference_answers=ctx.answers, options=GenerationOptions(max_new_tokens),
            prefilled=ctx.prefilled if sender == "warm" else None, on_segment=receipts,
        )  # fmt: skip
    except SendError as exc:  # one cell lost, not the run: recorded, and the grid goes on
        logger.warning("%s %s %s failed: %s", sender, rate_label(rate), method, exc)
        return {**skipped_cell(ctx, sender, rate, method, math.nan, f"failed: {exc}"), "failed": True}
    finally:
        proxy.close()
    await _release(upstream, result)
    if learned is not None:
        learned.segment_s = estimate.segment_s
        learned.scales = (
            estimate.recompute_scale, estimate.recompute_samples, estimate.decode_scale, estimate.decode_samples,
        )  # fmt: skip
    options = [s.option for s in result.segments]
    return {
        "context": ctx.label, "tokens": ctx.tokens, "sender": sender, "rate_bps": rate, "link": rate_label(rate),
        "method": method, "ttft_s": result.ttft_s, "predicted_ttft_s": result.predicted_ttft_s,
        "error": result.predicted_ttft_s / result.ttft_s - 1, "wire_bytes": result.total_bytes,
        "percent_of_fp16": 100 * result.fraction, "proxy_bytes_up": proxy.bytes_up, "options": options,
        "static_predictions_s": dict(result.static_predictions), "answer": result.answer.text,
        "f1": result.answer.f1, "timings": dict(result.timings), "load_1min": load,
        "segments": [s.as_dict() for s in result.segments], "receipts": receipts.seen,
        "segment_s_planned": planned_segment_s, "segment_s_learned": estimate.segment_s,
        "work_scales": list(result.work_scales),
        "drop": None if drop is None else {
            "after_receipts": receipts.dropped_after, "at_s": receipts.dropped_at_s, "to_bps": drop[1],
        },
    }  # fmt: skip


async def _release(upstream: tuple[str, int], result: Any) -> None:
    """Free the cell's context on the receiver (directly, not through the proxy): a kept 32k-token 8B
    context holds GBs of its memory until its session TTL, and the cells after it need them."""
    import grpc

    from kvlink.client.sender import PLAINTEXT, SendError, channel_options, release

    async with PLAINTEXT.channel(f"{upstream[0]}:{upstream[1]}", channel_options()) as channel:
        try:
            await release(channel, result.stream_id, result.session_id)
        except (SendError, grpc.aio.AioRpcError) as exc:
            logger.warning("could not free context %s: %s", result.stream_id, exc)


def skipped_cell(
    ctx: Context, sender: str, rate: float, method: str, predicted: float, why: str
) -> dict[str, Any]:
    return {
        "context": ctx.label, "tokens": ctx.tokens, "sender": sender, "rate_bps": rate, "link": rate_label(rate),
        "method": method, "predicted_ttft_s": predicted, "skipped": why,
    }  # fmt: skip


# --- the grid -------------------------------------------------------------------------------------------
@dataclass
class Grid:
    """What to run: contexts x senders x rates x (adaptive + statics), repeats, and the link change."""

    contexts: list[Context]
    rates: dict[str, list[float]]  # per sender
    statics: list[str] | None  # None: every option the sender chooses from
    segment_tokens: int
    repeats: int
    max_new_tokens: int
    max_cell_s: float
    drop: tuple[float, float] | None
    drop_sender: str
    drop_after: float
    deadline: float | None = None  # time.perf_counter() after which no cell starts (--time-budget)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline


async def run_grid(
    lm: Any, target: str, grid: Grid, progress: Callable[[dict[str, Any]], None]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(cells, link-change runs, what the receiver advertised)."""
    from kvlink.client.sender import PLAINTEXT, channel_options, hello

    host, _, port = target.rpartition(":")
    upstream = (host, int(port))
    async with PLAINTEXT.channel(target, channel_options()) as channel:
        welcome = await hello(channel, lm.fingerprint)
    if welcome.costs is None:
        raise RuntimeError("the receiver advertises no measured costs (kvlink-serve --cost-probe-tokens 0?)")
    advertised = {
        "prefill_tokens_per_s": [list(p) for p in welcome.costs.prefill],
        "decode_bytes_per_s": welcome.costs.decode_bytes_per_s, "first_token_s": welcome.costs.first_token_s,
        "decode_by_format": dict(welcome.costs.decode), "segment_s": welcome.costs.segment_s,
        "answer_s": welcome.costs.answer_s,
        "text_segments": "segment:text" in welcome.capabilities,
    }  # fmt: skip
    learned = Learned()
    # First calls (allocations, kernels) on both sides, over the whole first context: not recorded. A
    # quarter of it left the first cell at full length paying for its allocations (issue 22's H200 grid:
    # that cell's recompute 0.85 s and answer 0.63 s a segment, 0.20 s and 0.30 s in the next). Then every
    # other static the grid may run, predicted to fit --max-cell-s at the fastest rate: each option's
    # first message may pay for kernels of its own.
    rates = [r for rs in grid.rates.values() for r in rs] + ([grid.drop[0]] if grid.drop else [])
    if grid.contexts and rates:
        first = grid.contexts[0]
        warmed: list[str] = []
        predicted: dict[str, float] = {}
        for method in WARM_UP:
            cell = await run_cell(
                lm, upstream, first, "cold", max(rates), method, grid.segment_tokens, 1, learned=learned
            )
            warmed.append(method)
            predicted = cell.get("static_predictions_s") or predicted
        for method in grid.statics or list(predicted):
            if method not in warmed and predicted.get(method, math.inf) <= grid.max_cell_s:
                await run_cell(
                    lm, upstream, first, "cold", max(rates), method, grid.segment_tokens, 1, learned=learned
                )
    cells: list[dict[str, Any]] = []
    for repeat in range(grid.repeats):
        for ctx in grid.contexts:
            for sender, rates in grid.rates.items():
                for rate in rates:
                    if grid.out_of_time():
                        cells.append(
                            {
                                **skipped_cell(ctx, sender, rate, ADAPTIVE, math.nan, OUT_OF_TIME),
                                "repeat": repeat,
                            }
                        )
                        progress(cells[-1])
                        continue
                    adaptive = await run_cell(
                        lm, upstream, ctx, sender, rate, ADAPTIVE, grid.segment_tokens,
                        grid.max_new_tokens, learned=learned,
                    )  # fmt: skip
                    cells.append({**adaptive, "repeat": repeat})
                    progress(cells[-1])
                    predicted = adaptive.get("static_predictions_s", {})  # none when it failed
                    for name in grid.statics or list(predicted):
                        guess = predicted.get(name, math.nan)
                        why = None
                        if grid.out_of_time():
                            why = OUT_OF_TIME
                        elif name != "text" and guess > grid.max_cell_s:
                            why = f"predicted {guess:.1f} s > --max-cell-s {grid.max_cell_s:g}"
                        if why is not None:
                            cells.append(
                                {**skipped_cell(ctx, sender, rate, name, guess, why), "repeat": repeat}
                            )
                        else:
                            cell = await run_cell(
                                lm,
                                upstream,
                                ctx,
                                sender,
                                rate,
                                name,
                                grid.segment_tokens,
                                grid.max_new_tokens,
                                learned=learned,
                            )
                            cells.append({**cell, "repeat": repeat})
                        progress(cells[-1])
    changes = []
    if grid.drop is not None:
        for ctx in grid.contexts:
            if grid.out_of_time():
                logger.warning("--time-budget spent: the link change of %s is not run", ctx.label)
                continue
            changes.append(await link_change(lm, upstream, ctx, grid, cells, progress, learned))
    return cells, changes, advertised


async def link_change(
    lm: Any,
    upstream: tuple[str, int],
    ctx: Context,
    grid: Grid,
    cells: Sequence[dict[str, Any]],
    progress: Callable[[dict[str, Any]], None],
    learned: Learned | None = None,
) -> dict[str, Any]:
    """The adaptive sender and the best static at the starting rate, through a link that slows down."""
    assert grid.drop is not None
    start, end = grid.drop
    segments = math.ceil(ctx.tokens / grid.segment_tokens)
    after = max(1, min(segments - 1, round(grid.drop_after * segments)))
    sender = grid.drop_sender
    # What is returned, with why, if either run fails:
    failed = {"context": ctx.label, "sender": sender, "start_bps": start, "end_bps": end}
    adaptive = await run_cell(
        lm,
        upstream,
        ctx,
        sender,
        start,
        ADAPTIVE,
        grid.segment_tokens,
        grid.max_new_tokens,
        (after, end),
        learned,
    )
    progress(adaptive)
    if adaptive.get("failed"):
        return {**failed, "failed": adaptive["skipped"]}
    # The best static at the starting rate: measured in the grid when it ran that rate, else predicted.
    steady = [
        c for c in cells if c["context"] == ctx.label and c["sender"] == sender and c["rate_bps"] == start
    ]
    measured = {c["method"]: c["ttft_s"] for c in steady if c["method"] != ADAPTIVE and "ttft_s" in c}
    if measured:
        best, basis = min(measured, key=measured.__getitem__), "measured at the starting rate"
    else:
        predicted = {k: v for k, v in adaptive["static_predictions_s"].items()}
        best, basis = min(predicted, key=predicted.__getitem__), "predicted at the starting rate"
    static = await run_cell(
        lm,
        upstream,
        ctx,
        sender,
        start,
        best,
        grid.segment_tokens,
        grid.max_new_tokens,
        (after, end),
        learned,
    )
    progress(static)
    if static.get("failed"):
        return {**failed, "failed": static["skipped"]}
    # Where the drop made the adaptive sender choose otherwise: the first segment from the drop on whose
    # option differs from the steady run's at the starting rate (from the one before the drop when the grid
    # did not run that rate).
    options = adaptive["options"]
    drop_index = adaptive["drop"]["after_receipts"]  # the first segment whose receipt came after the drop
    runs = [c for c in steady if c["method"] == ADAPTIVE]
    reference = runs[0]["options"] if runs else None
    change = None
    if drop_index is not None and 0 < drop_index < len(options):
        before = reference or [options[drop_index - 1]] * len(options)
        change = next((i for i in range(drop_index, len(options)) if options[i] != before[i]), None)
    return {
        "context": ctx.label, "sender": sender, "start_bps": start, "end_bps": end, "segments": segments,
        "drop_after_receipts": after, "drop_segment": drop_index, "change_segment": change,
        "lag_segments": None if change is None or drop_index is None else change - drop_index,
        "steady_schedule": reference,
        "best_static": best, "best_static_basis": basis,
        "speedup": static["ttft_s"] / adaptive["ttft_s"], "adaptive": adaptive, "static": static,
    }  # fmt: skip


# --- summary ---------------------------------------------------------------------------------------------
def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarize(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (context, sender, rate): adaptive and the best static (medians over repeats), errors."""
    keys = list(dict.fromkeys((c["context"], c["sender"], c["rate_bps"]) for c in cells))
    out = []
    for ctx, sender, rate in keys:
        mine = [c for c in cells if (c["context"], c["sender"], c["rate_bps"]) == (ctx, sender, rate)]
        ran = [c for c in mine if "ttft_s" in c]
        by_method: dict[str, list[dict[str, Any]]] = {}
        for c in ran:
            by_method.setdefault(c["method"], []).append(c)
        ttft = {m: _median([c["ttft_s"] for c in cs]) for m, cs in by_method.items()}
        predicted = {m: _median([c["predicted_ttft_s"] for c in cs]) for m, cs in by_method.items()}
        statics = {m: t for m, t in ttft.items() if m != ADAPTIVE}
        best = min(statics, key=statics.__getitem__) if statics else None
        adaptive = by_method.get(ADAPTIVE, [])
        counts: dict[str, int] = {}
        for name in adaptive[0]["options"] if adaptive else []:
            counts[name] = counts.get(name, 0) + 1
        errors = {m: predicted[m] / ttft[m] - 1 for m in ttft}
        ratio = ttft[ADAPTIVE] / statics[best] if best is not None and ADAPTIVE in ttft else math.nan
        out.append({
            "context": ctx, "sender": sender, "rate_bps": rate, "link": rate_label(rate),
            "adaptive_ttft_s": ttft.get(ADAPTIVE, math.nan), "adaptive_predicted_s": predicted.get(ADAPTIVE, math.nan),
            "adaptive_options": counts, "adaptive_schedule": adaptive[0]["options"] if adaptive else [],
            "best_static": best, "best_static_ttft_s": statics.get(best, math.nan) if best else math.nan,
            "ratio": ratio, "ratio_ok": ratio <= TARGETS["adaptive_over_best_static"],
            "ttft_s": ttft, "predicted_s": predicted, "errors": errors,
            "max_abs_error": max((abs(e) for e in errors.values()), default=math.nan),
            "errors_ok": all(abs(e) <= TARGETS["prediction_error"] for e in errors.values()),
            "skipped": sorted(c["method"] for c in mine if "skipped" in c),
        })  # fmt: skip
    return out


RECEIVER_WORK = ("recompute_s", "decode_s", "assemble_s", "verify_s", "validate_s")
"""A segment's receiver timings that are its own work (receive_s and turn_s are waits)."""


def stages(cell: dict[str, Any]) -> dict[str, float]:
    """A sent cell's stages, each summed over its segments as if it ran alone: the sender's (its
    prefill when cold, every choice and every encode), the link's (the bytes that crossed the proxy at its rate), the
    receiver's (its own work on each segment) and the answer's (the question asked once all is in);
    "pipelined" = TTFT / the slowest of them (1.0: the others hid entirely behind it; target <= 1.2),
    "serial" = their sum / the slowest (what no overlap would give)."""
    sender = cell["timings"].get("prefill_s", 0.0) + sum(
        seg["encode_s"] + seg.get("plan_s", 0.0) for seg in cell["segments"]
    )
    link = 8 * cell["proxy_bytes_up"] / cell["rate_bps"]
    receiver = sum(seg["receiver"].get(k, 0.0) for seg in cell["segments"] for k in RECEIVER_WORK)
    parts = {"sender_s": sender, "link_s": link, "receiver_s": receiver, "answer_s": cell["timings"]["ask_s"]}
    slowest = max(sender, link, receiver)
    return {
        **parts,
        "slowest": ("sender", "link", "receiver")[[sender, link, receiver].index(slowest)],
        "pipelined": cell["ttft_s"] / slowest if slowest > 0 else math.nan,
        "serial": sum(parts.values()) / slowest if slowest > 0 else math.nan,
    }


def options_label(counts: dict[str, int]) -> str:
    return " + ".join(f"{n}x {name}" for name, n in counts.items())


def _by_format(receiver: dict[str, Any]) -> str:
    """The receiver's per-format decode rates and per-segment cost (absent from older results)."""
    rates = receiver.get("decode_by_format") or {}
    shown = ", ".join(f"{name} {r / 1e9:.2f}" for name, r in rates.items())
    out = f" (by format, GB/s: {shown})" if shown else ""
    if receiver.get("segment_s"):
        out += f"; its own part of a segment's call {1e3 * receiver['segment_s']:.1f} ms"
    if receiver.get("answer_s"):
        out += f"; first token {1e3 * receiver['answer_s']:.0f} ms beyond the question's prefill"
    return out


def _devices(meta: dict[str, Any]) -> str:
    sender, receiver = meta.get("device", "?"), meta.get("receiver_device", meta.get("device", "?"))
    if sender == receiver and str(sender).startswith("cuda"):
        return (f"Sender and receiver on one device ({sender}): each one's work slows the other's, which no "
                "plan models (a peer has a GPU of its own: --receiver-device).")  # fmt: skip
    return f"Sender on {sender}, receiver on {receiver}."


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"# kvlink-bench ttft: {meta['model']}" + (f" ({RANDOM_NOTE})" if meta.get("random_weights") else ""),
        "",
        f"{meta['date']}; {meta['machine']}; `{meta['command']}`",
        "",
        _devices(meta),
        "",
        "Receiver (measured at start-up): prefill "
        + ", ".join(f"{r:,.0f} tok/s at {n:,}" for n, r in result["receiver"]["prefill_tokens_per_s"])
        + f"; decode {result['receiver']['decode_bytes_per_s'] / 1e9:.2f} GB/s of FP16 KV"
        + _by_format(result["receiver"])
        + f"; first token {result['receiver']['first_token_s']:.3f} s.",
        "",
        "| context | sender | link | adaptive TTFT s (pred) | adaptive options | best static | its TTFT s "
        "| adaptive / best | worst pred. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['context']} | {s['sender']} | {s['link']} | {s['adaptive_ttft_s']:.2f} "
            f"({s['adaptive_predicted_s']:.2f}) | {options_label(s['adaptive_options'])} | {s['best_static']} "
            f"| {s['best_static_ttft_s']:.2f} | {s['ratio']:.2f}{'' if s['ratio_ok'] else ' ✗'} "
            f"| {100 * s['max_abs_error']:.0f}%{'' if s['errors_ok'] else ' ✗'} |"
        )
    lines += ["", "Every cell, measured TTFT s (predicted; error):", ""]
    methods = list(dict.fromkeys(m for s in result["summary"] for m in s["ttft_s"]))
    lines.append("| context | sender | link | " + " | ".join(methods) + " |")
    lines.append("|---|---|---|" + "---|" * len(methods))
    for s in result["summary"]:
        row = []
        for m in methods:
            if m in s["ttft_s"]:
                row.append(f"{s['ttft_s'][m]:.2f} ({s['predicted_s'][m]:.2f}; {100 * s['errors'][m]:+.0f}%)")
            else:
                row.append("skipped" if m in s["skipped"] else "")
        lines.append(f"| {s['context']} | {s['sender']} | {s['link']} | " + " | ".join(row) + " |")
    for ch in result["link_change"]:
        if "failed" in ch:
            lines += ["", f"Link change ({ch['sender']} sender, {ch['context']}): {ch['failed']}"]
            continue
        a, st = ch["adaptive"], ch["static"]
        lines += [
            "",
            f"Link change ({ch['sender']} sender, {ch['context']}): {rate_label(ch['start_bps'])} -> "
            f"{rate_label(ch['end_bps'])} after {ch['drop_after_receipts']} of {ch['segments']} receipts. "
            f"Adaptive {a['ttft_s']:.2f} s (segments: {' '.join(a['options'])}); best static at the start "
            f"({ch['best_static']}, {ch['best_static_basis']}) {st['ttft_s']:.2f} s: {ch['speedup']:.2f}x. "
            f"The drop came during segment {ch['drop_segment']}; the option changed at segment "
            f"{ch['change_segment']} (lag {ch['lag_segments']}).",
        ]
    ran = [c for c in result["cells"] if "ttft_s" in c]
    if ran:
        lines += [
            "",
            "Pipelining (kvlink.eval.bench_ttft.stages): each stage summed over the segments, s; TTFT / the "
            "slowest stage (target <= 1.2) and the stages' sum / the slowest (no overlap):",
            "",
            "| sender | link | method | TTFT s | sender s | link s | receiver s | answer s | slowest | TTFT / slowest "
            "| sum / slowest |",
            "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for c in ran:
            st = stages(c)
            lines.append(
                f"| {c['sender']} | {c['link']} | {c['method']} | {c['ttft_s']:.2f} | {st['sender_s']:.2f} "
                f"| {st['link_s']:.2f} | {st['receiver_s']:.2f} | {st['answer_s']:.2f} | {st['slowest']} "
                f"| {st['pipelined']:.2f} | {st['serial']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """TTFT against link rate, one panel per (context, sender): adaptive (measured, and predicted
    dashed) and each static. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
        return False
    summary = [s for s in result["summary"] if math.isfinite(s["adaptive_ttft_s"])]  # cells that ran
    panels = list(dict.fromkeys((s["context"], s["sender"]) for s in summary))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    methods = list(dict.fromkeys(m for s in summary for m in s["ttft_s"] if m != ADAPTIVE))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (ctx, sender) in zip(axes[0], panels, strict=True):
        rows = sorted((s for s in summary if (s["context"], s["sender"]) == (ctx, sender)),
                      key=lambda s: s["rate_bps"])  # fmt: skip
        for m in methods:
            pts = [(s["rate_bps"] / 1e9, s["ttft_s"][m]) for s in rows if m in s["ttft_s"]]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=colors[m], lw=1, ms=4, alpha=0.8, label=m)
        pts = [(s["rate_bps"] / 1e9, s["adaptive_ttft_s"]) for s in rows]
        ax.plot(*zip(*pts, strict=True), "s-", color="black", lw=2.2, ms=6, label="adaptive")
        pts = [(s["rate_bps"] / 1e9, s["adaptive_predicted_s"]) for s in rows]
        ax.plot(*zip(*pts, strict=True), "--", color="black", lw=1, label="adaptive, predicted")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate (Gbit/s)")
        ax.set_ylabel("time to first token (s)")
        ax.set_title(f"{ctx}, {sender} sender", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    title = f"kvlink-bench ttft: {result['meta']['model']}"
    fig.suptitle(title + (f" ({RANDOM_NOTE})" if result["meta"].get("random_weights") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- the command -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvlink-bench ttft", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "--model", default=None, help="model alias, HF id or random:NAME (default: the embedded model)"
    )
    p.add_argument("--device", default="cpu", help="the sender's device, and the receiver's (default cpu)")
    p.add_argument(
        "--receiver-device", default=None,
        help="the receiver's device when not --device: cuda:1 puts it on a GPU of its own, as a peer is",
    )  # fmt: skip
    p.add_argument(
        "--tokens", default="2k", help="context lengths, one context each: 2k,4k or 1500 (default 2k)"
    )
    p.add_argument("--contexts", type=int, default=1, help="contexts per length (default 1)")
    p.add_argument(
        "--rates", default="3M,10M,30M,100M,1G", help="link rates in bits/s (default 3M,10M,30M,100M,1G)"
    )
    p.add_argument("--senders", default="warm,cold", help=f"which senders, of {SENDERS} (default both)")
    p.add_argument(
        "--cold-rates", default=None, help="the cold sender's rates instead of --rates ('' for none)"
    )
    p.add_argument("--statics", default="", help="static options to run (default: every one the sender has)")
    p.add_argument("--segment-tokens", type=int, default=256, help="tokens a segment (default 256)")
    p.add_argument("--repeats", type=int, default=1, help="times each cell runs (median reported; default 1)")
    p.add_argument(
        "--max-cell-s", type=float, default=40.0, help="skip statics predicted slower (default 40)"
    )
    p.add_argument("--max-new-tokens", type=int, default=4, help="answer tokens (default 4: TTFT needs one)")
    p.add_argument("--drop", default="30M:3M", help="link change START:END ('' for none; default 30M:3M)")
    p.add_argument("--drop-sender", default="warm", choices=SENDERS, help="the link change's sender (warm)")
    p.add_argument("--drop-after", type=float, default=0.5, help="share of receipts in at the drop (0.5)")
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads each side (0: torch's default; default 1)"
    )
    p.add_argument(
        "--time-budget", type=float, default=None,
        help="seconds from the start after which no cell starts (the rest recorded as skipped)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output folder")
    return p


def _grid(args: argparse.Namespace, contexts: list[Context]) -> Grid:
    rates = parse_rates(args.rates)
    senders = [s.strip() for s in args.senders.split(",") if s.strip()]
    for s in senders:
        if s not in SENDERS:
            raise ValueError(f"a sender is one of {SENDERS}, got {s!r}")
    per_sender = {s: rates for s in senders}
    if "cold" in per_sender and args.cold_rates is not None:
        per_sender["cold"] = parse_rates(args.cold_rates)
    for name, value in (("--segment-tokens", args.segment_tokens), ("--repeats", args.repeats),
                        ("--contexts", args.contexts), ("--max-new-tokens", args.max_new_tokens)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    if args.time_budget is not None and not args.time_budget > 0:
        raise ValueError(f"--time-budget must be > 0 seconds, got {args.time_budget!r}")
    if not 0 < args.drop_after < 1:
        raise ValueError(f"--drop-after is a share of the receipts in (0, 1), got {args.drop_after!r}")
    statics = [s.strip() for s in args.statics.split(",") if s.strip()] or None
    return Grid(
        contexts, per_sender, statics, args.segment_tokens, args.repeats, args.max_new_tokens,
        args.max_cell_s, parse_drop(args.drop), args.drop_sender, args.drop_after,
    )  # fmt: skip


def _logged(path: Path) -> Callable[[dict[str, Any]], None]:
    """_progress, and each row appended to `path` as it comes (what a run cut short leaves)."""
    path.write_text("")

    def progress(row: dict[str, Any]) -> None:
        _progress(row)
        with path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    return progress


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _progress(row: dict[str, Any]) -> None:
    if "skipped" in row:
        print(
            f"  {row['sender']:4} {row['link']:>5} {row['method']:28} skipped: {row['skipped']}",
            file=sys.stderr,
        )
        return
    print(
        f"  {row['sender']:4} {row['link']:>5} {row['method']:28} TTFT {row['ttft_s']:7.2f} s "
        f"(predicted {row['predicted_ttft_s']:7.2f}, {100 * row['error']:+4.0f}%) "
        f"{row['wire_bytes'] / 1e6:8.2f} MB  {' '.join(o[:6] for o in row['options'])}",
        file=sys.stderr, flush=True,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        lengths = parse_tokens(args.tokens)
        _grid(args, [])  # every setting checked before anything starts
    except ValueError as exc:
        print(f"kvlink-bench ttft: {exc}", file=sys.stderr)
        return 2
    import torch

    from kvlink.models import load_model
    from kvlink.server.local import LocalReceiver

    started = time.perf_counter()
    env = {}
    if args.threads:
        torch.set_num_threads(args.threads)
        env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    receiver_device = args.receiver_device or args.device
    serve = ["--device", receiver_device, "--max-new-tokens", str(args.max_new_tokens), "--log-level", "warning",
             "--cost-probe-tokens", str(max(lengths) + 64), *(["--model", args.model] if args.model else [])]  # fmt: skip
    with LocalReceiver(serve, log=out / "receiver.log", env=env) as rx:
        rx.wait_healthy()  # first: the receiver measures its rates at start-up, on a CPU this process leaves alone
        lm = load_model(args.model, args.device)
        contexts = load_contexts(lm, lengths, args.contexts)
        grid = _grid(args, contexts)
        if args.time_budget is not None:
            grid.deadline = started + args.time_budget
        if "warm" in grid.rates or (grid.drop is not None and grid.drop_sender == "warm"):
            for ctx in contexts:
                read_prefill(lm, ctx)
        load_before = os.getloadavg()
        cells, changes, receiver = asyncio.run(run_grid(lm, rx.target, grid, _logged(out / "cells.jsonl")))
    (out / "receiver.log").unlink(missing_ok=True)
    meta = {
        "command": "kvlink-bench ttft " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
        "commit": _commit(), "model": lm.name, "random_weights": lm.random_weights, "device": args.device,
        "receiver_device": receiver_device,
        "dtype": str(lm.dtype).removeprefix("torch."), "threads_each_side": args.threads,
        "torch": torch.__version__, "segment_tokens": args.segment_tokens, "repeats": args.repeats,
        "load_1min_before": load_before[0], "load_1min_after": os.getloadavg()[0],
        "seconds": time.perf_counter() - started, "targets": TARGETS,
    }  # fmt: skip
    result = {
        "meta": meta, "receiver": receiver, "contexts": [c.as_dict() for c in contexts],
        "summary": summarize(cells), "link_change": changes, "cells": cells,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    text = markdown(result)
    (out / "results.md").write_text(text)
    plot(result, out / "ttft.png")
    print(text)
    print(
        f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'ttft.png'} in {meta['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
