"""KV extraction after prefill, the observations selectors score from, and cache rebuilding.

Keys are cached after rotary embedding, so a kept key carries its original
position inside it; `ContextKV.positions` records those positions so the
receiver can continue the question at the ORIGINAL context length T.

Queries are captured during prefill by a forward pre-hook on each attention
module (recomputing q_proj + RoPE on the module's own inputs), so attention
scores never need the whole model to run with eager attention.
"""

from __future__ import annotations

import enum
import inspect
import sys
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class ContextKV:
    """A context's KV cache, per layer.

    keys[l], values[l]: (kv_heads, n_kept, head_dim), keys after RoPE.
    positions[l]: (n_kept,) int64, sorted original positions of the kept entries.
    length: the original context length T (the question continues at T).
    """

    keys: list[Tensor]
    values: list[Tensor]
    positions: list[Tensor]
    length: int

    def __post_init__(self) -> None:
        if not (len(self.keys) == len(self.values) == len(self.positions)):
            raise ValueError(
                f"keys, values and positions need one entry per layer, got "
                f"{len(self.keys)}, {len(self.values)}, {len(self.positions)}"
            )
        for layer, (k, v, p) in enumerate(zip(self.keys, self.values, self.positions)):
            if k.dim() != 3 or v.shape[:2] != k.shape[:2] or p.shape != (k.shape[1],):
                raise ValueError(
                    f"layer {layer}: keys {tuple(k.shape)}, values {tuple(v.shape)} and positions "
                    f"{tuple(p.shape)} do not agree on (kv_heads, n_kept, head_dim)"
                )

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def kv_heads(self) -> int:
        return int(self.keys[0].shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.keys[0].shape[2])

    def kept(self, layer: int = 0) -> int:
        return int(self.positions[layer].numel())

    def fp16_bytes(self) -> int:
        """FP16 size of the FULL context KV (all T positions): the budget's denominator."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.length * 2

    def select(self, kept: list[Tensor]) -> ContextKV:
        """Keep, per layer, the entries whose ORIGINAL positions are listed in `kept[l]` (sorted)."""
        keys, values, positions = [], [], []
        for layer, pos in enumerate(kept):
            have = self.positions[layer]
            idx = torch.searchsorted(have, pos.to(have.device))
            if idx.numel() and (idx.max() >= have.numel() or not torch.equal(have[idx], pos.to(have.device))):
                raise ValueError(f"layer {layer}: kept positions are not a subset of the cached positions")
            keys.append(self.keys[layer].index_select(1, idx))
            values.append(self.values[layer].index_select(1, idx))
            positions.append(have[idx])
        return ContextKV(keys, values, positions, self.length)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ContextKV:
        return ContextKV(
            [k.to(device=device, dtype=dtype) for k in self.keys],
            [v.to(device=device, dtype=dtype) for v in self.values],
            [p.to(device=device) for p in self.positions],
            self.length,
        )


class Observe(enum.Enum):
    """Which queries a selector needs to see."""

    NONE = "none"  # StreamingLLM, Random: positions only
    QUESTION = "question"  # Q2C: the question tokens, run after the context
    WINDOW = "window"  # SnapKV: the last context positions
    ALL = "all"  # H2O: every context position


@dataclass
class LayerObservation:
    """Post-RoPE queries of one layer and the keys they attend to.

    queries: (q_heads, n_queries, head_dim); query_positions: (n_queries,)
    keys: (kv_heads, n_keys, head_dim); key_positions: (n_keys,); the first T keys are the context.
    """

    queries: Tensor
    query_positions: Tensor
    keys: Tensor
    key_positions: Tensor


@dataclass
class Observation:
    """What a selector may look at: per-layer observations plus the context length T.

    `layers` is empty for Observe.NONE; `num_layers` is the model's layer count
    for every kind, so position-only selectors know how many kept sets to return.
    """

    kind: Observe
    length: int
    layers: list[LayerObservation] = field(default_factory=list)
    scale: float = 1.0  # softmax scale of the attention (1/sqrt(head_dim) for most models)
    num_layers: int = 0


@dataclass
class Prefill:
    """The result of reading a context: its KV cache and what the selectors observed."""

    kv: ContextKV
    observation: Observation
    context_ids: Tensor  # (T,)
    question_ids: Tensor | None  # (Q,)


def attention_modules(model: Any) -> list[Any]:
    """The self-attention module of every decoder layer, in layer order."""
    layers = model.model.layers
    return [layer.self_attn for layer in layers]


def _rotary_fn(attn: Any) -> Callable[..., Any]:
    module = sys.modules[type(attn).__module__]
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(
            f"{type(attn).__name__} has no apply_rotary_pos_emb in {module.__name__}; unsupported model"
        )
    return fn  # type: ignore[no-any-return]


@contextmanager
def capture_queries(model: Any, keep_last: int | None = None) -> Iterator[list[Tensor | None]]:
    """Capture post-RoPE queries of every attention module during the forward passes in the block.

    Yields a list with one slot per layer; after a forward each slot holds (q_heads, n, head_dim)
    for the last `keep_last` positions of that forward (all when None), batch element 0.
    """
    modules = attention_modules(model)
    captured: list[Tensor | None] = [None] * len(modules)
    handles = []

    def make_hook(layer: int, attn: Any) -> Callable[..., None]:
        rotate = _rotary_fn(attn)

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            if keep_last is not None:
                hidden, cos, sin = hidden[:, -keep_last:], cos[:, -keep_last:], sin[:, -keep_last:]
            head_dim = module.head_dim
            q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, head_dim)  # (B, n, Hq, D)
            if hasattr(module, "q_norm"):
                q = module.q_norm(q)
            q = q.transpose(1, 2)  # (B, Hq, n, D)
            q, _ = rotate(q, q, cos, sin)
            captured[layer] = q[0].detach()

        return hook

    for layer, attn in enumerate(modules):
        handles.append(attn.register_forward_pre_hook(make_hook(layer, attn), with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _layer_kv(cache: Any, layer: int) -> tuple[Tensor, Tensor]:
    entry = cache.layers[layer]
    return entry.keys, entry.values


def kv_from_cache(cache: Any, length: int) -> ContextKV:
    """Per-layer (kv_heads, T, head_dim) tensors of the first `length` cached positions, batch element 0."""
    keys, values = [], []
    for layer in range(len(cache.layers)):
        k, v = _layer_kv(cache, layer)
        keys.append(k[0, :, :length].contiguous())
        values.append(v[0, :, :length].contiguous())
    positions = [torch.arange(length, device=keys[0].device) for _ in keys]
    return ContextKV(keys, values, positions, length)


def prefill(
    model: Any,
    context_ids: Tensor,
    question_ids: Tensor | None = None,
    observe: Observe = Observe.NONE,
    window: int = 32,
    question_rows: tuple[int, int] | None = None,
) -> Prefill:
    """Run the context through the model once and extract its KV cache.

    With `observe`, also capture the queries a selector needs: the question's
    (run after the context at positions T, T+1, ...; the question's KV is then
    discarded), the last `window` context positions', or all of them.
    `question_rows` (start, end) restricts the question observation to those
    rows of `question_ids` (the question's own words, not the chat template).
    """
    kv, observations = prefill_observations(
        model, context_ids, question_ids, (observe,), window, question_rows
    )
    return Prefill(
        kv=kv,
        observation=observations[observe],
        context_ids=context_ids.reshape(-1),
        question_ids=None if question_ids is None else question_ids.reshape(-1),
    )


_CACHE_PARAM: dict[type[Any], str] = {}  # model class -> the keyword its forward takes the cache under


def cache_arg(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword under which `model`'s forward takes a KV cache, bound to `cache`.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40);
    earlier versions, and models with their own forward, take `past_key_values`.
    """
    kind: type[Any] = type(model)
    if kind not in _CACHE_PARAM:
        params = inspect.signature(kind.forward).parameters
        _CACHE_PARAM[kind] = "cache" if "cache" in params else "past_key_values"
    return {_CACHE_PARAM[kind]: cache}


def build_cache(model: Any, kv: ContextKV) -> Any:
    """A transformers DynamicCache holding exactly the entries of `kv` (batch of one), in model dtype."""
    from transformers import DynamicCache

    param = next(model.parameters())
    cache = DynamicCache(config=model.config)
    for layer in range(kv.num_layers):
        k = kv.keys[layer].to(device=param.device, dtype=param.dtype)[None]
        v = kv.values[layer].to(device=param.device, dtype=param.dtype)[None]
        cache.update(k, v, layer)
    return cache


@torch.inference_mode()
def prefill_observations(
    model: Any,
    context_ids: Tensor,
    question_ids: Tensor | None = None,
    kinds: Collection[Observe] = (Observe.NONE,),
    window: int = 32,
    question_rows: tuple[int, int] | None = None,
) -> tuple[ContextKV, dict[Observe, Observation]]:
    """Read a context ONCE and capture what every selector in `kinds` needs.

    One forward over the context captures the post-RoPE queries of all its
    positions when Observe.ALL is asked for (or of the last `window` for
    Observe.WINDOW alone); Observe.QUESTION then runs the question after the
    context, as `prefill` does, and its KV is discarded. Each observation is
    the one `prefill(model, context_ids, question_ids, observe=kind, window)`
    would give (WINDOW is the last min(window, T) queries of the ALL capture).
    `question_rows` (start, end) keeps only those question rows as observers.
    Returns the context's KV (kv_heads, T, head_dim per layer) and one
    Observation per asked kind.
    """
    from transformers import DynamicCache

    kinds = set(kinds)
    device = next(model.parameters()).device
    ctx = context_ids.reshape(1, -1).to(device)
    length = int(ctx.shape[1])
    if length == 0:
        raise ValueError("the context is empty: nothing to prefill")
    if Observe.QUESTION in kinds and (question_ids is None or question_ids.numel() == 0):
        raise ValueError("Observe.QUESTION scores with the question's attention, but no question was given")
    n_window = min(window, length)
    capture: int | None = None if Observe.ALL in kinds else n_window
    cache = DynamicCache(config=model.config)
    positions = torch.arange(length, device=device)
    cache_kw = cache_arg(model, cache)

    def forward(ids: Tensor, pos: Tensor) -> None:  # extends `cache`; only the last logit is computed
        model(input_ids=ids, **cache_kw, use_cache=True, position_ids=pos[None], logits_to_keep=1)

    context_queries: list[Tensor | None] = []
    if kinds & {Observe.ALL, Observe.WINDOW}:
        with capture_queries(model, keep_last=capture) as captured:
            forward(ctx, positions)
        context_queries = list(captured)
    else:
        forward(ctx, positions)
    kv = kv_from_cache(cache, length)
    attn0 = attention_modules(model)[0]
    scale = float(getattr(attn0, "scaling", kv.head_dim**-0.5))

    def empty(kind: Observe) -> Observation:
        return Observation(kind=kind, length=length, scale=scale, num_layers=kv.num_layers)

    out: dict[Observe, Observation] = {}
    for kind in (Observe.ALL, Observe.WINDOW):
        if kind not in kinds:
            continue
        obs = empty(kind)
        n = length if kind is Observe.ALL else n_window
        qpos = positions[length - n :]
        for layer, q in enumerate(context_queries):
            assert q is not None
            obs.layers.append(
                LayerObservation(q[:, q.shape[1] - n :], qpos, kv.keys[layer], kv.positions[layer])
            )
        out[kind] = obs
    if Observe.QUESTION in kinds:
        assert question_ids is not None
        obs = empty(Observe.QUESTION)
        qids = question_ids.reshape(1, -1).to(device)
        qpos = torch.arange(length, length + qids.shape[1], device=device)
        with capture_queries(model) as captured:
            forward(qids, qpos)
        lo, hi = question_rows if question_rows is not None else (0, qids.shape[1])
        if not (0 <= lo < hi <= qids.shape[1]):
            raise ValueError(f"question_rows {question_rows!r} outside the {qids.shape[1]} question tokens")
        for layer, q in enumerate(captured):
            assert q is not None
            k, _ = _layer_kv(cache, layer)
            keys_pos = torch.arange(k.shape[2], device=device)
            obs.layers.append(LayerObservation(q[:, lo:hi], qpos[lo:hi], k[0], keys_pos))
        out[Observe.QUESTION] = obs
    if Observe.NONE in kinds:
        out[Observe.NONE] = empty(Observe.NONE)
    return kv, out
