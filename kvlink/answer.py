"""The receiver's answer: transformers' generate() over a KVLinkCache, with the asker's generation options.

    options = GenerationOptions(max_new_tokens=32)                                   # greedy, the default
    options = GenerationOptions(64, temperature=0.7, top_p=0.9, stop=("\\n",))       # sampling, a stop string
    answer = generate_answer(model, tokenizer, kv, question_ids, options, forward_lock=lock)

The context is wrapped in a fresh kvlink.hfcache.KVLinkCache per answer (the
received tensors are shared read-only, so answers about one context never see
each other's tokens) and continued at its ORIGINAL length T. Greedy answers are
kvlink.generate.greedy_answer's token for token (the reference the tests
compare against): same EOS ids, and nothing of the checkpoint's own sampling
defaults (its generation_config.json: temperature, top-k, repetition penalty,
...) is applied; every common knob is set from the options.

Two properties of the receiver's answer loop hold here too:
- turns: `forward_lock`, when given, is held around each model forward and
  released between them (forward hooks on the model that take the calling
  thread's lock: see `turns`), so answers sharing a model take turns forward by
  forward, however generate() drives them;
- bounded forwards: a question longer than `prefill_chunk` tokens is prefilled
  in forwards of at most that many tokens (generate()'s `prefill_chunk_size`),
  so no forward's attention mask grows past (prefill_chunk, cached + question).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kvlink.cache import ContextKV
from kvlink.generate import Answer, _eos_ids

MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
FINISH_REASONS = ("eos", "stop", "length")
"""Why an answer ended: the model's end-of-sequence token, one of the stop strings, or max_new_tokens."""


@dataclass(frozen=True)
class GenerationOptions:
    """How to answer: at most `max_new_tokens` tokens, greedy when `temperature` is 0 (the default), else
    sampled at that temperature from the smallest set of tokens whose probability reaches `top_p`; the
    answer ends after the first of the `stop` strings it produces (the string is part of it)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(
                f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0: greedy), got {self.temperature!r}"
            )
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_p < 1 and self.greedy:
            raise ValueError(f"top_p {self.top_p!r} needs sampling: give a temperature > 0 too")
        stop = tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"a stop string must be non-empty text, got {s!r}")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters, got {len(s)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def clamped(self, max_new_tokens: int) -> GenerationOptions:
        """These options with at most `max_new_tokens` new tokens."""
        if self.max_new_tokens <= max_new_tokens:
            return self
        return GenerationOptions(max_new_tokens, self.temperature, self.top_p, self.stop)

    def generation_config(
        self, eos: list[int], pad: int | None, prefill_chunk: int | None = None, keep_logits: bool = False
    ) -> Any:
        """A transformers GenerationConfig that sets every common knob, so that a checkpoint's own
        defaults do not apply: greedy, or temperature + top-p sampling (no top-k), nothing else."""
        from transformers import GenerationConfig

        # Greedy decoding reads no sampling knob, but transformers warns about any that differs from its
        # defaults: greedy sets them to those (a checkpoint's would otherwise come in), sampling to ours.
        sampling: dict[str, Any] = dict(
            temperature=1.0, top_p=1.0, top_k=50, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0
        )
        if not self.greedy:
            sampling.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, min_new_tokens=0, do_sample=not self.greedy, **sampling,
            repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
            encoder_no_repeat_ngram_size=0, length_penalty=1.0, num_beams=1, num_return_sequences=1,
            renormalize_logits=False, remove_invalid_values=False, guidance_scale=1.0,
            stop_strings=list(self.stop) or None, eos_token_id=eos, pad_token_id=pad, use_cache=True,
            prefill_chunk_size=prefill_chunk, return_dict_in_generate=True, output_logits=keep_logits,
        )  # fmt: skip


class _Turns:
    """A forward pre-hook and a forward hook (always called, errors included) on one model that take
    and release the lock the calling thread registered with `holding`, if any. Threads that registered
    none run their forwards untouched."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._local = threading.local()
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._exit, always_call=True)

    def _enter(self, module: Any, args: Any) -> None:
        lock = getattr(self._local, "lock", None)
        if lock is not None and not getattr(self._local, "held", False):
            lock.__enter__()
            self._local.held = True

    def _exit(self, module: Any, args: Any, output: Any) -> None:
        if getattr(self._local, "held", False):
            self._local.held = False
            self._local.lock.__exit__(None, None, None)

    @contextlib.contextmanager
    def holding(self, lock: AbstractContextManager[Any] | None) -> Iterator[None]:
        """Within this block, each forward of the model on this thread holds `lock`."""
        previous = getattr(self._local, "lock", None)
        self._local.lock = lock
        try:
            yield
        finally:
            self._local.lock = previous


_TURNS: weakref.WeakKeyDictionary[torch.nn.Module, _Turns] = weakref.WeakKeyDictionary()
_TURNS_LOCK = threading.Lock()


def turns(model: torch.nn.Module) -> _Turns:
    """The model's turn hooks, installed once: `with turns(model).holding(lock): ...`."""
    with _TURNS_LOCK:
        found = _TURNS.get(model)
        if found is None:
            found = _TURNS[model] = _Turns(model)
        return found


class _FirstToken:
    """A generate() streamer that only notes when the first new token arrives (its first put is the
    prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.at: float | None = None

    def put(self, value: Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


@dataclass
class GeneratedAnswer(Answer):
    """An Answer, and why it ended (one of FINISH_REASONS)."""

    finish_reason: str = "length"


def _pad_id(model: Any, tokenizer: Any, eos: list[int]) -> int | None:
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        pad = getattr(source, "pad_token_id", None) if source is not None else None
        if isinstance(pad, int):
            return pad
    return eos[0] if eos else None


def finish_reason(text: str, tokens: list[int], eos: set[int], options: GenerationOptions) -> str:
    """Why an answer ended: one of FINISH_REASONS ("eos", "stop" or "length")."""
    if tokens and tokens[-1] in eos:
        return "eos"
    if options.stop and any(s in text for s in options.stop):
        return "stop"
    return "length"


@torch.inference_mode()
def generate_answer(
    model: Any,
    tokenizer: Any,
    kv: ContextKV,
    question_ids: Tensor,
    options: GenerationOptions | None = None,
    *,
    prefill_chunk: int = 512,
    forward_lock: AbstractContextManager[Any] | None = None,
    keep_logits: bool = False,
) -> GeneratedAnswer:
    """Answer `question_ids` (Q,) from the cached context `kv` alone, with model.generate().

    options: GenerationOptions (default: greedy, 32 tokens). prefill_chunk: the most question tokens
    one forward takes. forward_lock: held around each forward (see the module docstring).
    keep_logits: the answer's logits hold the (steps, vocab) logits of every step (else they are
    empty, and prompt_logits too). timings: build_cache_s, first_token_s, answer_s, cached_entries.
    Raises ValueError for a context the cache refuses
    (see kvlink.hfcache.KVLinkCache.from_context) or an empty question.
    """
    from kvlink.hfcache import KVLinkCache

    options = options or GenerationOptions()
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk!r}")
    ids = question_ids.reshape(-1)
    if ids.numel() == 0:
        raise ValueError("the question is empty")
    started = time.perf_counter()
    cache = KVLinkCache.from_context(kv, model)
    build_s = time.perf_counter() - started
    eos = sorted(_eos_ids(model, tokenizer))
    chunk = prefill_chunk if ids.numel() > prefill_chunk else None
    config = options.generation_config(eos, _pad_id(model, tokenizer, eos), chunk, keep_logits)
    clock = _FirstToken()
    param = next(model.parameters())
    inputs = cache.inputs(ids.to(param.device))
    with turns(model).holding(forward_lock):
        out = model.generate(
            **inputs, generation_config=config, streamer=clock, tokenizer=tokenizer if options.stop else None
        )
    tokens = [int(t) for t in out.sequences[0, ids.numel() :].tolist()]
    eos_set = set(eos)
    text = (
        tokenizer.decode([t for t in tokens if t not in eos_set], skip_special_tokens=True)
        if tokenizer
        else ""
    )
    if keep_logits and out.logits:
        logits = torch.stack([step[0].float().cpu() for step in out.logits])  # (steps, vocab)
        prompt_logits = logits[0]
    else:
        logits = prompt_logits = torch.empty(0)
    reason = finish_reason(text, tokens, eos_set, options)
    timings = {
        "build_cache_s": build_s,
        "first_token_s": (clock.at or time.perf_counter()) - started,
        "answer_s": time.perf_counter() - started,
        "cached_entries": float(kv.kept(0)),
    }
    return GeneratedAnswer(tokens, text.strip(), logits, prompt_logits, timings, finish_reason=reason)
