"""Quantize: the one stage of a tensor's pipeline that writes codes (kvlink.quant formats, group-wise).

    Quantize("int4", 64, "channel")                        # keys: groups of 64 tokens per channel
    Quantize("int4", 64, "channel", rounding="query")      # rounded for the question's logits
    Quantize("int3", 64, "channel", widths="question")     # a width per channel (format int3cw)
    Quantize("int4", 64, "token", widths="question")       # values: a width per token row (int4rw)

format is the uniform format (fp16, int8, int4, int3, int2, nf4); with widths
"question" the wire format is its width-per-line twin along the tensor's axis
(kvlink.quant.formats: per channel for keys, per token row for values): the
same codes bytes plus 4 bits per line and head. Both question-aware options
need the prefill's observed queries (Observe.QUESTION) and change nothing the
receiver must do beyond decoding the format:

- rounding "query" (keys): INT codes chosen for the question's attention logits
  instead of the nearest level (kvlink.quant.aware; batched over layers);
- widths "question": keys get a width per channel from the queries' Hessian,
  allocated over every such layer at once (kvlink.quant.widths.allocate_widths);
  values a width per row from the attention mass the question gives each row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvlink.cache import Observation, Observe
from kvlink.models import Geometry
from kvlink.quant import AXES, QuantizedTensor, QuantSpec, part_sizes
from kvlink.quant.formats import format_spec
from kvlink.stages.base import Item, Stage, register

ROUNDINGS: tuple[str, ...] = ("nearest", "query")
WIDTHS: tuple[str, ...] = ("uniform", "question")
ROUND_BATCH_ELEMENTS = 1 << 25  # key entries rounded in one batched call (~256 MiB of float64 work)


@register
@dataclass(frozen=True)
class Quantize(Stage):
    """Group-wise quantization of the stored tensor in `format` (uniform name), groups of `group` along
    `axis`; `rounding` and `widths` make it question-aware (see the module docstring)."""

    name: ClassVar[str] = "quantize"
    role: ClassVar[str] = "quantize"

    format: str = "fp16"
    group: int = 32
    axis: str = "token"
    rounding: str = "nearest"
    widths: str = "uniform"

    def __post_init__(self) -> None:
        spec = format_spec(self.format)  # raises listing the formats
        if spec.widths:
            raise ValueError(
                f"format {self.format!r} is a width-per-line format: give its uniform format "
                f"{spec.uniform!r} with widths='question'"
            )
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group!r}")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.rounding == "query" and spec.family != "int":
            raise ValueError(f"rounding 'query' needs an INT format, got {self.format!r}")
        if self.widths not in WIDTHS:
            raise ValueError(f"widths must be one of {WIDTHS}, got {self.widths!r}")
        if self.widths == "question" and spec.with_widths(self.axis) is None:
            raise ValueError(f"widths 'question' needs INT2/3/4, got {self.format!r}")

    @property
    def wire_format(self) -> str:
        """The format name the codes travel in (the width-per-line twin under widths 'question')."""
        if self.widths == "question":
            return format_spec(self.format).with_widths(self.axis)  # type: ignore[return-value]
        return self.format

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.wire_format, self.group, self.axis)

    @property
    def question_aware(self) -> bool:
        return self.rounding == "query" or self.widths == "question"

    def needs(self) -> Observe:
        return Observe.QUESTION if self.question_aware else Observe.NONE

    def capability(self) -> str:
        return f"format:{self.wire_format}"

    def check(self, geometry: Geometry) -> None:
        if self.widths == "question" and geometry.head_dim % 8:
            raise ValueError(f"widths 'question' needs head_dim a multiple of 8, got {geometry.head_dim}")

    def check_in(self, kind: str, transforms: tuple[Stage, ...]) -> None:
        """Checks against the rest of a `kind` tensor's pipeline."""
        names = {t.name for t in transforms}
        if self.rounding == "query" and kind != "k":
            raise ValueError("rounding 'query' rounds keys for the question's logits: keys only")
        if self.question_aware and "lowrank" in names:
            raise ValueError(
                f"{'rounding' if self.rounding == 'query' else 'widths'} with a low-rank latent: choose one"
            )
        if self.widths == "question":
            want = "channel" if kind == "k" else "token"
            if self.axis != want:
                raise ValueError(f"{kind} widths 'question' need the {want} axis, got {self.axis!r}")
            if kind == "k" and "rotate" in names:
                raise ValueError("key widths 'question' with a rotation: choose one")

    def size_key(self) -> tuple[Any, ...]:
        return ("quantize", self.wire_format, self.group, self.axis)

    def part_sizes(self, stored: tuple[int, int, int]) -> dict[str, int]:
        return part_sizes(stored, self.spec)

    def stackable(self, stored: tuple[int, int, int]) -> bool:
        """Whether the parts of tensors alike can be laid end to end into one stack's parts (whole
        bytes at every boundary; the 4-bit row widths too)."""
        n = stored[0] * stored[1] * stored[2]
        spec = format_spec(self.wire_format)
        return (n * spec.bits) % 8 == 0 and (spec.widths != "token" or (stored[0] * stored[1]) % 2 == 0)

    # --- encode -----------------------------------------------------------------------------------------
    @staticmethod
    def encode_all(items: list[Item], observation: Observation | None) -> None:
        """Quantize every item (its own Quantize stage each) and write its parts: codes, scale, zero, widths.

        Question-aware keys are done together (their widths allocated over all such layers at once,
        their rounding batched), then question-aware values, then the rest one by one."""
        done: dict[int, QuantizedTensor] = {}
        aware_keys = [i for i, it in enumerate(items) if it.kind == "k" and it.quantize.question_aware]
        aware_values = [
            i for i, it in enumerate(items) if it.kind == "v" and it.quantize.widths == "question"
        ]
        if (aware_keys or aware_values) and observation is None:
            raise ValueError("question-aware quantization needs the prefill's observed queries")
        if aware_keys:
            done.update(_query_keys([items[i] for i in aware_keys], aware_keys, observation))  # type: ignore[arg-type]
        for i in aware_values:
            done[i] = _attended_values(items[i], observation)  # type: ignore[arg-type]
        from kvlink.codec import Part
        from kvlink.quant.widths import pack_widths
        from kvlink.stages.tensors import tensor_bytes

        for i, it in enumerate(items):
            q = done.get(i)
            if q is None:
                from kvlink.kernels import (
                    quantize_pack,
                )  # Triton on a CUDA tensor, else the reference: same bytes

                q = quantize_pack(it.x, it.quantize.spec)  # type: ignore[arg-type]
            widths = pack_widths(q.widths) if q.widths is not None else None
            for name, tensor in (
                ("codes", q.codes),
                ("scale", q.scale),
                ("zero", q.zero),
                ("widths", widths),
            ):
                if tensor is not None:
                    raw = tensor_bytes(tensor)
                    it.parts[name] = Part(raw, len(raw))
            it.info["spec"] = q.spec
            it.x = None

    def token_format(self) -> str:
        """This stage's format in a config name: the uniform format (its widths have their own token)."""
        return self.format


def _stored_shape(x: Tensor) -> tuple[int, int, int]:
    return (int(x.shape[0]), int(x.shape[1]), int(x.shape[2]))


def _query_keys(
    items: list[Item], indices: list[int], observation: Observation
) -> dict[int, QuantizedTensor]:
    """Keys quantized with the observed queries: per-channel widths allocated from them (widths
    'question') and/or rounded for their logits (rounding 'query'). The Hessian of a layer is that of its
    observed queries, as the stored keys see them (rotated like them when they are). Rounding works
    in batches of one spec and shape of at most ROUND_BATCH_ELEMENTS entries (in float64)."""
    from kvlink.quant.aware import query_hessian, round_query_aware, saliency
    from kvlink.quant.pack import pack_bits
    from kvlink.quant.widths import allocate_widths, channel_weights, pack_codes, quantize_widths

    hessians: list[Tensor] = []
    for it in items:
        queries = observation.layers[it.layer].queries.to(it.x.device)  # type: ignore[union-attr]
        for t in it.transforms:
            queries = t.queries(queries, it)
        hessians.append(query_hessian(queries, int(it.x.shape[0])))  # type: ignore[union-attr]
    # Widths: one allocation per mean width for all such layers' heads together (rows are independent).
    widths: dict[int, Tensor] = {}
    by_mean: dict[int, list[tuple[int, Tensor]]] = {}
    for n, (it, hessian) in enumerate(zip(items, hessians, strict=True)):
        stage = it.quantize
        if stage.widths == "question":
            compensated = stage.rounding == "query"
            weights = channel_weights(it.x, saliency(hessian, compensated), stage.group)  # type: ignore[arg-type]
            by_mean.setdefault(format_spec(stage.wire_format).bits, []).append((n, weights))
    for mean, entries in by_mean.items():
        allocated = allocate_widths(torch.cat([w for _, w in entries]), mean)
        start = 0
        for n, weights in entries:
            widths[n] = allocated[start : start + weights.shape[0]]
            start += weights.shape[0]
    out: dict[int, QuantizedTensor] = {}
    batches: dict[tuple[QuantSpec, tuple[int, ...]], list[tuple[int, Tensor, Tensor | None]]] = {}
    for n, (it, hessian) in enumerate(zip(items, hessians, strict=True)):
        spec, w = it.quantize.spec, widths.get(n)
        if it.quantize.rounding != "query":
            assert w is not None
            out[indices[n]] = quantize_widths(it.x, spec, w)  # type: ignore[arg-type]
        else:
            batches.setdefault((spec, tuple(it.x.shape)), []).append((n, hessian, w))  # type: ignore[union-attr]
    for (spec, shape), members in batches.items():
        h = shape[0]
        step = max(1, ROUND_BATCH_ELEMENTS // max(1, math.prod(shape)))
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            x = torch.cat([items[n].x for n, _, _ in chunk])  # type: ignore[misc]  # (layers * H, N, D)
            hessian = torch.cat([hs for _, hs, _ in chunk])  # (layers * H, D, D)
            stacked = torch.cat([w for _, _, w in chunk]) if format_spec(spec.format).widths else None  # type: ignore[misc]
            codes, scale, zero = round_query_aware(x, spec, hessian, widths=stacked)
            for i, (n, _, w) in enumerate(chunk):
                rows = slice(i * h, (i + 1) * h)
                packed = pack_bits(codes[rows], spec.bits) if w is None else pack_codes(codes[rows], w)
                out[indices[n]] = QuantizedTensor(
                    spec,
                    _stored_shape(items[n].x),  # type: ignore[arg-type]
                    packed,
                    scale[rows],
                    zero[rows],
                    w,  # type: ignore[arg-type]
                )
    return out


def _attended_values(item: Item, observation: Observation) -> QuantizedTensor:
    """A value tensor of a per-row-width format, each row's width allocated from the attention the
    observed queries give its position (kvlink.quant.widths.allocate_token_widths)."""
    from kvlink.quant.widths import allocate_token_widths, quantize_token_widths, token_weights
    from kvlink.select.base import attention_to_context

    spec = item.quantize.spec
    x = item.x
    assert x is not None
    sink = int(item.info.get("sink", 0))
    mass = attention_to_context(observation.layers[item.layer], observation.length, observation.scale)
    kept = item.info["positions"][sink:].to(mass.device)
    weights = token_weights(x, mass[:, kept].to(x.device), spec.group_size)
    widths = allocate_token_widths(weights, format_spec(spec.format).bits)
    return quantize_token_widths(x, spec, widths)
