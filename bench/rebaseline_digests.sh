#!/usr/bin/env bash
# Make the digests baseline of THIS machine with commit 12bfafe's code.
#
# The baseline is bit-exact: the embedded model's float32 prefill on CPU depends on the CPU's vector
# units (torch's ATen and MKL pick their kernels, and with them the order of float sums, by ISA), so a
# baseline made on one CPU fails on another from the first prefill on (each baseline records its
# machine). Regenerating it with the CURRENT code would prove nothing; this script makes it with the
# code the refactor guard is about: kvlink from commit 12bfafe, the recording scripts as they were
# committed with the baseline (a996675: bench/make_digests.py, tests/digests.py), the calibration runs
# of 12bfafe's tree checked, then stamps the machine it ran on. Then `pytest tests/test_digests.py`
# compares today's code with the baseline made on the machine it runs on (digests.baseline_for); on a
# machine none was made on, the test runs this script itself into a temporary file. About 2 minutes on
# one thread.
#
#   bash bench/rebaseline_digests.sh            # writes tests/data/digests-12bfafe-<vendor>-<family>-<model>-<digest>.json
#   bash bench/rebaseline_digests.sh OUT.json   # writes OUT.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
work=$(mktemp -d)
trap 'git worktree remove --force "$work/tree" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

git worktree add --detach "$work/tree" 12bfafe >/dev/null
mkdir -p "$work/scripts/bench" "$work/scripts/tests"
git show a996675:bench/make_digests.py >"$work/scripts/bench/make_digests.py"
git show a996675:tests/digests.py >"$work/scripts/tests/digests.py"

slug=$(PYTHONPATH="$PWD/tests" "$PY" -c 'import digests; print(digests.machine_slug(digests.machine()))')
out=$(realpath -m "${1:-$PWD/tests/data/digests-12bfafe-$slug.json}")
PYTHONPATH="$work/tree" "$PY" "$work/scripts/bench/make_digests.py" \
  --runs "$work/tree/bench/results" --out "$out"
PYTHONPATH="$PWD/tests" "$PY" - "$out" <<'PY'
import json, sys
from pathlib import Path

import digests

path = Path(sys.argv[1])
doc = json.loads(path.read_text())
doc["machine"] = digests.machine()
path.write_text(digests.dumps(doc))
print(f"stamped {path} with {doc['machine']}")
PY
