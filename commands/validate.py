"""``xpopt validate``: one model, one init, one batch stream, every backend.

A small character-level model (``context`` characters -> embedding -> hidden
``Linear`` + tanh -> output ``Linear`` -> softmax cross-entropy) is trained on
text embedded in the package (:mod:`xpopt._corpus`, no download).  Parameters
are initialised once in NumPy float64 from ``--seed`` and the batches are drawn
once from a seeded NumPy generator; every backend gets identical copies and the
same hyperparameters:

``numpy``  float64 -- the oracle -- and ``--dtype`` via :mod:`xpopt.adapters.arrays`,
           gradients by manual backprop written once over an array-API ``xp``
           (so ``cupy`` runs the very same code on a GPU);
``torch``  :class:`xpopt.adapters.torch.Muon` on real ``nn.Parameter`` s, autograd,
           ``opt.step()``;
``jax``    :func:`xpopt.adapters.optax.muon`, ``jax.grad``, a ``jax.jit`` train
           step, weights stored in flax's ``(in, out)`` layout (the adapter's
           default) and transposed back for the comparison;
``cupy``   like ``numpy``, only where a CUDA GPU is present.

The LR decays linearly to 0 over the run (:func:`lr_multiplier` says why),
through each adapter's own schedule mechanism (a callable ``lr``, an optax
schedule, torch's ``LambdaLR``).

The weight matrices go to Muon; the biases and the embedding go to the AdamW
fallback (the embedding by an explicit label / ``fallback_filter``, the biases
by Muon's suitability rule, spelled out in the labels too so that every
backend routes identically).

Each backend's parameters after the last step are compared with the oracle's:
``max over params of ||p - p_ref|| / ||p_ref||``.  See :data:`TOLERANCE`.

Importing this module imports no array framework (``xpopt --help`` stays
fast); each backend is imported inside its runner.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable

__all__ = [
    "BACKENDS", "DEFAULT_STEPS", "MODEL", "OPTIMIZERS", "TOLERANCE", "add_arguments",
    "loss_and_grads", "make_problem", "run", "run_validate",
]

BACKENDS = ("numpy", "torch", "jax", "cupy")
DTYPES = ("float32", "float64")

# Chosen so that the whole default run (oracle + numpy + torch + jax, with the
# framework imports and JAX's compile) takes well under 60 s on 2 shared CPU
# cores (about 10 s measured), while the model gets far enough to be a real
# training run (loss from ~3.7 down to ~0.85 nats per character).
DEFAULT_STEPS = 500
DEFAULT_SEED = 0
DEFAULT_OUT = "xpopt-out"
# torch's run uses one intra-op thread: the largest matrix is 64 x 128, too small for
# threads to pay, and on a 2-core machine shared with other jobs torch's thread pool
# stalls (measured there: Kron 68 steps/s on 1 thread vs 2 on 2 threads, Muon 248 vs 10).
DEFAULT_TORCH_THREADS = 1

# Relative parameter difference (max over params of ||p - p_ref|| / ||p_ref||)
# allowed between a backend's run and the NumPy float64 oracle after the run.
#
# float32: each step's forward/backward and Newton-Schulz GEMMs carry rounding
#   of order u32 = 2**-24 ~ 6e-8 (times sqrt of the reduction length), i.e.
#   ~1e-6 relative in each update.  Newton-Schulz amplifies the part of that
#   noise lying along small singular directions (the quintic's slope near 0 is
#   a_1 * ... * a_5 ~ 5e2), momentum carries it forward, and the training
#   dynamics amplify trajectory differences over the steps (exponentially
#   with a constant LR; the linear-decay schedule in lr_multiplier tames it).
#   Measured for correct backends on this model: ~1e-5 after 500 steps,
#   ~2e-4 after 1000 (all of numpy/torch/jax, seeds 0-2).  A bug, by contrast,
#   moved the float64 parameters by 4e-3 (fallback eps 1e-6 instead of 1e-8,
#   the subtlest tried), 2e-2 (schedule off by one step) and 0.1-0.7 (LR +1%,
#   momentum, nesterov, NS steps or coefficients, LR rule, betas, weight decay,
#   embedding routed to Muon).  1e-3 sits ~100x above the float32 noise at the
#   default length and below every bug tried.
# float64: the same chain starting from u64 = 2**-53 ~ 1e-16 gives ~1e-14
#   (measured: 2e-14 at 500 steps); 1e-9 leaves five orders of headroom and
#   still catches everything the float32 tolerance would.
TOLERANCE = {"float32": 1e-3, "float64": 1e-9}
TOLERANCE_REASON = (
    "{dtype} rounding (u = {u:.0e}) in forward, backward and the optimizer's matrix maths (Newton-Schulz / "
    "the Kron factors), amplified along small singular directions and accumulated over {steps} "
    "{optimizer} steps; the injected bugs we tried moved parameters by 4e-3 to 0.7"
)
_UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float64": 2.0 ** -53}
# Beyond this many steps float32 trajectories of this (chaotic) training run may
# separate past the float32 tolerance without any bug (measured ~0.1 at 2000).
FLOAT32_HORIZON = 1000


# --------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    context: int = 8       # characters of context
    embed: int = 16        # embedding width per character
    hidden: int = 64       # hidden units
    batch: int = 64        # examples per step


MODEL = ModelConfig()

# Parameter names (torch's ``named_parameters`` names) in torch layout
# ``(out, in)``, and the optimizer each one goes to.
PARAM_NAMES = ("embedding", "hidden.weight", "hidden.bias", "out.weight", "out.bias")
LABELS = {
    "embedding": "fallback",     # explicit: (vocab, embed) would pass Muon's shape test
    "hidden.weight": "muon",
    "hidden.bias": "fallback",   # 1-D: Muon's suitability rule says fallback anyway
    "out.weight": "muon",
    "out.bias": "fallback",
}
WEIGHTS = tuple(n for n in PARAM_NAMES if n.endswith(".weight"))


def fallback_filter(name: str, param: Any) -> bool:
    """torch ``fallback_filter``: the same routing as :data:`LABELS`."""
    return LABELS[name] == "fallback"


@dataclasses.dataclass
class Problem:
    """Everything every backend gets identical copies of (NumPy arrays)."""

    vocab: str
    params: dict          # name -> float64 array, torch layout
    x: Any                # (steps, batch, context) int64 character ids
    y: Any                # (steps, batch) int64 next-character ids
    config: ModelConfig

    @property
    def steps(self) -> int:
        return int(self.x.shape[0])


def make_problem(steps: int, seed: int, config: ModelConfig = MODEL, text: str | None = None) -> Problem:
    """Init params (float64) and draw all batches, both from ``seed``.

    The two come from independent child seeds, so ``--steps`` does not change
    the initialisation.
    """
    import numpy as np

    if text is None:
        from .._corpus import TEXT as text
    vocab = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.array([index[c] for c in text], dtype=np.int64)
    if ids.size <= config.context:
        raise ValueError(f"text of {ids.size} characters is too short for a context of {config.context}")

    init_seed, data_seed = np.random.SeedSequence(seed).spawn(2)
    g = np.random.default_rng(init_seed)
    V, k, d, h = len(vocab), config.context, config.embed, config.hidden
    params = {
        "embedding": g.standard_normal((V, d)),
        "hidden.weight": g.standard_normal((h, k * d)) / math.sqrt(k * d),
        "hidden.bias": np.zeros(h),
        "out.weight": g.standard_normal((V, h)) / math.sqrt(h),
        "out.bias": np.zeros(V),
    }
    g = np.random.default_rng(data_seed)
    starts = g.integers(0, ids.size - k, size=(steps, config.batch))
    x = ids[starts[..., None] + np.arange(k)]
    y = ids[starts + k]
    return Problem(vocab=vocab, params=params, x=x, y=y, config=config)


def loss_and_grads(xp, params: dict, x, y, vocab_size: int):
    """Mean cross-entropy and its gradients by manual backprop, over any ``xp``.

    Array-API standard operations only (``take``, ``tanh``, ``@``, reductions),
    so NumPy and CuPy run the same code.  ``params`` are in torch layout; ``x``
    is ``(batch, context)`` ids, ``y`` ``(batch,)``.  Returns ``(loss, grads)``
    with ``loss`` a 0-d array and ``grads`` a dict like ``params``.
    """
    E, W1, b1 = params["embedding"], params["hidden.weight"], params["hidden.bias"]
    W2, b2 = params["out.weight"], params["out.bias"]
    dtype = E.dtype
    B, k = x.shape
    d = E.shape[1]
    idx = xp.reshape(x, (B * k,))
    a0 = xp.reshape(xp.take(E, idx, axis=0), (B, k * d))
    hid = xp.tanh(a0 @ xp.matrix_transpose(W1) + b1)
    logits = hid @ xp.matrix_transpose(W2) + b2
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    logp = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
    classes = xp.arange(vocab_size)
    onehot_y = xp.astype(y[:, None] == classes[None, :], dtype)
    loss = -xp.sum(logp * onehot_y) / B

    dlogits = (xp.exp(logp) - onehot_y) / B
    dW2 = xp.matrix_transpose(dlogits) @ hid
    db2 = xp.sum(dlogits, axis=0)
    dz1 = (dlogits @ W2) * (1.0 - hid * hid)
    dW1 = xp.matrix_transpose(dz1) @ a0
    db1 = xp.sum(dz1, axis=0)
    da0 = xp.reshape(dz1 @ W1, (B * k, d))
    # Embedding gradient as a one-hot GEMM: the standard has no scatter-add.
    onehot_x = xp.astype(idx[:, None] == classes[None, :], dtype)
    dE = xp.matrix_transpose(onehot_x) @ da0
    grads = {"embedding": dE, "hidden.weight": dW1, "hidden.bias": db1, "out.weight": dW2, "out.bias": db2}
    return loss, grads


# ----------------------------------------------------------------------- optimizers


def lr_multiplier(t, steps: int):
    """Linear decay to 0 over the run: ``1 - t / steps`` for the ``t``-th update (0-based).

    Plain arithmetic, so it works on a Python int (arrays adapter, torch's
    ``LambdaLR``) and on optax's traced step count under ``jax.jit``.

    Why a schedule: with a constant LR, Muon's fixed-size orthogonalised steps
    keep bouncing around the minimum and the run is chaotic -- two runs that
    differ by float32 rounding separate exponentially (measured here: x2 every
    ~40 steps after step ~100, 0.4 relative after 1000 steps), so float32 could
    not be compared with float64 at all.  Decaying the LR damps that growth
    (and is what real runs do); it also puts each adapter's schedule path
    (callable ``lr``, optax schedule, torch LR scheduler) under test.
    """
    # ``t * (1 / steps)``, not ``t / steps``: JAX divides an int32 count into
    # float32 even with x64 on, which would make the float64 run's LR float32.
    return 1.0 - t * (1.0 / steps)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer in each adapter from one set of hyperparameters.

    Adding ``kron`` means adding a spec: its hyperparameters and a factory per
    adapter (arrays, torch, optax), plus its tolerance if it differs.  Every
    factory gets the adapter module, a copy of ``hyperparameters`` (``lr`` the
    peak LR) and ``schedule``: ``t -> lr`` for the ``t``-th update (0-based)
    that works on Python ints and traced JAX ints alike.
    """

    name: str
    hyperparameters: dict
    # (adapter module, hyperparameters, schedule) -> object with init/update
    make_arrays: Callable[[Any, dict, Callable], Any]
    # (adapter module, named parameters, hyperparameters, schedule)
    #   -> (torch.optim.Optimizer, LR scheduler or None)
    make_torch: Callable[[Any, list, dict, Callable], Any]
    # (adapter module, hyperparameters, schedule) -> optax.GradientTransformation
    make_optax: Callable[[Any, dict, Callable], Any]
    tolerance: dict = dataclasses.field(default_factory=lambda: dict(TOLERANCE))
    # JAX weights in flax layout (in, out), checking the adapter's layout
    # translation; False keeps torch's (out, in) (Kron has no layout option:
    # a transposed matrix swaps its factors and its noise's arrangement).
    jax_flax_layout: bool = True


# One set of Muon hyperparameters for every backend.  The defaults of
# docs/adapters.md except weight decay, set so the decoupled-decay path is
# exercised too (its effect over a few hundred steps is small but not zero);
# ``lr`` is the peak of the linear-decay schedule (see lr_multiplier).  The
# fallback (AdamW) follows the same scheduled LR in every adapter.
MUON_HP = {
    "lr": 0.02,
    "momentum": 0.95,
    "nesterov": True,
    "momentum_form": "ema",
    "weight_decay": 0.01,
    "ns_coefficients": "quintic",
    "ns_steps": 5,
    "adjust_lr_fn": "match_rms_adamw",
    "fallback": "adamw",
    "betas": (0.9, 0.95),
    "fallback_eps": 1e-8,
}


def _muon_ndarrays(mod, hp, schedule):
    hp["lr"] = schedule        # callable step -> lr; fallback_lr defaults to it
    return mod.muon(labels=dict(LABELS), dimension_numbers="torch", **hp)


def _muon_torch(mod, named_params, hp, schedule):
    import torch

    peak = hp["lr"]
    opt = mod.Muon(named_params, fallback_filter=fallback_filter, **hp)
    # The fallback follows the group's live lr, so one scheduler drives both.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: schedule(t) / peak)
    return opt, sched


def _muon_optax(mod, hp, schedule):
    hp.pop("lr")
    # No dimension_numbers: the JAX weights are stored in flax layout (in, out),
    # the adapter's default, so the layout translation is part of what we check.
    return mod.muon(schedule, labels=dict(LABELS), **hp)


# PSGD Kron: the seed's defaults except float32 factors (NumPy has no fast
# bf16, and the oracle must be able to match) and no weight decay on the
# embedding-free parameters' biases... kept simple: one decoupled weight decay
# for all, as the seed's quad/skew.  ``noise_scale`` is raised from 1e-9 to
# 1e-4: the hidden weight's gradient (64 x 128, a batch of 64) has rank <= 64,
# and without noise the right factor grows in the 64 directions the gradient
# never visits, where it then amplifies float32 rounding (measured: float32
# parted from float64 by 1e-2 within 20 steps).  The noise is drawn from the
# same key on every backend, so it is part of what agrees.
KRON_HP = {
    "lr": 0.01,
    "b1": 0.9,
    "weight_decay": 0.01,
    "preconditioner_update_style": "skew",
    "preconditioner_lr": 0.7,
    "dtype": "float32",
    "noise_scale": 1e-4,
    "seed": 0,
}


def _kron_ndarrays(mod, hp, schedule):
    hp.pop("lr")
    return _ScheduledKron(mod.kron(lr=1.0, **hp), schedule)


def _sorted(d):
    return dict(sorted(d.items())) if d is not None else None


class _ScheduledKron:
    """The arrays adapter's Kron takes a float lr: scale its deltas by the schedule.

    Parameters go in sorted-name order, the order JAX flattens a dict in:
    Kron draws parameter ``i``'s noise from ``fold_in(key, i)``, so every
    adapter must see the parameters in one order to draw the same noise.
    """

    def __init__(self, opt, schedule):
        self.opt, self.schedule = opt, schedule

    def init(self, params):
        return self.opt.init(_sorted(params))

    def update(self, grads, state, params=None):
        lr = self.schedule(state.step)
        updates, state = self.opt.update(_sorted(grads), state, _sorted(params))
        return {k: v * lr for k, v in updates.items()}, state


def _kron_torch(mod, named_params, hp, schedule):
    import torch

    peak = hp["lr"]
    hp["dtype"] = getattr(torch, hp["dtype"])
    opt = mod.Kron([p for _, p in sorted(named_params, key=lambda np_: np_[0])], **hp)  # JAX's order
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: schedule(t) / peak)
    return opt, sched


def _kron_optax(mod, hp, schedule):
    hp.pop("lr")
    return mod.skew(schedule, **{k: v for k, v in hp.items() if k != "preconditioner_update_style"})


OPTIMIZERS = {
    "muon": OptimizerSpec("muon", MUON_HP, _muon_ndarrays, _muon_torch, _muon_optax),
    "kron": OptimizerSpec("kron", KRON_HP, _kron_ndarrays, _kron_torch, _kron_optax, jax_flax_layout=False),
}


def _schedule(spec: OptimizerSpec, steps: int):
    peak = spec.hyperparameters["lr"]
    return lambda t: peak * lr_multiplier(t, steps)


# ------------------------------------------------------------------------- backends


@dataclasses.dataclass
class RunResult:
    backend: str
    dtype: str
    losses: Any           # (steps,) float64 numpy array
    params: dict          # name -> float64 numpy array, torch layout
    steps_per_s: float


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cuda_available() -> bool:
    from ..backends.cupy import cuda_available

    return cuda_available()


_ADAPTER = {"numpy": "arrays", "cupy": "arrays", "torch": "torch", "jax": "optax"}


def backend_status(name: str) -> tuple[bool, str]:
    """``(available, reason)`` without importing the framework (cupy aside)."""
    needs = {"numpy": ["numpy"], "torch": ["torch"], "jax": ["jax", "optax"], "cupy": ["cupy"]}[name]
    missing = [m for m in needs if not _has(m)]
    if missing:
        extra = {"numpy": "", "torch": "[torch]", "jax": "[jax]", "cupy": "[cupy]"}[name]
        return False, f"{', '.join(missing)} not installed (pip install xpopt{extra})"
    if name == "cupy" and not _cuda_available():
        return False, "cupy needs a CUDA GPU; none found"
    adapter = f"xpopt.adapters.{_ADAPTER[name]}"
    if not _has(adapter):
        return False, f"{adapter} is not available in this xpopt"
    return True, "ok"


def _timed_loop(steps: int, step_fn, sync, progress) -> float:
    """Run ``step_fn(t)`` for every step; steps/s excluding the first step.

    The first step pays for JAX's compile and every framework's lazy set-up,
    so the rate is over steps 2..N (``sync`` waits for queued device work).
    """
    step_fn(0)
    sync()
    progress.update(1)
    t0 = time.perf_counter()
    for t in range(1, steps):
        step_fn(t)
        progress.update(1)
    sync()
    elapsed = time.perf_counter() - t0
    return (steps - 1) / elapsed if steps > 1 and elapsed > 0 else float("nan")


def _run_arrays(name: str, problem: Problem, dtype: str, spec: OptimizerSpec, progress) -> RunResult:
    import array_api_compat
    import numpy as np

    adapter = importlib.import_module("xpopt.adapters.arrays")
    if name == "cupy":
        import cupy as mod

        to_host = mod.asnumpy
        sync = mod.cuda.Device().synchronize
    else:
        mod = np

        def to_host(a):
            return np.asarray(a)

        def sync():
            return None

    params = {n: mod.asarray(p, dtype=dtype) for n, p in problem.params.items()}
    xs, ys = mod.asarray(problem.x), mod.asarray(problem.y)
    xp = array_api_compat.array_namespace(*params.values())
    V = len(problem.vocab)
    opt = spec.make_arrays(adapter, dict(spec.hyperparameters), _schedule(spec, problem.steps))
    state = opt.init(params)
    losses = []

    def step(t):
        nonlocal params, state
        loss, grads = loss_and_grads(xp, params, xs[t], ys[t], V)
        updates, state = opt.update(grads, state, params)
        params = adapter.apply_updates(params, updates)
        losses.append(loss)

    rate = _timed_loop(problem.steps, step, sync, progress)
    return RunResult(
        name, dtype,
        np.array([float(to_host(v)) for v in losses]),
        {n: to_host(p).astype(np.float64) for n, p in params.items()},
        rate,
    )


def _run_torch(problem: Problem, dtype: str, spec: OptimizerSpec, progress, threads: int | None = None) -> RunResult:
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_torch_threads(problem, dtype, spec, progress)
    finally:
        torch.set_num_threads(before)


def _run_torch_threads(problem: Problem, dtype: str, spec: OptimizerSpec, progress) -> RunResult:
    import numpy as np
    import torch

    adapter = importlib.import_module("xpopt.adapters.torch")
    tdtype = getattr(torch, dtype)
    cfg = problem.config

    class CharMLP(torch.nn.Module):
        def __init__(self, init):
            super().__init__()

            def P(name):
                return torch.nn.Parameter(torch.tensor(init[name], dtype=tdtype))

            self.embedding = P("embedding")
            self.hidden = torch.nn.Linear(cfg.context * cfg.embed, cfg.hidden, dtype=tdtype)
            self.out = torch.nn.Linear(cfg.hidden, len(problem.vocab), dtype=tdtype)
            with torch.no_grad():
                for n, p in self.named_parameters():
                    p.copy_(torch.tensor(init[n], dtype=tdtype))

        def forward(self, x, y):
            a0 = torch.nn.functional.embedding(x, self.embedding).reshape(x.shape[0], -1)
            logits = self.out(torch.tanh(self.hidden(a0)))
            return torch.nn.functional.cross_entropy(logits, y)

    model = CharMLP(problem.params)
    assert sorted(n for n, _ in model.named_parameters()) == sorted(PARAM_NAMES)
    opt, sched = spec.make_torch(adapter, list(model.named_parameters()), dict(spec.hyperparameters),
                                 _schedule(spec, problem.steps))
    _check_torch_routes(opt)
    xs, ys = torch.from_numpy(problem.x), torch.from_numpy(problem.y)
    losses = []

    def step(t):
        opt.zero_grad(set_to_none=True)
        loss = model(xs[t], ys[t])
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.detach())

    rate = _timed_loop(problem.steps, step, lambda: None, progress)
    return RunResult(
        "torch", dtype,
        np.array([float(v) for v in losses]),
        {n: p.detach().cpu().numpy().astype(np.float64) for n, p in model.named_parameters()},
        rate,
    )


def _check_torch_routes(opt) -> None:
    """The torch adapter reports its routing (``Muon.routes()``); it must match LABELS."""
    routes = getattr(opt, "routes", None)
    if routes is None:
        return
    got = {r.name: r.route for r in routes()}
    if got != LABELS:
        wrong = {n: (got.get(n), LABELS.get(n)) for n in set(got) | set(LABELS) if got.get(n) != LABELS.get(n)}
        raise AssertionError(f"torch Muon routed parameters differently from the labels (got, want): {wrong}")


def _jax_loss(params, x, y, flax: bool = True):
    """Cross-entropy with weights in flax layout ``(in, out)`` (else torch's ``(out, in)``)."""
    import jax.numpy as jnp
    import optax

    def w(name):
        return params[name] if flax else params[name].T

    a0 = jnp.take(params["embedding"], x, axis=0).reshape(x.shape[0], -1)
    hid = jnp.tanh(a0 @ w("hidden.weight") + params["hidden.bias"])
    logits = hid @ w("out.weight") + params["out.bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _run_jax(problem: Problem, dtype: str, spec: OptimizerSpec, progress) -> RunResult:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    adapter = importlib.import_module("xpopt.adapters.optax")
    # JAX has float64 only with x64 on; switch it on for this run alone.
    ctx = jax.enable_x64(True) if dtype == "float64" else nullcontext()
    flax = spec.jax_flax_layout
    with ctx:
        params = {
            n: jnp.asarray(p.T if flax and n in WEIGHTS else p, dtype=dtype)   # flax layout (in, out)
            for n, p in problem.params.items()
        }
        tx = spec.make_optax(adapter, dict(spec.hyperparameters), _schedule(spec, problem.steps))
        state = tx.init(params)
        xs, ys = jnp.asarray(problem.x, dtype=jnp.int32), jnp.asarray(problem.y, dtype=jnp.int32)

        @jax.jit
        def train_step(params, state, x, y):
            loss, grads = jax.value_and_grad(_jax_loss)(params, x, y, flax)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        losses = []

        def step(t):
            nonlocal params, state
            params, state, loss = train_step(params, state, xs[t], ys[t])
            losses.append(loss)

        rate = _timed_loop(problem.steps, step, lambda: jax.block_until_ready(params), progress)
        out = {n: np.asarray(p, dtype=np.float64) for n, p in params.items()}
    return RunResult(
        "jax", dtype,
        np.array([float(v) for v in losses]),
        {n: (p.T if flax and n in WEIGHTS else p) for n, p in out.items()},   # back to torch layout
        rate,
    )


def _run_backend(name: str, problem: Problem, dtype: str, spec: OptimizerSpec, progress,
                 torch_threads: int | None = None) -> RunResult:
    if name in ("numpy", "cupy"):
        return _run_arrays(name, problem, dtype, spec, progress)
    if name == "torch":
        return _run_torch(problem, dtype, spec, progress, torch_threads)
    if name == "jax":
        return _run_jax(problem, dtype, spec, progress)
    raise ValueError(f"unknown backend {name!r}")


# ------------------------------------------------------------------------- progress


class _SimpleBar:
    """A one-line progress bar on stderr for when tqdm is not installed."""

    def __init__(self, total: int, desc: str, file=None):
        self.total, self.desc, self.n = total, desc, 0
        self.file = file or sys.stderr
        self._last = -1
        self._draw()

    def _draw(self):
        width = 30
        frac = self.n / self.total if self.total else 1.0
        pct = int(100 * frac)
        if pct == self._last:
            return
        self._last = pct
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        self.file.write(f"\r{self.desc:<22} [{bar}] {self.n}/{self.total}")
        self.file.flush()

    def update(self, n: int = 1):
        self.n += n
        self._draw()

    def close(self):
        self.file.write("\n")
        self.file.flush()


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _SimpleBar(total, desc)
    return tqdm(total=total, desc=f"{desc:<22}", file=sys.stderr, unit="step", leave=True,
                dynamic_ncols=True, mininterval=0.2)


# --------------------------------------------------------------------------- report


def max_relative_difference(params: dict, ref: dict) -> tuple[float, str]:
    """``max over params of ||p - p_ref|| / ||p_ref||`` and the worst param's name."""
    import numpy as np

    worst, worst_name = 0.0, ""
    for n, r in ref.items():
        p = params[n]
        if p.shape != r.shape:
            return float("inf"), f"{n} (shape {p.shape} != {r.shape})"
        num = float(np.linalg.norm(p - r))
        den = float(np.linalg.norm(r))
        rel = num / den if den > 0 else num
        if not math.isfinite(rel):
            return float("inf"), n
        if rel > worst:
            worst, worst_name = rel, n
    return worst, worst_name


def _fmt(v: float, spec: str) -> str:
    return format(v, spec) if math.isfinite(v) else str(v)


def format_table(rows: list[dict]) -> str:
    header = ("backend", "dtype", "final loss", "max rel diff", "steps/s", "status")
    lines = []
    for r in rows:
        diff = "(oracle)" if r["oracle"] else _fmt(r["max_rel_diff"], ".2e")
        lines.append((
            r["backend"], r["dtype"], _fmt(r["final_loss"], ".6f"), diff,
            _fmt(r["steps_per_s"], ".1f"), r["status"],
        ))
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    right = {2, 3, 4}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [fmt(header), "  ".join("-" * w for w in widths)]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def plot_losses(results: list[RunResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    ref = results[0]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    steps = np.arange(1, ref.losses.size + 1)
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(results):
        label = f"{r.backend} {r.dtype}" + (" (oracle)" if i == 0 else "")
        style = dict(color=f"C{i % 10}", linestyle=styles[i % len(styles)])
        ax1.plot(steps, r.losses, lw=2.2 if i == 0 else 1.3, label=label, **style)
        if i:
            diff = np.abs(r.losses - ref.losses) / np.abs(ref.losses)
            ax2.semilogy(steps, np.maximum(diff, 1e-17), lw=1.0, label=label, **style)
    ax1.set_ylabel("training loss (cross-entropy, nats)")
    ax1.set_title(title)
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel("|loss - oracle| / oracle")
    ax2.grid(alpha=0.3, which="both")
    if len(results) > 1:
        ax2.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ run


def _json_safe(obj):
    """Strict JSON: non-finite floats (a failed or diverged run) become null."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def parse_backends(spec: str | None) -> tuple[list[str], list[tuple[str, str]]]:
    """``(to run, [(skipped, reason)])``; explicit unknown/unavailable -> UsageError."""
    if spec is None:
        run_, skipped = [], []
        for b in BACKENDS:
            ok, reason = backend_status(b)
            (run_.append(b) if ok else skipped.append((b, reason)))
        return run_, skipped
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise UsageError("--backends is empty; give a comma list such as numpy,torch,jax")
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise UsageError(f"unknown backend(s) {', '.join(map(repr, unknown))} in --backends; "
                         f"choose from {','.join(BACKENDS)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"backend(s) {', '.join(dup)} listed twice in --backends")
    for n in names:
        ok, reason = backend_status(n)
        if not ok:
            raise UsageError(f"backend {n!r} is not available: {reason}")
    return names, []


def run(*, optimizer: str = "muon", steps: int = DEFAULT_STEPS, backends: str | None = None,
        dtype: str = "float32", out: str = DEFAULT_OUT, seed: int = DEFAULT_SEED,
        torch_threads: int | None = DEFAULT_TORCH_THREADS, stdout=None, argv: list | None = None) -> int:
    """Run the validation; print the table; return the exit code (0 ok, 1 diverged).

    ``torch_threads``: torch's intra-op threads for its run (None: leave torch's
    setting alone), see :data:`DEFAULT_TORCH_THREADS`; ``argv``: the command
    line, recorded in the JSON's ``settings``.  Raises :class:`UsageError` for
    bad input (the CLI turns it into exit 2).
    """
    stdout = stdout or sys.stdout
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"--optimizer {optimizer!r} is not supported; choose from {', '.join(OPTIMIZERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"--steps must be an integer >= 1, got {steps!r}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not supported; choose from {', '.join(DTYPES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed must be an integer >= 0, got {seed!r}")
    if torch_threads is not None and (isinstance(torch_threads, bool) or not isinstance(torch_threads, int)
                                      or torch_threads < 1):
        raise UsageError(f"--torch-threads must be an integer >= 1, got {torch_threads!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r} exists and is not a directory; give a folder (created if missing)")
    names, skipped = parse_backends(backends)
    if not _has("numpy") or not backend_status("numpy")[0]:
        raise UsageError(f"the float64 NumPy oracle is needed but unavailable: {backend_status('numpy')[1]}")
    from ._env import check_out_dir, settings

    why = check_out_dir(out)   # last: nothing is created for input that fails another check
    if why:
        raise UsageError(f"--out {why}")
    spec = OPTIMIZERS[optimizer]
    tol = spec.tolerance[dtype]

    t_start = time.perf_counter()
    problem = make_problem(steps, seed)
    plan = [("numpy", "float64")] + [(n, dtype) for n in names]
    print(estimate_line(optimizer, plan, steps), file=sys.stderr, flush=True)
    outcomes: list = []     # RunResult, or the error message of a run that raised
    for i, (name, dt) in enumerate(plan):
        bar = _progress(steps, f"[{i + 1}/{len(plan)}] {name} {dt}")
        try:
            outcomes.append(_run_backend(name, problem, dt, spec, bar, torch_threads))
        except Exception as e:  # report it, keep going with the other backends
            import traceback

            traceback.print_exc(file=sys.stderr)
            outcomes.append(f"{type(e).__name__}: {e}")
        finally:
            bar.close()
    elapsed = time.perf_counter() - t_start

    p = lambda *a: print(*a, file=stdout)  # noqa: E731
    ref = outcomes[0]
    if isinstance(ref, str):
        p(f"FAILED: the numpy float64 oracle raised {ref}; nothing to compare with")
        return 1
    results = [r for r in outcomes if not isinstance(r, str)]
    rows, diverged = [], []
    oracle_ok = bool(all(math.isfinite(v) for v in ref.losses))
    for i, ((name, dt), r) in enumerate(zip(plan, outcomes)):
        if isinstance(r, str):
            diverged.append(f"{name} {dt}: failed: {r}")
            rows.append({
                "backend": name, "dtype": dt, "oracle": False, "final_loss": float("nan"),
                "max_rel_diff": float("nan"), "worst_param": "", "steps_per_s": float("nan"),
                "ok": False, "status": "FAILED", "error": r,
            })
            continue
        diff, worst = (0.0, "") if i == 0 else max_relative_difference(r.params, ref.params)
        finite = all(math.isfinite(v) for v in r.losses)
        ok = finite and (i == 0 or diff <= tol)
        if not ok:
            why = "non-finite loss" if not finite else f"max rel diff {diff:.2e} > {tol:.0e} (worst: {worst})"
            diverged.append(f"{r.backend} {r.dtype}: {why}")
        rows.append({
            "backend": r.backend, "dtype": r.dtype, "oracle": i == 0,
            "final_loss": float(r.losses[-1]), "max_rel_diff": diff, "worst_param": worst,
            "steps_per_s": r.steps_per_s, "ok": ok, "status": "ok" if ok else "DIVERGED",
        })

    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, f"validate-{optimizer}.png")
    jpath = os.path.join(out, f"validate-{optimizer}.json")
    title = (f"xpopt validate: {optimizer}, {steps} steps, seed {seed}, "
             f"char-MLP on {len(problem.vocab)} symbols")
    try:
        plot_losses(results, png, title)
    except ImportError:
        png = None
    report = {
        "command": "validate",
        "settings": settings(argv, optimizer=optimizer, lr=spec.hyperparameters["lr"],
                             lr_schedule="linear decay to 0", steps=steps, seed=seed, dtype=dtype,
                             backends=[n for n, _ in plan[1:]], torch_threads=torch_threads, tolerance=tol),
        "optimizer": optimizer, "steps": steps, "seed": seed, "dtype": dtype,
        "model": dataclasses.asdict(problem.config) | {"vocab_size": len(problem.vocab)},
        "hyperparameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.hyperparameters.items()},
        "lr_schedule": "linear decay: lr * (1 - t / steps) for update t = 0..steps-1",
        "labels": LABELS, "tolerance": {"max_rel_diff": tol, "dtype": dtype, "reason": TOLERANCE_REASON.format(steps=steps, dtype=dtype, u=_UNIT_ROUNDOFF[dtype], optimizer=optimizer)},
        "skipped": [{"backend": b, "reason": why} for b, why in skipped],
        "rows": rows, "ok": not diverged and oracle_ok, "diverged": diverged,
        "losses": {f"{r.backend} {r.dtype}": r.losses.tolist() for r in results},
        "wall_s": elapsed, "png": png,
    }
    with open(jpath, "w") as f:
        json.dump(_json_safe(report), f, indent=1)

    p("")
    p(format_table(rows))
    p("")
    p(f"max rel diff = max over params of ||p - p_ref|| / ||p_ref||, p_ref from numpy float64 (the oracle).")
    p(f"tolerance {tol:.0e} for {dtype}: " + TOLERANCE_REASON.format(steps=steps, dtype=dtype, u=_UNIT_ROUNDOFF[dtype], optimizer=optimizer) + ".")
    p("steps/s excludes the first step (JAX compile, lazy set-up).")
    if dtype == "float32" and steps > FLOAT32_HORIZON:
        p(f"note: beyond ~{FLOAT32_HORIZON} steps float32 runs of this training separate from float64 "
          "exponentially (chaotic dynamics), so they may exceed the tolerance without a bug; "
          "use --dtype float64 to check long runs.")
    for b, why in skipped:
        p(f"skipped {b}: {why}")
    p(f"loss curves: {png}" if png else "loss curves: not drawn (matplotlib not installed: pip install xpopt[cli])")
    p(f"table (JSON): {jpath}")
    p(f"wall time: {elapsed:.1f} s")
    if not oracle_ok:
        p("FAILED: the numpy float64 oracle produced a non-finite loss")
        return 1
    if diverged:
        p("DIVERGED: " + "; ".join(diverged))
        return 1
    p(f"OK: {len(results)} runs agree with the oracle within {tol:.0e}")
    return 0


# ------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizer", default="muon", choices=sorted(OPTIMIZERS),
                        help="optimizer to validate; on 2 CPU cores the default run of kron takes about "
                             "35-50 s (3 min when they are very busy with other jobs), muon about 10 s "
                             "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="training steps per backend (default: %(default)s)")
    parser.add_argument("--backends", default=None, metavar="LIST",
                        help=f"comma list from {','.join(BACKENDS)} (default: every installed one; "
                             "cupy only with a CUDA GPU). The numpy float64 oracle always runs.")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="dtype of the runs compared with the float64 oracle (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help="folder for the loss-curve PNG and the JSON table (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the initial parameters and the batches (default: %(default)s)")
    parser.add_argument("--torch-threads", type=int, default=DEFAULT_TORCH_THREADS, metavar="N",
                        help="torch intra-op threads for the torch run: the model's matrices are too small "
                             "for threads to pay, and on a busy machine torch's thread pool stalls "
                             "(default: %(default)s)")


DESCRIPTION = """\
Train a small character-level model (embedded text, no download) with the same
initial parameters, batches and hyperparameters on every installed backend
(numpy, torch, jax; cupy with a CUDA GPU) and compare each run with a NumPy
float64 oracle. Prints a table (final loss, max relative parameter difference,
steps/s), writes a loss-curve PNG and the table as JSON to --out.
Exit code: 0 all backends agree within tolerance, 1 one diverged (named),
2 bad arguments."""


def run_validate(args: argparse.Namespace) -> int:
    """CLI entry point for ``xpopt validate`` (argparse namespace -> exit code)."""
    try:
        return run(optimizer=args.optimizer, steps=args.steps, backends=args.backends,
                   dtype=args.dtype, out=args.out, seed=args.seed, torch_threads=args.torch_threads,
                   argv=getattr(args, "_argv", None))
    except UsageError as e:
        args._parser.error(str(e))   # prints usage + message, exits 2
        raise  # pragma: no cover


# ------------------------------------------------------------------------- estimate

# Seconds per training step of each run (1 / its steps/s) and the command's fixed cost
# (imports, JAX's compile, the PNG), measured with `python -m xpopt validate` (BLAS and
# torch on one thread) on this project's machine, 2 CPU cores shared with other jobs:
# Kron 46 s wall at load average ~5 (34 s idle, 176 s at load ~9; 260 s at load ~5 and 39 s
# idle with BLAS and torch on 2 threads, as before), Muon 11.5 s at load ~2 (7.5 s idle).
# Only for the estimate printed up front.
STEP_SECONDS = {
    "muon": {"numpy float64": 1 / 608, "numpy float32": 1 / 818, "torch": 1 / 331, "jax": 1 / 1110},
    "kron": {"numpy float64": 1 / 120, "numpy float32": 1 / 137, "torch": 1 / 65, "jax": 1 / 41.5},
}
FIXED_SECONDS = {"muon": 8.1, "kron": 18.1}


def estimate_seconds(optimizer: str, plan, steps: int) -> float:
    """Expected wall time of a run of ``plan`` (``[(backend, dtype)]``), from :data:`STEP_SECONDS`."""
    per = STEP_SECONDS[optimizer]
    total = FIXED_SECONDS[optimizer]
    for name, dt in plan:
        total += steps * per.get(f"{name} {dt}", per.get(name, per["numpy float32"]))
    return total


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


def estimate_line(optimizer: str, plan, steps: int) -> str:
    """The line printed (on stderr) before the runs: what runs and about how long it takes."""
    runs = ", ".join(f"{n} {d}" for n, d in plan)
    return (f"xpopt validate: {optimizer}, {len(plan)} runs of {steps} steps ({runs}); expect about "
            f"{_duration(estimate_seconds(optimizer, plan, steps))} on 2 CPU cores (measured there with other "
            "jobs running; a busier machine takes longer)")
