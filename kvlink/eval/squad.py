"""SQuAD-format QA data (its F1/EM scoring is kvlink.scoring, which the receiver uses too)."""

from __future__ import annotations

import json
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
