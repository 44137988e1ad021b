"""The standard SQuAD F1/EM of an answer against its gold answers: lower-case, no punctuation or articles,
whitespace split. The receiver scores answers with it (a REST stat), so it lives outside kvlink.eval."""

from __future__ import annotations

import re
import string
from collections import Counter

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces (linear time)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_NO_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_scores(prediction: str, golds: tuple[str, ...] | list[str]) -> tuple[float, float]:
    """(F1, EM) against the best-matching gold answer."""
    if not golds:
        return 0.0, 0.0
    return max(f1_score(prediction, g) for g in golds), max(exact_match(prediction, g) for g in golds)
