"""Compare two `kvlink-bench quality` runs answer by answer: the same questions, configs in the same order.

    python bench/compare_answers.py RUN_A RUN_B   # --out folders: run.json and samples.jsonl(.gz)

Configs are matched by their index in run.json (their names may differ: issue 19 renamed them). Every
(question, config) pair both runs hold is compared on the answer, the kept positions, the payload and
metadata bytes, the K/V errors, the KL and the scores; framing bytes may differ and are printed as a range.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

FIELDS = (
    "answer", "n_kept", "payload_bytes", "metadata_bytes", "wire_payload", "wire_positions", "wire_scales",
    "wire_factors", "k_rel_err", "v_rel_err", "kl", "f1", "fidelity", "ref_answer",
)  # fmt: skip


def load(folder: str) -> tuple[list[str], dict[tuple[str, int], dict[str, Any]]]:
    d = Path(folder)
    names = [c["name"] for c in json.loads((d / "run.json").read_text())["configs"]]
    plain = d / "samples.jsonl"
    text = plain.read_text() if plain.exists() else gzip.decompress((d / "samples.jsonl.gz").read_bytes()).decode()
    rows = {}
    for line in text.splitlines():
        r = json.loads(line)
        rows[(r["eid"], names.index(r["config"]))] = r
    return names, rows


def main(a_dir: str, b_dir: str) -> int:
    na, a = load(a_dir)
    nb, b = load(b_dir)
    if len(na) != len(nb):
        print(f"the runs have {len(na)} and {len(nb)} configs")
        return 2
    common = sorted(set(a) & set(b))
    diffs = [
        (eid, na[i], nb[i], f, a[(eid, i)].get(f), b[(eid, i)].get(f))
        for eid, i in common
        for f in FIELDS
        if a[(eid, i)].get(f) != b[(eid, i)].get(f)
    ]
    questions = {eid for eid, _ in common}
    print(f"{len(common)} (question, config) pairs over {len(questions)} questions x {len(na)} configs: "
          f"{len(diffs)} differences in {', '.join(FIELDS)}")  # fmt: skip
    for d in diffs[:20]:
        print("  ", d)
    framing = [b[k]["wire_framing"] - a[k]["wire_framing"] for k in common]
    if framing:
        print(f"framing bytes, B - A: {min(framing)} .. {max(framing)}")
    for i, (x, y) in enumerate(zip(na, nb)):
        print(f"  config {i}: {x}  ->  {y}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
