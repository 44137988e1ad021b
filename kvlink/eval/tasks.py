"""Benchmark tasks: SQuAD QA, long-context QA over one article, and needle-in-a-haystack retrieval.

Every task yields `Example`s: a context the sender prefills, a question the
receiver asks, and gold answers. All tasks are deterministic (file order, or a
seed); none draws from a global random state.

Every builder takes a `split` (kvlink.eval.splits): "calibration" or
"evaluation" uses that split's articles only (questions, and every paragraph
of a long context or a needle's filler) and records it in `meta["split"]`;
None (the default) uses every article, as before the split existed.

- `squad_examples`: answerable questions of a SQuAD-format file (the shipped
  SQuAD v2 dev split by default), in file order.
- `long_examples`: for each answerable question, its paragraph among others
  up to a target length drawn in [min_tokens, max_tokens] (context-part tokens,
  prompt template included; default 2k-8k, LONG_TOKENS, within the embedded
  model's 8,192 positions with room for the question and answer); the
  question's paragraph sits at a seeded random place among them. The other
  paragraphs come from the question's own article first; with a split, when
  the article runs out, from the split's other articles (so every question
  reaches every length; `meta["articles"]` counts the articles used).
- `needle_examples`: filler made of SQuAD paragraphs (whole paragraphs, in a
  seeded order, of the split's articles) up to a target length, with "The
  secret code for <name> is <number>." inserted between two sentences at a
  seeded depth; the question asks for the code, and accuracy is whether the
  number appears in the answer.

Calibration contexts (`calibration_texts`) are paragraphs of the shipped file's
LAST article (`reserved_contexts`, Harvard_University, in the calibration
split); passing those as `exclude` removes every example that uses them, so a
calibrated projection is never evaluated on the text it was fitted on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from kvlink.eval import splits
from kvlink.eval.squad import QAExample, load_squad
from kvlink.prompt import context_ids, question_ids

TASKS: tuple[str, ...] = ("squad", "long", "needle")
# Context tokens of the long and needle tasks: 2k to 8k, leaving 256 of the embedded model's 8,192
# positions for the question and the answer.
LONG_TOKENS: tuple[int, int] = (2048, 8192 - 256)

NEEDLE_NAMES: tuple[str, ...] = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ines", "Jonas",
    "Kavya", "Lars", "Mireille", "Nikolai", "Olufemi", "Priya", "Quentin", "Rosa", "Sven", "Tamsin",
    "Ulrich", "Valentina", "Wojciech", "Ximena", "Yusuf", "Zofia",
)  # fmt: skip
NEEDLE_TEMPLATE = "The secret code for {name} is {number}."
NEEDLE_QUESTION = "What is the secret code for {name}?"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ATTEMPTS = 8


@dataclass(frozen=True)
class Example:
    """One benchmark item.

    eid: unique id "<task>:<id>". answers: gold answers (the needle's number for
    the needle task). needle: that number (None for QA tasks). meta: free-form
    facts about how the item was built (article, depth, target length ...).
    """

    eid: str
    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    title: str = ""
    needle: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def encode(self, tokenizer: Any) -> tuple[Tensor, Tensor]:
        """(context ids the sender prefills, question ids the receiver appends)."""
        return context_ids(tokenizer, self.context), question_ids(tokenizer, self.question)


def _from_qa(task: str, qa: QAExample, context: str | None = None, **meta: Any) -> Example:
    if meta.get("split") is None:
        meta.pop("split", None)
    return Example(
        eid=f"{task}:{qa.qid}",
        task=task,
        context=qa.context if context is None else context,
        question=qa.question,
        answers=qa.answers,
        title=qa.title,
        meta=dict(meta),
    )


def _questions(path: str | Path | None, split: str | None) -> list[QAExample]:
    """Answerable questions of the file, of `split`'s articles only when given."""
    return load_squad(path) if split is None else splits.load_split(split, path)


def squad_examples(
    path: str | Path | None = None,
    limit: int | None = None,
    exclude: Iterable[str] = (),
    split: str | None = None,
) -> list[Example]:
    """Answerable questions of a SQuAD-format file (of `split`'s articles), in file order, skipping
    contexts in `exclude`."""
    excluded = set(exclude)
    out = [_from_qa("squad", qa, split=split) for qa in _questions(path, split) if qa.context not in excluded]
    return out[:limit] if limit is not None else out


def _articles(path: str | Path | None, split: str | None = None) -> dict[str, list[str]]:
    """Title -> that article's paragraphs, in file order (each paragraph once); `split`'s articles only."""
    titles = None if split is None else set(splits.split_titles(split))
    if split is not None:
        splits.check_file(path)
    articles: dict[str, dict[str, None]] = {}
    for qa in load_squad(path, answerable_only=False):
        if titles is None or qa.title in titles:
            articles.setdefault(qa.title, {})[qa.context] = None  # a dict keeps first-seen order
    return {title: list(paragraphs) for title, paragraphs in articles.items()}


class _TokenCounter:
    """Cached token counts of paragraphs (the tokenizer is the slow part of building long contexts)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, int] = {}
        self.overhead = int(context_ids(tokenizer, "").numel())

    def __call__(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._cache[text] = n
        return n

    def context_tokens(self, text: str) -> int:
        return int(context_ids(self.tokenizer, text).numel())


def _check_range(min_tokens: int, max_tokens: int) -> None:
    if not (1 <= min_tokens <= max_tokens):
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens!r}, {max_tokens!r}")


def _fill(
    count: _TokenCounter,
    pieces: Sequence[str],
    fixed: str | None,
    target: int,
    max_tokens: int,
    rng: random.Random,
) -> tuple[list[str], int] | None:
    """Paragraphs from `pieces` (in order) plus `fixed` at a random place, joined by blank lines,
    whose context-part token count reaches `target` without exceeding `max_tokens`.

    Returns (paragraphs, index of `fixed` or -1), or None if the pieces cannot reach the target.
    """
    chosen: list[str] = []
    total = count.overhead + (count(fixed) + 2 if fixed is not None else 0)
    for piece in pieces:
        if total >= target:
            break
        n = count(piece) + 2  # the "\n\n" separator is a token or two
        if total + n > max_tokens:
            continue
        chosen.append(piece)
        total += n
    if total < target:
        return None
    if fixed is None:
        return chosen, -1
    where = rng.randint(0, len(chosen))
    chosen.insert(where, fixed)
    return chosen, where


def long_examples(
    tokenizer: Any,
    path: str | Path | None = None,
    limit: int | None = None,
    min_tokens: int = LONG_TOKENS[0],
    max_tokens: int = LONG_TOKENS[1],
    seed: int = 0,
    exclude: Iterable[str] = (),
    split: str | None = None,
) -> list[Example]:
    """Long-context QA: each answerable question's paragraph among others of its article (and split).

    The context-part token count (prompt template included) lies in
    [min_tokens, max_tokens]: a target is drawn per question from a generator
    seeded by (seed, question id), paragraphs of the same article (other than
    the question's and those in `exclude`) are added in a seeded order until
    the target is reached, and the question's paragraph is put at a seeded
    position. With a `split`, only its questions are asked, and when the
    question's article runs out, paragraphs of the split's other articles
    (in a seeded order) follow; without one, questions whose article is too
    short are skipped.
    """
    _check_range(min_tokens, max_tokens)
    excluded = set(exclude)
    articles = _articles(path, split)
    count = _TokenCounter(tokenizer)
    out: list[Example] = []
    for qa in _questions(path, split):
        if limit is not None and len(out) >= limit:
            break
        if qa.context in excluded:
            continue
        others = [p for p in articles.get(qa.title, []) if p != qa.context and p not in excluded]
        foreign = (
            [p for title, ps in articles.items() if title != qa.title for p in ps if p not in excluded]
            if split is not None
            else []
        )
        # Token counts of joined paragraphs are estimates: redraw (deterministically) until in range.
        for attempt in range(_ATTEMPTS):
            rng = random.Random(f"long:{seed}:{qa.qid}" + (f":{attempt}" if attempt else ""))
            target = rng.randint(min_tokens, max_tokens)
            order = others[:]
            rng.shuffle(order)
            if foreign:
                rest = foreign[:]
                rng.shuffle(rest)
                order += rest
            filled = _fill(count, order, qa.context, target, max_tokens, rng)
            if filled is None:
                continue
            paragraphs, where = filled
            context = "\n\n".join(paragraphs)
            n = count.context_tokens(context)
            if min_tokens <= n <= max_tokens:
                break
        else:
            continue  # the article is too short (or too coarse) for this length range
        own = set(articles.get(qa.title, [])) | {qa.context}
        out.append(
            _from_qa(
                "long", qa, context, target_tokens=target, tokens=n, paragraphs=len(paragraphs), index=where,
                articles=1 + len(_titles_of(articles, paragraphs, own)),
                split=split,
            )
        )  # fmt: skip
    return out


def _titles_of(articles: dict[str, list[str]], paragraphs: Sequence[str], own: set[str]) -> set[str]:
    """Titles of the articles the paragraphs outside `own` come from."""
    where = {p: title for title, ps in articles.items() for p in ps}
    return {where[p] for p in paragraphs if p not in own and p in where}


def needle_examples(
    tokenizer: Any,
    n: int,
    seed: int = 0,
    path: str | Path | None = None,
    min_tokens: int = LONG_TOKENS[0],
    max_tokens: int = LONG_TOKENS[1],
    exclude: Iterable[str] = (),
    split: str | None = None,
) -> list[Example]:
    """`n` needle-in-a-haystack items generated from `seed` (same seed, same items).

    Item i draws, from a generator seeded by (seed, i): a name, a 5-digit
    number, a target length in [min_tokens, max_tokens], a depth in [0, 1], and
    a filler order over the SQuAD paragraphs (of `split`'s articles) not in
    `exclude`. The needle sentence is inserted at the sentence boundary nearest
    to `depth` of the filler's characters. Ids are `needle:<split>:<seed>-<i>`
    (`needle:<seed>-<i>` without a split): the split of a result can be told from its id.
    """
    _check_range(min_tokens, max_tokens)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    excluded = set(exclude)
    paragraphs = [p for ps in _articles(path, split).values() for p in ps if p not in excluded]
    if not paragraphs:
        raise ValueError("no filler paragraphs left for the needle task")
    count = _TokenCounter(tokenizer)
    out: list[Example] = []
    for i in range(n):
        # Token counts of joined paragraphs are estimates: redraw (deterministically) until in range.
        for attempt in range(_ATTEMPTS):
            rng = random.Random(f"needle:{seed}:{i}" + (f":{attempt}" if attempt else ""))
            name = rng.choice(NEEDLE_NAMES)
            number = str(rng.randint(10000, 99999))
            target = rng.randint(min_tokens, max_tokens)
            depth = rng.random()
            order = paragraphs[:]
            rng.shuffle(order)
            needle = NEEDLE_TEMPLATE.format(name=name, number=number)
            room = max_tokens - count(needle) - 2
            filled = _fill(count, order, None, min(target, room), room, rng)
            if filled is None:
                continue
            context, offset = insert_at_depth("\n\n".join(filled[0]), needle, depth)
            tokens = count.context_tokens(context)
            if min_tokens <= tokens <= max_tokens:
                break
        else:
            raise ValueError(
                f"cannot build needle item {i} with {min_tokens}-{max_tokens} tokens from the filler"
            )
        out.append(
            Example(
                eid=splits.needle_eid(split, seed, i),
                task="needle",
                context=context,
                question=NEEDLE_QUESTION.format(name=name),
                answers=(number,),
                title="needle",
                needle=number,
                meta={
                    "seed": seed,
                    "index": i,
                    "name": name,
                    "depth": depth,
                    "char_offset": offset,
                    "target_tokens": target,
                    "tokens": tokens,
                    **({} if split is None else {"split": split}),
                },
            )
        )
    return out


def insert_at_depth(text: str, needle: str, depth: float) -> tuple[str, int]:
    """`text` with `needle` inserted at the sentence boundary closest to depth * len(text).

    Boundaries are the start, the end, and every whitespace run after ".", "!" or "?".
    Returns (new text, character offset of the needle).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    boundaries = [0, len(text)] + [m.end() for m in _SENTENCE_END.finditer(text)]
    where = min(boundaries, key=lambda b: (abs(b - depth * len(text)), b))
    before, after = text[:where].rstrip(), text[where:].lstrip()
    joined = " ".join(x for x in (before, needle) if x)
    offset = len(joined) - len(needle)
    return (joined + (" " + after if after else "")), offset


def needle_found(answer: str, number: str) -> bool:
    """Whether `number` appears in `answer` as a whole number (digits around it do not count)."""
    return re.search(rf"(?<!\d){re.escape(number)}(?!\d)", answer) is not None


def reserved_contexts() -> list[str]:
    """Every paragraph of the last article of the shipped SQuAD file: kept out of evaluation.

    Pass it as `exclude` to the task builders; `calibration_texts` draws from it.
    """
    articles = _articles(None)
    return articles[list(articles)[-1]]


def calibration_texts(limit: int = 16) -> list[str]:
    """The first `limit` reserved paragraphs: text to calibrate a projection profile on."""
    return reserved_contexts()[:limit]


def build_tasks(
    tokenizer: Any,
    tasks: Sequence[tuple[str, int | None]],
    data: str | Path | None = None,
    seed: int = 0,
    long_range: tuple[int, int] = LONG_TOKENS,
    needle_range: tuple[int, int] = LONG_TOKENS,
    exclude: Iterable[str] = (),
    split: str | None = None,
) -> list[Example]:
    """Examples of each (task, limit) in order, of `split`'s articles (every article when None);
    needle items default to 50 when the limit is None."""
    excluded = list(exclude)
    if split is not None:
        splits.check_split(split)
        splits.check_file(data)
    out: list[Example] = []
    for task, limit in tasks:
        if task == "squad":
            out += squad_examples(data, limit, excluded, split)
        elif task == "long":
            out += long_examples(
                tokenizer, data, limit, *long_range, seed=seed, exclude=excluded, split=split
            )
        elif task == "needle":
            out += needle_examples(
                tokenizer,
                50 if limit is None else limit,
                seed,
                data,
                *needle_range,
                exclude=excluded,
                split=split,
            )
        else:
            raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    return out
