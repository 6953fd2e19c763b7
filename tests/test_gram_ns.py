"""Gram Newton-Schulz (``orthogonalize(method="gram")``, Muon's ``ns_method="gram"``).

The Gram form runs the same polynomials as the standard iteration, so every
check here is one of tests/test_newton_schulz.py's with the standard iteration
replaced, plus what is Gram's own: where it runs, the restart plan, and that
the restarts are what keeps it accurate.

Tolerances.  In exact arithmetic both forms give ``U p(S) V^H``; what the Gram
form adds is the rounding of its Gram matrix, grown by the steps between
restarts.  ``gram_error(preset, eps=...)`` is the restart model's bound on
that, for the preset's plan in that precision (float32: 2.2e-3 for ``quintic``
and ``original`` with no restart, 1.4e-3 for Polar Express with one; float64:
4e-12 and 8e-10).  So a float32 Gram result sits within ``F32_SV_ATOL`` (the
standard iteration's own float32 rounding, measured there) plus that bound of
the exact singular values.  The model is pessimistic: measured on these
matrices, 2.2e-4 at most (``quintic``, condition 1e4, every backend).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backend_case, matrix_with_spectrum
from test_newton_schulz import BF16_BAND_MARGIN, F32_SV_ATOL, PRESET_STEPS, band, spectra, svals

import xpopt.core.newton_schulz as NS
from xpopt.core.muon import MuonOptions
from xpopt.core.newton_schulz import (
    COEFFICIENTS, GRAM_RATIO, GRAM_TOLERANCE, PRECONDITIONINGS, gram_error, gram_restarts, orthogonalize,
    scalar_iteration,
)

F32_EPS, F64_EPS, BF16_EPS = 2.0 ** -23, 2.0 ** -52, 2.0 ** -7


def f32_tol(preset: str) -> float:
    """Float32 Gram vs the exact iteration: the standard's rounding plus the model's bound (module docstring)."""
    return F32_SV_ATOL + gram_error(preset, PRESET_STEPS[preset], eps=F32_EPS)


def gram(G, preset, **kw):
    return orthogonalize(G, coefficients=preset, steps=PRESET_STEPS[preset], method="gram", **kw)


@pytest.fixture(params=["numpy", "array_api_strict", "torch"])
def xp(request):
    """conftest's backend cases without JAX: eager JAX compiles every op shape
    (seconds per test); JAX runs the Gram form under jit below, in float32
    (test_jit_matches_the_polynomial) and bfloat16 (test_bf16_compute_stays_in_band)."""
    return backend_case(request.param)


# ----------------------------------------------------------------- bands, as for the standard iteration

@pytest.mark.parametrize("preset", list(COEFFICIENTS))
def test_singular_values_follow_polynomial_and_stay_in_band(xp, rng, preset):
    steps, tol = PRESET_STEPS[preset], f32_tol(preset)
    lo, hi = band(preset)
    for name, s in spectra(rng).items():
        for m, n in ((16, 40), (40, 16)):  # wide and tall (transposed inside): both aspect 2.5, Gram runs
            G = matrix_with_spectrum(rng, m, n, s) * 3.7  # prescale must undo this
            sv = svals(xp.to_numpy(gram(xp.asarray(G), preset)))
            np.testing.assert_allclose(sv, np.sort(scalar_iteration(s, preset, steps)), atol=tol,
                                       err_msg=f"{name} {m}x{n}")
            assert lo - tol <= sv.min() and sv.max() <= hi + tol, (name, sv.min(), sv.max())


@pytest.mark.parametrize("preset", list(COEFFICIENTS))
def test_ill_conditioned(xp, rng, preset):
    # condition 1e4: the smallest Gram eigenvalue (2.5e-9 after the prescale)
    # is below float32's rounding of the Gram matrix (u ||R|| ~ 1e-8): the case
    # the restarts exist for.  Each direction still follows the polynomial.
    steps, tol = PRESET_STEPS[preset], f32_tol(preset)
    s = np.geomspace(1e-4, 1.0, 24)
    G = matrix_with_spectrum(rng, 24, 64, s)
    sv = svals(xp.to_numpy(gram(xp.asarray(G), preset)))
    np.testing.assert_allclose(sv, np.sort(scalar_iteration(s / np.linalg.norm(s), preset, steps)), atol=tol)
    assert sv.max() <= band(preset, 0.0, 1.0)[1] + tol


@pytest.mark.parametrize("backend, preset", [("torch", p) for p in COEFFICIENTS] + [
    ("jax", "quintic"), ("jax", "polar_express")])
def test_bf16_compute_stays_in_band(rng, backend, preset):
    # By property only.  The restart plan lets a Gram segment err up to
    # GRAM_RATIO (4) times what the model gives the same steps one at a time,
    # and the standard bf16 iteration measured 0.0045 beyond its band: so
    # 4 x 0.0045 = 0.018, within BF16_BAND_MARGIN (0.02).  Measured here:
    # 0.011 at most (quintic, torch), the standard 0.003 on the same matrices.
    # JAX under jit: XLA fuses the m x m updates its own way (in bf16 that
    # once blew up, before those matrices were kept in float32).
    case = backend_case(backend)
    assert GRAM_RATIO * 0.0045 <= BF16_BAND_MARGIN
    lo, hi = band(preset)
    s = np.geomspace(0.022, 1.0, 32)
    s /= np.linalg.norm(s)
    G = case.asarray(matrix_with_spectrum(rng, 32, 128, s))
    run = lambda g: gram(g, preset, compute_dtype="bfloat16")  # noqa: E731
    out = __import__("jax").jit(run)(G) if backend == "jax" else run(G)
    assert out.dtype == G.dtype  # returned in the input dtype
    sv = svals(case.to_numpy(out))
    assert lo - BF16_BAND_MARGIN <= sv.min() and sv.max() <= hi + BF16_BAND_MARGIN, (sv.min(), sv.max())


# ----------------------------------------------------------------- agreement with the standard iteration

@pytest.mark.parametrize("preconditioning", PRECONDITIONINGS)
@pytest.mark.parametrize("preset", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape, cplx", [((16, 40), False), ((40, 16), False), ((2, 3, 12, 40), False),
                                         ((16, 40), True)])
def test_matches_standard_in_float64(rng, preset, preconditioning, shape, cplx):
    # float64 (NumPy, the oracle): the two forms differ by the Gram form's
    # rounding, which the model bounds by gram_error at float64's eps (4e-12
    # quintic, 8e-10 Polar Express, no restarts), plus 1e-13 for the standard
    # iteration's own float64 rounding (measured 1e-14; the Polar Express slope
    # of 8 over 8 steps).  Each entry of the difference is at most its
    # spectral norm, the largest singular-value difference.  Measured: 1.1e-12.
    G = rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if cplx else 0.0)
    std = orthogonalize(G, coefficients=preset, preconditioning=preconditioning)
    out = orthogonalize(G, coefficients=preset, preconditioning=preconditioning, method="gram")
    assert out.shape == G.shape and out.dtype == G.dtype
    tol = gram_error(preset, eps=F64_EPS) + 1e-13
    np.testing.assert_allclose(out, std, rtol=0, atol=tol)
    assert not np.array_equal(out, std)  # the Gram path ran: its rounding differs


def test_square_and_near_square_run_the_standard_iteration(xp, rng):
    # Gram saves FLOPs only where n > 1.5 m: below that the standard iteration
    # runs, op for op (bitwise equal); above it the Gram form (rounding differs).
    for shape, same in (((24, 24), True), ((20, 30), True), ((30, 20), True), ((20, 31), False)):
        G = xp.asarray(rng.standard_normal(shape))
        std, out = xp.to_numpy(orthogonalize(G)), xp.to_numpy(orthogonalize(G, method="gram"))
        assert np.array_equal(out, std) == same, shape
        np.testing.assert_allclose(out, std, atol=f32_tol("quintic"))


def test_scale_cast_back_and_compute_dtype_keep_their_meaning(rng):
    torch = pytest.importorskip("torch")
    G = rng.standard_normal((2, 12, 40))
    ref = orthogonalize(G)  # float64 oracle
    # compute_dtype float32 from float64: returned as float64 (cast_back), or kept (cast_back=False)
    out = orthogonalize(G, method="gram", compute_dtype="float32", scale=0.3)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, 0.3 * ref, atol=0.3 * f32_tol("quintic"))
    kept = orthogonalize(G, method="gram", compute_dtype="float32", cast_back=False)
    assert kept.dtype == np.float32
    # an array scale (applied after the iteration) and a number (folded into the last GEMM) agree
    T = torch.from_numpy(G).float()
    by_number = orthogonalize(T, method="gram", scale=0.3)
    by_array = orthogonalize(T, method="gram", scale=torch.tensor(0.3))
    np.testing.assert_allclose(by_array.numpy(), by_number.numpy(), rtol=1e-6, atol=1e-7)  # one float32 rounding


def test_jit_matches_the_polynomial(rng):
    # JAX float32 under jit, a batch with Polar Express (its plan restarts once):
    # each matrix's singular values follow the polynomial as in float32 anywhere.
    jax = pytest.importorskip("jax")
    s = np.geomspace(1e-4, 1.0, 20)
    G = np.stack([matrix_with_spectrum(rng, 20, 48, s) for _ in range(3)])
    out = np.asarray(jax.jit(lambda g: gram(g, "polar_express"))(jax.numpy.asarray(G, dtype=np.float32)))
    want = np.sort(scalar_iteration(s / np.linalg.norm(s), "polar_express", 8))
    for o in out:
        np.testing.assert_allclose(svals(o), want, atol=f32_tol("polar_express"))


# ----------------------------------------------------------------- the restart plan

def test_restart_plans():
    # The documented plans (core/newton_schulz.py); a change to the model shows here.
    for preset in ("original", "quintic"):
        assert gram_restarts(preset, eps=F64_EPS) == gram_restarts(preset, eps=F32_EPS) == ()
        assert gram_restarts(preset, eps=BF16_EPS) == (2, 4)
    for preset in ("polar_express", "polar_express_safer"):
        assert gram_restarts(preset, eps=F64_EPS) == ()
        assert gram_restarts(preset, eps=F32_EPS) == (4,)
        assert gram_restarts(preset, eps=BF16_EPS) == (1, 2, 4, 6)
    # every plan keeps the model within its allowance; no restart at all would not
    for preset in COEFFICIENTS:
        assert gram_error(preset, eps=F32_EPS) <= 2 * GRAM_TOLERANCE
    assert gram_error("polar_express", eps=F32_EPS, restarts=()) > 100 * GRAM_TOLERANCE


def test_preset_plan_table_is_the_model(monkeypatch):
    # The presets' plans are a table (so torch.compile never traces the model):
    # recomputed from an empty cache, the model gives exactly that table.
    monkeypatch.setattr(NS, "_PLANS", {})
    for name, plans in NS._PRESET_PLANS.items():
        for eps, plan in zip(NS.GRAM_EPS, plans):
            assert gram_restarts(name, eps=eps) == plan, (name, eps)
    # MuonOptions(ns_method="gram") computes custom coefficients' plans when built
    triples = ((3.9, -6.0, 2.5), (3.0, -3.2, 1.2), (2.9, -3.1, 1.2))
    MuonOptions(ns_coefficients=triples, ns_method="gram")
    assert all((triples, eps) in NS._PLANS for eps in NS.GRAM_EPS)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_restarts_keep_polar_express_accurate(rng, monkeypatch, backend):
    # float32 Polar Express on a matrix with Gram eigenvalues far below
    # float32's rounding (one singular value 1, the rest 1e-3 .. 1e-7): without
    # its restart the blown-up small directions are off by 0.1 (measured 0.16;
    # the model says 2.2); with it, within f32_tol like everything above.
    mod = pytest.importorskip(backend)
    s = np.concatenate([[1.0], np.geomspace(1e-3, 1e-7, 15)])
    s /= np.linalg.norm(s)
    G = matrix_with_spectrum(rng, 16, 40, s).astype(np.float32)
    X = G if backend == "numpy" else mod.from_numpy(G)
    want = np.sort(scalar_iteration(s, "polar_express", 8))
    err = np.abs(svals(np.asarray(gram(X, "polar_express"))) - want).max()
    assert err <= f32_tol("polar_express")
    monkeypatch.setattr(NS, "_gram_plan", lambda coeffs, eps: ())
    err_no_restart = np.abs(svals(np.asarray(gram(X, "polar_express"))) - want).max()
    assert err_no_restart > 0.05 > 10 * err


# ----------------------------------------------------------------- Muon

def _torch_step(ns_method, W0, G0, **kw):
    torch = pytest.importorskip("torch")
    from xpopt.adapters.torch import Muon

    p = torch.nn.Parameter(torch.from_numpy(W0.copy()))
    opt = Muon([p], lr=0.02, ns_method=ns_method, **kw)
    p.grad = torch.from_numpy(G0.copy())
    opt.step()
    return p.detach().numpy()


def _optax_step(ns_method, W0, G0):
    jnp = pytest.importorskip("jax.numpy")
    from xpopt.adapters import optax as xo

    tx = xo.muon(0.02, ns_method=ns_method)
    params = {"w": jnp.asarray(W0)}
    updates, _ = tx.update({"w": jnp.asarray(G0)}, tx.init(params), params)
    return np.asarray(params["w"] + updates["w"])


@pytest.mark.parametrize("step", [_torch_step, _optax_step], ids=["torch", "optax"])
def test_muon_step_agrees_with_standard(rng, step):
    # One step from the same params and gradient: the updates differ by
    # lr * lr_scale times the two orthogonalisations' difference, each within
    # f32_tol of the exact one (per entry at most the spectral norm).
    W0 = rng.standard_normal((16, 64)).astype(np.float32)
    G0 = rng.standard_normal((16, 64)).astype(np.float32)
    std, gr = step("standard", W0, G0), step("gram", W0, G0)
    scale = 0.02 * MuonOptions().rms * np.sqrt(64)  # lr * lr_scale (match_rms_adamw)
    np.testing.assert_allclose(gr - W0, std - W0, rtol=0, atol=2 * scale * f32_tol("quintic"))
    assert not np.array_equal(gr, std)  # ns_method reached Newton-Schulz


def test_torch_group_option_and_sharded_route(rng):
    # ns_method is a param-group option like ns_coefficients: a group sets its own.
    torch = pytest.importorskip("torch")
    from xpopt.adapters.torch import Muon

    W0 = rng.standard_normal((16, 64)).astype(np.float32)
    G0 = rng.standard_normal((16, 64)).astype(np.float32)
    ps = [torch.nn.Parameter(torch.from_numpy(W0.copy())) for _ in range(2)]
    opt = Muon([{"params": [ps[0]]}, {"params": [ps[1]], "ns_method": "gram"}], lr=0.02)
    for p in ps:
        p.grad = torch.from_numpy(G0.copy())
    opt.step()
    np.testing.assert_array_equal(ps[0].detach().numpy(), _torch_step("standard", W0, G0))
    np.testing.assert_array_equal(ps[1].detach().numpy(), _torch_step("gram", W0, G0))
    assert opt.state_dict()["param_groups"][1]["ns_method"] == "gram"


# ----------------------------------------------------------------- errors

def test_bad_method_names_it_and_the_choices():
    with pytest.raises(ValueError, match=r"method='fast' is not valid; use one of \['standard', 'gram'\]"):
        orthogonalize(np.ones((4, 8)), method="fast")
    with pytest.raises(ValueError, match=r"ns_method='fast' is not valid; use one of \['standard', 'gram'\]"):
        MuonOptions(ns_method="fast")
    with pytest.raises(ValueError, match="ns_method=None"):
        MuonOptions(ns_method=None)


def test_bad_ns_method_in_adapters():
    torch = pytest.importorskip("torch")
    from xpopt.adapters.torch import Muon

    with pytest.raises(ValueError, match="ns_method='Gram'"):
        Muon([torch.nn.Parameter(torch.ones(8, 16))], ns_method="Gram")
    xo = pytest.importorskip("xpopt.adapters.optax")
    with pytest.raises(ValueError, match="ns_method='Gram'"):
        xo.muon(0.02, ns_method="Gram")


# ----------------------------------------------------------------- larger, slow

@pytest.mark.slow
@pytest.mark.parametrize("preset", ["quintic", "polar_express"])
def test_larger_matrices_stay_within_tolerance(rng, preset):
    # 256 x 1024 float32 (torch), spectra down to rank-deficient: the Gram form
    # within f32_tol of the exact singular values (measured 1.5e-4 at most,
    # quintic with one singular value 1 and the rest 1e-3 .. 1e-7).
    torch = pytest.importorskip("torch")
    steps = PRESET_STEPS[preset]
    for s in (np.concatenate([[1.0], np.geomspace(1e-3, 1e-7, 255)]), np.geomspace(1e-4, 1.0, 256),
              np.concatenate([np.geomspace(1e-3, 1.0, 128), np.zeros(128)])):
        s = np.sort(s / np.linalg.norm(s))[::-1]
        G = torch.from_numpy(matrix_with_spectrum(rng, 256, 1024, s)).float()
        sv = svals(gram(G, preset).numpy())
        np.testing.assert_allclose(sv, np.sort(scalar_iteration(s, preset, steps)), atol=f32_tol(preset))
