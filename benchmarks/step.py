"""One Muon optimizer step, xpopt vs peers, as ratios measured in one run.

Sets
  transformer: 16 x 512x512, 4 x 2048x512, 4 x 512x2048 matrices + 40 vectors of 512
  small:       200 x 64x64 matrices (dispatch overhead)

Rows (float32 everywhere unless stated)
  xpopt torch Muon            xpopt.adapters.torch.Muon (batched same-shape NS, fused addmm)
  per-matrix loop             torch.optim.Muon's algorithm written as a plain float32
                              loop (no bf16 cast), AdamW loop for vectors: the ratio's base
  torch.optim.Muon (bf16)     as it ships (bf16 NS; 2-D params only): timed once, no
                              warm-up, --torch-muon to enable (minutes on CPUs without bf16)
  xpopt optax muon (jit)      xpopt.adapters.optax.muon vs optax.contrib.muon, both jitted

    python benchmarks/step.py [--repeats 5] [--torch-muon]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine, median_time, table  # noqa: E402

LR, MU, WD, EPS = 0.02, 0.95, 0.01, 1e-7
QUINTIC = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
           (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]

SETS = {
    "transformer": [(512, 512)] * 16 + [(2048, 512)] * 4 + [(512, 2048)] * 4 + [(512,)] * 40,
    "small": [(64, 64)] * 200,
}


def make(shapes, seed=0):
    r = np.random.default_rng(seed)
    return [r.standard_normal(s).astype(np.float32) * 0.02 for s in shapes], \
        [r.standard_normal(s).astype(np.float32) for s in shapes]


# ---- torch ---------------------------------------------------------------------------

def torch_loop_step(params, bufs, adam, step):
    """torch.optim.Muon's rule (nesterov, 'original' LR scale) in float32, one matrix at a time."""
    import torch

    for p, buf in zip(params, bufs):
        g = p.grad
        if p.ndim < 2:
            m, v = adam[p]
            p.mul_(1 - LR * WD)
            m.lerp_(g, 0.1)
            v.mul_(0.95).addcmul_(g, g, value=0.05)
            denom = (v / (1 - 0.95**step)).sqrt_().add_(1e-8)
            p.addcdiv_(m, denom, value=-LR / (1 - 0.9**step))
            continue
        p.mul_(1 - LR * WD)
        buf.lerp_(g, 1 - MU)
        X = g.lerp(buf, MU)
        tall = X.size(0) > X.size(1)
        if tall:
            X = X.T
        X = X / X.norm().clamp(min=EPS)
        for a, b, c in QUINTIC:
            A = X @ X.T
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
        if tall:
            X = X.T
        p.add_(X, alpha=-LR * math.sqrt(max(1, p.size(0) / p.size(1))))


def bench_torch(shapes, repeats, with_torch_muon):
    import torch

    from xpopt.adapters.torch import Muon

    P, G = make(shapes)

    def params():
        ps = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in P]
        for p, g in zip(ps, G):
            p.grad = torch.from_numpy(g)
        return ps

    ps = params()
    opt = Muon(ps, lr=LR, momentum=MU, nesterov=True, weight_decay=WD, adjust_lr_fn="original",
               ns_coefficients="quintic", ns_steps=5, betas=(0.9, 0.95))
    t_xp = median_time(opt.step, repeats=repeats)

    ps = params()
    bufs = [torch.zeros_like(p) for p in ps]
    adam = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in ps if p.ndim < 2}
    counter = [0]

    def loop():
        counter[0] += 1
        with torch.no_grad():
            torch_loop_step(ps, bufs, adam, counter[0])

    t_loop = median_time(loop, repeats=repeats)
    rows = [dict(impl="xpopt torch Muon", ms=t_xp * 1e3, base="per-matrix loop", ratio=t_xp / t_loop),
            dict(impl="per-matrix loop (torch.optim.Muon rule, fp32)", ms=t_loop * 1e3, base="", ratio=1.0)]
    if with_torch_muon and hasattr(torch.optim, "Muon"):
        mats = [p for p in params() if p.ndim == 2]
        tm = torch.optim.Muon(mats, lr=LR, momentum=MU, nesterov=True, weight_decay=WD)
        t_tm = median_time(tm.step, repeats=1, warmup=0)
        rows.append(dict(impl="torch.optim.Muon as shipped (bf16 NS, matrices only)", ms=t_tm * 1e3,
                         base="per-matrix loop", ratio=t_tm / t_loop))
    return rows


# ---- jax / optax -----------------------------------------------------------------------

def bench_optax(shapes, repeats):
    import jax
    import jax.numpy as jnp
    import optax

    from xpopt.adapters import optax as xo

    P, G = make(shapes)
    # flax layout (in, out): the transposes of the torch-layout arrays.
    params = {f"p{i}": jnp.asarray(p.T) for i, p in enumerate(P)}
    grads = {f"p{i}": jnp.asarray(g.T) for i, g in enumerate(G)}

    def timed(tx):
        state = tx.init(params)

        @jax.jit
        def step(p, s):
            u, s = tx.update(grads, s, p)
            return optax.apply_updates(p, u), s

        carry = [params, state]

        def run():
            carry[0], carry[1] = step(carry[0], carry[1])
            return carry[0]

        return median_time(run, repeats=repeats, sync=jax.block_until_ready)

    t_xp = timed(xo.muon(LR, momentum=MU, nesterov=True, adjust_lr_fn="original", weight_decay=WD))
    t_ox = timed(optax.contrib.muon(LR, beta=MU, nesterov=True, weight_decay=WD))
    return [dict(impl="xpopt optax muon (jit)", ms=t_xp * 1e3, base="optax.contrib.muon (jit)", ratio=t_xp / t_ox),
            dict(impl="optax.contrib.muon (jit)", ms=t_ox * 1e3, base="", ratio=1.0)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sets", default="transformer,small")
    ap.add_argument("--torch-muon", action="store_true", help="also time torch.optim.Muon as shipped (slow on CPU)")
    ap.add_argument("--no-optax", action="store_true")
    args = ap.parse_args(argv)

    print(f"Muon step, float32 — {machine()}\n")
    for name in args.sets.split(","):
        rows = bench_torch(SETS[name], args.repeats, args.torch_muon and name == "transformer")
        if not args.no_optax:
            rows += bench_optax(SETS[name], args.repeats)
        for r in rows:
            r["set"] = name
            r["ms"] = f"{r['ms']:.1f}"
            r["ratio"] = f"{r['ratio']:.3f}" if r["base"] else "1 (base)"
        print(table(rows, ["set", "impl", "ms", "base", "ratio"]))
        print()


if __name__ == "__main__":
    main()
