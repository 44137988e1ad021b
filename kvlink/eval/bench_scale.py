"""kvlink-bench scale: time to first token through the real service, per geometry, context length, link and method.

    kvlink-bench scale --model random:llama-3.1-8b --model random:qwen2.5-32b --tokens 8k,32k \\
        --links unpaced,100G,25G,10G,1G --device cuda --out bench/results/scale-h200 --resume

For each model (a `random:` geometry, or any model kvlink loads) and context length, over each link and
method, one cell:

- KV methods (FP16, and compressed configs pinned for random-weight models: INT4 g64, Q2C 50% + INT4,
  Q2C 25% + INT4; or the planner at a budget, `plan:12.5%`, for real weights): the real receiver
  (`kvlink-serve` in a subprocess, kvlink.server.local.LocalReceiver) and the real sender path
  (kvlink.client.sender.send_prefilled: encode, frames, the gRPC Transfer and Ask) through a paced TCP proxy
  (kvlink.eval.link, its own process) that carries gRPC's HTTP/2 bytes both ways; "unpaced" connects
  directly. The sender reads each context once (its prefill is not on the path: it already holds the
  cache) and then frees its weights, so that sender and receiver fit one GPU together.
  TTFT = plan (select + quantize, and sizing) + pack (frames) + transfer (first frame to the receipt,
  which the receiver sends once it decoded) + ask (the question out, the first token back).
- text: the receiver re-reads the context. Its prefill over context + question to the first token is
  measured on the receiver's device in this process (the same model and code a receiver runs); the
  context travels as token ids, 4 bytes a token, whose time at the link's rate is added (128 KB for
  32k tokens: 1 ms at 1 Gbit/s). Why not a text path through kvlink-serve: the bytes are negligible,
  and a receiver that prefills what it is sent is a protocol decision (the design's token chunks,
  with their own limits against abuse), not a benchmark's.

Per cell: TTFT and its stages, wire bytes, sender encode throughput (GB/s of FP16 KV), wire throughput,
the receiver's peak device memory (torch's allocator, from its REST /v1/stats) and resident memory
above where the cell started, against the decoded cache's own size. Per context: the sender's prefill,
and (--planner) the free planner's time at 12.5%. Per run: the proxy's and the loopback's TCP ceilings
and the proxy's pacing. The crossover of each KV method is the link rate at which its TTFT meets the
text's (a fit of t = a + b / rate to the paced cells).

Writes under --out: cells.jsonl (one line per cell, appended: --resume skips what is there),
contexts.jsonl, results.json (everything, with summary and crossovers), results.md and ttft.png.
Random-weight models: every output says "random weights: timing only". --time-budget stops starting
cells past that many seconds (rerun with --resume); --cell-timeout bounds one cell; --max-paced-s
extrapolates a paced cell whose bytes alone would take longer (from its unpaced twin; flagged).
A benchmark: it asserts nothing and never gates CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlink.eval.link import LocalLink, parse_rate, rate_label, tcp_throughput

logger = logging.getLogger(__name__)

RANDOM_NOTE = "random weights: timing only"
TEXT_ID_BYTES = 4
"""Bytes a context token takes as a token id on the wire (the text method)."""
GIB = 1 << 30


# --- methods ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One way to get a context to the receiver: its text, or its KV cache under a codec config.

    config: a pinned codec config (kvlink.recipe.build keyword arguments); budget: the planner's budget instead
    (real weights, whose quality table means something). nominal: the fraction of FP16 it aims at.
    """

    name: str
    nominal: float | None = None
    config: dict[str, Any] | None = None
    budget: float | None = None

    @property
    def text(self) -> bool:
        return self.config is None and self.budget is None


_G = 64
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


register(Method("text"))
register(Method("fp16", 1.0, {}))
register(Method("int8", 0.53, dict(k_bits=8, v_bits=8, group_size=_G)))
register(Method("int4", 0.28, dict(k_bits=4, v_bits=4, group_size=_G)))
register(Method("q2c50-int4", 0.14, dict(selector="q2c", retention=0.5, k_bits=4, v_bits=4, group_size=_G)))
register(Method("q2c25-int4", 0.07, dict(selector="q2c", retention=0.25, k_bits=4, v_bits=4, group_size=_G)))
register(Method("q2c50-int2", 0.078, dict(selector="q2c", retention=0.5, k_bits=2, v_bits=2, group_size=_G)))
RANDOM_METHODS = ("text", "fp16", "int4", "q2c50-int4", "q2c25-int4")
"""~100 / 25 / 12.5 / 6.25% of FP16 (28.1, 14.1, 7.0% measured with their scales), plus text."""
REAL_METHODS = ("text", "fp16", "plan:25%", "plan:12.5%", "plan:6.25%")


def method(name: str) -> Method:
    """A registered method, or `plan:<budget>` (the planner, free, at that budget)."""
    if name.startswith("plan:"):
        from kvlink.budget import parse_budget

        budget = parse_budget(name.removeprefix("plan:"))
        return Method(name, budget, budget=budget)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}, or plan:<budget>")
    return METHODS[name]


def parse_tokens(text: str) -> list[int]:
    """'8k,32k,128k' -> [8192, 32768, 131072]; plain integers are tokens."""
    out = []
    for raw in text.split(","):
        raw = raw.strip().lower()
        scale = 1024 if raw.endswith("k") else 1
        try:
            value = int(float(raw.removesuffix("k")) * scale)
        except ValueError:
            raise ValueError(f"context lengths like 8k,32k or 4096, got {raw!r}") from None
        if value < 16:
            raise ValueError(f"a context length must be >= 16 tokens, got {raw!r}")
        out.append(value)
    return out


def token_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


POSITION_MARGIN = 96
"""Positions a context leaves free for the question and the answer (kvlink-bench scale answers 32 tokens)."""


# --- contexts --------------------------------------------------------------------------------------------------
def context_text(tokenizer: Any, tokens: int, data: str | None = None) -> tuple[str, str]:
    """(context, question): SQuAD v2 dev paragraphs in file order (cycled when `tokens` is longer than all
    of them, ~55k tokens), cut at `tokens` tokens of text; the question of the first paragraph."""
    from kvlink.eval.squad import load_squad
    from kvlink.prompt import encode_text

    examples = load_squad(data)
    paragraphs = list(dict.fromkeys(e.context for e in examples))
    parts: list[str] = []
    count = 0
    while count < tokens + 64:  # enough paragraphs; then ONE tokenization, so the cut text re-tokenizes alike
        parts.append(paragraphs[len(parts) % len(paragraphs)])
        count += len(encode_text(tokenizer, parts[-1])) + 1
    ids = encode_text(tokenizer, "\n\n".join(parts))[:tokens]
    return str(tokenizer.decode(ids.tolist())), examples[0].question


@dataclass
class Context:
    """One context read by the sender: its ids, its prefill (KV + the question's observation)."""

    tokens: int  # nominal length
    text: str
    question: str
    context_ids: Any  # (T,) tensor
    question_ids: Any
    read: Any = None  # kvlink.cache.Prefill, once the sender read it
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.context_ids.numel())


# --- measuring on the device -----------------------------------------------------------------------------------
def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def _device_memory(device: Any) -> tuple[int, int] | None:
    """(allocated, peak allocated) bytes of torch's allocator on a CUDA device, None elsewhere."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


def _reset_peak(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _rss() -> int | None:
    from kvlink.server.memory import host_memory

    return host_memory()["rss_bytes"]


def kv_bytes(geometry: Any, tokens: int, element: int = 2) -> int:
    """Bytes of the full context KV of `tokens` tokens in a dtype of `element` bytes."""
    return int(geometry.fp16_bytes(tokens) // 2 * element)


def reprefill(model: Any, ids: Any) -> int:
    """The receiver's work for the text method: one forward over context + question to the first token."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=ids[None], use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax())


def measure_text(lm: Any, ctx: Context, repeats: int = 3) -> dict[str, Any]:
    """Time (and device memory) of re-reading `ctx` on lm's device: tokenize, then reprefill (the median
    of up to `repeats` runs, fewer once they took 2 s)."""
    import torch

    from kvlink.prompt import context_ids, question_ids

    device = lm.device
    started = time.perf_counter()
    ids = torch.cat([context_ids(lm.tokenizer, ctx.text), question_ids(lm.tokenizer, ctx.question)])
    tokenize_s = time.perf_counter() - started
    ids = ids.to(device)
    _sync(device)
    gc.collect()
    _reset_peak(device)
    before = _device_memory(device)
    runs: list[float] = []
    while len(runs) < repeats and (not runs or sum(runs) < 2.0):  # a long prefill is measured once
        t0 = time.perf_counter()
        token = reprefill(lm.model, ids)
        _sync(device)
        runs.append(time.perf_counter() - t0)
    prefill_s = statistics.median(runs)
    after = _device_memory(device)
    peak = None if before is None or after is None else after[1] - before[0]
    kv = kv_bytes(lm.geometry, int(ids.numel()), torch.empty((), dtype=lm.dtype).element_size())
    return {
        "tokenize_s": tokenize_s, "prefill_s": prefill_s, "runs": runs, "tokens": int(ids.numel()), "token": token,
        "text_bytes": TEXT_ID_BYTES * int(ids.numel()) + 5, "device_peak_bytes": peak, "kv_bytes": kv,
    }  # fmt: skip


def read_context(lm: Any, ctx: Context) -> dict[str, Any]:
    """The sender reads `ctx` (prefill with the question observed, for Q2C); keeps the Prefill in ctx.read."""
    import torch

    from kvlink.cache import Observe, prefill
    from kvlink.prompt import question_rows

    device = lm.device
    gc.collect()
    _reset_peak(device)
    before = _device_memory(device)
    t0 = time.perf_counter()
    ctx.read = prefill(
        lm.model,
        ctx.context_ids,
        ctx.question_ids,
        Observe.QUESTION,
        32,
        question_rows(lm.tokenizer, ctx.question),
    )
    _sync(device)
    prefill_s = time.perf_counter() - t0
    after = _device_memory(device)
    held = None if after is None or before is None else after[0] - before[0]
    peak = None if after is None or before is None else after[1] - before[0]
    kv = kv_bytes(lm.geometry, ctx.length, torch.empty((), dtype=lm.dtype).element_size())
    return {"prefill_s": prefill_s, "device_held_bytes": held, "device_peak_bytes": peak, "kv_bytes": kv}


def synthetic_read(lm: Any, ctx: Context, seed: int = 0) -> dict[str, Any]:
    """A stand-in for read_context where a prefill costs too much (long contexts on a CPU): seeded random
    keys and values of the model's geometry and dtype, and random question queries for Q2C. What is
    sent, decoded and answered from is then not the model's own cache (answers mean nothing; random
    weights' do not either), but it has its shape, size and dtype: the transfer path's costs are real."""
    import torch

    from kvlink.cache import ContextKV, LayerObservation, Observation, Observe, Prefill

    g, n, q = lm.geometry, ctx.length, int(ctx.question_ids.numel())
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).to(device=lm.device, dtype=lm.dtype)

    t0 = time.perf_counter()
    keys = [rand(g.kv_heads, n, g.head_dim) for _ in range(g.num_layers)]
    values = [rand(g.kv_heads, n, g.head_dim) for _ in range(g.num_layers)]
    positions = torch.arange(n, device=lm.device)
    kv = ContextKV(keys, values, [positions] * g.num_layers, n)
    qpos = torch.arange(n, n + q, device=lm.device)
    observed = [LayerObservation(rand(g.q_heads, q, g.head_dim), qpos, k, positions) for k in keys]
    observation = Observation(Observe.QUESTION, n, observed, g.head_dim**-0.5, g.num_layers)
    ctx.read = Prefill(kv, observation, ctx.context_ids, ctx.question_ids)
    kv_size = kv_bytes(g, n, torch.empty((), dtype=lm.dtype).element_size())
    return {
        "prefill_s": None,
        "synthetic_s": time.perf_counter() - t0,
        "kv_bytes": kv_size,
        "synthetic": True,
    }


def planner_time(lm_meta: dict[str, Any], ctx: Context, budget: float = 0.125) -> dict[str, Any]:
    """The free planner (kvlink.budget.plan, default constraints) on this context: its time and tries."""
    from kvlink.budget import BudgetError, plan

    t0 = time.perf_counter()
    try:
        p = plan(ctx.read, lm_meta["geometry"], lm_meta["fingerprint"], budget, model_name=lm_meta["name"])
    except BudgetError as exc:
        return {"budget": budget, "error": str(exc), "plan_s": time.perf_counter() - t0}
    return {
        "budget": budget, "plan_s": time.perf_counter() - t0, "search_s": p.timings.get("search_s"),
        "candidates": len(p.candidates), "encoded": sum(1 for c in p.candidates if " B (" in c.note),
        "zstd_tries": sum(1 for c in p.candidates if "+zstd" in c.note and " B (" in c.note), "config": p.recipe.name,
        "fraction": p.fraction,
    }  # fmt: skip


# --- memory plan -----------------------------------------------------------------------------------------------
def prefill_peak_bytes(weights: int, config: Any, kv: int, tokens: int) -> int:
    """Upper estimate of a prefill's device peak: weights, the cache and a copy of it, the MLP and
    attention activations of `tokens` positions in 16 bits."""
    hidden = int(getattr(config, "hidden_size", 0))
    inter = int(getattr(config, "intermediate_size", 0))
    return weights + 3 * kv + 2 * tokens * (3 * inter + 6 * hidden)


def device_total(device: Any) -> int:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    from kvlink.server.memory import available_host_bytes

    return available_host_bytes() or (8 * GIB)


# --- the receiver ----------------------------------------------------------------------------------------------
class Receiver:
    """kvlink-serve (kvlink.server.local.LocalReceiver) for one model, with the REST calls a cell needs."""

    def __init__(self, model: str, device: str, dtype: str, max_fp16_bytes: int, cell_timeout: float,
                 ttl_s: float, log: Path | None) -> None:  # fmt: skip
        from kvlink.server.local import LocalReceiver

        message = max_fp16_bytes + max_fp16_bytes // 50 + (16 << 20)
        flags = [
            "--model", model, "--device", device, "--dtype", dtype, "--max-new-tokens", "1",
            "--max-message-bytes", str(message), "--max-cached-bytes", str(3 * message + 4 * GIB),
            "--session-ttl", str(ttl_s), "--message-deadline", str(max(cell_timeout, 60.0)),
            "--log-level", "warning",
        ]  # fmt: skip
        self.rx = LocalReceiver(flags, log=log, keep_log=log is not None)
        self.target, self.rest = self.rx.target, self.rx.rest
        self.pid = self.rx.proc.pid

    def wait_healthy(self, timeout: float = 900.0) -> None:
        self.rx.wait_healthy(timeout)

    def stats(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.rest}/v1/stats", timeout=30).json()  # type: ignore[no-any-return]

    def reset_peaks(self) -> dict[str, Any]:
        import httpx

        return httpx.post(f"{self.rest}/v1/stats/memory/reset", timeout=30).json()  # type: ignore[no-any-return]

    def wait_empty(self, timeout: float = 60.0) -> None:
        """Until the store holds no context (the last cell's expired): each cell starts from the weights."""
        deadline = time.monotonic() + timeout
        while self.stats()["store"]["messages"] and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> int:
        return self.rx.stop()


# --- one KV cell -----------------------------------------------------------------------------------------------
def kv_cell(
    rx: Receiver, meta: dict[str, Any], ctx: Context, m: Method, rate: float | None, timeout: float
) -> dict[str, Any]:
    """Send ctx's KV under method `m` over a link of `rate` (None: direct) to `rx`, ask, measure."""
    import torch

    from kvlink.budget import BudgetError
    from kvlink.client.sender import SendError, send_prefilled
    from kvlink.recipe import build

    device = meta["device"]
    rx.wait_empty()
    before = rx.reset_peaks()
    gc.collect()
    _reset_peak(device)
    sender_before = _device_memory(device)
    with contextlib.ExitStack() as stack:
        target = rx.target if rate is None else stack.enter_context(LocalLink(rx.target, rate)).target
        config = None if m.config is None else build(**m.config)
        sending = send_prefilled(
            target, ctx.read, ctx.question, m.budget or 1.0, fingerprint=meta["fingerprint"],
            geometry=meta["geometry"], model_name=meta["name"], config=config, max_new_tokens=1, timeout=timeout,
            min_rate_bps=(rate or 1e9) / 4,  # the Transfer's deadline: its bytes at a quarter of the link's rate
        )  # fmt: skip
        started = time.perf_counter()
        try:
            result = asyncio.run(asyncio.wait_for(sending, timeout))
        except (TimeoutError, asyncio.TimeoutError):
            return {"error": f"timeout after {timeout:g} s"}
        except (SendError, BudgetError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        wall = time.perf_counter() - started
    after = rx.stats()["memory"]
    sender_after = _device_memory(device)
    t = result.timings
    fp16 = result.plan.fp16_bytes
    wire = result.receipt.total
    encode_s = t.get("select_s", 0.0) + t.get("quantize_s", 0.0) + t["pack_s"]
    element = torch.empty((), dtype=meta["dtype"]).element_size()
    kept = result.as_dict().get("kept_tokens", ctx.length)
    decoded = kv_bytes(meta["geometry"], kept, element)
    row: dict[str, Any] = dict(
        config=result.plan.recipe.name, fp16_bytes=fp16, wire_bytes=wire, fraction=wire / fp16,
        kept_tokens=kept, timings={k: float(v) for k, v in t.items()}, wall_s=wall,
        ttft_s=t["plan_s"] + t["pack_s"] + t["transfer_s"] + t["ask_s"], encode_s=encode_s,
        encode_gbps=fp16 / encode_s / 1e9 if encode_s > 0 else None,
        wire_gbps=8 * wire / t["receive_s"] / 1e9 if t.get("receive_s") else None,
        transfer_gbps=8 * wire / t["transfer_s"] / 1e9, decoded_bytes=decoded, token=result.answer.token_ids[:1],
    )  # fmt: skip
    row["receiver"] = _memory_delta(before, after, decoded)
    if sender_before is not None and sender_after is not None:
        row["sender_device_peak_bytes"] = sender_after[1] - sender_before[0]
    return row


def _memory_delta(before: dict[str, Any], after: dict[str, Any], decoded: int) -> dict[str, Any]:
    """The receiver's peaks during a cell above where it started, and against the decoded cache's size."""
    out: dict[str, Any] = {}
    host0, host1 = before.get("host") or {}, after.get("host") or {}
    if host0.get("rss_bytes") is not None and host1.get("peak_rss_bytes") is not None:
        out["host_peak_bytes"] = host1["peak_rss_bytes"] - host0["rss_bytes"]
        out["host_rss_bytes"] = host1["rss_bytes"]
    dev0, dev1 = before.get("device"), after.get("device")
    if dev0 and dev1:
        peak = dev1["peak_allocated_bytes"] - dev0["allocated_bytes"]
        out.update(device_peak_bytes=peak, device_peak_over_decoded=peak / decoded if decoded else None,
                   device_weights_bytes=dev0["allocated_bytes"])  # fmt: skip
    return out


def extrapolated_cell(unpaced: dict[str, Any], rate: float) -> dict[str, Any]:
    """A paced cell from its measured unpaced twin: the same encode, ask and receiver tail (assemble +
    decode after the last frame), with the wire time of its bytes at `rate`."""
    row = json.loads(json.dumps(unpaced))
    t = row["timings"]
    tail = t["transfer_s"] - t.get("receive_s", 0.0)
    receive = 8 * row["wire_bytes"] / rate
    t["receive_s"], t["transfer_s"] = receive, receive + tail
    row["ttft_s"] = t["plan_s"] + t["pack_s"] + t["transfer_s"] + t["ask_s"]
    row["wire_gbps"] = rate / 1e9
    row["transfer_gbps"] = 8 * row["wire_bytes"] / t["transfer_s"] / 1e9
    row["extrapolated"] = True
    return row


def text_cell(measured: dict[str, Any], rate: float | None, ceiling_bps: float) -> dict[str, Any]:
    """The text method over a link: the token ids' time at the rate (or the loopback's ceiling), then
    the receiver's re-prefill (measured)."""
    transfer = 8 * measured["text_bytes"] / (rate or ceiling_bps)
    return {
        "wire_bytes": measured["text_bytes"], "timings": {"transfer_s": transfer, "prefill_s": measured["prefill_s"],
                                                           "tokenize_s": measured["tokenize_s"]},
        "ttft_s": transfer + measured["prefill_s"], "transfer_computed": True,
        "receiver": {"device_peak_bytes": measured["device_peak_bytes"],
                     "device_peak_over_decoded": (measured["device_peak_bytes"] / measured["kv_bytes"])
                     if measured["device_peak_bytes"] is not None else None},
    }  # fmt: skip


# --- crossovers ------------------------------------------------------------------------------------------------
def fit_inverse(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares t = a + b / rate over (rate, t) points; None with fewer than two distinct rates."""
    xs = [1.0 / r for r, _ in points]
    ys = [t for _, t in points]
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def crossover(kv: Sequence[tuple[float, float]], text: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """The link rate above which KV's TTFT is below the text's, from (rate, ttft) points of each.

    Both are fitted as t = a + b / rate (KV: a its fixed costs, b its wire bits; text: a the re-prefill,
    b its token ids' bits), and the rate where they meet is (b_kv - b_text) / (a_text - a_kv). "never":
    KV's fixed costs alone exceed the re-prefill (no link is fast enough); "always": KV wins at any rate.
    """
    fk, ft = fit_inverse(kv), fit_inverse(text)
    if fk is None or ft is None:
        return {"rate_bps": None, "verdict": "unknown", "why": "fewer than two paced rates"}
    (ak, bk), (at, bt) = fk, ft
    out: dict[str, Any] = {"kv_fixed_s": ak, "kv_wire_bits": bk, "text_fixed_s": at, "text_wire_bits": bt}
    if at <= ak:
        return {**out, "rate_bps": None, "verdict": "never"}
    rate = (bk - bt) / (at - ak)
    if rate <= 0:
        return {**out, "rate_bps": None, "verdict": "always"}
    lo, hi = min(r for r, _ in kv), max(r for r, _ in kv)
    return {**out, "rate_bps": rate, "verdict": "crossover", "extrapolated": not lo <= rate <= hi}


# --- the run ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvlink-bench scale", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    p.add_argument("--model", action="append", default=None,
                   help="repeatable: random:llama-3.1-8b, random:qwen2.5-32b, an HF id ... (default random:tiny-llama)")  # fmt: skip
    p.add_argument("--tokens", default="8k,32k", help="context lengths, e.g. 8k,32k,128k")
    p.add_argument("--links", default="unpaced,100G,25G,10G,1G",
                   help="link rates each way (proxy) or unpaced (direct); measured in this order")  # fmt: skip
    p.add_argument("--methods", default=None,
                   help=f"comma-separated (default {','.join(RANDOM_METHODS)} for random weights, "
                   f"{','.join(REAL_METHODS)} otherwise); registered: {','.join(METHODS)}, plan:<budget>".replace("%", "%%"))  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument(
        "--dtype", default="bf16", choices=("fp32", "fp16", "bf16"), help="model dtype, both sides"
    )
    p.add_argument("--out", default="bench/results/scale", help="output directory")
    p.add_argument("--resume", action="store_true", help="skip the cells already in OUT/cells.jsonl")
    p.add_argument("--cell-timeout", type=float, default=600.0, help="seconds one cell may take")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no new cell starts (rerun with --resume to continue)")  # fmt: skip
    p.add_argument("--max-paced-s", type=float, default=None,
                   help="extrapolate (from the unpaced cell) paced cells whose bytes alone take longer")  # fmt: skip
    p.add_argument("--planner", action="store_true", help="also time the free planner at 12.5%% per context")
    p.add_argument(
        "--synthetic-kv", action="store_true",
        help="CPU stand-in: the sender's cache is seeded random keys and values of the model's geometry "
        "(no prefill, no text method): the transfer path at lengths whose prefill the device cannot afford",
    )  # fmt: skip
    p.add_argument("--receiver-ttl", type=float, default=1.0,
                   help="the receiver's --session-ttl: a cell's context expires this long after its answer")  # fmt: skip
    p.add_argument(
        "--ceiling-bytes", type=int, default=512 << 20, help="bytes of the TCP ceiling measurements"
    )
    p.add_argument(
        "--data", default=None, help="SQuAD-format JSON for the contexts (default: the shipped one)"
    )
    p.add_argument("--report-only", action="store_true", help="rebuild results.json/md/png from OUT's jsonl")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    return p


def _key(model: str, tokens: int, method: str, link: str) -> str:
    return f"{model}|{token_label(tokens)}|{method}|{link}"


class Results:
    """OUT/cells.jsonl and OUT/contexts.jsonl, appended as the run goes (what --resume reads)."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.cells_file, self.contexts_file = out / "cells.jsonl", out / "contexts.jsonl"
        if not resume:
            for f in (self.cells_file, self.contexts_file):
                f.unlink(missing_ok=True)
        self.cells = {r["key"]: r for r in _read_jsonl(self.cells_file)}
        self.contexts = {r["key"]: r for r in _read_jsonl(self.contexts_file)}

    def add_cell(self, row: dict[str, Any]) -> None:
        self.cells[row["key"]] = row
        with self.cells_file.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def add_context(self, row: dict[str, Any]) -> None:
        self.contexts[row["key"]] = row
        with self.contexts_file.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a killed run
            out.append(json.loads(line))
    return out


class OutOfTime(Exception):
    """The run's --time-budget is spent: the rest is left for --resume."""


@dataclass
class Run:
    args: argparse.Namespace
    results: Results
    links: list[tuple[str, float | None]]
    tokens: list[int]
    started: float = field(default_factory=time.perf_counter)
    ceiling_bps: float = 0.0
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def left(self) -> float:
        budget = self.args.time_budget
        return math.inf if budget is None else budget - (time.perf_counter() - self.started)

    def check_time(self, need_s: float = 0.0) -> None:
        if self.left() < need_s:
            raise OutOfTime()


def measure_links(run: Run) -> dict[str, Any]:
    """TCP ceilings (loopback direct, through the proxy unpaced) and the proxy's pacing at 1 Gbit/s."""
    n = run.args.ceiling_bytes
    direct = tcp_throughput(n, None, "direct")
    proxy = tcp_throughput(n, None, "process")
    paced = tcp_throughput(min(n, 125 << 20) // 2, 1e9, "process")
    run.ceiling_bps = direct["bits_per_s"]
    return {
        "tcp_direct_bps": direct["bits_per_s"], "tcp_proxy_unpaced_bps": proxy["bits_per_s"],
        "proxy_paced_1g": {"bits_per_s": paced["bits_per_s"], "seconds": paced["seconds"],
                           "expected_s": 8 * paced["bytes"] / 1e9},
    }  # fmt: skip


def _free(lm: Any) -> None:
    """Drop the sender's weights (what it read stays): the receiver's copy needs the room."""
    import torch

    lm.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_model(run: Run, name: str, device: str) -> None:
    """Every cell of one model: read the contexts, measure the text method, free the weights, start
    the receiver, send every KV cell."""
    import torch

    from kvlink.models import load_model

    args, res = run.args, run.results
    run.check_time(60.0)
    t0 = time.perf_counter()
    lm = load_model(name, device, args.dtype)
    load_s = time.perf_counter() - t0
    random_weights = bool(getattr(lm, "random_weights", False))
    names = (
        args.methods.split(",") if args.methods else list(RANDOM_METHODS if random_weights else REAL_METHODS)
    )
    methods = [method(n.strip()) for n in names if n.strip()]
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    total = device_total(lm.device)
    element = torch.empty((), dtype=lm.dtype).element_size()
    meta = {"name": lm.name, "fingerprint": lm.fingerprint, "geometry": lm.geometry, "device": lm.device,
            "dtype": lm.dtype}  # fmt: skip
    logger.info("%s loaded in %.1f s (%.1f GiB of weights)", lm.name, load_s, weights / GIB)
    from kvlink.models import max_positions
    from kvlink.prompt import context_ids, question_ids

    contexts: list[Context] = []
    budget_kv = 0
    limit = max_positions(lm.model.config)
    for tokens in sorted(run.tokens):
        kv = kv_bytes(lm.geometry, tokens, element)
        need = 2 * kv if args.synthetic_kv else prefill_peak_bytes(weights, lm.model.config, kv, tokens)
        held_after = budget_kv + 3 * kv // 2  # what the sender keeps of each context read (K, V and K again)
        receiver_need = held_after + weights + 2 * kv + (2 * GIB if lm.device.type == "cuda" else 0)
        if need > 0.92 * total or receiver_need > 0.92 * total:
            why = (f"does not fit: prefill ~{need / GIB:.0f} GiB, sender + receiver ~{receiver_need / GIB:.0f} GiB "
                   f"of {total / GIB:.0f} GiB")  # fmt: skip
            run.skipped.append({"model": lm.name, "tokens": tokens, "why": why})
            logger.warning("%s at %s tokens: %s", lm.name, tokens, why)
            continue
        budget_kv = held_after
        text, question = context_text(lm.tokenizer, tokens, args.data)
        ctx = Context(
            tokens, text, question, context_ids(lm.tokenizer, text), question_ids(lm.tokenizer, question)
        )
        # The prompt template, the question and the answer must fit the model's positions too (Qwen2.5-32B
        # has 32,768: a "32k" text of 32,768 tokens is 32,799 context tokens): cut the text to fit.
        over = ctx.length + int(ctx.question_ids.numel()) + POSITION_MARGIN - (limit or ctx.length + 10**9)
        if over > 0:
            text, question = context_text(lm.tokenizer, tokens - over, args.data)
            ctx = Context(
                tokens, text, question, context_ids(lm.tokenizer, text), question_ids(lm.tokenizer, question)
            )
        contexts.append(ctx)
    if not contexts:
        return
    kv_keys = {c.tokens: [_key(lm.name, c.tokens, m.name, lab) for m in methods if not m.text for lab, _ in run.links]
               for c in contexts}  # fmt: skip
    todo = {t: [k for k in keys if k not in res.cells] for t, keys in kv_keys.items()}
    if not args.synthetic_kv:  # a warm-up on a short input: the first forward pays for kernel selection
        reprefill(lm.model, contexts[0].context_ids[:256].to(lm.device))
        _sync(lm.device)
    for ctx in contexts:
        key = _key(lm.name, ctx.tokens, "text", "measure")
        if not args.synthetic_kv:
            if key not in res.contexts:
                run.check_time(30.0)
                measured = measure_text(lm, ctx)
                res.add_context({"key": key, "model": lm.name, "tokens": ctx.tokens, "context_tokens": ctx.length,
                                 "random_weights": random_weights, "text": measured})  # fmt: skip
            measured = res.contexts[key]["text"]
            for label, rate in run.links:
                row_key = _key(lm.name, ctx.tokens, "text", label)
                if row_key not in res.cells:
                    res.add_cell(_cell_base(row_key, lm.name, random_weights, ctx, "text", label, rate)
                                 | text_cell(measured, rate, run.ceiling_bps))  # fmt: skip
        planner_key = f"{key}:planner"
        if todo[ctx.tokens] or (args.planner and planner_key not in res.contexts):
            run.check_time(30.0)
            ctx.info = synthetic_read(lm, ctx) if args.synthetic_kv else read_context(lm, ctx)
            res.add_context({"key": _key(lm.name, ctx.tokens, "sender", "prefill"), "model": lm.name,
                             "tokens": ctx.tokens, "context_tokens": ctx.length, "sender": ctx.info})  # fmt: skip
            if args.planner and planner_key not in res.contexts:
                res.add_context({"key": planner_key, "model": lm.name, "tokens": ctx.tokens,
                                 "context_tokens": ctx.length, "planner": planner_time(meta, ctx)})  # fmt: skip
    if not any(todo.values()):
        return
    _free(lm)
    max_fp16 = max(lm.geometry.fp16_bytes(c.length) for c in contexts)
    log = run.results.out / f"serve-{_slug(lm.name)}.log" if args.verbose else None
    rx = Receiver(name, device, args.dtype, max_fp16, args.cell_timeout, args.receiver_ttl, log)
    try:
        rx.wait_healthy()
        for ctx in contexts:
            for m in methods:
                if m.text:
                    continue
                unpaced: dict[str, Any] | None = None
                for label, rate in run.links:
                    key = _key(lm.name, ctx.tokens, m.name, label)
                    if key in res.cells:
                        if rate is None:
                            unpaced = res.cells[key]
                        continue
                    base = _cell_base(key, lm.name, random_weights, ctx, m.name, label, rate)
                    wire_s = (
                        8 * unpaced["wire_bytes"] / rate
                        if rate and unpaced and "wire_bytes" in unpaced
                        else 0.0
                    )
                    if unpaced and rate and args.max_paced_s is not None and wire_s > args.max_paced_s:
                        res.add_cell(base | extrapolated_cell(unpaced, rate))
                        continue
                    expect = 0.0
                    if unpaced and "wire_bytes" in unpaced:
                        expect = unpaced.get("wall_s", 0.0) + (
                            8 * unpaced["wire_bytes"] / rate if rate else 0.0
                        )
                    run.check_time(expect)
                    logger.info("cell %s", key)
                    row = base | kv_cell(rx, meta, ctx, m, rate, args.cell_timeout)
                    res.add_cell(row)
                    _progress(row, run)
                    if rate is None:
                        unpaced = row
    finally:
        rx.stop()
        for ctx in contexts:
            ctx.read = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _progress(row: dict[str, Any], run: Run) -> None:
    """One line per measured cell on stderr (a long run on a remote machine shows where it is)."""
    if "error" in row:
        what = row["error"]
    else:
        t = row["timings"]
        what = (f"TTFT {row['ttft_s']:.3f} s (plan {t['plan_s']:.3f}, pack {t['pack_s']:.3f}, transfer "
                f"{t['transfer_s']:.3f}, ask {t['ask_s']:.3f}), {row['wire_bytes'] / 1e6:.0f} MB, "
                f"{row.get('wire_gbps') or 0:.2f} Gbit/s")  # fmt: skip
    print(f"[{time.perf_counter() - run.started:6.0f} s] {row['key']}: {what}", file=sys.stderr, flush=True)


def _slug(name: str) -> str:
    from kvlink.models import model_slug

    return model_slug(name)


def _cell_base(key: str, model: str, random_weights: bool, ctx: Context, m: str, label: str,
               rate: float | None) -> dict[str, Any]:  # fmt: skip
    out = {"key": key, "model": model, "tokens": ctx.tokens, "context_tokens": ctx.length, "method": m,
           "link": label, "rate_bps": rate}  # fmt: skip
    if random_weights:
        out["note"] = RANDOM_NOTE
    return out


# --- reports ---------------------------------------------------------------------------------------------------
def summarize(cells: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(summary, crossovers): per (model, tokens, link) each method's TTFT and the ratios text / it and
    fp16 / it; per (model, tokens, KV method) its crossover rate against text."""
    ok = [c for c in cells if "ttft_s" in c]
    groups: dict[tuple[str, int, str], dict[str, dict[str, Any]]] = {}
    for c in ok:
        groups.setdefault((c["model"], c["tokens"], c["link"]), {})[c["method"]] = c
    summary = []
    for (model, tokens, link), by_method in groups.items():
        text, fp16 = by_method.get("text"), by_method.get("fp16")
        for name, c in by_method.items():
            entry = {"model": model, "tokens": tokens, "link": link, "method": name, "ttft_s": c["ttft_s"],
                     "wire_bytes": c.get("wire_bytes"), "fraction": c.get("fraction"),
                     "extrapolated": bool(c.get("extrapolated"))}  # fmt: skip
            if text is not None:
                entry["text_over_this"] = text["ttft_s"] / c["ttft_s"]
            if fp16 is not None:
                entry["fp16_over_this"] = fp16["ttft_s"] / c["ttft_s"]
            if c.get("note"):
                entry["note"] = c["note"]
            summary.append(entry)
    crossovers = []
    series: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    for c in ok:
        if c.get("rate_bps"):
            series.setdefault((c["model"], c["tokens"], c["method"]), []).append((c["rate_bps"], c["ttft_s"]))
    for (model, tokens, name), points in sorted(series.items()):
        if name == "text" or (model, tokens, "text") not in series:
            continue
        entry = {"model": model, "tokens": tokens, "method": name,
                 **crossover(points, series[(model, tokens, "text")])}  # fmt: skip
        if any(c.get("note") for c in ok if c["model"] == model):
            entry["note"] = RANDOM_NOTE
        crossovers.append(entry)
    return summary, crossovers


def _fmt_rate(bps: float | None) -> str:
    return "–" if bps is None else rate_label(bps) + "bit/s"


def _num(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _gib(n: float | None) -> str:
    return "–" if n is None else f"{n / GIB:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """The tables of results.md: TTFT per link and method with ratios, crossovers, then every cell."""
    lines = [f"# kvlink-bench scale ({result['meta'].get('device_name', '?')})", ""]
    if any(c.get("note") for c in result["cells"]):
        lines += [f"**{RANDOM_NOTE}**: random-weight geometries; answers mean nothing, times, bytes and memory are real.", ""]  # fmt: skip
    lines += [f"Command: `{result['meta'].get('command', '')}`", ""]
    links = result.get("links") or {}
    if links:
        lines += [
            f"Loopback TCP: {links['tcp_direct_bps'] / 1e9:.1f} Gbit/s direct, {links['tcp_proxy_unpaced_bps'] / 1e9:.1f} "
            f"Gbit/s through the proxy unpaced; proxy paced at 1 Gbit/s: {links['proxy_paced_1g']['bits_per_s'] / 1e9:.3f} "
            "Gbit/s.", "",
        ]  # fmt: skip
    lines += ["## TTFT (s) by link; in brackets text / this and FP16 / this", ""]
    by: dict[tuple[str, int], dict[str, dict[str, dict[str, Any]]]] = {}
    for s in result["summary"]:
        by.setdefault((s["model"], s["tokens"]), {}).setdefault(s["method"], {})[s["link"]] = s
    rates = {c["link"]: c.get("rate_bps") or math.inf for c in result["cells"]}
    link_order = sorted(rates, key=lambda link: -rates[link])  # unpaced, then the fastest link first
    method_order = [*METHODS, *sorted({s["method"] for s in result["summary"]} - set(METHODS))]
    for (model, tokens), methods in sorted(by.items()):
        lines += [f"### {model}, {token_label(tokens)} tokens", "",
                  "| method | wire % FP16 | " + " | ".join(link_order) + " |",
                  "|---|---:|" + "---:|" * len(link_order)]  # fmt: skip
        for name in (m for m in method_order if m in methods):
            per_link = methods[name]
            frac = next((e["fraction"] for e in per_link.values() if e.get("fraction")), None)
            cells = []
            for link in link_order:
                e = per_link.get(link)
                if e is None:
                    cells.append("–")
                    continue
                ratios = [f"{e[k]:.2f}x" if k in e else "–" for k in ("text_over_this", "fp16_over_this")]
                ratio = "" if name in ("text", "fp16") else f" ({', '.join(ratios)})"
                cells.append(f"{e['ttft_s']:.3f}{'*' if e['extrapolated'] else ''}{ratio}")
            lines.append(
                f"| {name} | {'–' if frac is None else f'{100 * frac:.1f}%'} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    lines += ["\\* extrapolated from the unpaced cell (--max-paced-s): its bytes at the link's rate.", ""]
    lines += ["## Crossover: the link rate above which the KV method's TTFT beats text re-prefill", "",
              "| model | tokens | method | crossover | KV fixed (s) | text re-prefill (s) |", "|---|---|---|---:|---:|---:|"]  # fmt: skip
    for c in result["crossovers"]:
        rate = _fmt_rate(c.get("rate_bps")) if c["verdict"] == "crossover" else c["verdict"]
        if c.get("extrapolated"):
            rate += " (extrapolated)"
        lines.append(f"| {c['model']} | {token_label(c['tokens'])} | {c['method']} | {rate} | "
                     f"{c.get('kv_fixed_s', math.nan):.3f} | {c.get('text_fixed_s', math.nan):.3f} |")  # fmt: skip
    per: dict[tuple[str, int], dict[str, Any]] = {}
    for c in result.get("contexts", []):
        entry = per.setdefault((c["model"], c["tokens"]), {"context_tokens": c.get("context_tokens")})
        for part in ("text", "sender", "planner"):
            if part in c:
                entry[part] = c[part]
    if per:
        lines += ["", "## Per context: the sender's read, the text method's re-prefill, the free planner at 12.5%", "",
                  "| model | T | sender prefill (s) | text re-prefill (s) | re-prefill GPU peak GiB | planner (s) | "
                  "of which search (s) | candidates encoded | planner's pick |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for (model, _), e in per.items():
            sender, text, planner = e.get("sender") or {}, e.get("text") or {}, e.get("planner") or {}
            read = "synthetic" if sender.get("synthetic") else _num(sender.get("prefill_s"), 3)
            lines.append(
                f"| {model} | {e['context_tokens']} | {read} | {_num(text.get('prefill_s'), 3)} | "
                f"{_gib(text.get('device_peak_bytes'))} | {_num(planner.get('plan_s'), 3)} | "
                f"{_num(planner.get('search_s'), 3)} | {planner.get('encoded', '–')} | {planner.get('config', '–')} |"
            )  # fmt: skip
    lines += ["", "## Every cell", "",
              "| model | T | method | link | TTFT | plan | pack | transfer | receive | decode | first token | ask | "
              "wire MB | encode GB/s | wire Gbit/s | rx GPU peak GiB (x decoded) | rx RSS peak GiB |",
              "|---|---:|---|---|" + "---:|" * 13]  # fmt: skip
    order = {m: i for i, m in enumerate(method_order)}
    for c in sorted(result["cells"], key=lambda c: (c["model"], c["tokens"], order.get(c["method"], 99),
                                                    -(c.get("rate_bps") or math.inf))):  # fmt: skip
        t = c.get("timings", {})
        if "error" in c:
            lines.append(
                f"| {c['model']} | {c['context_tokens']} | {c['method']} | {c['link']} | {c['error']} |"
                + " |" * 12
            )
            continue
        rx = c.get("receiver", {})
        ratio = rx.get("device_peak_over_decoded")

        def s(key: str, t: dict[str, Any] = t) -> str:
            return f"{t[key]:.3f}" if key in t else "–"

        first = s("first_token_s") if "first_token_s" in t else s("prefill_s")
        lines.append(
            f"| {c['model']} | {c['context_tokens']} | {c['method']} | {c['link']}{'*' if c.get('extrapolated') else ''} "
            f"| {c['ttft_s']:.3f} | {s('plan_s')} | {s('pack_s')} | {s('transfer_s')} | {s('receive_s')} "
            f"| {s('decode_s')} | {first} | {s('ask_s')} | {c.get('wire_bytes', 0) / 1e6:.1f} "
            f"| {_num(c.get('encode_gbps'), 1)} | {_num(c.get('wire_gbps'), 2)} "
            f"| {_gib(rx.get('device_peak_bytes'))}{f' ({ratio:.2f}x)' if ratio else ''} | {_gib(rx.get('host_peak_bytes'))} |"
        )  # fmt: skip
    skipped = result["meta"].get("skipped") or []
    if skipped:
        lines += [
            "",
            "Not run: "
            + "; ".join(f"{s['model']} at {token_label(s['tokens'])}: {s['why']}" for s in skipped),
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """TTFT against link rate per (model, context length), one line per method, crossovers marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cells = [c for c in result["cells"] if "ttft_s" in c]
    panels = sorted({(c["model"], c["tokens"]) for c in cells})
    if not panels:
        return False
    paced = sorted({c["rate_bps"] for c in cells if c.get("rate_bps")})
    unpaced_x = (max(paced) * 4) if paced else 1e11
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    for ax, (model, tokens) in zip(axes[0], panels):
        mine = [c for c in cells if (c["model"], c["tokens"]) == (model, tokens)]
        for name in dict.fromkeys(c["method"] for c in mine):
            pts = sorted((c.get("rate_bps") or unpaced_x, c["ttft_s"]) for c in mine if c["method"] == name)
            style = "k--" if name == "text" else "-o"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, markersize=4)
        for x in result["crossovers"]:
            if (x["model"], x["tokens"]) == (model, tokens) and x.get("rate_bps"):
                ax.axvline(x["rate_bps"], color="grey", lw=0.6, ls=":")
                ax.annotate(f"{x['method']}: {rate_label(x['rate_bps'])}", (x["rate_bps"], ax.get_ylim()[1]),
                            rotation=90, fontsize=6, va="top", ha="right")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [*paced, unpaced_x]
        ax.set_xticks(ticks, [rate_label(r) for r in paced] + ["unpaced"], fontsize=7)
        ax.set_xlabel("link rate (bit/s, each way)")
        ax.set_ylabel("TTFT (s)")
        short = model.removeprefix("random:").split(":")[0]
        ax.set_title(f"{short}, {token_label(tokens)} tokens", fontsize=9)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
    title = "time to first token: KV over the link vs text re-prefill"
    if any(c.get("note") for c in cells):
        title += f" ({RANDOM_NOTE})"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """results.json, results.md and ttft.png from OUT's jsonl files."""
    cells = sorted(_read_jsonl(out / "cells.jsonl"), key=lambda c: c.get("key", ""))
    cells = list({c["key"]: c for c in cells}.values())
    contexts = list({c["key"]: c for c in _read_jsonl(out / "contexts.jsonl")}.values())
    summary, crossovers = summarize(cells)
    result = {"meta": meta, "links": meta.get("links"), "contexts": contexts, "cells": cells,
              "summary": summary, "crossovers": crossovers}  # fmt: skip
    if any(c.get("note") for c in cells):
        result["note"] = RANDOM_NOTE
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "ttft.png")
    return result


def _meta(args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    return {
        "command": "kvlink-bench scale " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["scale"] else sys.argv[1:]),
        "device": device, "device_name": name, "dtype": args.dtype, "torch": torch.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(), "models": args.model,
        "tokens": args.tokens, "links": None, "methods": args.methods,
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (timeout, a device's limit) unwinds like ^C: the receiver and the link processes are stopped
    # on the way out instead of holding their memory (a 32B receiver holds 60 GiB of the GPU) for the next run.
    # The handler before is put back on the way out: a caller in the same process (a test runner) is still
    # stopped by a SIGTERM afterwards, not handed a SystemExit in whatever it runs next.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _main(args)
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    out = Path(args.out)
    run_file = out / "run.json"
    if args.report_only:
        meta = json.loads(run_file.read_text()) if run_file.is_file() else {}
        result = write_report(out, meta)
        print(markdown(result))
        return 0
    try:
        tokens = parse_tokens(args.tokens)
        links = [(rate_label(r), r) for r in (parse_rate(x) for x in args.links.split(",") if x.strip())]
        if args.methods:
            for name in args.methods.split(","):
                method(name.strip())
    except ValueError as exc:
        print(f"kvlink-bench scale: {exc}", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = args.model or ["random:tiny-llama"]
    results = Results(out, args.resume)
    meta = _meta(args, device)
    if args.resume and run_file.is_file():
        old = json.loads(run_file.read_text())
        meta["links"] = old.get("links")
        meta["skipped"] = old.get("skipped", [])
    run = Run(args, results, links, tokens)
    if meta.get("links") is None:
        meta["links"] = measure_links(run)
    run.ceiling_bps = meta["links"]["tcp_direct_bps"]
    run_file.write_text(json.dumps(meta, indent=1, default=str))
    complete = True
    for name in models:
        try:
            run_model(run, name, device)
        except OutOfTime:
            complete = False
            break
    meta["skipped"] = list(
        {(s["model"], s["tokens"]): s for s in [*meta.get("skipped", []), *run.skipped]}.values()
    )
    meta["complete"] = complete
    meta["seconds"] = time.perf_counter() - run.started
    run_file.write_text(json.dumps(meta, indent=1, default=str))
    result = write_report(out, meta)
    print(markdown(result))
    if not complete:
        print(
            f"time budget spent after {meta['seconds']:.0f} s: rerun with --resume to continue",
            file=sys.stderr,
        )
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'ttft.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
