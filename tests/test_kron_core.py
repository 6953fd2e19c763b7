"""core.kron: what the PSGD preconditioner fit must do, checked on the maths itself.

Every tolerance is stated where it is used, with its reason.  The cross-
backend trajectory test drives the core exactly as the adapters do (per
parameter keys, update draws, Toeplitz noise) so that NumPy, torch, JAX
(jitted) and array_api_strict run the same 30 steps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from xpopt.core import blocking as B
from xpopt.core import kron as K
from xpopt.core import random as R

from _nudge import nudge


def _np_f(lay, dtype=np.float32, scale=1.0):
    return K.init_factors(np.zeros(0, np.float32), lay, dtype=dtype, init_scale=scale)


def _spd(rng, n, diag=False, lo=0.5, hi=2.0):
    """An SPD matrix with eigenvalues spread over [lo, hi] (both ends included)."""
    s = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    s[0], s[-1] = lo, hi
    if diag:
        return np.diag(rng.permutation(s))
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (U * s) @ U.T


def _block_diag(rng, n, t, diag):
    M = np.zeros((n, n))
    for i in range(0, n, t):
        k = min(t, n - i)
        M[i:i + k, i:i + k] = _spd(rng, k, diag)
    return M


def _cond(C):
    e = np.linalg.eigvalsh(C)
    return e.max() / e.min()


def _precond_matrix(Q, valid):
    Q = np.asarray(Q, np.float64)
    if Q.ndim == 1:
        return np.diag(Q[:valid] ** 2)
    Q = Q[:valid, :valid]
    return Q.T @ Q


# ------------------------------------------------------------------ whitening

WHITEN = [
    # (shape, block_size, max_size_dense, left diagonal A, right diagonal B)
    pytest.param((8, 6), 256, 16384, False, False, id="dense"),
    pytest.param((8, 6), 256, 5, True, True, id="diag"),
    pytest.param((6, 12), 256, 10, False, True, id="dense-diag"),
    pytest.param((12, 10), 4, 16384, False, False, id="blocked"),
]


@pytest.mark.parametrize("style", K.UPDATE_STYLES)
@pytest.mark.parametrize("shape,bs,mds,diag_l,diag_r", WHITEN)
def test_whitening(style, shape, bs, mds, diag_l, diag_r):
    """Gradients ``G = A Z B``: the fitted ``P = Pl (x) Pr`` whitens them.

    The preconditioned gradient ``Pl G Pr`` has row covariance proportional
    to ``Pl A A^T Pl`` and column covariance to ``Pr B^T B Pr``; the ideal
    fit makes both multiples of I.  ``A``, ``B`` have eigenvalues spread over
    [0.5, 2] (block diagonal along the tiles for the blocked layout, since a
    tile can only whiten its own block; diagonal where the factor is), so
    before fitting each covariance has condition number 16.  After 3000
    fits at preconditioner_lr 0.02 every block's covariances must have
    condition number < 2: what is left is the fit's stochastic fluctuation
    at that step size (measured 1.1-1.6 over seeds 0-2, both styles, every
    path; at preconditioner_lr 0.05 it is 1.4-1.9).
    """
    rng = np.random.default_rng(0)
    m, n = shape
    lay = B.layout(shape, block_size=bs, max_size_dense=mds)
    A = _block_diag(rng, m, lay.tr if lay.left == "dense" else m, diag_l)
    Bm = _block_diag(rng, n, lay.tc if lay.right == "dense" else n, diag_r)
    f = _np_f(lay)
    for _ in range(3000):
        G = (A @ rng.standard_normal(shape) @ Bm).astype(np.float32)
        _, _, f = K.precondition(G, f, lay, update=True, plr=0.02, style=style)
    vr, vc = B.valid_sizes(lay)
    for b in range(lay.blocks):
        i, j = divmod(b, lay.nc)
        Ai = A[i * lay.tr:i * lay.tr + vr[b], i * lay.tr:i * lay.tr + vr[b]]
        Bj = Bm[j * lay.tc:j * lay.tc + vc[b], j * lay.tc:j * lay.tc + vc[b]]
        Pl, Pr = _precond_matrix(f.Ql[b], vr[b]), _precond_matrix(f.Qr[b], vc[b])
        assert _cond(Ai @ Ai.T) > 15 and _cond(Bj.T @ Bj) > 15 or min(vr[b], vc[b]) < 2
        assert _cond(Pl @ Ai @ Ai.T @ Pl) < 2.0, (b, "rows")
        assert _cond(Pr @ Bj.T @ Bj @ Pr) < 2.0, (b, "cols")


# ------------------------------------------------------------------ invariants

def _fit_steps(style, shape=(9, 7), steps=200, seed=0, **kw):
    rng = np.random.default_rng(seed)
    lay = B.layout(shape, **kw)
    f = _np_f(lay)
    for t in range(1, steps + 1):
        G = rng.standard_normal(shape).astype(np.float32) * np.float32(10.0 ** rng.uniform(-3, 3))
        _, _, f = K.precondition(G, f, lay, update=True, plr=K.precond_lr(t), style=style,
                                 balance=t % K.BALANCE_EVERY == 0)
    return f, lay


def test_quad_keeps_factors_spd():
    """QUAD's update ``(I - zE) Q (I - zE)`` symmetrised: symmetric exactly, positive definite."""
    for seed in range(3):
        f, lay = _fit_steps("QUAD", seed=seed)
        for Q in (f.Ql, f.Qr):
            np.testing.assert_array_equal(Q, np.swapaxes(Q, -1, -2))
            assert np.linalg.eigvalsh(Q.astype(np.float64)).min() > 0


def test_procrustes_step():
    """The Procrustes step rotates ``Q`` towards its SPD polar factor: it never lowers
    ``trace(Q)``, keeps ``Q^T Q`` (a rotation, second order in ``a <= 1/8``: the
    third-order term is ``<= (1/8)^3/6 = 3e-4`` of ``||Q||``), and fixes an SPD ``Q``."""
    rng = np.random.default_rng(0)
    Q = rng.standard_normal((16, 6, 6)).astype(np.float32) + 3 * np.eye(6, dtype=np.float32)
    new = K._procrustes(np, Q)
    assert np.all(np.trace(new, axis1=1, axis2=2) >= np.trace(Q, axis1=1, axis2=2) - 1e-5)
    assert np.any(np.trace(new, axis1=1, axis2=2) > np.trace(Q, axis1=1, axis2=2) + 1e-3)
    QtQ, newtn = np.swapaxes(Q, 1, 2) @ Q, np.swapaxes(new, 1, 2) @ new
    scale = np.linalg.norm(QtQ, axis=(1, 2))
    assert np.all(np.linalg.norm(newtn - QtQ, axis=(1, 2)) <= 1e-3 * scale)
    S = Q @ np.swapaxes(Q, 1, 2)
    np.testing.assert_array_equal(K._procrustes(np, S), S)


def test_skew_factors_stay_near_symmetric():
    """What the Procrustes step is for: skew's factors stay close to symmetric (without it
    ``Q - z E Q`` drifts into an arbitrary rotation) and ``P = Q^T Q`` stays SPD and well
    conditioned.  (``Q`` itself may be symmetric indefinite: ``R = Q^T - Q = 0`` there, so the
    Procrustes step has nothing to rotate; ``P`` is what preconditions.)  Measured over seeds
    0-2, gradient scales 1e-3..1e3, 300 fits: asymmetry <= 0.01, cond(P)^(1/2) <= 3.1."""
    for seed in range(3):
        f, _ = _fit_steps("skew", steps=300, seed=seed)
        for Q in (f.Ql, f.Qr):
            Q = Q.astype(np.float64)
            asym = np.linalg.norm(Q - np.swapaxes(Q, 1, 2), axis=(1, 2)) / np.linalg.norm(Q, axis=(1, 2))
            assert asym.max() < 0.1
            s = np.linalg.svd(Q, compute_uv=False)
            assert s.min() > 0 and (s.max(axis=-1) / s.min(axis=-1)).max() < 10


@pytest.mark.parametrize("shape,mds", [((9, 7), 100), ((9, 7), 8), ((12, 3), 5)])
def test_balancing_keeps_the_kronecker_product(shape, mds):
    f, lay = _fit_steps("skew", shape=shape, steps=50, max_size_dense=mds, block_size=256)
    f = f._replace(Ql=f.Ql * np.float32(7.0), Qr=f.Qr / np.float32(7.0))     # unbalance them
    g = K._balance(np, f)
    vr, vc = B.valid_sizes(lay)

    def kron(f):
        return np.kron(_precond_matrix(f.Ql[0], vr[0]), _precond_matrix(f.Qr[0], vc[0]))

    # balancing multiplies by sqrt(nl*nr)/nl and its inverse: a few float32 roundings
    np.testing.assert_allclose(kron(g), kron(f), rtol=1e-5, atol=1e-6 * np.abs(kron(f)).max())
    nl = np.abs(g.Ql[0]).max()
    nr = np.abs(g.Qr[0]).max()
    assert math.isclose(nl, nr, rel_tol=1e-6)


def _true_norm(A):
    return np.linalg.norm(A.astype(np.float64), ord=2, axis=(1, 2))


@pytest.mark.parametrize("kind", ["gaussian", "psd", "rank1", "zero", "tiny", "huge", "diagonal", "skew"])
def test_norm_lower_bound(kind):
    """``||A||_lb <= ||A||_2`` (up to float32 rounding of the last norm: 1e-6) for every kind of input."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((64, 8, 8))
    if kind == "psd":
        A = A @ np.swapaxes(A, 1, 2)
    elif kind == "rank1":
        u = rng.standard_normal((64, 8, 1))
        A = u @ np.swapaxes(u, 1, 2)
    elif kind == "zero":
        A = np.zeros_like(A)
    elif kind == "tiny":
        A = A * 1e-30
    elif kind == "huge":
        A = A * 1e30
    elif kind == "diagonal":
        A = np.eye(8) * rng.standard_normal((64, 1, 8))
    elif kind == "skew":
        A = A - np.swapaxes(A, 1, 2)
    A = A.astype(np.float32)
    lb = K._norm_lower_bound(np, A)
    true = _true_norm(A)
    assert np.all(np.isfinite(lb))
    assert np.all(lb <= true * (1 + 1e-6))
    if kind in ("psd", "rank1"):
        # the fit uses it on PSD Pg Pg^T: 4 power iterations from the row energies are within 2x
        assert np.all(lb >= 0.5 * true)


def test_lipschitz_estimate_at_least_ell():
    """``L_t = max(0.95 L + 0.05 ell, ell) >= ell_t`` whatever L was."""
    rng = np.random.default_rng(0)
    Q = np.broadcast_to(np.eye(6, dtype=np.float32), (8, 6, 6)).copy()
    term2 = np.full((8,), 5.0, np.float32)
    for L0 in (0.0, 1e-3, 1e6):
        P = rng.standard_normal((8, 6, 5)).astype(np.float32)
        term1 = P @ np.swapaxes(P, 1, 2)
        ell = K._norm_lower_bound(np, term1) + term2
        for style in K.UPDATE_STYLES:
            _, L = K._dense_step(np, Q, term1, term2, np.full((8,), L0, np.float32), 0.1, style)
            assert np.all(L >= ell)
            if L0 == 1e6:
                np.testing.assert_allclose(L, 0.95 * L0 + 0.05 * ell, rtol=1e-6)


def test_precond_lr_schedule():
    assert K.precond_lr(0) == 0.7
    assert math.isclose(K.precond_lr(10000), 0.7 / math.sqrt(2))
    assert K.precond_lr(10 ** 7) == 0.4                      # the seed's floor
    assert K.precond_lr(10 ** 7, 0.1) == 0.1                 # never raised above the user's value


def test_padding_never_leaks():
    """A tiled, padded layout: the padded rows/cols of every factor stay exactly zero and the
    valid part equals the same fit on the unpadded block alone."""
    rng = np.random.default_rng(0)
    lay = B.layout((10, 7), block_size=4)                   # tiles of 4 (rows: 4,4,2 valid) and 4 (cols: 4,3)
    f = _np_f(lay)
    lay1 = B.layout((2, 3), block_size=4)                    # the last block on its own
    f1 = _np_f(lay1)
    for t in range(1, 30):
        G = rng.standard_normal((10, 7)).astype(np.float32)
        _, _, f = K.precondition(G, f, lay, update=True, plr=K.precond_lr(t), style="QUAD")
        _, _, f1 = K.precondition(np.ascontiguousarray(G[8:, 4:]), f1, lay1, update=True,
                                  plr=K.precond_lr(t), style="QUAD")
    last = lay.blocks - 1
    assert not f.Ql[last][2:].any() and not f.Ql[last][:, 2:].any()
    assert not f.Qr[last][3:].any() and not f.Qr[last][:, 3:].any()
    # same maths on a zero-padded copy: equal up to the summation order of the matmuls (1e-5)
    np.testing.assert_allclose(f.Ql[last][:2, :2], f1.Ql[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.Qr[last][:3, :3], f1.Qr[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ guards

OPTS = K.KronOptions(b1=0.0, dtype="float32", block_size=8, max_size_dense=20, noise_scale=0.0)
GUARD_SHAPES = [(12, 10), (30, 6), (7,), ()]


def _state(opts=OPTS, shapes=GUARD_SHAPES):
    lays = [B.layout(s, block_size=opts.block_size, max_size_dense=opts.max_size_dense) for s in shapes]
    fs = [_np_f(lay) for lay in lays]
    mus = [None if opts.b1 == 0 else np.zeros(s, np.float32) for s in shapes]
    return lays, fs, mus


def _same_factors(a, b):
    for x, y in zip(a, b):
        if x is None:
            assert y is None
        else:
            np.testing.assert_array_equal(x, y)


def _step(grads, mus, fs, lays, t, opts=OPTS):
    return K.kron_updates(grads, mus, fs, lays, step=t, opts=opts, update=True)


def test_zero_gradients_at_step_one():
    lays, fs, mus = _state()
    grads = [np.zeros(s, np.float32) for s in GUARD_SHAPES]
    dirs, _, new = _step(grads, mus, fs, lays, 1)
    for d, a, b in zip(dirs, fs, new):
        assert np.all(d == 0)
        _same_factors(a, b)


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_zero_gradients_after_training(b1):
    opts = K.KronOptions(b1=b1, dtype="float32", block_size=8, max_size_dense=20, noise_scale=0.0)
    lays, fs, mus = _state(opts)
    rng = np.random.default_rng(0)
    for t in range(1, 5):
        dirs, mus, fs = _step([rng.standard_normal(s).astype(np.float32) for s in GUARD_SHAPES], mus, fs, lays, t, opts)
    zeros = [np.zeros(s, np.float32) for s in GUARD_SHAPES]
    dirs, _, new = _step(zeros, mus, fs, lays, 5, opts)
    for d in dirs:
        assert np.all(np.isfinite(d))
    if b1 == 0:
        for d, a, b in zip(dirs, fs, new):     # nothing to fit: factors untouched, update zero
            assert np.all(d == 0)
            _same_factors(a, b)


def test_zero_gradient_on_one_parameter_of_many():
    lays, fs, mus = _state()
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s).astype(np.float32) for s in GUARD_SHAPES]
    grads[1] = np.zeros_like(grads[1])
    dirs, _, new = _step(grads, mus, fs, lays, 1)
    _same_factors(fs[1], new[1])
    assert np.all(dirs[1] == 0)
    for i in (0, 2, 3):
        assert np.all(np.isfinite(dirs[i])) and np.any(dirs[i] != 0)
        assert not np.array_equal(fs[i].Qr, new[i].Qr)


def test_zero_and_nonfinite_blocks_keep_their_factors():
    """Per block: a tile whose gradient is zero or not finite keeps its factors, the others fit."""
    lay = B.layout((16, 16), block_size=8)
    f = _np_f(lay)
    G = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    G[:8, :8] = 0.0
    G[8:, 8:][0, 0] = np.nan
    _, _, new = K.precondition(G, f, lay, update=True)
    for b in (0, 3):
        np.testing.assert_array_equal(new.Ql[b], f.Ql[b])
    for b in (1, 2):
        assert not np.array_equal(new.Ql[b], f.Ql[b])


@pytest.mark.parametrize("style", K.UPDATE_STYLES)
def test_extreme_gradient_scales(style):
    """Gradients far outside float32's comfortable range give finite updates and factors, RMS
    within the clip.  Outside ``[2^-40, 2^40]`` the fit sees the block divided by its power-of-
    two unit (exact), so two gradients that differ by a power of two out there get exactly the
    same factors, and directions equal exactly: large ones both hit the clip, small ones differ
    by exactly that power of two."""
    opts = K.KronOptions(b1=0.0, dtype="float32", block_size=8, max_size_dense=20, noise_scale=0.0,
                         preconditioner_update_style=style)
    lays, fs, mus = _state(opts)
    rng = np.random.default_rng(0)
    # largest entry 1 (a power of two), so ``scale`` is the gradient's largest entry: 3e38 is finite
    base = [rng.standard_normal(s).astype(np.float32) for s in GUARD_SHAPES]
    base = [g / np.float32(2.0 ** np.ceil(np.log2(np.abs(g).max()))) for g in base]

    def run(scale):
        dirs, _, new = _step([g * np.float32(scale) for g in base], mus, fs, lays, 1, opts)
        for d, f in zip(dirs, new):
            assert np.all(np.isfinite(d))
            assert all(q is None or np.all(np.isfinite(q)) for q in f)
            assert np.sqrt(np.mean(d.astype(np.float64) ** 2)) <= K.RMS_CLIP / K.ADAM_DIVISOR * (1 + 1e-6)
        return dirs, new

    for scale in (1e-30, 1e-20, 1e20, 1e30, 3e38):
        run(scale)
    for a, b in [(2.0 ** 66, 2.0 ** 100), (2.0 ** -66, 2.0 ** -100)]:
        (da, fa), (db, fb) = run(a), run(b)
        for x, y, f, g in zip(da, db, fa, fb):
            _same_factors(f, g)
            np.testing.assert_array_equal(x, y if a > 1 else y * np.float32(a / b))


def test_no_float64_in_a_float32_step_jax():
    """Trace one jitted float32 step with JAX x64 enabled: no float64 value anywhere in the
    program (a float64 constant would promote the step and slow it ~2x)."""
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("jax")
    code = textwrap.dedent("""
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        from xpopt.core import kron as K, blocking as B, random as R
        shapes = [(12, 10), (30, 6), (7,), ()]
        for style in K.UPDATE_STYLES:
            opts = K.KronOptions(b1=0.9, dtype="bfloat16", block_size=8, max_size_dense=20, noise_scale=1e-3,
                                 preconditioner_update_style=style, preconditioner_update_probability="heavyball")
            lays = [B.layout(s, block_size=8, max_size_dense=20) for s in shapes]
            fs = [K.init_factors(jnp.zeros(0, jnp.float32), l, dtype=jnp.bfloat16) for l in lays]
            mus = [jnp.zeros(s, jnp.bfloat16) for s in shapes]
            def step(gs, mus, fs, t, key):
                nk, dk = K.step_keys(key, t)
                upd = K.draw_update(dk, K.update_probability(opts.preconditioner_update_probability, t))
                noise = [K.make_noise(nk, l, jnp.zeros(0, jnp.float32), opts.noise_scale) for l in lays]
                return K.kron_updates(gs, mus, fs, lays, step=t, opts=opts, update=upd, noise=noise)
            gs = [jnp.ones(s, jnp.float32) for s in shapes]
            jaxpr = jax.make_jaxpr(step)(gs, mus, fs, jnp.asarray(3, jnp.int32), R.PRNGKey(0, like=jnp.zeros(1)))
            text = str(jaxpr)
            assert "f64" not in text, [l for l in text.splitlines() if "f64" in l][:5]
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_no_float64_in_a_float32_step_torch():
    """Every op of a torch Kron step (float32 params, bf16 factors) records its output dtype:
    none is float64 (a Python scalar promoted to a float64 tensor would show here)."""
    torch = pytest.importorskip("torch")
    from torch.overrides import TorchFunctionMode

    from xpopt.adapters.torch import Kron

    class Dtypes(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    self.seen.add((o.dtype, getattr(func, "__name__", str(func))))
            return out

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in GUARD_SHAPES]
    opt = Kron(ps, lr=0.01, b1=0.9, block_size=8, max_size_dense=20, noise_scale=1e-3, weight_decay=0.1,
               preconditioner_update_probability="heavyball")
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        mode = Dtypes()
        with mode:
            opt.step()
        bad = sorted({name for dt, name in mode.seen if dt == torch.float64})
        assert not bad, bad
        assert any(dt == torch.float32 for dt, _ in mode.seen)


def test_factors_finite_over_2000_steps():
    """A noisy quadratic (one ill-conditioned direction, gradient scales over 1e-4..1e4) for
    2000 steps (float32 factors): factors, L and updates finite, and the loss goes down."""
    opts = K.KronOptions(b1=0.9, dtype="float32", block_size=8, max_size_dense=20, noise_scale=1e-9)
    shapes = [(12, 10), (30, 6), (7,)]
    lays, fs, mus = _state(opts, shapes)
    rng = np.random.default_rng(0)
    H = [np.diag(np.geomspace(1e-2, 1e2, math.prod(s))).astype(np.float32) for s in shapes]
    W = [rng.standard_normal(s).astype(np.float32) for s in shapes]

    def loss(W):
        return sum(float(w.reshape(-1) @ h @ w.reshape(-1)) for w, h in zip(W, H)) / 2

    first = loss(W)
    for t in range(1, 2001):
        g = [(h @ w.reshape(-1)).reshape(w.shape) + 0.1 * rng.standard_normal(w.shape).astype(np.float32)
             for w, h in zip(W, H)]
        g = [x * np.float32(10.0 ** rng.uniform(-4, 4)) for x in g]
        dirs, mus, fs = _step(g, mus, fs, lays, t, opts)
        W = [w - np.float32(0.01) * d for w, d in zip(W, dirs)]
        for d, f in zip(dirs, fs):
            assert np.all(np.isfinite(d))
            assert all(q is None or np.all(np.isfinite(q)) for q in f)
    assert loss(W) < 0.05 * first


# ------------------------------------------------------------------ cross-backend trajectory

TRAJ_SHAPES = [(10, 10), (6, 20), (12,), (2, 3, 5)]
TRAJ_OPTS = K.KronOptions(b1=0.9, dtype="float32", block_size=8, max_size_dense=15, noise_scale=1e-2,
                          preconditioner_update_probability=0.6, preconditioner_update_style="skew")
TRAJ_STEPS = 30
# float32 against the float64 oracle after 30 closed-loop steps, relative to the parameter scale.
# Each step rounds the fit and the update in float32 (~6e-8 relative); a one-ulp difference in a
# factor is amplified by the block's conditioning (~1e2 for small random blocks: up to 2.6e-5 of
# the *update* size, tests/test_kron_adapters.py, i.e. ~5e-7 of the parameters at lr 0.02) and
# accumulates over 30 steps.  Measured: 2.0e-7 .. 2.2e-7 on numpy, torch, array_api_strict and
# JAX (jit), every nudge.  1e-5 keeps a 45x margin for other CPUs' rounding and is 1000x below
# what a wrong option does (another seed, every-step updates, QUAD, no noise: 1.3e-2 .. 3.2e-2).
TRAJ_TOL = 1e-5


def _targets(rng):
    return [(_spd(rng, math.prod(s)) / 2).astype(np.float64) for s in TRAJ_SHAPES]


_JITTED: dict = {}


def _core_step(xp, like, lays, opts, jit):
    """One step of every parameter, as the adapters take it (per-parameter keys and draws)."""

    def step(W, mus, fs, t, key, Hs):
        gs = [xp.reshape(h @ xp.reshape(w, (-1,)), w.shape) for w, h in zip(W, Hs)]
        prob = K.update_probability(opts.preconditioner_update_probability, t)
        newW, newmu, newf = [], [], []
        for i, (g, mu, f, lay) in enumerate(zip(gs, mus, fs, lays)):
            nk, dk = K.step_keys(K.param_key(key, i), t)
            upd = K.draw_update(dk, prob)
            upd = upd if jit else bool(upd)
            noise = [K.make_noise(nk, lay, like, opts.noise_scale)]
            (d,), (m,), (nf,) = K.kron_updates([g], [mu], [f], [lay], step=t, opts=opts, update=upd, noise=noise)
            newW.append(W[i] - 0.02 * (d + 0.1 * W[i]))
            newmu.append(m)
            newf.append(nf)
        return newW, newmu, newf

    if not jit:
        return step
    import jax

    if opts not in _JITTED:            # compile once per options for every nudge (~10 s)
        _JITTED[opts] = jax.jit(step)
    return _JITTED[opts]


def _core_run(case, start, dtype="float32", opts=TRAJ_OPTS, jit=False, steps=TRAJ_STEPS, seed=5):
    """30 steps of Kron on ``0.5 sum w^T H w`` driven through the core exactly as the adapters do."""
    xp = case.xp
    Hs = [case.asarray(h, dtype) for h in _targets(np.random.default_rng(7))]
    W = [case.asarray(w, dtype) for w in start]
    lays = [B.layout(s, block_size=opts.block_size, max_size_dense=opts.max_size_dense) for s in TRAJ_SHAPES]
    fdt = xp.float64 if dtype == "float64" else xp.float32
    like = case.asarray(np.zeros(0), dtype)
    fs = [K.init_factors(like, lay, dtype=fdt) for lay in lays]
    mus = [xp.zeros_like(w) for w in W]
    key = R.PRNGKey(seed, like=like)
    step = _core_step(xp, like, lays, opts, jit)
    for t in range(1, steps + 1):
        W, mus, fs = step(W, mus, fs, xp.asarray(t, dtype=xp.int32) if jit else t, key, Hs)
    return [np.asarray(case.to_numpy(w), np.float64) for w in W]


def _start(nudge_seed):
    rng = np.random.default_rng(1)
    return [nudge(rng.standard_normal(s).astype(np.float32), nudge_seed) for s in TRAJ_SHAPES]


@pytest.fixture(scope="module")
def oracle():
    from conftest import _numpy_case

    class Runs(dict):  # each start's float64 run, made when a test first asks for it
        def __missing__(self, s):
            self[s] = _core_run(_numpy_case(), _start(s), "float64")
            return self[s]

    return Runs()


def _err(got, want, start):
    return max(np.abs(g - w).max() / max(1.0, np.abs(s).max()) for g, w, s in zip(got, want, start))


def test_trajectory_matches_oracle(xp, nudge_seed, oracle):
    start = _start(nudge_seed)
    # JAX jitted (as the optax adapter runs it; one compile, ~20 s, for every start)
    got = _core_run(xp, start, "float32", jit=xp.name == "jax")
    assert _err(got, oracle[nudge_seed], start) < TRAJ_TOL


def test_trajectory_float64_backends_agree(xp, oracle):
    """Float64 runs agree with the oracle far more tightly.  The noise's normals are made in
    float32 on every backend (core.random), up to 16 ulp apart (measured 3): ~1e-6 relative of
    noise_scale 1e-2, so 1e-8 per step; measured 1.3e-9 after 30 steps (torch)."""
    if not xp.has_float64:
        pytest.skip(f"{xp.name} runs float32 only here")
    start = _start(0)
    assert _err(_core_run(xp, start, "float64"), oracle[0], start) < 1e-7


def test_trajectory_detects_wrong_options(oracle):
    """The tolerance above is meaningful: a wrong key or probability moves far outside it."""
    from conftest import _numpy_case

    start = _start(0)
    for opts, seed in [(TRAJ_OPTS, 6), (K.KronOptions(**{**TRAJ_OPTS.__dict__, "preconditioner_update_probability": 1.0}), 5),
                       (K.KronOptions(**{**TRAJ_OPTS.__dict__, "preconditioner_update_style": "QUAD"}), 5),
                       (K.KronOptions(**{**TRAJ_OPTS.__dict__, "noise_scale": 0.0}), 5)]:
        got = _core_run(_numpy_case(), start, "float32", opts=opts, seed=seed)
        assert _err(got, oracle[0], start) > 1000 * TRAJ_TOL


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kw,name", [
    (dict(preconditioner_update_style="EQ"), "preconditioner_update_style"),
    (dict(dtype="float16"), "dtype"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(max_size_dense=0), "max_size_dense"),
    (dict(b1=1.0), "b1"),
    (dict(b1=-0.1), "b1"),
    (dict(preconditioner_update_probability=0.0), "preconditioner_update_probability"),
    (dict(preconditioner_update_probability=1.5), "preconditioner_update_probability"),
    (dict(preconditioner_update_probability="sometimes"), "preconditioner_update_probability"),
    (dict(preconditioner_lr=0.0), "preconditioner_lr"),
    (dict(noise_scale=-1.0), "noise_scale"),
    (dict(lr_style="sgd"), "lr_style"),
    (dict(mu_dtype="float64"), "mu_dtype"),
])
def test_bad_options(kw, name):
    with pytest.raises(ValueError, match=name):
        K.KronOptions(**kw)


def test_heavyball_schedule():
    assert K.update_probability("heavyball", 1) == 1.0
    assert K.update_probability("heavyball", 1000) == 1.0
    assert math.isclose(K.update_probability("heavyball", 2000), 0.999 ** 1000, rel_tol=1e-6)
    assert math.isclose(K.update_probability("heavyball", 10 ** 6), 0.03, rel_tol=1e-6)


def test_auto_init_scale():
    """``preconditioner_init_scale="auto"``: the first fitted step's direction has the RMS it would
    have for a unit-RMS gradient, whatever the gradient's scale; zero gradients wait (factors
    untouched) and a later usable gradient scales them."""
    opts = K.KronOptions(b1=0.0, dtype="float32", block_size=8, max_size_dense=20, noise_scale=0.0, lr_style=None,
                         preconditioner_init_scale="auto")
    lays, fs, mus = _state(opts)
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(s).astype(np.float32) for s in GUARD_SHAPES]
    base = [g / np.float32(np.sqrt(np.mean(g.astype(np.float64) ** 2))) for g in base]
    ref, _, _ = _step(base, mus, fs, lays, 1, opts)
    for scale in (1e-6, 1e-3, 1e3):       # powers-of-ten: inside float32's exact-rescaling range
        dirs, _, _ = _step([g * np.float32(scale) for g in base], mus, fs, lays, 1, opts)
        for d, r in zip(dirs, ref):
            # the fit sees the scaled gradient after the auto scale: the same up to float32 rounding
            np.testing.assert_allclose(d, r, rtol=2e-3, atol=2e-4 * np.abs(r).max())
    zeros = [np.zeros(s, np.float32) for s in GUARD_SHAPES]
    dirs, _, new = _step(zeros, mus, fs, lays, 1, opts)
    for d, a, b in zip(dirs, fs, new):
        assert np.all(d == 0)
        _same_factors(a, b)
    dirs, _, new = _step([g * np.float32(1e-3) for g in base], mus, new, lays, 2, opts)
    assert all(np.all(np.isfinite(d)) for d in dirs)
    assert not np.array_equal(new[0].Qr, fs[0].Qr)
    with pytest.raises(ValueError, match="preconditioner_init_scale"):
        K.KronOptions(preconditioner_init_scale="automatic")
