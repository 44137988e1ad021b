"""Segmented, time-to-first-token-aware sending: the library half (the gRPC half is kvlink.client.stream
on the sender and kvlink.server.service on the receiver).

A context of T tokens is cut into segments of `segment_tokens` (`segment_bounds`). Each segment
travels as one message of its own (kvlink.wire.Segment in its header) under one of three options:

- "text": its token ids; the receiver recomputes their KV with the earlier segments' cache as
  prefix, at their original positions (`recompute`). Costs the receiver a prefill, the link ~3 bytes
  a token, the sender nothing (not even its own prefill).
- "fp16": its KV as read, every position (the FP16 baseline).
- a recipe of the quality table (kvlink.budget.QualityTable): selected and quantized. Selection
  stays task-aware: the question's attention scores every position of the WHOLE context once
  (`Scores`), and a segment under retention r keeps its ceil(r * n) best positions by those global
  scores (`encode_segment`).

`Planner` predicts the time to first token of a schedule (one option per segment) from what each
stage costs: the sender's prefill and encode rates, the link rate (`LinkEstimate`, smoothed from
the receipts of earlier segments and kept per receiver), and the receiver's measured prefill and
decode rates (kvlink.wire.ReceiverCosts, in its Welcome; `measure_costs` measures them: the decode rate
of each KV format, `decode_format`, and its fixed cost of one segment's message), and each segment's
call cost as the sender measures it from its receipts (`LinkEstimate.segment_s`). Segments
flow as a pipeline: the sender encodes segment i+1 while i is on the link, the receiver decodes i
while i+1 arrives, so the prediction is a pipeline's, not a sum (`Planner.predict`); the sender keeps
only a window of segments open (send_streamed: 2), so the link runs at most that far ahead of the
receiver, and the prediction knows it. `Planner.choose`
picks the next segment's option given what is already sent and the current estimates: re-planning
after every receipt is what makes the sender follow a link whose rate changes mid-stream.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvlink.budget import QualityTable
from kvlink.cache import ContextKV, Prefill
from kvlink.capabilities import missing
from kvlink.codec import Codec, EncodedKV
from kvlink.models import Geometry
from kvlink.recipe import Recipe
from kvlink.select import keep_count
from kvlink.wire import ReceiverCosts

logger = logging.getLogger(__name__)

TEXT = "text"
FP16 = "fp16"
TEXT_BYTES_PER_TOKEN = 3
"""A token id as a protobuf varint: 3 bytes below 2**21 (every vocabulary we serve)."""
SEGMENT_OVERHEAD_BYTES = 2048
"""Per segment: its header's fixed fields, trailer, receipt and HTTP/2 frames, rounded up."""
DEFAULT_LINK_BPS = 1e9
"""The link rate assumed for a receiver never sent to before (bits/s); the first receipt replaces it."""
JUMP = 2.0
"""A link sample this many times above or below the estimate is a changed link (LinkEstimate)."""
DEFAULT_ENCODE_BPS = 2e9
"""FP16 bytes a second the sender encodes before it has measured itself (the CPU reference path)."""
PINNED = ("kint8c/vint8t-g32", "kint4c/vint4t-g32", "q2c50%+kint4c/vint4t-g32", "q2c25%+kint4c/vint4t-g32")
"""KV options for a model without a measured quality table (random weights: timing only)."""
MAX_TABLE_OPTIONS = 6
MAX_DECODE_PROBES = 8
"""KV formats a receiver times its decode of at start-up (FP16 and INT4 first, then the quality table's)."""
MAX_SEGMENT_S = 10.0
"""A per-segment call cost sample above this is clamped to it (a stalled call, not the call's cost)."""
MAX_WORK_SCALE = 20.0
"""The most a receiver's measured work may depart from what it advertised, either way, in what a sender learns."""


def segment_bounds(length: int, segment_tokens: int) -> list[tuple[int, int]]:
    """[start, stop) of each segment of a `length`-token context, `segment_tokens` each (the last shorter).

    A remainder of less than a quarter of `segment_tokens` joins the segment before it: as a message of
    its own it would pay a segment's fixed costs (a call, the receiver's checks, for a selecting option
    the sender's scores over the whole context) to carry a few tokens, and leave nothing to overlap."""
    if length < 1:
        raise ValueError(f"the context must have at least one token, got {length!r}")
    if segment_tokens < 1:
        raise ValueError(f"segment_tokens must be >= 1, got {segment_tokens!r}")
    bounds = [(a, min(a + segment_tokens, length)) for a in range(0, length, segment_tokens)]
    if len(bounds) > 1 and 4 * (bounds[-1][1] - bounds[-1][0]) < segment_tokens:
        bounds[-2:] = [(bounds[-2][0], length)]
    return bounds


# --- options -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """How one segment travels: TEXT, FP16 or `recipe`; `quality` its expected answer fidelity."""

    name: str
    recipe: Recipe | None = None
    quality: float = 1.0

    @property
    def text(self) -> bool:
        return self.name == TEXT

    @property
    def format(self) -> str:
        """What the receiver decodes (decode_format), TEXT for text."""
        return TEXT if self.recipe is None else decode_format(self.recipe)

    def wire_bytes(self, geometry: Geometry, n: int) -> int:
        """Bytes of a segment of `n` tokens under this option (exact before zstd and framing; the
        framing is SEGMENT_OVERHEAD_BYTES plus the chunk prefixes)."""
        if self.text:
            return TEXT_BYTES_PER_TOKEN * n + SEGMENT_OVERHEAD_BYTES
        assert self.recipe is not None
        payload = Codec(self.recipe, geometry).predicted_sizes(n).total
        return (
            payload + SEGMENT_OVERHEAD_BYTES + 16 * math.ceil(payload / (1 << 20)) * 2 * geometry.num_layers
        )

    def kept(self, n: int) -> int:
        """Positions of an `n`-token segment this option sends (all of them for text and FP16)."""
        select = self.recipe.select if self.recipe is not None else None
        return keep_count(select.retention, n) if select is not None else n


def text_option() -> Option:
    return Option(TEXT)


def fp16_option() -> Option:
    return Option(FP16, Recipe.from_name("fp16"))


def recipe_option(recipe: Recipe, quality: float) -> Option:
    return Option(recipe.name, recipe, quality)


def decode_format(recipe: Recipe) -> str:
    """The name of what a receiver decodes for `recipe`: its name less the selection (a segment under
    q2c50% decodes like one under no selection, half as many positions). ReceiverCosts' decode rates
    are by this name."""
    return recipe.without("select").name


def kv_options(
    fingerprint: str,
    model_name: str,
    capabilities: frozenset[str],
    geometry: Geometry,
    min_quality: float,
    tokens: int | None = None,
) -> list[Option]:
    """FP16 and the quality table's configs that encode a segment alone (segmentable), that the receiver
    decodes and whose expected quality is at least `min_quality`: the frontier of quality against bits
    (at most MAX_TABLE_OPTIONS); the PINNED configs for a model without a measured table. tokens: the
    context's length (the table's bucket for it)."""
    table = QualityTable.for_model(fingerprint, model_name)
    names = list(table.entries) if table.entries else list(PINNED)
    found: list[Option] = []
    for name in names:
        try:
            recipe = Recipe.from_name(name)
        except ValueError:
            continue
        if name == "fp16" or not segmentable(recipe) or missing(recipe, capabilities):
            continue
        quality = table.expected(recipe, geometry.head_dim, tokens=tokens) if table.entries else float("nan")
        if table.entries and quality < min_quality:
            continue
        found.append(recipe_option(recipe, quality))
    if table.entries:  # the frontier: no other option both smaller and at least as good
        found.sort(key=lambda o: (o.wire_bytes(geometry, 1024), -o.quality))
        frontier: list[Option] = []
        for o in found:
            if not frontier or o.quality > frontier[-1].quality:
                frontier.append(o)
        found = frontier[-MAX_TABLE_OPTIONS:]
    return [fp16_option(), *found]


def segmentable(recipe: Recipe) -> bool:
    """Whether a recipe can encode one segment alone: its quantizers need no observed queries (their
    attention is over the whole context), its selection, if any, scores positions globally, and it
    needs no calibrated profile (a low-rank projection or cross-layer predictors: segments carry none)."""
    from kvlink.cache import Observe
    from kvlink.stages import LowRank, Predict

    if any(
        isinstance(s, Predict) or (isinstance(s, LowRank) and s.mode == "profile") for s in recipe.stages()
    ):
        return False
    for kind in ("k", "v"):
        if any(q.needs() is not Observe.NONE for q in recipe.quantizers(kind)):
            return False
    select = recipe.select
    return select is None or (select.scope == "global" and select.method == "q2c")


# --- the sender's encode of one segment ---------------------------------------------------------
class Scores:
    """Global importance of every context position for a selection method: the selector's scores
    of each layer, as shares of that layer's total, summed over layers (what its global keep ranks
    by), computed once per method over the whole prefill."""

    def __init__(self, prefill: Prefill) -> None:
        self.prefill = prefill
        self._by_method: dict[str, Tensor] = {}

    def of(self, recipe: Recipe) -> Tensor:
        select = recipe.select
        assert select is not None
        if select.method not in self._by_method:
            self._by_method[select.method] = select.scores(self.prefill)
        return self._by_method[select.method]


def encode_segment(
    prefill: Prefill, scores: Scores, option: Option, geometry: Geometry, start: int, stop: int
) -> EncodedKV:
    """The KV of tokens [start, stop) under a KV option, positions relative to `start`; a selecting
    recipe keeps the segment's keep_count(r, n) best positions by the global scores."""
    if option.text or option.recipe is None:
        raise ValueError("a text segment has no KV to encode")
    kv = prefill.kv
    n = stop - start
    part = ContextKV(
        [k[:, start:stop] for k in kv.keys],
        [v[:, start:stop] for v in kv.values],
        [torch.arange(n, device=kv.keys[0].device) for _ in kv.keys],
        n,
    )
    kept: list[Tensor] | None = None
    if option.recipe.select is not None:
        local = scores.of(option.recipe)[start:stop]
        order = torch.argsort(local, descending=True, stable=True)[: option.kept(n)]
        chosen = torch.sort(order).values.to(torch.long).to(kv.keys[0].device)
        kept = [chosen] * kv.num_layers
    return Codec(option.recipe, geometry).encode_kv(part, kept, None)


# --- the receiver's recompute of a text segment ----------------------------------------------------
@torch.inference_mode()
def recompute(model: Any, prefix: ContextKV | None, token_ids: Tensor, start: int) -> ContextKV:
    """The KV of `token_ids` at original positions start, start + 1, ..., computed by `model` after the
    cached `prefix` (the earlier segments as received, of length `start`); None: the context's start."""
    from kvlink.attention import PREFIX_CAUSAL, prefix_causal_ok
    from kvlink.cache import prefill as read
    from kvlink.hfcache import KVLinkCache

    device = next(model.parameters()).device
    ids = token_ids.reshape(-1).to(device)
    n = int(ids.numel())
    if prefix is None or prefix.kept(0) == 0:
        if start != 0:
            raise ValueError(f"a text segment at {start} needs the cache of the tokens before it")
        return read(model, ids).kv
    if prefix.length != start:
        raise ValueError(f"the prefix covers {prefix.length} tokens, the segment starts at {start}")
    cache = KVLinkCache.from_context(prefix, model)
    positions = torch.arange(start, start + n, device=device)
    # Every cached entry precedes the segment: lower-right causal attention, no (n, kept + n) mask.
    fast = {PREFIX_CAUSAL: True} if prefix_causal_ok(model, start + n) else {}
    model(**cache.inputs(ids), position_ids=positions[None], use_cache=True, logits_to_keep=1, **fast)
    keys = [layer.keys[0].contiguous() for layer in cache.layers]
    values = [layer.values[0].contiguous() for layer in cache.layers]
    return ContextKV(keys, values, [positions.clone() for _ in keys], start + n)


def join(parts: Sequence[ContextKV], length: int) -> ContextKV:
    """One context from its segments' caches (absolute positions, in order), of `length` tokens."""
    layers = parts[0].num_layers
    return ContextKV(
        [torch.cat([p.keys[layer] for p in parts], dim=1) for layer in range(layers)],
        [torch.cat([p.values[layer] for p in parts], dim=1) for layer in range(layers)],
        [torch.cat([p.positions[layer] for p in parts]) for layer in range(layers)],
        length,
    )


def shifted(kv: ContextKV, start: int, length: int) -> ContextKV:
    """A segment's decoded cache (positions relative to its start) at its place in the context."""
    return ContextKV(kv.keys, kv.values, [p + start for p in kv.positions], length)


def measure_costs(
    model: Any,
    geometry: Geometry,
    max_tokens: int,
    vocab: int,
    seed: int = 0,
    budget_s: float = 5.0,
    formats: Sequence[Recipe] = (),
) -> ReceiverCosts:
    """What this receiver's work costs on its model and device, measured by doing it:

    - prefill tokens/s at a few context lengths up to `max_tokens` (of random token ids: speed does not
      depend on the text; longer ones are skipped once `budget_s` is spent);
    - the decode rate of each KV format (FP16-equivalent bytes/s by decode_format): FP16, INT4 and
      those of `formats` (the quality table's, at most MAX_DECODE_PROBES in all; later ones skipped once
      `budget_s` is spent on decoding), each by encoding a probe of up to 512 tokens of a real prefill
      and timing its decode, less the fixed cost of a decode call (timed on 16 tokens, counted in
      segment_s instead); decode_bytes_per_s is INT4's gross rate (what senders that read one rate
      use for every format);
    - segment_s: the fixed cost of one small segment's message at the receiver, its frames parsed and
      verified (kvlink.wire.Assembler) and decoded;
    - a short question's first token after a context of n <= 1024 tokens received in 4 segments
      (first_token_s: joined, then answered), and at n/4 too: what it takes beyond the question's
      prefill, a fixed part (answer_s) and one per context token (answer_s_per_token)."""
    from kvlink import wire
    from kvlink.answer import GenerationOptions, generate_answer
    from kvlink.cache import prefill as read
    from kvlink.recipe import build

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)

    def timed(fn: Any) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    lengths = sorted({n for n in (128, 512, 2048, 8192, 32768) if n <= max_tokens} or {max(1, max_tokens)})
    ids = torch.randint(0, vocab, (lengths[-1],), generator=gen)
    read(model, ids[:16])  # first-call costs
    rates: list[tuple[int, float]] = []
    spent = 0.0
    for n in lengths:
        if rates and spent > budget_s:
            break
        times = [timed(lambda n=n: read(model, ids[:n])) for _ in range(2)]
        spent += sum(times)
        rates.append((n, n / max(min(times), 1e-9)))
    n = min(rates[-1][0], 1024)
    pre = read(model, ids[:n])
    int4 = build(k_bits=4, v_bits=4)
    codec = Codec(int4, geometry)
    encoded = codec.encode(pre)
    codec.decode(encoded, device, dtype)
    decode_s = min(timed(lambda: codec.decode(encoded, device, dtype)) for _ in range(2))

    # The fixed cost of one segment: a 16-token INT4 message through the receiver's own parse, verify
    # and decode (what every segment pays whatever its length).
    small = codec.encode(read(model, ids[: min(16, n)]))
    frames = [wire.frame_bytes(f) for f in wire.to_frames(small, "probe", "probe", "cost-probe", 1 << 20)]

    def one_segment() -> None:
        asm = wire.Assembler("cost-probe", geometry)
        for raw in frames:
            asm.feed_raw(raw)
        got, _ = asm.finish()
        Codec(got.recipe, geometry).decode(got, device, dtype)

    one_segment()
    segment_s = min(timed(one_segment) for _ in range(3))
    call_s = min(timed(lambda: codec.decode(small, device, dtype)) for _ in range(3))

    # Each format's decode rate on a probe of m tokens, beyond the fixed decode call.
    m = min(n, 512)
    probe = read(model, ids[:m]) if m != n else pre
    decode: dict[str, float] = {}
    probing = 0.0
    for recipe in [Recipe.from_name("fp16"), int4, *formats]:
        name = decode_format(recipe)
        if name in decode or len(decode) >= MAX_DECODE_PROBES or (len(decode) >= 2 and probing > budget_s):
            continue
        started = time.perf_counter()
        try:
            fmt = Codec(recipe.without("select"), geometry)
            message = fmt.encode(probe)
        except ValueError as exc:  # a format this model's geometry does not take
            logger.info("no decode rate for %s: %s", name, exc)
            continue
        fmt.decode(message, device, dtype)
        gross = min(timed(lambda f=fmt, e=message: f.decode(e, device, dtype)) for _ in range(2))
        decode[name] = geometry.fp16_bytes(m) / max(gross - call_s, gross / 2, 1e-9)
        probing += time.perf_counter() - started

    # The first token after a context of m tokens received in 4 segments: their join (the commit) and
    # the answer, at m = n/4 and n; beyond the question's prefill (as the prefill rates predict it), a
    # fixed part and one growing with the context (copies of the cache: the join, the cache's
    # conversion for the answer).
    question = torch.randint(0, vocab, (16,), generator=gen)
    planned = ReceiverCosts(tuple(rates), 1.0, 0.0)
    beyond: list[tuple[int, float]] = []
    first = 0.0
    for m in sorted({max(16, n // 4), n}):
        cache = (pre if m == n else read(model, ids[:m])).kv.to(device=device, dtype=dtype)
        cuts = [(a, min(a + -(-m // 4), m)) for a in range(0, m, -(-m // 4))]
        parts = [
            ContextKV([k[:, a:b] for k in cache.keys], [v[:, a:b] for v in cache.values],
                      [p[a:b] for p in cache.positions], m)
            for a, b in cuts
        ]  # fmt: skip

        def answer(parts: list[ContextKV] = parts, m: int = m) -> None:
            generate_answer(model, None, join(parts, m), question, GenerationOptions(1))

        answer()
        took = min(timed(answer) for _ in range(2))
        first = took
        beyond.append((m, max(took - planned.recompute_s(m, 16), 0.0)))
    (m1, e1), (m2, e2) = beyond[0], beyond[-1]
    per_token = max((e2 - e1) / (m2 - m1), 0.0) if m2 > m1 else 0.0
    answer_s = max(min(e1 - per_token * m1, e2 - per_token * m2), 1e-4)  # the smaller when noise made e2 < e1
    return ReceiverCosts(
        tuple(rates), geometry.fp16_bytes(n) / max(decode_s, 1e-9), first, tuple(decode.items()), segment_s,
        answer_s, per_token,
    )  # fmt: skip


# --- link estimate ---------------------------------------------------------------------------------
@dataclass
class LinkEstimate:
    """A receiver's link rate in bits/s: an exponentially smoothed mean of per-segment samples (bytes
    over the receiver's receive time), `alpha` the weight of the newest; a sample more than JUMP times
    off the estimate replaces it (the link changed: smoothing would follow it segments late). And the
    call cost of one segment (segment_s, seconds; None until a receipt measured it): what a segment's
    Transfer takes beyond its bytes on the link and the receiver's decode or recompute (the call, the
    receiver's checks and bookkeeping, the receipt), smoothed with weight `call_alpha`. And how the
    receiver's own work on a segment compares with what its advertised rates predict (recompute_scale
    for text, decode_scale for KV: measured / predicted, smoothed with weight `work_alpha`; 1.0 until a
    receipt measured one): a start-up probe times whole prefills and decodes, which a segment after a
    long prefix, or at another scale, may not match."""

    bps: float = DEFAULT_LINK_BPS
    samples: int = 0
    alpha: float = 0.6
    segment_s: float | None = None
    segment_samples: int = 0
    call_alpha: float = 0.3
    recompute_scale: float = 1.0
    decode_scale: float = 1.0
    recompute_samples: int = 0
    decode_samples: int = 0
    work_alpha: float = 0.5

    MIN_WORK_S = 1e-3  # less is not timed well enough to scale a prediction by

    MIN_SAMPLE_BYTES = 64 << 10  # smaller segments time the call, not the link

    def add(self, nbytes: int, seconds: float) -> bool:
        """Take one sample (ignored when too small to time the link); whether it was taken."""
        if nbytes < self.MIN_SAMPLE_BYTES or not 1e-4 < seconds < math.inf:  # NaN included
            return False
        rate = 8 * nbytes / seconds
        if self.samples == 0 or not self.bps / JUMP <= rate <= self.bps * JUMP:
            self.bps = rate  # a new link, or one that changed: follow it at once
        else:
            self.bps = self.alpha * rate + (1 - self.alpha) * self.bps
        self.samples += 1
        return True

    def add_call(self, seconds: float | None) -> bool:
        """Take one segment's call cost (clamped to [0, MAX_SEGMENT_S]; ignored unless finite)."""
        if seconds is None or not math.isfinite(seconds):
            return False
        sample = min(max(seconds, 0.0), MAX_SEGMENT_S)
        if self.segment_s is None or self.segment_samples == 0:
            self.segment_s = sample
        else:
            self.segment_s = self.call_alpha * sample + (1 - self.call_alpha) * self.segment_s
        self.segment_samples += 1
        return True

    def add_work(self, text: bool, measured: float, predicted: float) -> bool:
        """Take one segment's receiver work (a text segment's recompute, else a KV segment's decode),
        measured against the unscaled prediction; ignored unless both are finite and timeable."""
        if not (math.isfinite(measured) and math.isfinite(predicted)):
            return False
        if measured < self.MIN_WORK_S or predicted < self.MIN_WORK_S:
            return False
        sample = min(max(measured / predicted, 1 / MAX_WORK_SCALE), MAX_WORK_SCALE)
        old = self.recompute_scale if text else self.decode_scale
        first = (self.recompute_samples if text else self.decode_samples) == 0
        new = sample if first else self.work_alpha * sample + (1 - self.work_alpha) * old
        if text:
            self.recompute_scale, self.recompute_samples = new, self.recompute_samples + 1
        else:
            self.decode_scale, self.decode_samples = new, self.decode_samples + 1
        return True

    def call_s(self, receiver: ReceiverCosts) -> float:
        """The per-segment call cost to plan with: measured from receipts, else what the receiver
        advertises of its own part (0 from a receiver that measured none)."""
        return self.segment_s if self.segment_s is not None else receiver.segment_s


WAITED_S = 1e-3
"""A segment that waited this long for the one before it (the receiver's turn_s) was in before that was."""


def call_sample(
    began: float,
    answered: float,
    previous: float | None,
    receive_s: float,
    work_s: float,
    turn_s: float = 0.0,
) -> float | None:
    """One segment's call cost, from the sender's clock (when its Transfer began and was answered; when
    the segment before it was answered) and its receipt's timings (receive_s, the receiver's decode or
    recompute `work_s`, and turn_s, how long it waited for the segment before it): the time from when
    the receiver could take it to its receipt, less its work. None when the receipt cannot tell: its
    bytes may have queued on the link behind the segment before it (that is the link's time, not the
    call's).

    - It waited at the receiver: it could be taken once the segment before was answered.
    - It began after the segment before was answered (or is the first): once its bytes were in."""
    if previous is not None and turn_s >= WAITED_S:
        return answered - previous - work_s
    if previous is None or previous <= began:
        return answered - began - receive_s - work_s
    return None


class LinkMemory:
    """Link estimates per receiver address, kept between sends (in memory, and in a JSON file when
    given one: kvlink-send keeps it in the user cache directory): the rate and the per-segment call
    cost. A file of before the call cost (a rate alone per address) still reads."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._links: dict[str, LinkEstimate] = {}
        if path is not None and path.is_file():
            try:
                for target, kept in json.loads(path.read_text()).items():
                    estimate = _estimate_from_json(kept)
                    if estimate is not None:
                        self._links[str(target)] = estimate
            except (OSError, ValueError, AttributeError) as exc:
                logger.warning("ignoring the link estimates in %s: %s", path, exc)

    def get(self, target: str, hint_bps: float | None = None) -> LinkEstimate:
        if target not in self._links:
            self._links[target] = LinkEstimate(hint_bps or DEFAULT_LINK_BPS, 1 if hint_bps else 0)
        return self._links[target]

    def save(self) -> None:
        if self.path is None:
            return
        kept = {
            t: {
                "bps": e.bps,
                **({"segment_s": e.segment_s} if e.segment_s is not None else {}),
                **({"recompute_scale": e.recompute_scale} if e.recompute_samples else {}),
                **({"decode_scale": e.decode_scale} if e.decode_samples else {}),
            }
            for t, e in self._links.items()
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(kept, indent=1))
        except OSError as exc:
            logger.warning("cannot keep the link estimates in %s: %s", self.path, exc)


def _estimate_from_json(kept: Any) -> LinkEstimate | None:
    """A kept estimate: {"bps": ..., "segment_s": ...}, or a rate alone (a file of before the call cost);
    None for anything else, or values no plan can use."""
    bps, segment_s = (
        (kept, None) if isinstance(kept, (int, float)) else (kept.get("bps"), kept.get("segment_s"))
    )
    if not isinstance(bps, (int, float)) or not math.isfinite(bps) or bps <= 0:
        return None
    estimate = LinkEstimate(float(bps), 1)
    if isinstance(segment_s, (int, float)) and math.isfinite(segment_s) and 0 <= segment_s <= MAX_SEGMENT_S:
        estimate.segment_s, estimate.segment_samples = float(segment_s), 1
    if isinstance(kept, dict):
        for name in ("recompute_scale", "decode_scale"):
            scale = kept.get(name)
            if isinstance(scale, (int, float)) and 1 / MAX_WORK_SCALE <= scale <= MAX_WORK_SCALE:
                setattr(estimate, name, float(scale))
                setattr(estimate, name.replace("_scale", "_samples"), 1)
    return estimate


LINKS = LinkMemory()
"""This process's link estimates (what a library user's sends share)."""


# --- prediction and choice -------------------------------------------------------------------------
@dataclass
class Costs:
    """What the planner knows: receiver costs, link rate (bits/s), the sender's encode rate (FP16
    bytes/s), its prefill time still to come (0 once read), one-way latency, question tokens, each KV
    option's measured encode rate, and the call cost of one segment (seconds each segment's Transfer
    takes beyond its bytes and the receiver's work: LinkEstimate.call_s)."""

    receiver: ReceiverCosts
    link_bps: float
    encode_bps: float = DEFAULT_ENCODE_BPS
    prefill_s: float = 0.0
    latency_s: float = 0.0005
    question_tokens: int = 32
    encode_rates: dict[str, float] = field(default_factory=dict)  # measured per option (FP16 bytes/s)
    segment_s: float = 0.0
    recompute_scale: float = 1.0  # the receiver's measured / advertised work (LinkEstimate)
    decode_scale: float = 1.0


@dataclass
class Prediction:
    """A schedule's predicted stage times (seconds from now): each segment's arrival and the time it
    is in the receiver's cache, then the first token."""

    arrive: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    wire_bytes: list[int] = field(default_factory=list)
    ttft: float = 0.0
    encoded: float = 0.0  # when the sender's encoder is next free

    @property
    def total_bytes(self) -> int:
        return sum(self.wire_bytes)


class Planner:
    """Predicts and chooses segment by segment (see the module docstring). bounds: the segments;
    options: what each may travel as; budget_bytes: every byte sent stays under it (the cheapest
    option is always text, so a plan exists whenever all-text fits); window: segments the sender has
    open at once (a segment is chosen, encoded and sent once the one `window` before it is answered;
    None: no such limit, the link may run any number of segments ahead of the receiver)."""

    def __init__(
        self,
        geometry: Geometry,
        bounds: Sequence[tuple[int, int]],
        options: Sequence[Option],
        budget_bytes: int,
        window: int | None = None,
    ) -> None:
        if not options:
            raise ValueError("no option to send a segment with")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window!r}")
        self.window = window
        self.geometry = geometry
        self.bounds = list(bounds)
        self.options = list(options)
        self.budget_bytes = budget_bytes
        self._bytes = {(o.name, b - a): o.wire_bytes(geometry, b - a) for o in options for a, b in bounds}

    def bytes_of(self, option: Option, i: int) -> int:
        a, b = self.bounds[i]
        return self._bytes[(option.name, b - a)]

    def advertised_work_s(self, option: Option, i: int, receiver: ReceiverCosts) -> float:
        """The receiver's seconds on segment i under `option` by its advertised rates: recomputing it
        (text) or decoding what it keeps at its format's rate."""
        a, b = self.bounds[i]
        if option.text:
            return receiver.recompute_s(a, b - a)
        return self.geometry.fp16_bytes(option.kept(b - a)) / receiver.decode_rate(option.format)

    def whole_prefill(self, option: Option, i: int) -> bool:
        """Whether segment i under `option` is a whole prefill: text at the context's start, what the
        receiver's advertised rates time. It is planned unscaled and teaches no scale (recompute_scale is
        learned after a prefix: on the H100 grid a first text segment ran at 0.3-1.0x of the advertised
        time, later ones at 1.2-1.9x, their attention then over the prefix under an explicit mask)."""
        return option.text and self.bounds[i][0] == 0

    def work_s(self, option: Option, i: int, costs: Costs) -> float:
        """The receiver's seconds on segment i under `option`: its advertised work scaled by what
        receipts measured of it (not a whole prefill's), plus the segment's call cost."""
        if self.whole_prefill(option, i):
            scale = 1.0
        else:
            scale = costs.recompute_scale if option.text else costs.decode_scale
        return self.advertised_work_s(option, i, costs.receiver) * scale + costs.segment_s

    def predict(self, schedule: Sequence[Option], costs: Costs, first: int = 0, link_free: float = 0.0,
                ready: float = 0.0, encoded: float = 0.0) -> Prediction:  # fmt: skip
        """The pipeline of segments first.. under `schedule` (one option each, from `first`): the
        sender encodes KV segments in order after its prefill, the link sends them in order as each is
        ready (text at once), the receiver takes them in order as each arrives; with a window, a
        segment is chosen (then encoded, then sent) once the one `window` before it is answered.
        link_free / ready / encoded: when the link, the receiver and the sender's encoder are next free
        (0: now); the segments before `first` other than the last are answered by now."""
        g, r = self.geometry, costs.receiver
        out = Prediction()
        enc_free = max(encoded, costs.prefill_s)
        answered = [0.0] * (self.window - 1) + [ready] if self.window else []  # of segments first-window..
        for offset, option in enumerate(schedule):
            i = first + offset
            a, b = self.bounds[i]
            n = b - a
            nbytes = self.bytes_of(option, i)
            go = answered[offset] if self.window else 0.0  # when it may be chosen and sent
            if option.text:
                sendable = go
            else:
                rate = costs.encode_rates.get(option.name, costs.encode_bps)
                enc_free = max(enc_free, go) + g.fp16_bytes(n) / rate
                sendable = enc_free
            work = self.work_s(option, i, costs)
            start = max(sendable, link_free)
            link_free = start + 8 * nbytes / costs.link_bps
            arrive = link_free + costs.latency_s
            ready = max(arrive, ready) + work
            answered.append(ready)
            out.arrive.append(arrive)
            out.ready.append(ready)
            out.wire_bytes.append(nbytes)
        out.ttft = ready + r.answer_time(self.bounds[-1][1] if self.bounds else 0, costs.question_tokens)
        out.encoded = enc_free
        return out

    def plan(self, costs: Costs) -> tuple[list[Option], Prediction]:
        """The schedule choose() makes segment by segment when every stage takes what it is predicted
        to, and its prediction (what a sender expects before it sends anything)."""
        schedule: list[Option] = []
        spent = 0
        for i in range(len(self.bounds)):
            option, _ = self._best(i, costs, spent, schedule)
            schedule.append(option)
            spent += self.bytes_of(option, i)
        return schedule, self.predict(schedule, costs)

    def uniform(self, costs: Costs, first: int = 0, **state: float) -> tuple[Option, Prediction]:
        """The best single option for every segment from `first` on, within the budget left."""
        left = self.budget_bytes - int(state.pop("spent", 0))
        best: tuple[Option, Prediction] | None = None
        n_left = len(self.bounds) - first
        for option in self.options:
            p = self.predict([option] * n_left, costs, first, **state)
            if p.total_bytes <= left and (best is None or p.ttft < best[1].ttft):
                best = (option, p)
        if best is None:
            cheapest = min(
                self.options, key=lambda o: sum(self.bytes_of(o, i) for i in range(first, len(self.bounds)))
            )
            return cheapest, self.predict([cheapest] * n_left, costs, first, **state)
        return best

    def choose(self, i: int, costs: Costs, spent: int = 0, **state: float) -> tuple[Option, Prediction]:
        """Segment i's option: the one whose schedule (it, then the best uniform rest) has the lowest
        predicted TTFT within the budget left (`spent` bytes already sent)."""
        return self._best(i, costs, spent, (), **state)

    def _best(
        self, i: int, costs: Costs, spent: int, before: Sequence[Option], **state: float
    ) -> tuple[Option, Prediction]:
        """choose(), predicting from segment i - len(before) with the options `before` in front (one
        prediction for the whole schedule, so that each segment sees those a window before it)."""
        best: tuple[Option, Prediction] | None = None
        first, rest = i - len(before), len(self.bounds) - i - 1
        for option in self.options:
            nbytes = self.bytes_of(option, i)
            if spent + nbytes > self.budget_bytes:
                continue
            for tail in [[u] * rest for u in self.options] if rest else [[]]:
                p = self.predict([*before, option, *tail], costs, first, **state)
                total = sum(p.wire_bytes[len(before) :])
                if spent + total <= self.budget_bytes and (best is None or p.ttft < best[1].ttft):
                    best = (option, Prediction(ttft=p.ttft, wire_bytes=[total]))
        if best is None:
            raise ValueError(
                f"no option fits the byte budget: {spent:,} bytes spent of {self.budget_bytes:,}, "
                f"segment {i} needs at least {min(self.bytes_of(o, i) for o in self.options):,}"
            )
        return best
