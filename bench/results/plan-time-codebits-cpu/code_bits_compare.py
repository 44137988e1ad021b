"""A commit's Tables.code_bits (default 9d3077a, before _symbol_keys) against the tree's on a 60 x 6,700 x 192
message: equal bits, and the seconds of each.   usage: python code_bits_compare.py [COMMIT]"""

import importlib.util
import subprocess
import sys
import time

import numpy as np

from kvlink import ans as new


def timed(fn, *args):
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


def main() -> None:
    commit = sys.argv[1] if len(sys.argv) > 1 else "9d3077a"
    git = ["git", "show", f"{commit}:kvlink/ans.py"]
    src = subprocess.run(git, capture_output=True, text=True, check=True).stdout
    old = importlib.util.module_from_spec(importlib.util.spec_from_loader("ans_old", loader=None))
    exec(src, old.__dict__)
    rng = np.random.default_rng(0)
    b, n, f = 60, 6700, 192
    before, after = old.laplace_tables(), new.laplace_tables()
    sym = np.round(rng.laplace(0, 3, size=(b, n, f))).astype(np.float32)
    sym[0, 0, 0] = 5000  # an escape
    tab = rng.integers(0, len(after), size=(b, f))
    shifts = rng.integers(-40, 41, size=(b, n))
    for s in (shifts, None):
        for _ in range(2):
            x, tx = timed(before.code_bits, sym, tab, s)
            y, ty = timed(after.code_bits, sym, tab, s)
            print("shifts" if s is not None else "none", x == y, round(tx, 2), round(ty, 2), round(tx / ty, 2))


if __name__ == "__main__":
    main()
