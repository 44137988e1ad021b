# the old code_bits (HEAD) vs the new on the benchmark's shapes: equal bits, seconds
import importlib.util, subprocess, sys, time, numpy as np
src = subprocess.run(["git", "show", "HEAD:kvlink/ans.py"], capture_output=True, text=True, check=True).stdout
spec = importlib.util.spec_from_loader("ans_old", loader=None); old = importlib.util.module_from_spec(spec); exec(src, old.__dict__)
from kvlink import ans as new
rng = np.random.default_rng(0)
B, N, F = 60, 6700, 192
mo, mn = old.laplace_tables(), new.laplace_tables()
sym = np.round(rng.laplace(0, 3, size=(B, N, F))).astype(np.float32); sym[0,0,0] = 5000
tab = rng.integers(0, len(mn), size=(B, F)); sh = rng.integers(-40, 41, size=(B, N))
for s in (sh, None):
    for _ in range(2):
        t = time.perf_counter(); a = mo.code_bits(sym, tab, s); ta = time.perf_counter() - t
        t = time.perf_counter(); b = mn.code_bits(sym, tab, s); tb = time.perf_counter() - t
        print("shifts" if s is not None else "none", a == b, round(ta, 2), round(tb, 2), round(ta / tb, 2))
