"""Measure a model's sensitivity profile: the KL each layer's K or V alone causes at low bits.

For each held-out question (SQuAD questions on the reserved last article,
Harvard_University, in the calibration split; `measure` refuses any other split's
examples, kvlink.eval.splits.require_calibration): prefill the context, answer greedily from the full KV, then for every
(K/V, layer) take the cache the real codec decodes at INT8 everywhere except that
one tensor at `bits` (groups of `group_size`, `sink` fp16 entries; `variant_configs`)
and score the full-KV answer teacher-forced: the mean KL of the next-token
distributions against the full KV (`batch` variant caches per forward). The codec
encodes each tensor on its own, so the cache is encoded twice (all INT8, all at
`bits`) and each variant swaps one tensor (`variant_caches`). The profile is the mean over questions
(kvlink.layerbits.Sensitivity; `kvlink-bench sensitivity` writes it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch

from kvlink.cache import ContextKV, prefill
from kvlink.codec import Codec
from kvlink.eval import fidelity
from kvlink.eval.splits import require_calibration
from kvlink.eval.tasks import Example, reserved_contexts, squad_examples
from kvlink.layerbits import Sensitivity
from kvlink.models import LoadedModel
from kvlink.recipe import Recipe, build

logger = logging.getLogger(__name__)


def held_out_examples(limit: int | None = None, data: str | None = None) -> list[Example]:
    """Answerable SQuAD questions on the reserved paragraphs (kvlink.eval.tasks.reserved_contexts), which are
    in the calibration split."""
    reserved = set(reserved_contexts())
    out = [e for e in squad_examples(data, split="calibration") if e.context in reserved]
    if not out:
        raise ValueError("the SQuAD file has no answerable question on its reserved (last) article")
    return out[:limit] if limit is not None else out


def variant_configs(
    num_layers: int, bits: int = 2, group_size: int = 64, sink: int = 1
) -> list[tuple[str, int, Recipe]]:
    """(kind, layer, config) for every tensor alone at `bits` with the rest at INT8."""
    out = []
    for kind in ("k", "v"):
        for layer in range(num_layers):
            low = tuple(bits if i == layer else 8 for i in range(num_layers))
            rest = (8,) * num_layers
            k_bits, v_bits = (low, rest) if kind == "k" else (rest, low)
            config = build(group_size=group_size, sink=sink, k_layer_bits=k_bits, v_layer_bits=v_bits)
            out.append((kind, layer, config))
    return out


def variant_caches(
    kv: ContextKV, lm: LoadedModel, bits: int = 2, group_size: int = 64, sink: int = 1
) -> Iterator[tuple[str, int, ContextKV]]:
    """(kind, layer, decoded cache) of each variant_configs entry, in its order: two encodes in all."""
    decoded = []
    for width in (8, bits):
        codec = Codec(build(k_bits=width, v_bits=width, group_size=group_size, sink=sink), lm.geometry)
        decoded.append(codec.decode(codec.encode_kv(kv), lm.device, lm.dtype))
    rest, low = decoded
    for kind in ("k", "v"):
        for layer in range(rest.num_layers):
            keys, values = list(rest.keys), list(rest.values)
            (keys if kind == "k" else values)[layer] = (low.keys if kind == "k" else low.values)[layer]
            yield kind, layer, ContextKV(keys, values, rest.positions, rest.length)


def measure(
    lm: LoadedModel,
    examples: Sequence[Example],
    bits: int = 2,
    group_size: int = 64,
    sink: int = 1,
    max_new_tokens: int = 16,
    batch: int = 16,
    on_example: Callable[[int], None] | None = None,
) -> Sensitivity:
    """The model's Sensitivity over `examples` (see the module docstring)."""
    if not examples:
        raise ValueError("sensitivity needs at least one example")
    require_calibration(examples, "a sensitivity profile")
    g = lm.geometry
    totals = torch.zeros(2, g.num_layers, dtype=torch.float64)
    used = 0
    for i, ex in enumerate(examples):
        ctx, q = ex.encode(lm.tokenizer)
        kv = prefill(lm.model, ctx).kv.to(dtype=torch.float16)  # what the sender quantizes
        full = kv.to(dtype=lm.dtype)
        answer = fidelity.batched_answers(lm.model, lm.tokenizer, [full], q, (), max_new_tokens).tokens[0]
        if not answer:
            logger.warning("%s: empty full-KV answer, skipped", ex.eid)
            continue
        used += 1
        variants = list(variant_caches(kv, lm, bits, group_size, sink))
        for start in range(0, len(variants), batch):
            chunk = variants[start : start + batch]
            caches = [cache for _, _, cache in chunk]
            out = fidelity.batched_answers(lm.model, lm.tokenizer, [full, *caches], q, [answer], 0)
            forced = out.forced[0]  # (1 + len(chunk), len(answer), vocab); row 0 is the full KV
            for row, (kind, layer, _) in enumerate(chunk, start=1):
                totals[0 if kind == "k" else 1, layer] += fidelity.mean_kl(forced[0], forced[row])
        if on_example is not None:
            on_example(i)
    if not used:
        raise ValueError("no example gave a non-empty full-KV answer")
    return Sensitivity(
        model=lm.name, k=tuple((totals[0] / used).tolist()), v=tuple((totals[1] / used).tolist()), bits=bits,
        group_size=group_size, sink=sink, examples=used,
    )  # fmt: skip
