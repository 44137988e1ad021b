"""The calibration / evaluation split of the shipped SQuAD data, by article.

Anything that is tuned (screens, the planner's quality table, sensitivity and
projection profiles, codebooks or predictors a method calibrates) may read the
CALIBRATION split only; headline figures come from the EVALUATION split, which
nothing is tuned on. Splitting by article, not by question, keeps paragraphs
(and the questions that share them) on one side.

The shipped file (kvlink/data/squad-v2-dev-a.json, 8 articles, 1,278 answerable
questions) splits 4 / 4:

| split | article | answerable | all questions |
|---|---|---:|---:|
| calibration | Normans | 96 | 208 |
| calibration | Computational_complexity_theory | 197 | 418 |
| calibration | European_Union_law | 231 | 421 |
| calibration | Harvard_University | 112 | 262 |
| evaluation | Huguenot | 217 | 424 |
| evaluation | Steam_engine | 215 | 444 |
| evaluation | 1973_oil_crisis | 106 | 255 |
| evaluation | Packet_switching | 104 | 373 |

636 / 642 answerable questions (1,309 / 1,496 in all). Of the 35 ways to put
four articles on each side, only one is closer in answerable questions
(640 / 638); this one was chosen because the earlier tuning (issue 7's screens
and the planner's table: `--task squad:300`, the first 300 answerable
questions in file order = Normans, Computational_complexity_theory and 7
Huguenot questions) and the shipped profiles (the projection and sensitivity
profiles fitted on Harvard_University, `kvlink.eval.tasks.reserved_contexts`)
then all fall on the calibration side: the evaluation split holds 635
answerable questions that nothing was ever tuned on.

A question's split follows from its id: `squad:<qid>` and `long:<qid>` by the
article of qid in the shipped file, `needle:<split>:<seed>-<i>` by the split
its filler came from (`split_of_eid`). Examples whose split cannot be told
(another data file, needle items built from every article) count as neither
and are refused for calibration like evaluation ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvlink.eval.squad import QAExample, default_squad_path, load_squad

CALIBRATION = "calibration"
EVALUATION = "evaluation"
SPLITS: tuple[str, ...] = (CALIBRATION, EVALUATION)

CALIBRATION_TITLES: tuple[str, ...] = (
    "Normans", "Computational_complexity_theory", "European_Union_law", "Harvard_University",
)  # fmt: skip
EVALUATION_TITLES: tuple[str, ...] = ("Huguenot", "Steam_engine", "1973_oil_crisis", "Packet_switching")
TITLES: dict[str, tuple[str, ...]] = {CALIBRATION: CALIBRATION_TITLES, EVALUATION: EVALUATION_TITLES}


def check_split(split: str) -> str:
    """`split` if it is one of SPLITS, else ValueError quoting it."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def split_titles(split: str) -> tuple[str, ...]:
    """The article titles of `split`, in the shipped file's order."""
    return TITLES[check_split(split)]


def split_of_title(title: str) -> str | None:
    """The split an article belongs to, or None for an article of neither (not in the shipped file)."""
    for split, titles in TITLES.items():
        if title in titles:
            return split
    return None


def _file_titles(path: str | Path) -> list[str]:
    try:
        data = json.loads(Path(path).read_text())
        return [str(a.get("title", "")) for a in data["data"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read SQuAD file {str(path)!r}: {exc}") from None


def check_file(path: str | Path | None) -> None:
    """Refuse a data file whose articles are not the split's: the split is defined over the shipped file's
    eight articles, so a file with any other article (say, the held-out SQuAD dev articles) has no split."""
    if path is None:
        return
    stray = [t for t in _file_titles(path) if split_of_title(t) is None]
    if stray:
        raise ValueError(
            f"{str(path)!r} has articles in neither split ({', '.join(map(repr, stray[:3]))}"
            f"{', ...' if len(stray) > 3 else ''}): the calibration/evaluation split is defined over the shipped "
            "SQuAD file's articles; run such a file with split 'all'"
        )


def load_split(split: str, path: str | Path | None = None, answerable_only: bool = True) -> list[QAExample]:
    """The questions of `split` (of the shipped file, or of `path` whose articles are the shipped ones), file order."""
    titles = set(split_titles(split))
    check_file(path)
    return [qa for qa in load_squad(path, answerable_only) if qa.title in titles]


def calibration_examples(path: str | Path | None = None, answerable_only: bool = True) -> list[QAExample]:
    """The calibration split's questions: what screens, tables and profiles may be fitted on."""
    return load_split(CALIBRATION, path, answerable_only)


def evaluation_examples(path: str | Path | None = None, answerable_only: bool = True) -> list[QAExample]:
    """The evaluation split's questions: reporting only."""
    return load_split(EVALUATION, path, answerable_only)


@lru_cache(maxsize=1)
def _titles_by_qid() -> dict[str, str]:
    """Question id -> article title over every question (answerable or not) of the shipped file."""
    return {qa.qid: qa.title for qa in load_squad(default_squad_path(), answerable_only=False)}


def article_of_eid(eid: str) -> str | None:
    """The shipped-file article a `squad:`/`long:` example id asks about (None if unknown or not such an id)."""
    task, sep, rest = eid.partition(":")
    if not sep or task not in ("squad", "long"):
        return None
    return _titles_by_qid().get(rest)


def needle_eid(split: str | None, seed: int, index: int) -> str:
    """The id of needle item `index` of `seed`, built from `split`'s filler (None: every article, no split)."""
    return f"needle:{seed}-{index}" if split is None else f"needle:{check_split(split)}:{seed}-{index}"


def split_of_eid(eid: str) -> str | None:
    """The split of an example id: by its question's article, or the needle's filler; None when unknown."""
    if eid.startswith("needle:"):
        head, sep, _ = eid.removeprefix("needle:").partition(":")
        return head if sep and head in SPLITS else None
    title = article_of_eid(eid)
    return None if title is None else split_of_title(title)


def _eid(item: Any) -> str:
    eid = item.get("eid") if isinstance(item, Mapping) else getattr(item, "eid", None)
    if not isinstance(eid, str):
        raise ValueError(f"cannot tell the split of {item!r}: it has no example id")
    return eid


def require_calibration(items: Iterable[Any], what: str = "calibration") -> int:
    """Refuse anything but calibration-split examples for `what` (a screen, a quality table, a profile).

    `items`: Examples (kvlink.eval.tasks) or sample records (dicts with "eid"). Raises ValueError naming the
    first example (and its article) that is in the evaluation split or whose split cannot be told, with the
    count of such examples. Returns how many examples were checked.
    """
    bad: list[tuple[str, str | None, str | None]] = []
    n = 0
    seen: set[str] = set()
    for item in items:
        eid = _eid(item)
        n += 1
        if eid in seen:
            continue
        seen.add(eid)
        split = split_of_eid(eid)
        if split != CALIBRATION:
            bad.append((eid, split, article_of_eid(eid)))
    if bad:
        eid, split, title = bad[0]
        where = f" (article {title!r})" if title else ""
        why = "is in the evaluation split" if split == EVALUATION else "belongs to no split"
        raise ValueError(
            f"{what} takes calibration-split examples only: example {eid!r}{where} {why}"
            f"{f'; {len(bad)} such examples in all' if len(bad) > 1 else ''}. Calibration articles: "
            f"{', '.join(CALIBRATION_TITLES)} (kvlink-bench quality --split calibration)"
        )
    return n


def split_counts(path: str | Path | None = None) -> dict[str, dict[str, tuple[int, int]]]:
    """split -> title -> (answerable questions, all questions): the table in this module's docstring."""
    out: dict[str, dict[str, tuple[int, int]]] = {s: {} for s in SPLITS}
    answerable = {qa.qid for qa in load_squad(path)}
    for qa in load_squad(path, answerable_only=False):
        split = split_of_title(qa.title)
        if split is None:
            continue
        a, n = out[split].get(qa.title, (0, 0))
        out[split][qa.title] = (a + (qa.qid in answerable), n + 1)
    return out
