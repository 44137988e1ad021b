"""SQuAD-format QA data and the standard F1/EM scoring (lower-case, no punctuation/articles, whitespace split)."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class QAExample:
    """One question about one context, with its gold answers (empty for unanswerable questions)."""

    qid: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


def default_squad_path() -> Path:
    """The SQuAD v2 dev split shipped with kvlink (kvlink/data/squad-v2-dev-a.json, CC BY-SA 4.0)."""
    return Path(str(resources.files("kvlink") / "data" / "squad-v2-dev-a.json"))


def load_squad(path: str | Path | None = None, answerable_only: bool = True) -> list[QAExample]:
    """Read a SQuAD (v1 or v2) JSON file into examples, in file order."""
    path = Path(path) if path is not None else default_squad_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read SQuAD file {str(path)!r}: {exc}") from None
    if not isinstance(data, dict) or "data" not in data:
        raise ValueError(f"{str(path)!r} is not SQuAD format: no top-level 'data' list")
    out: list[QAExample] = []
    for article in data["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = tuple(a["text"] for a in qa.get("answers", []))
                if answerable_only and (qa.get("is_impossible", False) or not answers):
                    continue
                starts = tuple(int(a.get("answer_start", -1)) for a in qa.get("answers", []))
                out.append(
                    QAExample(
                        qa["id"], article.get("title", ""), para["context"], qa["question"], answers, starts
                    )
                )
    return out


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
