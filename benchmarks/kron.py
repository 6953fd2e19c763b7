"""PSGD Kron: one optimizer step of xpopt vs its peers, as ratios, in one run; and state bytes.

    python benchmarks/kron.py [--quick] [--rounds N] [--no-torch] [--no-jax] [--jax-bf16]

Parameter set (float32): 16 x 512x512, 4 x 2048x512, 4 x 512x2048 matrices, 16 vectors of
512 and 4 of 2048 (12.6 M parameters).  Every optimizer sees the same gradients (two fixed
random sets, alternating step by step), lr 1e-3, b1 0.9, weight decay 0, a preconditioner
fit on every step, float32 factors.

Tables
  torch   xpopt ``Kron`` vs ``kron_torch.Kron`` 0.3.3 and heavyball 3.2.1 ``PSGDKron``.
          Peers: ``preconditioner_update_probability=1.0`` and ``max_size_triangular=4096``
          (dense, triangular factors on every side of the set; kron-torch's default 8192
          already is, heavyball's 2048 is too, by ``size > max``: 4096 makes it explicit).
          xpopt rows: ``block_size=256`` (the default: every side is cut into 256-wide
          tiles, 512x512 -> 4 blocks of 256x256, 2048x512 -> 16) and ``block_size=4096``
          (no tiling: one dense 512 or 2048 factor per side, like the peers), each with
          ``preconditioner_update_style`` skew (the default) and QUAD.  The peers fit the
          factors by Xi-Lin Li's original triangular rule (a triangular solve instead of
          skew's Procrustes step / QUAD's two-sided product), so the untiled rows compare
          the same layout, not the same arithmetic.  Both peers run under
          ``torch.compile`` (their own decorators): their compile is done in warm-up
          steps, outside the timing; heavyball's ``compile_mode`` is set to "default"
          (its "max-autotune-no-cudagraphs" autotunes every GEMM on CPU, ~150 s here,
          and picks aten's bmm anyway).
  jax     xpopt ``optax.skew`` vs eformer 0.0.101 ``skew`` (``eformer.optimizers._tx.white_kron``,
          the seed spec), both ``jax.jit(update + apply_updates)``, same options (block 256,
          max_size_dense 16384, noise 1e-9, dtype float32; eformer computes in ``dtype``,
          so float32 is the like-for-like maths; ``--jax-bf16`` adds both at bf16).  Compile
          times are printed (not in the ratio).
  memory  optimizer state bytes after one step (every tensor in ``opt.state``, shared
          storage counted once) vs ``torch.optim.AdamW``, on the set and on one 768x3072.

Candidates of a table run in turn, round after round (a shared machine's drift hits them
alike); the table shows medians (and the min of each).  ``torch.set_num_threads`` is the
core count; XLA's CPU client uses all cores by default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine  # noqa: E402

SET = [(512, 512)] * 16 + [(2048, 512)] * 4 + [(512, 2048)] * 4 + [(512,)] * 16 + [(2048,)] * 4
LR, B1 = 1e-3, 0.9


def grads_np(shapes, n_sets=2, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s, dtype=np.float32) for s in shapes] for _ in range(n_sets)]


def params_np(shapes, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in shapes]


def interleave(cands: dict, *, rounds: int, warmup: int) -> dict:
    """``cands``: name -> (prepare(i), step()); only ``step`` is timed.  ``{name: [seconds]}``."""
    times = {k: [] for k in cands}
    for r in range(warmup + rounds):
        for k, (prepare, step) in cands.items():
            prepare(r)
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
            else:
                print(f"  warm-up {r + 1}/{warmup}: {k}: {dt:.1f} s", file=sys.stderr, flush=True)
    return times


def fmt_ms(ts):
    return f"{statistics.median(ts) * 1e3:.0f}"


def state_bytes(state) -> int:
    """Bytes of every tensor / array reachable from an optimizer's state (shared storage once)."""
    import torch

    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(dict(state))
    return total


# ------------------------------------------------------------------ torch

def torch_table(rounds: int, warmup: int, gsets):
    import torch

    from xpopt.adapters.torch import Kron

    torch.set_num_threads(os.cpu_count())
    p0 = params_np(SET)
    gsets_t = [[torch.from_numpy(g) for g in gs] for gs in gsets]

    def params():
        return [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]

    def cand(make):
        ps = params()
        opt = make(ps)

        def prepare(r):
            for p, g in zip(ps, gsets_t[r % len(gsets_t)]):
                p.grad = g.clone()      # a peer may write into its gradient

        return (prepare, opt.step), opt

    cands, opts, notes = {}, {}, []
    for style in ("skew", "QUAD"):
        for bs in (256, 4096):
            name = f"xpopt {style} block {bs}"
            cands[name], opts[name] = cand(lambda ps, style=style, bs=bs: Kron(
                ps, lr=LR, b1=B1, weight_decay=0.0, preconditioner_update_style=style, block_size=bs,
                dtype=torch.float32, preconditioner_update_probability=1.0))
    peers = []
    try:
        import kron_torch
        cands["kron-torch"], opts["kron-torch"] = cand(lambda ps: kron_torch.Kron(
            ps, lr=LR, b1=B1, weight_decay=0.0, preconditioner_update_probability=1.0,
            max_size_triangular=4096, precond_dtype=torch.float32))
        peers.append("kron-torch")
    except ImportError as e:
        notes.append(f"kron-torch not installed ({e})")
    try:
        import heavyball
        import heavyball.utils
        heavyball.utils.compile_mode = "default"
        import warnings
        warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")   # dynamo on heavyball's helpers
        cands["heavyball"], opts["heavyball"] = cand(lambda ps: heavyball.PSGDKron(
            ps, lr=LR, betas=(B1, 0.999), weight_decay=0.0, preconditioner_update_probability=1.0,
            max_size_triangular=4096))
        peers.append("heavyball")
    except ImportError as e:
        notes.append(f"heavyball not installed ({e})")

    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):    # kron-torch prints its sizes on step 1
        times = interleave(cands, rounds=rounds, warmup=warmup)
    mine = [k for k in cands if k.startswith("xpopt")]
    rows = []
    for peer in peers:
        for k in mine:
            tp, tx = statistics.median(times[peer]), statistics.median(times[k])
            rows.append(f"| {peer} | {fmt_ms(times[peer])} | {k} | {fmt_ms(times[k])} | **{tx / tp:.2f}** |")
    if not peers:
        for k in mine:
            rows.append(f"| (no peer) | | {k} | {fmt_ms(times[k])} | |")
    lines = ["| peer | peer ms | xpopt | xpopt ms | xpopt / peer |", "|---|---|---|---|---|"] + rows
    spread = ", ".join(f"{k} {min(v) * 1e3:.0f}" for k, v in times.items())
    lines.append(f"\nmin ms per candidate: {spread}")
    return "\n".join(lines), opts, notes


# ------------------------------------------------------------------ jax

def jax_table(rounds: int, warmup: int, gsets, dtypes):
    import jax
    import jax.numpy as jnp
    import optax

    from xpopt.adapters import optax as xo

    try:
        from eformer.optimizers._tx import white_kron as wk
    except ImportError as e:
        return f"(jax table skipped: eformer's white_kron does not import: {e})", []
    names = [f"p{i:02d}" for i in range(len(SET))]
    params = dict(zip(names, map(jnp.asarray, params_np(SET))))
    gs = [dict(zip(names, map(jnp.asarray, g))) for g in gsets]
    cands, compile_s = {}, {}
    for dt in dtypes:
        kw = dict(b1=B1, weight_decay=0.0, dtype=dt, block_size=256, max_size_dense=16384, noise_scale=1e-9,
                  preconditioner_lr=0.7)
        # eformer stores the momentum in ``dtype``; xpopt's mu_dtype=None would keep it float32
        for who, tx in ((f"eformer skew {dt}", wk.skew(LR, **kw)), (f"xpopt skew {dt}", xo.skew(LR, mu_dtype=dt, **kw))):
            st0 = tx.init(params)

            def step_fn(p, s, g, tx=tx):
                u, s = tx.update(g, s, p)
                return optax.apply_updates(p, u), s

            t0 = time.perf_counter()
            comp = jax.jit(step_fn).lower(params, st0, gs[0]).compile()
            compile_s[who] = time.perf_counter() - t0
            print(f"  compiled {who}: {compile_s[who]:.1f} s", file=sys.stderr, flush=True)
            box = {"p": params, "s": st0, "g": gs[0]}

            def prepare(r, box=box):
                box["g"] = gs[r % len(gs)]

            def step(box=box, comp=comp):
                box["p"], box["s"] = comp(box["p"], box["s"], box["g"])
                jax.block_until_ready(box["p"])

            cands[who] = (prepare, step)
    times = interleave(cands, rounds=rounds, warmup=warmup)
    lines = ["| peer | peer ms | xpopt | xpopt ms | xpopt / peer | compile s (peer / xpopt) |",
             "|---|---|---|---|---|---|"]
    for dt in dtypes:
        pe, me = f"eformer skew {dt}", f"xpopt skew {dt}"
        r = statistics.median(times[me]) / statistics.median(times[pe])
        lines.append(f"| {pe} | {fmt_ms(times[pe])} | {me} | {fmt_ms(times[me])} | **{r:.2f}** | "
                     f"{compile_s[pe]:.0f} / {compile_s[me]:.0f} |")
    spread = ", ".join(f"{k} {min(v) * 1e3:.0f}" for k, v in times.items())
    lines.append(f"\nmin ms per candidate: {spread}")
    return "\n".join(lines), []


# ------------------------------------------------------------------ memory

def memory_table(stepped: dict):
    """State bytes after one step: xpopt Kron bf16 / float32 factors vs AdamW (and the peers
    stepped in the torch table, on the set)."""
    import torch

    from xpopt.adapters.torch import Kron

    def one_step(shapes, make):
        ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = make(ps)
        g = torch.Generator().manual_seed(0)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        return state_bytes(opt.state)

    makers = {
        "xpopt Kron, bf16 factors + momentum": lambda ps: Kron(ps, lr=LR, dtype=torch.bfloat16,
                                                               mu_dtype=torch.bfloat16),
        "xpopt Kron, bf16 factors, float32 momentum (default)": lambda ps: Kron(ps, lr=LR, dtype=torch.bfloat16),
        "xpopt Kron, float32 factors + momentum": lambda ps: Kron(ps, lr=LR, dtype=torch.float32),
        "xpopt Kron, float32, block 4096 (untiled)": lambda ps: Kron(ps, lr=LR, dtype=torch.float32, block_size=4096),
        "torch.optim.AdamW": lambda ps: torch.optim.AdamW(ps, lr=LR),
    }
    sets = {"the set (12.6 M params)": SET, "one 768x3072": [(768, 3072)]}
    res = {s: {k: one_step(shapes, m) for k, m in makers.items()} for s, shapes in sets.items()}
    for k in ("kron-torch", "heavyball"):
        if k in stepped:
            res["the set (12.6 M params)"][f"{k} (float32, untiled, as timed)"] = state_bytes(stepped[k].state)
    lines = ["| optimizer | " + " | ".join(f"{s}: MB | / AdamW" for s in sets) + " |",
             "|---|" + "---|---|" * len(sets)]
    keys = list(dict.fromkeys(k for s in sets for k in res[s]))
    for k in keys:
        cells = []
        for s in sets:
            b, a = res[s].get(k), res[s]["torch.optim.AdamW"]
            cells += ["", ""] if b is None else [f"{b / 1e6:.1f}", f"{b / a:.2f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ main

def versions():
    out = []
    for mod in ("torch", "jax", "optax", "kron_torch", "heavyball", "eformer"):
        try:
            from importlib.metadata import version
            out.append(f"{mod} {version(mod.replace('_', '-'))}")
        except Exception:
            pass
    return ", ".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 timed rounds (jax 3), 1 warm-up (peers compile in it)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds of the torch table (default 7, "
                    "--quick 2); the jax table runs max(rounds, 10) (3 with --quick)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--jax-bf16", action="store_true", help="also time both optax versions at dtype bfloat16")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 7)
    jax_rounds = 3 if args.quick and not args.rounds else max(rounds, 10)
    warmup = 1 if args.quick else 2
    t_start = time.perf_counter()
    import torch

    print(f"Machine: {machine()}; torch threads {os.cpu_count()} (set_num_threads), XLA CPU default threads; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"Versions: {versions()}")
    cmd = " ".join(["python benchmarks/kron.py"] + list(sys.argv[1:] if argv is None else argv))
    print(f"Command: {cmd}; {rounds} timed rounds "
          f"(jax {jax_rounds}) after {warmup} warm-up round(s), candidates interleaved; medians of per-step "
          "wall time\n")
    gsets = grads_np(SET)
    stepped = {}
    if not args.no_torch:
        tab, stepped, notes = torch_table(rounds, warmup, gsets)
        print("### torch: one step (a preconditioner fit every step), float32 factors\n")
        print(tab)
        for n in notes:
            print(f"\nnote: {n}")
        print()
    if not args.no_jax:
        tab, _ = jax_table(jax_rounds, warmup, gsets, ["float32"] + (["bfloat16"] if args.jax_bf16 else []))
        print("### optax under jax.jit: one step, skew, block 256\n")
        print(tab)
        print()
    print("### state bytes after one step, vs torch.optim.AdamW (float32 exp_avg + exp_avg_sq)\n")
    print(memory_table(stepped))
    print(f"\n(total run {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()[0]:.2f})")
    del torch


if __name__ == "__main__":
    main()
