"""Newton-Schulz cost over its own matmul floor, per backend, in one run.

ratio = time(orthogonalize(X), 5 quintic steps) / (5 * (t(X X^T) + t(A A) + t(B X)))

where each matmul is timed alone on same-shape inputs.  A ratio of 1.00 means
the iteration costs nothing beyond its GEMMs (the prescale, the fused
``a*X + B@X`` epilogues and dispatch are free); the target is <= 1.05.

A second table compares Gram Newton-Schulz with it (``method="gram"``, the
same 5 quintic steps, no restart in float32): both run in turn each round
(``interleaved_times``), so a shared machine's drift hits them alike, and the
ratio is of the medians; the target is <= 0.65 at 1024 x 4096 float32 (its
FLOPs: 0.56x).

    python benchmarks/ns.py [--m 1024 --n 4096 --repeats 5 --rounds 9]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__file__))
from _timing import interleaved_times, machine, median_time, table  # noqa: E402

from xpopt.core.newton_schulz import gram_restarts, orthogonalize  # noqa: E402

STEPS = 5


def bench_torch(G, repeats):
    import torch

    X = torch.from_numpy(G)
    A = X @ X.mT
    B = A @ A
    ns = median_time(lambda: orthogonalize(X, steps=STEPS), repeats=repeats)
    floor = STEPS * sum(
        median_time(f, repeats=repeats) for f in (lambda: X @ X.mT, lambda: A @ A, lambda: B @ X)
    )
    return dict(backend=f"torch {torch.__version__} ({torch.get_num_threads()} threads)", ns=ns, floor=floor)


def bench_jax(G, repeats):
    import jax
    import jax.numpy as jnp

    X = jnp.asarray(G)
    A = X @ X.T
    B = A @ A
    block = jax.block_until_ready
    ns_fn = jax.jit(lambda x: orthogonalize(x, steps=STEPS))
    mm = jax.jit(lambda a, b: a @ b)
    xxt = jax.jit(lambda x: x @ x.T)
    ns = median_time(lambda: ns_fn(X), repeats=repeats, sync=block)
    floor = STEPS * (
        median_time(lambda: xxt(X), repeats=repeats, sync=block)
        + median_time(lambda: mm(A, A), repeats=repeats, sync=block)
        + median_time(lambda: mm(B, X), repeats=repeats, sync=block)
    )
    return dict(backend=f"jax {jax.__version__} (jit)", ns=ns, floor=floor)


def bench_numpy(G, repeats):
    X = G
    A = X @ X.T
    B = A @ A
    ns = median_time(lambda: orthogonalize(X, steps=STEPS), repeats=repeats)
    floor = STEPS * sum(median_time(f, repeats=repeats) for f in (lambda: X @ X.T, lambda: A @ A, lambda: B @ X))
    return dict(backend=f"numpy {np.__version__}", ns=ns, floor=floor)


def gram_vs_standard(G, backend: str, rounds: int) -> dict:
    """Median seconds of the standard and the Gram iteration on ``G``, interleaved, in one backend."""
    if backend == "torch":
        import torch

        X, label, sync = torch.from_numpy(G), f"torch {torch.__version__} ({torch.get_num_threads()} threads)", None
    elif backend == "jax":
        import jax

        X, label, sync = jax.numpy.asarray(G), f"jax {jax.__version__} (jit)", jax.block_until_ready
    else:
        X, label, sync = G, f"numpy {np.__version__}", None
    fns = {m: (lambda m=m: orthogonalize(X, steps=STEPS, method=m)) for m in ("standard", "gram")}
    if backend == "jax":
        fns = {m: (lambda f=jax.jit(lambda x, m=m: orthogonalize(x, steps=STEPS, method=m)): f(X)) for m in fns}
    t = interleaved_times(fns, rounds=rounds, **({"sync": sync} if sync else {}))
    return dict(backend=label, standard=t["standard"][0], gram=t["gram"][0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default="torch,jax,numpy")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the Gram comparison")
    ap.add_argument("--gram-only", action="store_true", help="only the Gram vs standard table")
    args = ap.parse_args(argv)

    G = np.random.default_rng(0).standard_normal((args.m, args.n)).astype(np.float32)
    runners = {"torch": bench_torch, "jax": bench_jax, "numpy": bench_numpy}
    rows = []
    for name in ([] if args.gram_only else args.backends.split(",")):
        try:
            r = runners[name](G, args.repeats)
        except ImportError as e:
            print(f"skip {name}: {e}", file=sys.stderr)
            continue
        r.update(ns=f"{r['ns'] * 1e3:.1f}", floor=f"{r['floor'] * 1e3:.1f}", ratio=f"{r['ns'] / r['floor']:.3f}")
        rows.append(r)
    if rows:
        print(f"NS{STEPS} (quintic) on {args.m}x{args.n} float32 — {machine()}\n")
        print(table(rows, ["backend", "ns", "floor", "ratio"]).replace("| ns |", "| NS5 ms |").replace(
            "| floor |", "| 15 matmuls ms |"))
        print()
    grows = []
    for name in args.backends.split(","):
        try:
            r = gram_vs_standard(G, name, args.rounds)
        except ImportError as e:
            print(f"skip {name}: {e}", file=sys.stderr)
            continue
        r.update(ratio=f"{r['gram'] / r['standard']:.3f}", standard=f"{r['standard'] * 1e3:.1f}",
                 gram=f"{r['gram'] * 1e3:.1f}")
        grows.append(r)
    print(f"Gram vs standard NS{STEPS} (quintic, float32 restarts {list(gram_restarts('quintic'))}) on "
          f"{args.m}x{args.n} float32, median of {args.rounds} interleaved rounds — {machine()}\n")
    print(table(grows, ["backend", "standard", "gram", "ratio"]).replace("| standard |", "| standard ms |").replace(
        "| gram |", "| gram ms |").replace("| ratio |", "| gram / standard |"))


if __name__ == "__main__":
    main()
