"""A transformers `Cache` over a received context, so that `model.generate()` answers from it.

`KVLinkCache.from_context(kv, model)` wraps a `ContextKV` (what the receiver
decoded: per layer keys and values (kv_heads, n_kept, head_dim) after RoPE,
`positions[l]` the ORIGINAL positions of the kept entries, `length` the
original context length T). It answers exactly as `kvlink.generate.greedy_answer`
(the reference) does, under `generate()` (greedy, sampling, streamers, stop
strings, batches) and under a plain forward.

Coordinates. The cache presents itself as holding T + A tokens, A being the
tokens appended after the context (question, then answer): `get_seq_length()`
is T + A, so a forward without `position_ids` puts its tokens at T + A, T + A
+ 1, ..., exactly where they would be had nothing been dropped.

Masks. transformers builds one mask per forward from two numbers the cache
gives, `get_mask_sizes(q) = (kv_length, kv_offset)`, and the query offset
`get_query_offset()` (= `get_seq_length()` = T + A): key column j stands at virtual index kv_offset + j and is
visible to the query at index T + A + i when its index is not greater (and its
column of the 2-D attention mask is 1). Attention sees [kept context | appended
tokens], so kv_length = n_kept + A + q and kv_offset = T - n_kept: the kept
entries sit at T - n_kept .. T - 1, before every question token as their
ORIGINAL positions are, and the appended tokens sit at T, T + 1, ..., their
original positions. Nothing of length T is materialized; the mask is
(batch, 1, q, n_kept + A + q). A model without a sliding window never needs
more than "every context entry precedes every question token", so any kept
set works in any layer; the kept sets may differ between layers, their sizes
may not (transformers shares one mask between the layers). The cache is not
compileable, so the mask is built in each forward from these sizes. Sliding-window
models are refused once context + question + answer exceed the window, as
`greedy_answer` refuses them.

generate(). transformers (5.25) derives `position_ids` from the cumulative sum
of the 2-D `attention_mask`, never from the cache when a mask exists, and it
always makes one. Continuing a cache with only new tokens therefore needs the
mask of the FULL sequence (T cached + the question), as for any transformers
cache; `KVLinkCache.inputs(question_ids, question_mask)` builds the arguments:

    cache = KVLinkCache.from_context(kv, model)
    out = model.generate(**cache.inputs(question_ids), max_new_tokens=32)

A question-only call without that mask would put the question at 0, 1, ...
(or cut it, believing input_ids to hold the T cached tokens too): the cache
refuses such a forward (ValueError) instead of answering wrongly. Only a
question at least T tokens long escapes: generate() then reads its first T
tokens as the cached ones, as it would with any cache. The positions check
reads the `position_ids` that transformers' attention modules hand to
`Cache.update` (Llama, Qwen2, Mistral do), once per forward.
Left-padded batches of questions work: pass their (batch, Q) mask to `inputs`.

Sharing. The context tensors are shared read-only: every cache built from one
`ContextKV` references the same tensors (no copy when dtype and device already
match), stores them once for the whole batch (batch 1, broadcast to every
row) and never writes to them. What a generation appends lives in the cache
object itself, per row, so one KVLinkCache serves one generate() call; build
another (cheap) for the next, or call `reset()` to drop what was appended.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from kvlink.cache import ContextKV, cache_arg
from kvlink.generate import _sliding_window
from kvlink.models import geometry_of

logger = logging.getLogger(__name__)

_MASK_HINT = (
    "generate() derives positions from the 2-D attention_mask: pass the mask of the whole sequence, "
    "e.g. model.generate(**cache.inputs(question_ids, question_mask), ...)"
)


class KVLinkLayer(CacheLayerMixin):
    """One layer of a KVLinkCache: the received context (shared, read-only) and what was appended.

    context_keys, context_values: (1, kv_heads, n_kept, head_dim), keys after RoPE, never written.
    positions: (n_kept,) int64, the ORIGINAL positions of the kept entries (sorted, < length).
    keys, values: (batch, kv_heads, appended, head_dim), the tokens appended after the context.
    length: the original context length T. window: the model's sliding window, if any.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    keys: Tensor  # never None here: empty (1, kv_heads, 0, head_dim) until something is appended
    values: Tensor

    def __init__(
        self,
        context_keys: Tensor,
        context_values: Tensor,
        positions: Tensor,
        length: int,
        window: int | None = None,
        check_positions: bool = False,
    ) -> None:
        super().__init__()
        self.context_keys = context_keys
        self.context_values = context_values
        self.positions = positions
        self.length = length
        self.window = window
        self.check_positions = check_positions  # one layer checks the positions of each forward
        self.device = context_keys.device
        self.is_initialized = True
        self.reset()

    def __repr__(self) -> str:
        return f"KVLinkLayer(kept={self.kept}, length={self.length}, appended={self.appended})"

    @property
    def kept(self) -> int:
        return int(self.context_keys.shape[-2])

    @property
    def appended(self) -> int:
        return int(self.keys.shape[-2])

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to do: the layer is built initialized, from the received context."""

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Append (batch, kv_heads, q, head_dim) new keys/values; return [context | appended] for attention.

        The context is broadcast to the batch for this call only; the returned tensors are
        (batch, kv_heads, n_kept + appended, head_dim), in the order `get_mask_sizes` describes.
        """
        q = int(key_states.shape[-2])
        self._check_window(q)
        if self.check_positions:
            self._check_positions(kwargs.get("kwargs"), q)
        if self.appended == 0:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        batch = int(self.keys.shape[0])
        keys = torch.cat([self.context_keys.expand(batch, -1, -1, -1), self.keys], dim=-2)
        values = torch.cat([self.context_values.expand(batch, -1, -1, -1), self.values], dim=-2)
        return keys, values

    def _check_window(self, q: int) -> None:
        total = self.length + self.appended + q
        if self.window is not None and total > self.window:
            raise ValueError(
                f"context of {self.length} tokens plus {self.appended + q} question and answer tokens exceeds "
                f"the model's sliding window ({self.window}); sliding-window attention over a transferred "
                "cache is not supported"
            )

    def _check_positions(self, forward_kwargs: Any, q: int) -> None:
        """Refuse new tokens placed inside the context (positions restarted at 0 or at n_kept)."""
        position_ids = forward_kwargs.get("position_ids") if isinstance(forward_kwargs, dict) else None
        if not isinstance(position_ids, Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != q:
            return
        # Each row's newest token is real (left padding puts pads first, at position 0), so it must
        # come after the context. Wrongly derived positions end before T.
        newest = int(position_ids[:, -1].min())
        if newest < self.length:
            raise ValueError(
                f"the new tokens end at position {newest}, inside the context of {self.length} tokens: "
                f"they must continue at {self.length + self.appended}; {_MASK_HINT}"
            )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) = (n_kept + appended + q, T - n_kept): see the module docstring."""
        if query_length < 1:
            # What generate() does when the mask covers the question only: it takes input_ids for the
            # whole sequence, and cuts the T tokens it believes cached off the front.
            raise ValueError(
                f"a forward over a KVLinkCache got {query_length!r} new tokens (generate() without the "
                f"mask of the whole sequence cuts {self.get_seq_length()} cached tokens off input_ids); {_MASK_HINT}"
            )
        return self.kept + self.appended + query_length, self.length - self.kept

    def get_seq_length(self) -> int:
        """T + appended: the length the sequence would have had with nothing dropped."""
        return self.length + self.appended

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Drop what was appended; the context stays."""
        self.keys = self.context_keys.new_empty(
            (1, self.context_keys.shape[1], 0, self.context_keys.shape[3])
        )
        self.values = self.context_values.new_empty(
            (1, self.context_values.shape[1], 0, self.context_values.shape[3])
        )

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` appended tokens (the context cannot be cropped)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove!r}")
        if -tokens_to_remove > self.appended:
            raise ValueError(
                f"cannot crop {-tokens_to_remove} tokens: only {self.appended} were appended to the context"
            )
        if tokens_to_remove:
            self.keys = self.keys[..., :tokens_to_remove, :]
            self.values = self.values[..., :tokens_to_remove, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.appended:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.appended:
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.appended:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))


class KVLinkCache(Cache):
    """A transformers Cache holding a received context at its ORIGINAL positions.

    One KVLinkLayer per model layer. Build it with `from_context`; see the module
    docstring for coordinates, masks, generate() and sharing.
    """

    layers: list[KVLinkLayer]  # type: ignore[assignment]

    def __init__(self, layers: list[KVLinkLayer], cache_keyword: str = "cache") -> None:
        if not layers:
            raise ValueError("a KVLinkCache needs at least one layer")
        super().__init__(layers=list(layers))  # type: ignore[arg-type]
        self.cache_keyword = cache_keyword

    @classmethod
    def from_context(cls, kv: ContextKV, model: Any) -> KVLinkCache:
        """Wrap `kv` for `model` (same geometry), in the model's dtype and on its device.

        Raises ValueError if the geometry differs from the model's, if the layers keep
        different numbers of entries, if positions are not sorted, unique and < kv.length,
        or if the context alone fills the model's sliding window.
        """
        config = model.config.get_text_config(decoder=True)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"{type(model).__name__} is an encoder-decoder model; only decoder-only LMs are supported"
            )
        layer_types = getattr(config, "layer_types", None) or []
        odd = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if odd:
            raise ValueError(f"layer types {odd!r} are not attention over a KV cache; unsupported model")
        geometry = geometry_of(config)
        got = (kv.num_layers, kv.kv_heads, kv.head_dim)
        want = (geometry.num_layers, geometry.kv_heads, geometry.head_dim)
        if got != want:
            raise ValueError(
                f"the context's (layers, kv_heads, head_dim) {got!r} is not the model's {want!r}"
            )
        counts = sorted({kv.kept(layer) for layer in range(kv.num_layers)})
        if len(counts) > 1:
            raise ValueError(
                f"layers keep different numbers of entries {counts!r}; transformers shares one mask between "
                "layers, so every layer must keep the same number (the sets may differ)"
            )
        window = _sliding_window(config)
        if window is not None and kv.length >= window:
            raise ValueError(
                f"context of {kv.length} tokens fills the model's sliding window ({window}); sliding-window "
                "attention over a transferred cache is not supported"
            )
        param = next(model.parameters())
        layers = []
        for layer in range(kv.num_layers):
            positions = kv.positions[layer].to(device=param.device, dtype=torch.long)
            if positions.numel() and (
                int(positions[0]) < 0
                or int(positions[-1]) >= kv.length
                or bool((positions[1:] <= positions[:-1]).any())
            ):
                raise ValueError(
                    f"layer {layer}: kept positions must be sorted, unique and in [0, {kv.length}), "
                    f"got {positions.tolist()!r}"
                )
            keys = kv.keys[layer].to(device=param.device, dtype=param.dtype)[None]  # (1, H, n, D)
            values = kv.values[layer].to(device=param.device, dtype=param.dtype)[None]
            layers.append(KVLinkLayer(keys, values, positions, kv.length, window, check_positions=layer == 0))
        (keyword,) = cache_arg(model, None)
        logger.debug("KVLinkCache: %d layers, %d of %d positions kept", kv.num_layers, counts[0], kv.length)
        return cls(layers, cache_keyword=keyword)

    @property
    def length(self) -> int:
        """The original context length T."""
        return self.layers[0].length

    @property
    def appended(self) -> int:
        """Tokens appended after the context so far (question and answer)."""
        return self.layers[0].appended

    def attention_mask(self, new_mask: Tensor) -> Tensor:
        """The 2-D mask of the whole sequence: (batch, T + appended + q), ones over what is cached.

        `new_mask` is (batch, q) or (q,), 1 for real tokens and 0 for (left) padding.
        """
        mask = new_mask.reshape(1, -1) if new_mask.dim() == 1 else new_mask
        if mask.dim() != 2:
            raise ValueError(f"new_mask must be (batch, q) or (q,), got shape {tuple(new_mask.shape)!r}")
        cached = torch.ones(
            (mask.shape[0], self.length + self.appended), dtype=mask.dtype, device=mask.device
        )
        return torch.cat([cached, mask], dim=1)

    def inputs(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Any]:
        """Keyword arguments for `model.generate` (or a forward) that continue after the context.

        input_ids: (batch, q) or (q,) question tokens, left-padded when rows differ in length;
        attention_mask: (batch, q), 1 for real tokens, all ones when None.
        Returns {"input_ids": (batch, q), "attention_mask": (batch, T + appended + q), <cache kw>: self}.
        """
        ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be (batch, q) with q >= 1, got shape {tuple(input_ids.shape)!r}"
            )
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = attention_mask.reshape(1, -1) if attention_mask.dim() == 1 else attention_mask
            if mask.shape != ids.shape:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)!r} does not match input_ids {tuple(ids.shape)!r}"
                )
        return {
            "input_ids": ids,
            "attention_mask": self.attention_mask(mask.to(ids.device)),
            self.cache_keyword: self,
        }
