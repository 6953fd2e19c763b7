"""One Muon optimizer step, xpopt vs peers and vs its own loop, as ratios in one run.

Sets
  transformer: 16 x 512x512, 4 x 2048x512, 4 x 512x2048 matrices (+ 40 vectors of 512
               for the rows with a fallback)
  small:       200 x 64x64 matrices (dispatch overhead)

Tables
  bf16     (only where bf16 matmuls are native: AMX / AVX512-BF16 CPUs, CUDA):
           torch.optim.Muon as shipped (bf16 NS, matrices only) is the base;
           xpopt Muon with ns_dtype=torch.bfloat16 and with ns_dtype="auto", the same
           rule (nesterov, KJ coefficients, "original" LR scale, weight decay).
  batching xpopt torch Muon with batched=False (one NS per matrix) is the base;
           batched="auto" (the default) and batched=True, float32 and (where native) bf16.
  float32  xpopt torch Muon vs torch.optim.Muon's rule as a plain float32 loop; xpopt
           optax muon vs optax.contrib.muon, both jitted.

Candidates of one table run in turn, round after round (``interleaved_times``), so a
shared machine's drift hits them alike; medians and minimums are both printed.

    python benchmarks/step.py [--rounds 9] [--sets transformer,small] [--no-optax]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved_times, machine, table  # noqa: E402

LR, MU, WD, EPS = 0.02, 0.95, 0.01, 1e-7
QUINTIC = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
           (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]
KJ = (3.4445, -4.7750, 2.0315)

MATRICES = {
    "transformer": [(512, 512)] * 16 + [(2048, 512)] * 4 + [(512, 2048)] * 4,
    "small": [(64, 64)] * 200,
}
VECTORS = {"transformer": [(512,)] * 40, "small": []}


def make(shapes, seed=0):
    r = np.random.default_rng(seed)
    return [r.standard_normal(s).astype(np.float32) * 0.02 for s in shapes], \
        [r.standard_normal(s).astype(np.float32) for s in shapes]


def rows_from(times, base: str, label: str):
    b_med, b_min = times[base]
    out = []
    for k, (med, mn) in times.items():
        out.append(dict(set=label, impl=k, ms=f"{med * 1e3:.1f}", min_ms=f"{mn * 1e3:.1f}",
                        ratio="1 (base)" if k == base else f"{med / b_med:.3f}",
                        ratio_min="1 (base)" if k == base else f"{mn / b_min:.3f}"))
    return out


# ---- torch ---------------------------------------------------------------------------

def torch_params(shapes):
    import torch

    P, G = make(shapes)

    def fresh():
        ps = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in P]
        for p, g in zip(ps, G):
            p.grad = torch.from_numpy(g.copy())
        return ps

    return fresh


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
            denom = (v.sqrt() / math.sqrt(1 - 0.95**step)).add_(1e-8)
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


def xpopt_muon(fresh, **kw):
    from xpopt.adapters.torch import Muon

    opt = Muon(fresh(), lr=LR, momentum=MU, nesterov=True, weight_decay=WD, adjust_lr_fn="original",
               betas=(0.9, 0.95), **kw)
    return opt.step


def bench_bf16(name, rounds):
    import torch

    from xpopt.backends import torch as tb

    fresh = torch_params(MATRICES[name])
    if not tb.has_native_bf16(torch.zeros(1)):
        return []
    tm = torch.optim.Muon(fresh(), lr=LR, momentum=MU, nesterov=True, weight_decay=WD)
    same = dict(ns_coefficients=KJ, ns_steps=5)
    times = interleaved_times({
        "torch.optim.Muon as shipped (bf16)": tm.step,
        "xpopt Muon ns_dtype=bfloat16": xpopt_muon(fresh, ns_dtype=torch.bfloat16, **same),
        'xpopt Muon ns_dtype="auto"': xpopt_muon(fresh, ns_dtype="auto", **same),
    }, rounds=rounds)
    return rows_from(times, "torch.optim.Muon as shipped (bf16)", name)


def bench_batching(name, rounds, ns_dtype):
    fresh = torch_params(MATRICES[name])
    kw = dict(ns_dtype=ns_dtype, ns_coefficients="quintic")
    times = interleaved_times({
        "batched=False (loop)": xpopt_muon(fresh, batched=False, **kw),
        'batched="auto" (default)': xpopt_muon(fresh, batched="auto", **kw),
        "batched=True": xpopt_muon(fresh, batched=True, **kw),
    }, rounds=rounds)
    label = f"{name} {'bf16' if ns_dtype else 'float32'}"
    return rows_from(times, "batched=False (loop)", label)


def bench_float32(name, rounds):
    import torch

    fresh = torch_params(MATRICES[name] + VECTORS[name])
    ps = fresh()
    bufs = [torch.zeros_like(p) for p in ps]
    adam = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in ps if p.ndim < 2}
    counter = [0]

    def loop():
        counter[0] += 1
        with torch.no_grad():
            torch_loop_step(ps, bufs, adam, counter[0])

    times = interleaved_times({
        "per-matrix loop (torch.optim.Muon rule, fp32)": loop,
        "xpopt torch Muon (float32)": xpopt_muon(fresh, ns_coefficients="quintic"),
    }, rounds=rounds)
    return rows_from(times, "per-matrix loop (torch.optim.Muon rule, fp32)", name)


# ---- jax / optax -----------------------------------------------------------------------

def bench_optax(name, rounds):
    import jax
    import jax.numpy as jnp
    import optax

    from xpopt.adapters import optax as xo

    P, G = make(MATRICES[name] + VECTORS[name])
    # flax layout (in, out): the transposes of the torch-layout arrays.
    params = {f"p{i}": jnp.asarray(p.T) for i, p in enumerate(P)}
    grads = {f"p{i}": jnp.asarray(g.T) for i, g in enumerate(G)}

    def stepper(tx):
        state = tx.init(params)

        @jax.jit
        def step(p, s):
            u, s = tx.update(grads, s, p)
            return optax.apply_updates(p, u), s

        carry = [params, state]

        def run():
            carry[0], carry[1] = step(carry[0], carry[1])
            return carry[0]

        return run

    times = interleaved_times({
        "optax.contrib.muon (jit)": stepper(optax.contrib.muon(LR, beta=MU, nesterov=True, weight_decay=WD)),
        "xpopt optax muon (jit)": stepper(xo.muon(LR, momentum=MU, nesterov=True, adjust_lr_fn="original",
                                                  weight_decay=WD)),
    }, rounds=rounds, sync=jax.block_until_ready)
    return rows_from(times, "optax.contrib.muon (jit)", name)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--sets", default="transformer,small")
    ap.add_argument("--tables", default="bf16,batching,float32")
    ap.add_argument("--no-optax", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from xpopt.backends import torch as tb

    native = tb.has_native_bf16(torch.zeros(1))
    print(f"Muon step — {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"native bf16: {native}\n")
    cols = ["set", "impl", "ms", "ratio", "min_ms", "ratio_min"]
    tables = args.tables.split(",")
    for name in args.sets.split(","):
        if "bf16" in tables and name == "transformer":
            rows = bench_bf16(name, args.rounds)
            if rows:
                print("bf16 Newton-Schulz vs torch.optim.Muon (matrices only)\n")
                print(table(rows, cols), "\n")
        if "batching" in tables:
            rows = bench_batching(name, args.rounds, None)
            if native:
                rows += bench_batching(name, args.rounds, torch.bfloat16)
            print("batching policy vs one Newton-Schulz per matrix\n")
            print(table(rows, cols), "\n")
        if "float32" in tables:
            rows = bench_float32(name, args.rounds)
            if not args.no_optax:
                rows += bench_optax(name, args.rounds)
            print("float32 step vs peers\n")
            print(table(rows, cols), "\n")


if __name__ == "__main__":
    main()
