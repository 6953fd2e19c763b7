"""Parity with ``optax.contrib.muon`` 0.2.8 on the options it has and we added:
``preconditioning``, ``adaptive``, ``consistent_rms``, complex parameters
(line numbers below are optax 0.2.8's ``optax/contrib/_muon.py``).

Every adapter where the option exists runs the same problem from the same
start: ``xpopt.adapters.optax.muon`` (jitted), ``xpopt.adapters.torch.Muon``
and ``xpopt.adapters.arrays.muon`` (NumPy), against optax's trajectory.

The problem.  Two flax-layout matrices ``w1 (16, 24)``, ``w2 (24, 8)`` (Muon in
both) and a bias ``b (8,)`` (AdamW in both), loss ``0.5 mean |tanh(X w1) w2 + b
- Y|^2`` (real) or ``0.5 mean |X w1 w2 + b - Y|^2`` (complex, bilinear): smooth,
no kinks.  The gradient is one NumPy float64 function of the current float32
(complex64) params, cast to the param dtype, so every run sees gradients of
its own trajectory computed the same way.  Our runs start from a copy nudged
by 3 float32 ulps per entry (another machine's BLAS rounds differently), optax
from the exact start; the comparison must survive that.

Option mapping (optax -> ours): ``beta -> momentum``, ``ns_coeffs`` Keller
Jordan's triple (optax's default) -> the same triple, ``"dion"`` -> our
``"quintic"`` (the same 5 triples), ``ns_steps=5``, ``eps -> eps`` and
``fallback_eps``, ``consistent_rms=None -> adjust_lr_fn="original"``,
``consistent_rms=c -> adjust_lr_fn="match_rms_adamw", consistent_rms=c``,
``adam_b1/b2 -> betas``, ``adam_learning_rate -> fallback lr``,
``adam_weight_decay -> fallback_weight_decay``, ``nesterov=False``.

eps.  optax divides by ``||X|| + eps`` (L.340/342) where we divide by
``max(||X||, eps)``; AOL/Schatten clip with a floor in both (L.216/232, ours
after dividing by the largest entry).  With ``EPS = 1e-12`` the additive
difference is ``eps/||X|| <= 1e-12 / 1e-2 = 1e-10`` relative (the smallest
momentum norm here is ~5e-2), 600x below one float32 ulp (6e-8), and no floor
binds: so eps plays no part in these comparisons.  (The placement itself is
pinned in tests/test_parity_optax_muon.py::test_ns_prescale_eps_placement.)

Known differences, pinned at the end (not hidden):

1. ``nesterov=True`` bias correction (L.488-495): optax corrects the two terms
   of its Nesterov mix separately, ours (``core.muon.debias_factor``) is the
   unbiased correction of the whole mix.  Without ``adaptive`` Newton-Schulz
   removes any scalar; with it, for a constant gradient optax's update is
   ``k_t = mu(1-mu^t)/(1-mu^(t+1)) + (1-mu)/(1-mu^t)`` times ours (1.474, 1.157,
   1.078, 1.047, 1.031 for t = 1..5 at mu=0.9), and ours equals the unbiased
   ``<g, O> O`` at every step.  (``momentum_bias_correction=True``, issue 23,
   reproduces optax's factor: tests/test_compat_optax_contrib.py.)
2. complex ``schatten``: optax's first step uses ``a = x @ x.T`` (L.231, no
   conjugate, unlike L.215 and L.245), so for complex input it is not X X^H;
   confirmed: its output is NaN.  Ours is finite and is U p(S) V^H.
3. complex ``adaptive``: optax scales by the complex ``sum(conj(x) * y)``
   (L.507), we by its real part.  In exact arithmetic it is real
   (``tr(S p(S))``); optax's imaginary part is float32 rounding (checked).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install xpopt[jax])")
pytest.importorskip("optax", reason="optax is not installed (pip install xpopt[jax])")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from _peers import load_optax_muon, torch_module_threads, trajectory_error  # noqa: E402,F401
from _subset import default_cases  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_module_threads")

KJ = (3.4445, -4.7750, 2.0315)
EPS = 1e-12
STEPS = 8
ORDER = ("w1", "w2", "b")
SHAPES = {"w1": (16, 24), "w2": (24, 8), "b": (8,)}
# One float32 Newton-Schulz call in a different op order, relative to the
# update's largest entry: measured <= 2.7e-6 in tests/test_parity_optax_muon.py
# (and here); 2e-5 as there.
NS_REL = 2e-5


def _show(label, value):
    if os.environ.get("XPOPT_SHOW_ERRORS"):
        print(f"[measured] {label}: {value:.3g}")
    return value


# --------------------------------------------------------------- the problem


@functools.lru_cache(maxsize=None)
def _problem(complex_: bool):
    rng = np.random.default_rng(7)

    def draw(shape, scale):
        x = rng.standard_normal(shape)
        if complex_:
            x = (x + 1j * rng.standard_normal(shape)) / math.sqrt(2)
        return x * scale

    dt = np.complex64 if complex_ else np.float32
    params = {"w1": draw((16, 24), 1 / 4), "w2": draw((24, 8), 1 / math.sqrt(24)), "b": draw((8,), 0.1)}
    params = {k: v.astype(dt) for k, v in params.items()}
    X = draw((64, 16), 1.0)
    Y = draw((64, 8), 1.0)
    return params, X, Y


def grads(params, complex_):
    """Gradient of the loss at ``params`` (dict of numpy arrays), float64 maths.

    Complex: the conjugate Wirtinger gradient (torch's convention, steepest
    ascent of the real loss); any fixed convention would do for parity.
    """
    _, X, Y = _problem(complex_)
    w1, w2, b = (np.asarray(params[k]).astype(np.complex128 if complex_ else np.float64) for k in ORDER)
    n = X.shape[0]
    if complex_:
        h = X @ w1
        r = (h @ w2 + b - Y) / n
        g = {"w1": X.conj().T @ (r @ w2.conj().T), "w2": h.conj().T @ r, "b": r.sum(0)}
    else:
        h = np.tanh(X @ w1)
        r = (h @ w2 + b - Y) / n
        g = {"w1": X.T @ ((r @ w2.T) * (1 - h**2)), "w2": h.T @ r, "b": r.sum(0)}
    dt = np.complex64 if complex_ else np.float32
    return {k: v.astype(dt) for k, v in g.items()}


def nudged(params, ulps=3, seed=11):
    """Each entry moved by ``ulps`` float32 ulps up or down (real and imaginary parts)."""
    rng = np.random.default_rng(seed)

    def move(x):
        x = np.asarray(x, np.float32)
        return x + (ulps * np.spacing(np.abs(x)) * rng.choice([-1, 1], x.shape)).astype(np.float32)

    out = {}
    for k, v in params.items():
        out[k] = (move(v.real) + 1j * move(v.imag)).astype(v.dtype) if np.iscomplexobj(v) else move(v)
    return out


def as_list(params):
    return [np.array(params[k]) for k in ORDER]


# --------------------------------------------------------------- the runners


def _run_optax_like(tx, complex_, start, steps):
    params = {k: jnp.asarray(v) for k, v in start.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    traj = [as_list(start)]
    for _ in range(steps):
        g = grads({k: np.asarray(v) for k, v in params.items()}, complex_)
        updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        traj.append(as_list({k: np.asarray(v) for k, v in params.items()}))
    return traj


def run_theirs(case, steps=STEPS):
    params0, _, _ = _problem(case["complex"])
    return _run_optax_like(optax.contrib.muon(**theirs_kwargs(case)), case["complex"], params0, steps)


@functools.lru_cache(maxsize=None)
def theirs_cached(case_id):
    return run_theirs(CASES[case_id])


def run_ours(adapter, case, steps=STEPS, start=None):
    complex_ = case["complex"]
    if start is None:
        start = nudged(_problem(complex_)[0])
    kw = ours_kwargs(case)
    lr, flr = kw.pop("lr"), kw.pop("fallback_lr")
    if adapter == "optax":
        from xpopt.adapters import optax as xo

        tx = xo.muon(lr, fallback_learning_rate=flr, labels={"w1": "muon", "w2": "muon", "b": "fallback"}, **kw)
        return _run_optax_like(tx, complex_, start, steps)
    if adapter == "arrays":
        from xpopt.adapters import arrays

        opt = arrays.muon(lr, fallback_lr=flr, dimension_numbers="flax",
                          labels={"w1": "muon", "w2": "muon", "b": "fallback"}, **kw)
        params = {k: np.array(v) for k, v in start.items()}
        state = opt.init(params)
        traj = [as_list(params)]
        for _ in range(steps):
            updates, state = opt.update(grads(params, complex_), state, params)
            params = arrays.apply_updates(params, updates)
            traj.append(as_list(params))
        return traj
    torch = pytest.importorskip("torch")
    from xpopt.adapters.torch import Muon

    # torch layout: a Linear weight is (out, in), the transpose of flax's kernel
    tp = {k: torch.nn.Parameter(torch.from_numpy(np.array(v.T if v.ndim == 2 else v))) for k, v in start.items()}
    opt = Muon([{"params": [tp["w1"], tp["w2"]], "use_muon": True},
                {"params": [tp["b"]], "use_fallback": True}], lr=lr, fallback_lr=flr, **kw)

    def current():
        return {k: (p.detach().numpy().T if p.ndim == 2 else p.detach().numpy()).copy() for k, p in tp.items()}

    traj = [as_list(current())]
    for _ in range(steps):
        g = grads(current(), complex_)
        for k, p in tp.items():
            p.grad = torch.from_numpy(np.ascontiguousarray(g[k].T if g[k].ndim == 2 else g[k]))
        opt.step()
        traj.append(as_list(current()))
    return traj


def traj_err(ours, theirs) -> float:
    """``_peers.trajectory_error`` for real or complex params (complex as its (re, im) pair)."""
    def split(step):
        return [np.stack([x.real, x.imag]) if np.iscomplexobj(x) else x for x in step]

    return trajectory_error([split(s) for s in ours], [split(s) for s in theirs])


# --------------------------------------------------------------- cases

BASE = dict(lr=0.02, adam_lr=0.003, beta=0.9, wd=0.05, b1=0.9, b2=0.99, mode="frobenius", coeffs="kj",
            adaptive=False, rms=None, complex=False, nesterov=False)


def _case(**kw):
    return {**BASE, **kw}


# ``differs_from``: the case this option changes; item 5 of the brief: each
# option moves optax's own trajectory far beyond the tolerance, so a parity
# pass cannot come from an option being ignored.
CASES = {
    "frobenius": _case(),
    "spectral": _case(mode="spectral", differs_from="frobenius"),
    "aol": _case(mode="aol", differs_from="frobenius"),
    "schatten": _case(mode="schatten", differs_from="frobenius"),
    "adaptive": _case(adaptive=True, lr=0.01, differs_from="frobenius"),
    "rms0.2-dion": _case(rms=0.2, coeffs="dion", differs_from="frobenius"),
    "rms0.35-dion-aol": _case(rms=0.35, coeffs="dion", mode="aol", differs_from="rms0.2-dion"),
    "complex-frobenius": _case(complex=True),
    "complex-spectral": _case(complex=True, mode="spectral", differs_from="complex-frobenius"),
    "complex-aol": _case(complex=True, mode="aol", differs_from="complex-frobenius"),
    "complex-adaptive": _case(complex=True, adaptive=True, lr=0.01, differs_from="complex-frobenius"),
    "complex-rms0.35-dion": _case(complex=True, rms=0.35, coeffs="dion", differs_from="complex-frobenius"),
}


def theirs_kwargs(c):
    return dict(learning_rate=c["lr"], ns_coeffs=KJ if c["coeffs"] == "kj" else "dion", ns_steps=5,
                beta=c["beta"], eps=EPS, weight_decay=c["wd"], nesterov=c["nesterov"], adaptive=c["adaptive"],
                preconditioning=c["mode"], consistent_rms=c["rms"], adam_b1=c["b1"], adam_b2=c["b2"],
                adam_weight_decay=0.0, adam_learning_rate=c["adam_lr"])


def ours_kwargs(c):
    return dict(lr=c["lr"], fallback_lr=c["adam_lr"], momentum=c["beta"], nesterov=c["nesterov"],
                ns_coefficients=KJ if c["coeffs"] == "kj" else "quintic", ns_steps=5, eps=EPS,
                weight_decay=c["wd"], adaptive=c["adaptive"], preconditioning=c["mode"],
                adjust_lr_fn="original" if c["rms"] is None else "match_rms_adamw", consistent_rms=c["rms"],
                fallback="adamw", betas=(c["b1"], c["b2"]), fallback_eps=EPS, fallback_weight_decay=0.0)


ADAPTERS = ["optax", "torch", "arrays"]

# Trajectory tolerance, relative to each tensor's displacement (trajectory_error,
# tests/_peers.py).  Its floor is float32 storage, as argued there: after step 1
# a param of size 0.6 (ulp 6e-8) has moved by ~7e-3, so one rounding is ~5e-6 of
# the displacement, and the 3-ulp nudge of our start adds ~2.5e-5 on its own.
# Measured from the exact start: <= 6e-6 (real), <= 1.9e-5 (complex: two
# roundings per entry); from the nudged start (5 nudge seeds, 8 and 16 steps):
# <= 4.2e-5 (complex-spectral), <= 2.4e-5 (real).  The errors do not grow with
# steps (the smooth problem does not amplify them).  2e-4 keeps ~5x over the
# worst; an option ignored or mapped wrongly costs >= 0.25 here (the option-gap
# test below), 1000x the tolerance.  (The suite's F32_TRAJ_TOL, 1e-4, was argued
# for un-nudged runs; the nudge is what the extra factor 2 pays for.)
TRAJ_TOL = 2e-4


# Each case against optax through one adapter by default, the adapters taking turns (every
# adapter meets real and complex cases); the adapters agree with each other in
# tests/test_definitions.py, and -m slow runs every adapter on every case.
_TRAJ = [pytest.param(c, a, id=f"{c}-{a}") for c in CASES for a in ADAPTERS]


@pytest.mark.parametrize("case_id, adapter", default_cases(
    _TRAJ, [f"{c}-{ADAPTERS[i % len(ADAPTERS)]}" for i, c in enumerate(CASES)]))
def test_trajectory_matches_optax_contrib_muon(adapter, case_id):
    theirs = theirs_cached(case_id)
    assert all(np.all(np.isfinite(x)) for step in theirs for x in step)
    ours = run_ours(adapter, CASES[case_id])
    err = _show(f"traj {case_id} {adapter}", traj_err(ours, theirs))
    assert err < TRAJ_TOL


@pytest.mark.parametrize("case_id", [k for k, c in CASES.items() if "differs_from" in c])
def test_each_option_moves_optax_far_beyond_tolerance(case_id):
    """Item 5: had an adapter ignored the option, its run would equal the
    ``differs_from`` case, which is >= 100x TRAJ_TOL away from optax's
    (measured gaps 0.25 .. 0.81 of the displacement)."""
    gap = _show(f"option gap {case_id}",
                traj_err(theirs_cached(CASES[case_id]["differs_from"]), theirs_cached(case_id)))
    assert gap > 100 * TRAJ_TOL


# --------------------------------------------------------------- Newton-Schulz itself


@pytest.mark.parametrize("mode, shape", default_cases(
    [pytest.param(m, s, id=f"{m}-{n}") for m in ("frobenius", "spectral", "aol", "schatten")
     for s, n in (((16, 24), "wide"), ((24, 16), "tall"))],
    ["frobenius-wide", "spectral-tall", "aol-wide", "schatten-tall"]))
def test_orthogonalize_matches_optax(mode, shape):
    """One NS call: optax's ``orthogonalize_via_newton_schulz`` (jax float32)
    against our float64 oracle and our jax float32, for both coefficient sets.
    For AOL this is the check that our row scaling and reused Gram matrix are
    optax's (L.207-220)."""
    om = load_optax_muon()
    from xpopt.core.newton_schulz import COEFFICIENTS, orthogonalize

    G = np.random.default_rng(3).standard_normal(shape)
    for ours_c, theirs_c in ((KJ, jnp.asarray(KJ)), ("quintic", jnp.asarray(COEFFICIENTS["quintic"]))):
        theirs = np.asarray(om.orthogonalize_via_newton_schulz(jnp.asarray(G, jnp.float32), theirs_c, 5, mode, EPS))
        oracle = orthogonalize(G, coefficients=ours_c, steps=5, eps=EPS, preconditioning=mode)
        mine = np.asarray(orthogonalize(jnp.asarray(G, jnp.float32), coefficients=ours_c, steps=5, eps=EPS,
                                        preconditioning=mode))
        scale = np.abs(oracle).max()
        # float32 vs float64, and float32 vs float32 in another op order:
        # measured <= 1.5e-6 relative to the largest entry
        assert _show(f"ns optax-vs-oracle {mode} {shape}", np.abs(theirs - oracle).max() / scale) < NS_REL
        assert _show(f"ns ours-vs-optax {mode} {shape}", np.abs(mine - theirs).max() / scale) < NS_REL


# --------------------------------------------------------------- plumbing of the other new options


def _one_update(adapter, G, **kw):
    """Muon update of one torch-layout matrix from a zero state (params zero, no wd)."""
    if adapter == "arrays":
        from xpopt.adapters import arrays

        opt = arrays.muon(1.0, labels=["muon"], **kw)
        return opt.update([G], opt.init([np.zeros_like(G)]), [np.zeros_like(G)])[0][0]
    if adapter == "optax":
        from xpopt.adapters import optax as xo

        tx = xo.muon(1.0, labels="muon", dimension_numbers="torch", **kw)
        p = [jnp.zeros(G.shape, G.dtype)]
        return np.asarray(tx.update([jnp.asarray(G)], tx.init(p), p)[0][0])
    torch = pytest.importorskip("torch")
    from xpopt.adapters.torch import Muon

    W = torch.nn.Parameter(torch.zeros(G.shape, dtype=torch.float32))
    opt = Muon([{"params": [W], "use_muon": True}], lr=1.0, **kw)
    W.grad = torch.from_numpy(G.copy())
    opt.step()
    return W.detach().numpy()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_ns_steps_none_is_the_presets_own_length(adapter):
    G = np.random.default_rng(5).standard_normal((16, 24)).astype(np.float32)
    kw = dict(ns_coefficients="polar_express", nesterov=False)
    none = _one_update(adapter, G, ns_steps=None, **kw)
    np.testing.assert_array_equal(none, _one_update(adapter, G, ns_steps=8, **kw))
    assert np.abs(none - _one_update(adapter, G, ns_steps=5, **kw)).max() > 1e-4


# --------------------------------------------------------------- known differences, pinned


def _const_grad_updates(adapter, nesterov, steps=5, lr=0.01, beta=0.9):
    """Per-step updates of ``w`` (flax layout (16, 24)) for a constant gradient,
    params held at zero (optimiser-only run), wd 0, adaptive on."""
    G = np.random.default_rng(9).standard_normal((16, 24)).astype(np.float32)
    if adapter == "theirs":
        tx = optax.contrib.muon(learning_rate=lr, ns_coeffs=KJ, ns_steps=5, beta=beta, eps=EPS,
                                nesterov=nesterov, adaptive=True)
    elif adapter == "optax":
        from xpopt.adapters import optax as xo

        tx = xo.muon(lr, momentum=beta, nesterov=nesterov, adaptive=True, ns_coefficients=KJ, ns_steps=5, eps=EPS,
                     adjust_lr_fn="original", labels="muon")
    if adapter in ("theirs", "optax"):
        p = {"w": jnp.zeros((16, 24), jnp.float32)}
        state, out = tx.init(p), []
        upd = jax.jit(tx.update)
        for _ in range(steps):
            u, state = upd({"w": jnp.asarray(G)}, state, p)
            out.append(np.asarray(u["w"]))
        return G, out
    if adapter == "arrays":
        from xpopt.adapters import arrays

        opt = arrays.muon(lr, momentum=beta, nesterov=nesterov, adaptive=True, ns_coefficients=KJ, ns_steps=5,
                          eps=EPS, adjust_lr_fn="original", labels=["muon"], dimension_numbers="flax")
        p = [np.zeros_like(G)]
        state, out = opt.init(p), []
        for _ in range(steps):
            u, state = opt.update([G], state, p)
            out.append(u[0])
        return G, out
    torch = pytest.importorskip("torch")
    from xpopt.adapters.torch import Muon

    W = torch.nn.Parameter(torch.zeros(24, 16))
    opt = Muon([{"params": [W], "use_muon": True}], lr=lr, momentum=beta, nesterov=nesterov, adaptive=True,
               ns_coefficients=KJ, ns_steps=5, eps=EPS, adjust_lr_fn="original")
    out = []
    for _ in range(steps):
        before = W.detach().clone()
        W.grad = torch.from_numpy(G.T.copy())
        opt.step()
        out.append((W.detach() - before).numpy().T)
    return G, out


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adaptive_nesterov_differs_from_optax_by_its_bias_factor(adapter):
    """Difference 1, exactly.  Constant gradient g, mu = 0.9, adaptive:

    * nesterov=False: optax's mu_hat = buf / (1-mu^t) = g, ours debias*buf = g:
      equal updates at every step;
    * nesterov=True: ours is still exactly -lr * scale * <g, O(g)> O(g) at every
      step (unbiased), while optax's mix is k_t g with
      k_t = mu (1-mu^t)/(1-mu^(t+1)) + (1-mu)/(1-mu^t) (1.474, 1.157, 1.078,
      1.047, 1.031 for t = 1..5, -> 1), so its update is k_t times ours.
    """
    from xpopt.core.newton_schulz import orthogonalize

    lr, beta = 0.01, 0.9
    for nesterov in (False, True):
        G, theirs = _const_grad_updates("theirs", nesterov, lr=lr, beta=beta)
        _, ours = _const_grad_updates(adapter, nesterov, lr=lr, beta=beta)
        O = orthogonalize(G.astype(np.float64), coefficients=KJ, steps=5)   # flax (in, out) = (16, 24)
        unbiased = -lr * math.sqrt(max(1, 24 / 16)) * np.sum(G * O) * O
        for t, (u_ours, u_theirs) in enumerate(zip(ours, theirs), start=1):
            k = beta * (1 - beta**t) / (1 - beta ** (t + 1)) + (1 - beta) / (1 - beta**t) if nesterov else 1.0
            top = np.abs(unbiased).max()
            # one float32 NS call each, and a float32 bias correction (1-beta^t):
            # measured <= 2.4e-6 of the largest entry; NS_REL as argued above
            assert _show(f"unbiased {adapter} nesterov={nesterov} t={t}",
                         np.abs(u_ours - unbiased).max() / top) < NS_REL
            assert _show(f"k_t {adapter} nesterov={nesterov} t={t}",
                         np.abs(u_theirs - k * u_ours).max() / (k * top)) < NS_REL
            if nesterov:  # k_t - 1 >= 0.03 for t <= 5: 1500x NS_REL, not rounding
                assert k - 1 > 0.03


def test_complex_schatten_is_nan_in_optax_finite_and_right_in_ours():
    """Difference 2: optax's Schatten first step (L.231) uses ``x @ x.T``; for a
    complex matrix that is not X X^H.  Confirmed: NaN out.  Ours (X X^H) equals
    U p(S / ||S||_4) V^H computed from the complex SVD, and the adapters run."""
    om = load_optax_muon()
    from xpopt.core.newton_schulz import orthogonalize, scalar_iteration

    rng = np.random.default_rng(4)
    G = rng.standard_normal((16, 24)) + 1j * rng.standard_normal((16, 24))
    theirs = np.asarray(om.orthogonalize_via_newton_schulz(jnp.asarray(G, jnp.complex64), jnp.asarray(KJ), 5,
                                                           "schatten", EPS))
    assert np.isnan(theirs).any()  # optax 0.2.8's behaviour; if this fails, optax was fixed: compare instead
    U, s, Vh = np.linalg.svd(G, full_matrices=False)
    want = (U * scalar_iteration(s / np.sum(s**4) ** 0.25, KJ, 5)) @ Vh
    mine = np.asarray(orthogonalize(jnp.asarray(G, jnp.complex64), coefficients=KJ, steps=5, eps=EPS,
                                    preconditioning="schatten"))
    assert np.all(np.isfinite(mine))
    assert _show("complex schatten ours vs svd", np.abs(mine - want).max() / np.abs(want).max()) < NS_REL
    # whole optimiser: optax's trajectory goes NaN; ours stays finite and equals
    # our complex128 oracle run (the NumPy float64 adapter) to float32 accuracy
    case = _case(complex=True, mode="schatten")
    theirs_traj = run_theirs(case, steps=2)
    assert np.isnan(theirs_traj[1][0]).any()
    params0 = _problem(True)[0]
    oracle = run_ours("arrays", case, steps=4, start={k: v.astype(np.complex128) for k, v in params0.items()})
    for adapter in ADAPTERS:
        ours = run_ours(adapter, case, steps=4, start=params0)
        assert all(np.all(np.isfinite(x)) for step in ours for x in step)
        # measured <= 2.1e-5 (complex64 vs complex128 from the same start)
        assert _show(f"complex schatten traj {adapter} vs c128", traj_err(ours, oracle)) < TRAJ_TOL


def test_complex_adaptive_scale_is_real_up_to_rounding():
    """Difference 3: optax's complex ``sum(conj(x) * y)`` (L.507) vs our real part.
    With y = NS(x) = U p(S) V^H, sum(conj(x) y) = tr(S p(S)): real.  In float64
    its imaginary part is ~1e-16 of the real part; optax's float32 one is
    rounding (measured 2.3e-8 of the real part), which the trajectory
    tolerance absorbs."""
    om = load_optax_muon()
    from xpopt.core.newton_schulz import orthogonalize

    rng = np.random.default_rng(6)
    x = rng.standard_normal((16, 24)) + 1j * rng.standard_normal((16, 24))
    y = orthogonalize(x, coefficients=KJ, steps=5)
    s = np.sum(np.conj(x) * y)
    assert abs(s.imag) < 1e-13 * abs(s.real)
    x32 = jnp.asarray(x, jnp.complex64)
    y32 = om.orthogonalize_via_newton_schulz(x32, jnp.asarray(KJ), 5, "frobenius", EPS)
    s32 = complex(jnp.sum(x32.conj() * y32))
    assert _show("optax complex adaptive imag/real", abs(s32.imag) / abs(s32.real)) < 1e-5


def test_complex_adamw_matches_optax_adamw():
    """Core AdamW on complex params vs ``optax.adamw``: both keep one real second
    moment |g|^2 per complex entry (optax: ``update_moment_per_elem_norm`` with
    ``abs_sq``)."""
    from xpopt.core.adam import adamw_step

    rng = np.random.default_rng(8)
    shape = (6, 4)
    p0 = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    gs = [(rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64) for _ in range(10)]
    tx = optax.adamw(1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.05)
    tp = jnp.asarray(p0)
    st = tx.init(tp)
    p, m, v = jnp.asarray(p0), jnp.zeros(shape, jnp.complex64), jnp.zeros(shape, jnp.float32)
    for t, g in enumerate(gs, start=1):
        u, st = tx.update(jnp.asarray(g), st, tp)
        tp = optax.apply_updates(tp, u)
        p, m, v = adamw_step(p, jnp.asarray(g), m, v, t, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    nu = np.asarray(st[0].nu)
    assert np.abs(nu.imag).max() == 0 and np.asarray(v).dtype == np.float32
    np.testing.assert_allclose(np.asarray(v), nu.real, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(m), np.asarray(st[0].mu), rtol=0, atol=2e-6)
    # 10 steps, each rounding p (|re|, |im| <= 2.6: ulp 2.4e-7) in a different
    # op order on each side (optax adds -lr*(dir + wd*p), we scale then
    # subtract): up to ~1 ulp per step apart, measured 1.1e-6; 5e-6 = 2 ulps/step
    assert _show("complex adamw vs optax", np.abs(np.asarray(p) - np.asarray(tp)).max()) < 5e-6
