"""The body of `kvlink-bench e2e`: time to first answer token at a receiver over a paced link.

For one example, `e2e_example` sends the context three ways over a PacedSocketPair (kvlink.eval.link)
at each bandwidth: as each compressed config's kvlink.wire frames, as the full KV at FP16 (the same
path), and as text the receiver tokenizes and prefills; `e2e_summary` takes the medians over examples.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

from kvlink.eval.link import GRPC_PREFIX, PacedSocketPair, framed_transfer


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def e2e_example(
    lm: Any,
    example: Any,
    configs: Sequence[Any],
    bandwidths: Sequence[float],
    repeats: int = 3,
    profile: Any = None,
) -> list[dict[str, Any]]:
    """Time to first answer token at the receiver, per (bandwidth, method), for one example.

    Methods: each config in `configs` (the context's KV, compressed, as kvlink.wire frames),
    "fp16-kv" (the full KV at FP16, same path) and "text" (the context and question as UTF-8;
    the receiver tokenizes and prefills). KV methods: ttft = sender select+encode+frame
    (the question is needed to select, so it is on the path) + transfer + receiver assemble
    and decode + first token (cache build + question forward). Text: transfer + prefill
    + first token. Each timing is the median of `repeats` runs after one warm-up.
    """
    from kvlink import wire
    from kvlink.cache import Prefill, prefill, prefill_observations
    from kvlink.codec import Codec
    from kvlink.eval.grid import GridConfig, _observes, _profile_for, _queries_for
    from kvlink.generate import greedy_answer
    from kvlink.prompt import context_ids, question_ids, question_rows
    from kvlink.recipe import build

    model, tok, device = lm.model, lm.tokenizer, lm.device
    ctx, q = example.encode(tok)
    methods = [*configs, GridConfig("fp16-kv", build())]
    kinds = {_observes(c.config) for c in methods}
    kinds |= {k for k in (_queries_for(c.config) for c in methods) if k is not None}
    kv, observations = prefill_observations(model, ctx, q, kinds, 32, question_rows(tok, example.question))
    profiles = {c.name: _profile_for(lm, c.config, profile) for c in methods}  # loaded before any timing

    def send_kv(c: Any) -> tuple[list[bytes], float, int]:
        codec = Codec(c.config, lm.geometry, profiles[c.name])
        _sync(device)
        t0 = time.perf_counter()
        kept = codec.select(Prefill(kv, observations[_observes(c.config)], ctx, q))
        queries = _queries_for(c.config)
        encoded = codec.encode_kv(kv, kept, None if queries is None else observations[queries])
        frames = wire.to_frames(encoded, "0" * 32, "1" * 32, lm.fingerprint, 1 << 20)
        blobs = [wire.frame_bytes(f) for f in frames]
        return blobs, time.perf_counter() - t0, int(encoded.fp16_bytes())

    def receive_kv(c: Any, link: PacedSocketPair | None, blobs: list[bytes]) -> dict[str, float]:
        asm = wire.Assembler(lm.fingerprint, lm.geometry, profile_hashes=None)
        if link is None:
            t0 = time.perf_counter()
            for b in blobs:
                asm.feed_raw(b)
            transfer = time.perf_counter() - t0
        else:
            transfer = framed_transfer(link, blobs, asm.feed_raw)
        t1 = time.perf_counter()
        encoded, _ = asm.finish()
        decoded = Codec(encoded.recipe, lm.geometry, profiles[c.name]).decode(encoded, device, lm.dtype)
        _sync(device)
        t2 = time.perf_counter()
        answer = greedy_answer(model, tok, decoded, q, max_new_tokens=1)
        _sync(device)
        t3 = time.perf_counter()
        return {
            "transfer_s": transfer,
            "decode_s": t2 - t1,
            "first_token_s": t3 - t2,
            "token": answer.token_ids[0],
        }

    def receive_text(link: PacedSocketPair | None, blob: bytes) -> dict[str, float]:
        got: list[bytes] = []
        if link is None:
            t0 = time.perf_counter()
            got.append(blob)
            transfer = time.perf_counter() - t0
        else:
            transfer = framed_transfer(link, [blob], got.append)
        t1 = time.perf_counter()
        context, question = json.loads(got[0].decode())
        c_ids, q_ids = context_ids(tok, context), question_ids(tok, question)
        pre = prefill(model, c_ids)
        _sync(device)
        t2 = time.perf_counter()
        answer = greedy_answer(model, tok, pre.kv, q_ids, max_new_tokens=1)
        _sync(device)
        t3 = time.perf_counter()
        return {
            "transfer_s": transfer,
            "prefill_s": t2 - t1,
            "first_token_s": t3 - t2,
            "token": answer.token_ids[0],
        }

    text_blob = json.dumps([example.context, example.question]).encode()
    prepared = {c.name: send_kv(c) for c in methods}  # warm-up of the sender path
    for c in methods:
        receive_kv(c, None, prepared[c.name][0])  # warm-up of the receiver path
    receive_text(None, text_blob)

    rows: list[dict[str, Any]] = []
    for bw in bandwidths:
        base = {"eid": example.eid, "task": example.task, "T": int(ctx.numel()), "bandwidth_bps": bw}
        for c in methods:
            runs = []
            for _ in range(repeats):
                blobs, encode_s, fp16 = send_kv(c)
                link = PacedSocketPair(bw)
                try:
                    r = receive_kv(c, link, blobs)
                finally:
                    link.close()
                r["encode_s"] = encode_s
                r["ttft_s"] = encode_s + r["transfer_s"] + r["decode_s"] + r["first_token_s"]
                r["bytes"] = sum(len(b) + GRPC_PREFIX.size for b in blobs)
                runs.append(r)
            rows.append({**base, "method": c.name, "fp16_bytes": fp16, **_median(runs)})
        runs = []
        for _ in range(repeats):
            link = PacedSocketPair(bw)
            try:
                r = receive_text(link, text_blob)
            finally:
                link.close()
            r["ttft_s"] = r["transfer_s"] + r["prefill_s"] + r["first_token_s"]
            r["bytes"] = len(text_blob) + GRPC_PREFIX.size
            runs.append(r)
        rows.append({**base, "method": "text", **_median(runs)})
    for row in rows:
        row["achieved_bps"] = 8 * row["bytes"] / row["transfer_s"] if row["transfer_s"] > 0 else math.nan
    return rows


def _median(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = values[0] if key == "token" else statistics.median(values)
    return out


def e2e_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (bandwidth, method): median over examples of each time, and ttft ratios (fp16-kv / method,
    text / method) computed per example first (same run, same example), then the median."""
    by_key: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((r["bandwidth_bps"], r["method"]), []).append(r)
    out = []
    for (bw, method), group in by_key.items():
        entry: dict[str, Any] = {"bandwidth_bps": bw, "method": method, "n": len(group)}
        for key in (
            "bytes",
            "encode_s",
            "transfer_s",
            "decode_s",
            "prefill_s",
            "first_token_s",
            "ttft_s",
            "achieved_bps",
        ):
            values = [g[key] for g in group if key in g]
            if values:
                entry[key] = statistics.median(values)
        for other, name in (("fp16-kv", "fp16_over_this"), ("text", "text_over_this")):
            ratios = []
            for g in group:
                match = [x for x in by_key.get((bw, other), []) if x["eid"] == g["eid"]]
                if match:
                    ratios.append(match[0]["ttft_s"] / g["ttft_s"])
            if ratios:
                entry[name] = statistics.median(ratios)
        out.append(entry)
    return out
