"""The receiver's answer path: an explicit greedy decode loop over a rebuilt cache.

We never let `generate()` infer positions from the cache length: after
selection the cache holds N < T entries, but the question must continue at
the ORIGINAL context length T. Each step passes explicit `position_ids`,
`cache_position` and a 4-D attention mask built from the positions of what
is actually cached, so attention covers exactly the kept entries.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kvlink.cache import ContextKV, build_cache, cache_arg


@dataclass
class Answer:
    """Greedy answer tokens, their text, and the logits that chose each token."""

    token_ids: list[int]
    text: str
    logits: Tensor  # (n_steps, vocab), float32, row i chose token_ids[i]
    prompt_logits: Tensor  # (vocab,) logits after the last question token (= logits[0])
    timings: dict[str, float] = field(default_factory=dict)


def attention_mask(
    key_positions: Tensor, query_positions: Tensor, dtype: torch.dtype, sliding_window: int | None = None
) -> Tensor:
    """Additive mask (1, 1, n_queries, n_keys): 0 where the key's position <= the query's, else -inf-ish.

    Positions are ORIGINAL positions, so the mask is right however many keys were dropped.
    """
    allowed = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        allowed &= (query_positions[:, None] - key_positions[None, :]) < sliding_window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_positions.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _answer_cache(model: Any, kv: ContextKV) -> Any:
    """The cache an answer runs over: a KVLinkCache that shares `kv`'s tensors and keeps what the
    answer appends apart, so the receiver holds ONE copy of a context however long it answers from it
    (a DynamicCache copies the context in and then grows a second copy: twice the decoded size at
    every answer). Where a KVLinkCache does not apply (layers keeping different counts), a DynamicCache.
    Both present attention [kept context | appended] in that order, so the explicit mask is the same."""
    from kvlink.hfcache import KVLinkCache

    try:
        return KVLinkCache.from_context(kv, model)
    except ValueError:
        return build_cache(model, kv)


@torch.inference_mode()
def greedy_answer(
    model: Any,
    tokenizer: Any,
    kv: ContextKV,
    question_ids: Tensor,
    max_new_tokens: int = 32,
    stop_at_eos: bool = True,
    mask_out: Tensor | None = None,
    prefill_chunk: int = 512,
    forward_lock: AbstractContextManager[Any] | None = None,
) -> Answer:
    """Answer `question_ids` from the cached context `kv` alone, greedily.

    The question and answer tokens take positions T, T+1, ... where T =
    `kv.length`. All layers must keep the same positions for the shared mask,
    unless the model has no sliding window (then any per-layer set works: all
    cached context entries precede the question). `mask_out` (positions) hides
    cached entries from attention without removing them: the reference that
    eviction must match. A question longer than `prefill_chunk` tokens is
    prefilled in forwards of that many, so its mask is at most
    (prefill_chunk, cached + question) and no forward runs long. `forward_lock`,
    when given, is held around each forward (and released between them), so that
    answers sharing a model take turns step by step instead of answer by answer.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk!r}")
    if question_ids.numel() == 0:
        raise ValueError("the question is empty")
    started = time.perf_counter()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    window = _sliding_window(model.config)
    if window is not None and kv.length + question_ids.numel() + max_new_tokens > window:
        raise ValueError(
            f"context of {kv.length} tokens plus question and answer exceeds the model's sliding window "
            f"({window}); sliding-window attention over a transferred cache is not supported"
        )
    cache = _answer_cache(model, kv)
    key_positions = kv.positions[0].to(device)
    if mask_out is not None:
        # Hidden entries get a position no query reaches.
        hidden = torch.isin(key_positions, mask_out.to(device))
        key_positions = torch.where(hidden, torch.iinfo(torch.int64).max, key_positions)
    n_cached = int(key_positions.numel())
    build_s = time.perf_counter() - started

    eos = _eos_ids(model, tokenizer) if stop_at_eos else set()
    ids = question_ids.reshape(1, -1).to(device)
    next_pos = kv.length
    tokens: list[int] = []
    step_logits: list[Tensor] = []
    first_token_s = 0.0
    cache_kw = cache_arg(model, cache)
    turn = forward_lock if forward_lock is not None else nullcontext()
    for step in range(max_new_tokens):
        for start in range(0, ids.shape[1], prefill_chunk):  # one forward, but for a long question
            piece = ids[:, start : start + prefill_chunk]
            n = piece.shape[1]
            query_positions = torch.arange(next_pos, next_pos + n, device=device)
            key_positions = torch.cat([key_positions, query_positions])
            mask = attention_mask(key_positions, query_positions, dtype, window)
            with turn:
                out = model(
                    input_ids=piece,
                    **cache_kw,
                    use_cache=True,
                    position_ids=query_positions[None],
                    cache_position=query_positions,
                    attention_mask=mask,
                    # Only the last forward's logits are used; the earlier ones of a long question need none.
                    **({} if start + n == ids.shape[1] else {"logits_to_keep": 1}),
                )
            next_pos += n
        logits = out.logits[0, -1].float()
        token = int(torch.argmax(logits))
        step_logits.append(logits.cpu())
        tokens.append(token)
        if step == 0:
            first_token_s = time.perf_counter() - started
        if token in eos:
            break
        ids = torch.tensor([[token]], device=device)
    text = (
        tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True) if tokenizer else ""
    )
    logits_t = torch.stack(step_logits)
    timings = {
        "build_cache_s": build_s,
        "first_token_s": first_token_s,
        "answer_s": time.perf_counter() - started,
        "cached_entries": float(n_cached),
    }
    return Answer(tokens, text.strip(), logits_t, logits_t[0], timings)


@torch.inference_mode()
def teacher_forced_logits(model: Any, kv: ContextKV, question_ids: Tensor, answer_ids: list[int]) -> Tensor:
    """Logits (len(answer_ids), vocab) predicting each answer token given the cache, question and prefix.

    One forward over question + answer[:-1] at positions T, T+1, ...; row i predicts answer_ids[i].
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    cache = build_cache(model, kv)
    q = question_ids.reshape(-1).to(device)
    seq = torch.cat([q, torch.tensor(answer_ids[:-1], dtype=q.dtype, device=device)]) if answer_ids else q
    query_positions = torch.arange(kv.length, kv.length + seq.numel(), device=device)
    key_positions = torch.cat([kv.positions[0].to(device), query_positions])
    mask = attention_mask(key_positions, query_positions, dtype, _sliding_window(model.config))
    out = model(
        input_ids=seq[None],
        **cache_arg(model, cache),
        use_cache=True,
        position_ids=query_positions[None],
        cache_position=query_positions,
        attention_mask=mask,
    )
    start = q.numel() - 1
    return out.logits[0, start : start + len(answer_ids)].float().cpu()  # type: ignore[no-any-return]
