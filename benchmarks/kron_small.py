"""torch Kron on many small parameters (per-step overhead), one checkout against another.

A 200-parameter model (100 matrices 16x16, 100 vectors of 16), 1 torch thread,
``Kron(lr=1e-3, dtype=torch.float32)`` (float32 factors, which older checkouts did not
default to), preconditioner update every step.  Where the
time goes here is Python work per parameter and per group (option checks, state
look-ups, small kernel launches), not matmuls: the number to watch when the
adapter changes shape.

Each checkout runs in its own subprocess, round after round in turn (so a shared
machine's drift hits them alike); the table gives each one's median ms per step
and its ratio to the first.

    python benchmarks/kron_small.py [ROOT ...] [--rounds 5] [--steps 30]

ROOT: a directory holding an ``xpopt`` checkout's parent layout (``ROOT/xpopt``
importable after ``sys.path.insert(0, ROOT)``); default ``-``: the installed xpopt.  To compare
with an older commit: ``git worktree add /tmp/old <commit>`` and pass a directory
where ``xpopt`` links to it (``mkdir /tmp/o && ln -s /tmp/old /tmp/o/xpopt``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine, table  # noqa: E402

CHILD = r"""
import sys, time, json
if sys.argv[1] != "-":
    sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from xpopt.adapters.torch import Kron
torch.manual_seed(0)
ps = [torch.nn.Parameter(torch.randn(16, 16) * 0.1) for _ in range(100)]
ps += [torch.nn.Parameter(torch.randn(16) * 0.1) for _ in range(100)]
opt = Kron(ps, lr=1e-3, dtype=torch.float32)  # float32 factors: the default now, bf16 before
grads = [torch.randn_like(p) for p in ps]
def step():
    for p, g in zip(ps, grads):
        p.grad = g
    opt.step()
for _ in range(3):
    step()
steps = int(sys.argv[2])
t0 = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps((time.perf_counter() - t0) / steps * 1e3))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="*")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args(argv)
    roots = a.roots or ["-"]
    times = {r: [] for r in roots}
    for _ in range(a.rounds):
        for r in roots:
            out = subprocess.run([sys.executable, "-c", CHILD, r, str(a.steps)], capture_output=True, text=True,
                                 check=True)
            times[r].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(times[roots[0]])
    rows = [{"checkout": r, "ms/step (median)": f"{statistics.median(t):.1f}", "min": f"{min(t):.1f}",
             "ratio": f"{statistics.median(t) / base:.2f}"} for r, t in times.items()]
    print(f"torch Kron, 200 small params, 1 thread; {machine()}")
    print(table(rows, ["checkout", "ms/step (median)", "min", "ratio"]))


if __name__ == "__main__":
    main()
