"""Where does one batched Newton-Schulz beat a loop?  The data behind ``batch_limit``.

For each backend and size, ``count`` same-shape square matrices are
orthogonalised with ``batch=True`` (one stacked call) and ``batch=False`` (one
call each), in turn, round after round; the ratio batched/loop < 1 means
batching pays.  ``backends.<name>.batch_limit`` encodes the crossover (in
``m*m*n``) that ``batch="auto"`` uses.

    python benchmarks/batching.py [--rounds 7] [--backends torch,numpy,jax]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved_times, machine, table  # noqa: E402

SIZES = [(32, 64), (64, 32), (128, 16), (256, 16), (512, 8)]


def run(backend: str, rounds: int):
    from xpopt.core.muon import orthogonalized_updates

    rows = []
    dtypes = [None]
    if backend == "torch":
        import torch

        from xpopt.backends import torch as tb

        asarray, sync = torch.from_numpy, (lambda out: None)
        limit = tb.batch_limit(torch.zeros(1))
        if tb.has_native_bf16(torch.zeros(1)):
            dtypes.append("bfloat16")
    elif backend == "jax":
        import jax
        import jax.numpy as jnp

        from xpopt.backends import jax as jb

        asarray, sync = jnp.asarray, jax.block_until_ready
        limit = jb.batch_limit(jnp.zeros(1))
    else:
        from xpopt.backends import numpy as nb

        asarray, sync = (lambda a: a), (lambda out: None)
        limit = nb.batch_limit(np.zeros(1))
    for dt in dtypes:
        for n, count in SIZES:
            us = [asarray(np.random.default_rng(i).standard_normal((n, n)).astype(np.float32))
                  for i in range(count)]
            if backend == "jax":
                import jax

                fb = jax.jit(lambda us: orthogonalized_updates(us, batch=True, compute_dtype=dt))
                fl = jax.jit(lambda us: orthogonalized_updates(us, batch=False, compute_dtype=dt))
                cands = {"batched": lambda: fb(us), "loop": lambda: fl(us)}
            else:
                cands = {"batched": lambda: orthogonalized_updates(us, batch=True, compute_dtype=dt),
                         "loop": lambda: orthogonalized_updates(us, batch=False, compute_dtype=dt)}
            t = interleaved_times(cands, rounds=rounds, sync=sync)
            rows.append(dict(backend=backend, dtype=dt or "float32", size=f"{count} x {n}^2",
                             batched_ms=f"{t['batched'][0] * 1e3:.2f}", loop_ms=f"{t['loop'][0] * 1e3:.2f}",
                             ratio=f"{t['batched'][0] / t['loop'][0]:.2f}",
                             auto="batched" if n ** 3 <= limit else "loop"))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--backends", default="torch,numpy,jax")
    args = ap.parse_args(argv)
    print(f"batched / loop Newton-Schulz (quintic, 5 steps) — {machine()}\n")
    rows = []
    for b in args.backends.split(","):
        rows += run(b, args.rounds)
    print(table(rows, ["backend", "dtype", "size", "batched_ms", "loop_ms", "ratio", "auto"]))


if __name__ == "__main__":
    main()
