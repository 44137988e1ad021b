"""Quality metrics of a compressed KV cache against the full-KV FP16 reference on the same inputs.

Per (example, config), all against the REFERENCE: the full context KV sent at
FP16 (the `fp16` config: every position, no quantization), decoded and
answered exactly like any other config:

- `f1`, `em`: SQuAD F1 / exact match of the greedy answer against the gold answers
  (`ref_f1`, `ref_em`: the reference's; summaries report F1 as % of the reference's).
- `fidelity`: token F1 of the answer against the reference answer (SQuAD
  normalization); `agree`: the two answers are equal after normalization.
- `kl`: mean over the steps of the reference answer of KL(p_ref || p_config),
  the next-token distributions teacher-forced along the reference answer (nats).
- `nll_gold`: mean per-token NLL of the first gold answer, teacher-forced after the question (nats).
- `ppl`: perplexity of a held-out continuation: the context's raw tokens are cut
  in two; the first half (at most `ppl_prefix` tokens) is prefilled and compressed,
  and the next tokens (at most `ppl_tokens`) are teacher-forced after it. The first
  continuation token is the prompt (the receiver has no logits before it), so the
  perplexity is over the continuation's tokens 2..n.
- `needle`: 1 if the needle's number appears in the answer (needle task only).
- Reconstruction of K and V separately (`k_*`, `v_*`), decoded vs original, in float32:
  `rel_err` = ||X_hat - X||_F / ||X||_F over the KEPT positions only; `cos` = mean
  cosine similarity of the head_dim vectors over layers, heads and kept positions;
  `energy` = ||X[kept]||^2 / ||X||^2, the share of the full cache's energy that was
  sent; `rel_err_all` counts dropped positions as reconstructed by zeros:
  sqrt((||X_hat - X||^2_kept + ||X||^2_dropped) / ||X||^2). Selection shows up in
  `energy`/`rel_err_all`, quantization and low rank in `rel_err`/`cos`; set against
  `fidelity` they show where reconstruction error and task quality disagree.

`batched_answers` runs many caches of ONE context in one batch: each config's
kept entries are padded to the longest and masked out, so one forward per step
serves every config (the per-row result is `generate.greedy_answer`'s, to float
tolerance). Several teacher-forced continuations share that batch's first
forward: they follow the question side by side at the same positions, each
masked from the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kvlink.cache import ContextKV, cache_arg
from kvlink.eval.tasks import needle_found
from kvlink.generate import _eos_ids, _sliding_window
from kvlink.scoring import best_scores, exact_match, f1_score

_HIDDEN = torch.iinfo(torch.int64).max  # position of a padding slot: no query ever reaches it


# --- answer metrics ---------------------------------------------------------------
def answer_fidelity(answer: str, reference: str) -> float:
    """Token F1 of `answer` against the full-KV answer (1.0 when both normalize to empty)."""
    return f1_score(answer, reference)


def agreement(answer: str, reference: str) -> float:
    """1.0 when the answers are equal after SQuAD normalization."""
    return exact_match(answer, reference)


def gold_scores(answer: str, golds: Sequence[str]) -> tuple[float, float]:
    """(F1, EM) against the best-matching gold answer."""
    return best_scores(answer, tuple(golds))


def needle_accuracy(answer: str, number: str | None) -> float | None:
    return None if number is None else float(needle_found(answer, number))


# --- distribution metrics -------------------------------------------------------------
def mean_kl(reference_logits: Tensor, logits: Tensor) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(logits)), nats; rows (n, vocab); 0 rows -> 0."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    if reference_logits.shape[0] == 0:
        return 0.0
    log_p = F.log_softmax(reference_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float().to(log_p.device), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (n,)
    return float(kl.clamp_min(0.0).mean())


def mean_nll(logits: Tensor, targets: Sequence[int]) -> float:
    """Mean negative log-likelihood (nats) of `targets` under `logits` (len(targets), vocab)."""
    if len(targets) == 0:
        return float("nan")
    if logits.shape[0] != len(targets):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(targets)} targets")
    target = torch.tensor(list(targets), device=logits.device)
    return float(F.cross_entropy(logits.float(), target, reduction="mean"))


def perplexity(nll: float) -> float:
    return math.exp(nll) if math.isfinite(nll) else float("nan")


# --- reconstruction ------------------------------------------------------------------
def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last dim; two zero vectors count as identical (1), one zero as 0."""
    dot = (a * b).sum(dim=-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    both_zero = (a.abs().amax(dim=-1) == 0) & (b.abs().amax(dim=-1) == 0)
    cos = torch.where(norms > 0, dot / norms.clamp_min(1e-30), torch.zeros_like(dot))
    return torch.where(both_zero, torch.ones_like(cos), cos)


def reconstruction(original: ContextKV, decoded: ContextKV) -> dict[str, float]:
    """k_/v_ rel_err, cos, energy, rel_err_all of `decoded` against the full `original` (see module doc).

    `original` holds every context position (positions 0..T-1); `decoded` the kept ones.
    """
    if original.length != decoded.length or original.num_layers != decoded.num_layers:
        raise ValueError("original and decoded caches describe different contexts")
    if original.kept(0) != original.length:
        raise ValueError("the original cache must hold every position 0..T-1")
    out: dict[str, float] = {}
    for kind in ("k", "v"):
        # Sums stay on the device (float64): one host sync per kind, not four per layer.
        sums = torch.zeros(4, dtype=torch.float64, device=original.keys[0].device)  # err, kept, total, cos
        count = 0
        for layer in range(original.num_layers):
            full = (original.keys if kind == "k" else original.values)[layer].float()  # (H, T, D)
            x_hat = (decoded.keys if kind == "k" else decoded.values)[layer].float().to(full.device)
            idx = decoded.positions[layer].to(full.device)
            x = full.index_select(1, idx)  # (H, n_kept, D)
            sums += torch.stack(
                [
                    (x_hat - x).pow(2).sum(dtype=torch.float64),
                    x.pow(2).sum(dtype=torch.float64),
                    full.pow(2).sum(dtype=torch.float64),
                    _cosine(x_hat, x).sum(dtype=torch.float64),
                ]
            )
            count += int(x.shape[0] * x.shape[1])
        err, kept, total, cos_sum = sums.tolist()
        out[f"{kind}_rel_err"] = math.sqrt(err / kept) if kept > 0 else 0.0
        out[f"{kind}_cos"] = cos_sum / count if count else 1.0
        out[f"{kind}_energy"] = kept / total if total > 0 else 1.0
        out[f"{kind}_rel_err_all"] = math.sqrt((err + max(total - kept, 0.0)) / total) if total > 0 else 0.0
    return out


# --- batched decoding ------------------------------------------------------------------
@dataclass
class BatchOutput:
    """Per row: greedy answer tokens (EOS included when hit) and, per forced continuation, logits.

    forced[i]: (rows, len(continuations[i]), vocab) float32 on the model's device; row r, step j
    predicts continuations[i][j] after the question and continuations[i][:j].
    """

    tokens: list[list[int]]
    forced: list[Tensor]


def _mask(key_positions: Tensor, query_positions: Tensor, dtype: torch.dtype, window: int | None) -> Tensor:
    """Additive mask (B, 1, n_queries, n_keys) from per-row key positions (B, K) and query positions (B, Q)."""
    allowed = key_positions[:, None, :] <= query_positions[:, :, None]
    if window is not None:
        allowed &= (query_positions[:, :, None] - key_positions[:, None, :]) < window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_positions.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _padded_cache(model: Any, kvs: Sequence[ContextKV]) -> tuple[Any, Tensor]:
    """A DynamicCache of batch len(kvs) (entries padded to the longest) and key positions (B, N)."""
    from transformers import DynamicCache

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    counts = [kv.kept(0) for kv in kvs]
    n = max(counts)
    first = kvs[0]
    cache = DynamicCache(config=model.config)
    for layer in range(first.num_layers):
        shape = (len(kvs), first.kv_heads, n, first.head_dim)
        keys = torch.zeros(shape, dtype=dtype, device=device)
        values = torch.zeros(shape, dtype=dtype, device=device)
        for row, kv in enumerate(kvs):
            if kv.kept(layer) != counts[row]:
                raise ValueError("batched decoding needs the same kept count in every layer of a cache")
            keys[row, :, : counts[row]] = kv.keys[layer].to(device=device, dtype=dtype)
            values[row, :, : counts[row]] = kv.values[layer].to(device=device, dtype=dtype)
        cache.update(keys, values, layer)
    positions = torch.full((len(kvs), n), _HIDDEN, dtype=torch.long, device=device)
    for row, kv in enumerate(kvs):
        # All cached context precedes the question, so layer 0's positions serve every layer's mask.
        positions[row, : counts[row]] = kv.positions[0].to(device)
    return cache, positions


def _truncate(cache: Any, n: int) -> None:
    """Keep the first `n` entries of every layer (DynamicCache.crop's argument differs across versions)."""
    for layer in cache.layers:
        layer.keys = layer.keys[..., :n, :]
        layer.values = layer.values[..., :n, :]


@torch.inference_mode()
def batched_answers(
    model: Any,
    tokenizer: Any,
    kvs: Sequence[ContextKV],
    question_ids: Tensor,
    continuations: Sequence[Sequence[int]] = (),
    max_new_tokens: int = 16,
) -> BatchOutput:
    """Greedy answers of `question_ids` from each cache in `kvs` (caches of ONE context), plus the
    teacher-forced logits of each continuation, in one batch.

    The question and answers take positions T, T+1, ... (T = the ORIGINAL context length).
    Forward 1 runs [question, continuation 1[:-1], continuation 2[:-1], ...]: every continuation
    sits at positions T+Q, T+Q+1, ... and sees the context, the question and its own prefix
    only. Its last question row gives the first greedy token; the continuation entries are
    then cropped from the cache and greedy decoding goes on one token per forward.
    `max_new_tokens=0` computes the forced logits only.
    """
    if not kvs:
        raise ValueError("batched_answers needs at least one cache")
    if question_ids.numel() == 0:
        raise ValueError("the question is empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}")
    length = kvs[0].length
    if any(kv.length != length for kv in kvs):
        raise ValueError("batched caches must come from one context (same original length T)")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    window = _sliding_window(model.config)
    longest = max([max_new_tokens, *(len(c) for c in continuations)])
    if window is not None and length + question_ids.numel() + longest > window:
        raise ValueError(
            f"context of {length} tokens plus question and answer exceeds the model's sliding window ({window})"
        )
    rows = len(kvs)
    cache, key_positions = _padded_cache(model, kvs)
    n_cached = int(key_positions.shape[1])

    q = question_ids.reshape(-1).to(device)
    n_q = int(q.numel())
    pieces, positions, segments = [q], [torch.arange(length, length + n_q, device=device)], [0]
    seg_of = [torch.zeros(n_q, dtype=torch.long, device=device)]
    starts: list[int] = []
    offset = n_q
    for i, cont in enumerate(continuations, start=1):
        body = torch.tensor(list(cont[:-1]), dtype=q.dtype, device=device)
        starts.append(offset)
        pieces.append(body)
        positions.append(torch.arange(length + n_q, length + n_q + body.numel(), device=device))
        seg_of.append(torch.full((body.numel(),), i, dtype=torch.long, device=device))
        segments.append(i)
        offset += int(body.numel())
    seq = torch.cat(pieces)  # (L,)
    pos = torch.cat(positions)  # (L,)
    seg = torch.cat(seg_of)  # (L,)
    # Cached context: by position. New tokens: causal by position, within the question or own segment.
    ctx_mask = _mask(key_positions, pos[None].expand(rows, -1), dtype, window)  # (B, 1, L, N)
    own = (seg[None, :] == 0) | (seg[None, :] == seg[:, None])  # (L, L)
    causal = pos[None, :] <= pos[:, None]
    if window is not None:
        causal &= (pos[:, None] - pos[None, :]) < window
    new_mask = torch.zeros((len(seq), len(seq)), dtype=dtype, device=device)
    new_mask.masked_fill_(~(own & causal), torch.finfo(dtype).min)
    mask = torch.cat([ctx_mask, new_mask[None, None].expand(rows, 1, -1, -1)], dim=-1)
    # Logits only where something is read: the last question row and each continuation's rows.
    keep = [n_q - 1] + [
        i for cont, start in zip(continuations, starts) for i in range(start, start + len(cont) - 1)
    ]
    cache_kw = cache_arg(model, cache)
    out = model(
        input_ids=seq[None].expand(rows, -1),
        **cache_kw,
        use_cache=True,
        position_ids=pos[None].expand(rows, -1),
        cache_position=pos,
        attention_mask=mask,
        logits_to_keep=torch.tensor(keep, device=device),
    )
    logits = out.logits  # (B, len(keep), V): row 0 is the last question token
    forced: list[Tensor] = []
    offset = 1
    for cont in continuations:
        n_body = max(len(cont) - 1, 0)
        idx = torch.tensor([0, *range(offset, offset + n_body)], device=device)[: len(cont)]
        forced.append(logits.index_select(1, idx).float())
        offset += n_body
    tokens: list[list[int]] = [[] for _ in range(rows)]
    if max_new_tokens == 0:
        return BatchOutput(tokens, forced)

    eos = _eos_ids(model, tokenizer)
    _truncate(cache, n_cached + n_q)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    next_token = logits[:, 0].float().argmax(dim=-1)  # (B,)
    del out, logits
    key_positions = torch.cat([key_positions, pos[:n_q][None].expand(rows, -1)], dim=1)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    history = []
    for step in range(max_new_tokens):
        history.append(next_token)
        done |= torch.isin(next_token, eos_t)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        p = length + n_q + step
        query = torch.full((rows, 1), p, dtype=torch.long, device=device)
        key_positions = torch.cat([key_positions, query], dim=1)
        step_out = model(
            logits_to_keep=1,
            input_ids=next_token[:, None],
            **cache_kw,
            use_cache=True,
            position_ids=query,
            cache_position=query[0],
            attention_mask=_mask(key_positions, query, dtype, window),
        )
        next_token = step_out.logits[:, -1].float().argmax(dim=-1)
    chosen = torch.stack(history, dim=1).tolist()  # (B, steps)
    for row in range(rows):
        for token in chosen[row]:
            tokens[row].append(int(token))
            if token in eos:
                break
    return BatchOutput(tokens, forced)


def answer_text(tokenizer: Any, model: Any, tokens: Sequence[int]) -> str:
    """The answer's text as `greedy_answer` gives it (EOS dropped, special tokens skipped, stripped)."""
    eos = _eos_ids(model, tokenizer)
    if tokenizer is None:
        return ""
    return str(tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)).strip()
