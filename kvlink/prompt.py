"""Split a QA prompt into a context part (prefilled by the sender) and a question part.

Both sides must tokenize exactly the same way: the sender prefills the
context ids and sends their KV; the receiver gets the question text and
tokenizes the question part itself. With a chat template, the context opens
the user turn and the question closes it and opens the assistant turn.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_MARK = "\x00KVLINK_SPLIT\x00"

SYSTEM = "You are a helpful assistant. Answer the question using the context. Reply with a short phrase."
CONTEXT_TEMPLATE = "Context:\n{context}"
QUESTION_TEMPLATE = "\n\nQuestion: {question}\nAnswer in a few words."


def _render(tokenizer: Any, user: str) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return f"{user}\nAnswer:"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def split_prompt(tokenizer: Any, context: str, question: str) -> tuple[str, str]:
    """(context_text, question_text) whose concatenation is the full prompt."""
    full = _render(
        tokenizer,
        CONTEXT_TEMPLATE.format(context=context) + _MARK + QUESTION_TEMPLATE.format(question=question),
    )
    head, _, tail = full.partition(_MARK)
    return head, tail


def encode_text(tokenizer: Any, text: str) -> Tensor:
    """Token ids of `text` as a 1-D int64 tensor, without special tokens added by the tokenizer."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def context_ids(tokenizer: Any, context: str) -> Tensor:
    """The sender's prefill ids for `context` (independent of the question)."""
    head, _ = split_prompt(tokenizer, context, "")
    return encode_text(tokenizer, head)


def question_ids(tokenizer: Any, question: str) -> Tensor:
    """The receiver's ids for the question part that follows the context."""
    _, tail = split_prompt(tokenizer, "", question)
    return encode_text(tokenizer, tail)


def question_rows(tokenizer: Any, question: str) -> tuple[int, int]:
    """(start, end) of the question's own words inside `question_ids(tokenizer, question)`.

    Q2C observes these rows only: the chat-template tokens around the question
    attend generically (mostly to the system prompt) and drown its signal.
    """
    _, tail = split_prompt(tokenizer, "", question)
    at = tail.find(question) if question else -1
    total = len(encode_text(tokenizer, tail))
    if at < 0 or total == 0:
        return (0, total)
    # The space before the question merges into its first token, so count tokens before it.
    start = len(encode_text(tokenizer, tail[:at].rstrip()))
    end = len(encode_text(tokenizer, tail[: at + len(question)]))
    start = min(start, total - 1)
    return (start, max(start + 1, min(end, total)))
