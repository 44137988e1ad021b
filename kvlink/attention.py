"""Attention for a text segment recomputed after its cached prefix, without a (segment x context) mask.

A receiver recomputes a text segment of n tokens after the k cached entries of the segments before it
(kvlink.stream.recompute). Every cached entry precedes the segment, so each new token sees all k of them
and the new tokens up to itself: causal attention aligned to the lower right of the (n, k + n) score
matrix. Hugging Face's "sdpa" path cannot say that: with n < k + n queries it builds an explicit
(n, k + n) mask, and PyTorch then runs a kernel that reads the mask instead of flash attention
(bench/results/recompute-profile-h100: 211 of 365 ms of a 4k segment after 28k tokens went there).

IMPLEMENTATION is "sdpa" with one addition: a forward given PREFIX_CAUSAL=True runs each layer's
attention with torch's lower-right causal bias (flash attention on CUDA), ignoring the mask
Transformers built. Any other call is Hugging Face's sdpa_attention_forward unchanged. Models that
kvlink loads use it (use_prefix_attention); a model that does not is recomputed through its mask as
before (prefix_causal_ok).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

IMPLEMENTATION = "kvlink_sdpa"
PREFIX_CAUSAL = "kvlink_prefix_causal"


def _forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """AttentionInterface entry: (batch, heads, q, d) tensors in, (batch, q, heads, d) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.pop(PREFIX_CAUSAL, False):
        return prefix_causal(query, key, value, scaling), None
    return sdpa_attention_forward(  # type: ignore[no-any-return]
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def prefix_causal(query: Tensor, key: Tensor, value: Tensor, scaling: float | None = None) -> Tensor:
    """Attention of the last q of k keys' positions: query i sees keys 0 .. k - q + i.

    query (batch, heads, q, d); key, value (batch, kv_heads, k, d), heads a multiple of kv_heads.
    Returns (batch, q, heads, d)."""
    from torch.nn.attention.bias import causal_lower_right

    q, k = query.shape[2], key.shape[2]
    if k < q:
        raise ValueError(f"{q} queries after {k} keys: the keys must include the queries' own")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=causal_lower_right(q, k), scale=scaling
    )
    return out.transpose(1, 2).contiguous()


def register() -> None:
    """Make IMPLEMENTATION known to Transformers (its attention and its mask: sdpa's). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def use_prefix_attention(model: Any) -> bool:
    """Switch a model on "sdpa" to IMPLEMENTATION (the same attention for every call that does not ask
    for PREFIX_CAUSAL). Returns whether the model now uses it; models on another implementation keep it."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(model, "set_attn_implementation"):
        register()
        model.set_attn_implementation(IMPLEMENTATION)
    return prefix_causal_ok(model)


def prefix_causal_ok(model: Any, length: int | None = None) -> bool:
    """Whether a forward of `model` may ask for PREFIX_CAUSAL: the model uses IMPLEMENTATION and no
    sliding window applies (none, or none shorter than `length`: the positions the prefix and the
    segment span)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != IMPLEMENTATION:
        return False
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return True
    return length is not None and length <= int(window)
