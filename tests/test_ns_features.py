"""Core features matching optax.contrib.muon 0.2.8: NS preconditioning, complex
input, ``steps=None``, ``compute_dtype="auto"``; Muon ``adaptive`` (bias-corrected
dual-norm scale) and ``consistent_rms``; AdamW overflow safety and complex |g|^2.

Every backend's float32/complex64 result is compared with the NumPy float64
oracle (the ``xp`` fixture); the oracle itself is checked against formulas
written here with an SVD (``expected``), which share no code with
``core/newton_schulz.py`` beyond ``scalar_iteration`` (the polynomial spec).
Parity with optax's own numbers is in ``tests/test_parity_optax_features.py``.

A trick used below: ``coefficients=(1, 0, 0), steps=1`` is the identity
polynomial, so ``orthogonalize`` then returns the *prescaled* matrix itself,
which makes each preconditioning observable from outside.

Set ``XPOPT_SHOW_ERRORS=1`` and run with ``-s`` to print the measured errors
that the tolerances below quote.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from _peers import torch_module_threads  # noqa: F401  (fixture, used by pytestmark)
from conftest import matrix_with_spectrum

from xpopt.backends import get_backend
from xpopt.core import muon as M
from xpopt.core.adam import adam_update, adamw_step
from xpopt.core.newton_schulz import (
    COEFFICIENTS,
    DEFAULT_STEPS,
    PRECONDITIONINGS,
    orthogonalize,
    preset_steps,
    resolve_coefficients,
    scalar_iteration,
)

# tiny matrices: torch's thread pool only adds contention on a shared 2-core box
pytestmark = pytest.mark.usefixtures("torch_module_threads")

MODES = list(PRECONDITIONINGS)
IDENTITY = (1.0, 0.0, 0.0)  # p(x) = x: with steps=1, orthogonalize returns the prescaled matrix

# float32 (complex64) vs the float64 oracle, absolute, on quintic outputs whose
# entries are ~1/sqrt(n) ~ 0.25 (16x24 Gaussian input): measured worst 8.3e-7
# (real and complex) over the four modes, four backends, 2-D and batched, wide
# and tall.  Same bound as tests/test_newton_schulz.py (2e-5: 24x margin for
# other BLAS/XLA summation orders).
F32_ATOL = 2e-5
# Singular values of a float32 output vs the float64 scalar iteration of the
# prescaled ones (spectra in [0.02, 1], quintic 5 steps): measured worst 1.2e-6;
# same bound as tests/test_newton_schulz.py (which measured 1.7e-5 on harder,
# condition-1e4 spectra).
F32_SV_ATOL = 1e-4
# Relative float32 rounding of one reduction (a norm, an SVD's top value):
# measured <= 1.6e-7 (spectral top value); 1e-5 leaves 60x.
F32_REL = 1e-5
# float64 oracle vs the SVD formula: 40-80 flops per entry and step in float64,
# measured <= 2.3e-15.
F64_ATOL = 1e-12


def _show(label, value):
    if os.environ.get("XPOPT_SHOW_ERRORS"):
        print(f"[measured] {label}: {value:.3g}")
    return value


def maxerr(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def svals(a) -> np.ndarray:
    return np.sort(np.linalg.svd(np.asarray(a, dtype=np.complex128 if np.iscomplexobj(a) else np.float64),
                                 compute_uv=False), axis=-1)


def _h(x):
    return np.conj(np.swapaxes(x, -1, -2))


def prescaled(G, mode, safety=1.0):
    """The prescaled matrix, in float64, computed from each mode's definition.

    AOL scales the rows of the *wide* orientation (core transposes tall
    matrices first, as optax does), so a tall G is scaled by columns.
    """
    G = np.asarray(G)
    tall = G.shape[-2] > G.shape[-1]
    X = np.swapaxes(G, -1, -2) if tall else G
    if mode == "frobenius":
        X = X / (np.linalg.norm(X, axis=(-2, -1), keepdims=True) * safety)
    elif mode == "spectral":
        X = X / (np.linalg.norm(X, ord=2, axis=(-2, -1), keepdims=True) * safety)
    elif mode == "aol":
        d = np.sum(np.abs(X @ _h(X)), axis=-1, keepdims=True)        # Gershgorin row sums
        X = X / (np.sqrt(d) * safety)
    else:  # schatten: ||X||_S4 = ||X X^H||_F^(1/2)
        X = X / (np.sqrt(np.linalg.norm(X @ _h(X), axis=(-2, -1), keepdims=True)) * safety)
    return np.swapaxes(X, -1, -2) if tall else X


def expected(G, mode, coefficients="quintic", steps=None, safety=1.0):
    """``U p(S) V^H`` of the prescaled matrix: what Newton-Schulz computes, via an SVD."""
    U, s, Vh = np.linalg.svd(prescaled(G, mode, safety), full_matrices=False)
    return (U * scalar_iteration(s, coefficients, steps)[..., None, :]) @ Vh


def gaussian(rng, shape, complex_=False):
    G = rng.standard_normal(shape)
    return G + 1j * rng.standard_normal(shape) if complex_ else G


SHAPES = [(16, 24), (24, 16), (3, 16, 24), (3, 24, 16)]  # wide, tall, batched wide, batched tall


# ---------------------------------------------------------------- preconditioning


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_float64_oracle(xp, rng, mode, shape):
    G = gaussian(rng, shape)
    ref = orthogonalize(G, preconditioning=mode)
    # the oracle is the formula (float64 vs float64)
    assert _show(f"oracle-vs-svd {mode} {shape}", maxerr(ref, expected(G, mode))) < F64_ATOL
    x = xp.asarray(G)
    out = orthogonalize(x, preconditioning=mode)
    assert out.dtype == x.dtype and tuple(out.shape) == shape
    assert _show(f"f32 {xp.name} {mode} {shape}", maxerr(xp.to_numpy(out), ref)) < F32_ATOL


@pytest.mark.parametrize("mode", ["frobenius", "spectral", "schatten"])
def test_singular_values_follow_polynomial_of_prescaled(xp, rng, mode):
    """Scalar prescales: output singular values are p(s / norm) with norm =
    ||s||_2 (frobenius), max s (spectral), ||s||_4 (schatten), times safety."""
    k = 16
    s = np.sort(np.concatenate([[1.0], rng.uniform(0.02, 1.0, k - 1)]))[::-1]
    norm = {"frobenius": np.linalg.norm(s), "spectral": s.max(), "schatten": np.sum(s**4) ** 0.25}[mode]
    for safety in (1.0, 1.05):
        want = np.sort(scalar_iteration(s / (norm * safety), "quintic"))
        for m, n in ((16, 24), (24, 16)):
            G = matrix_with_spectrum(rng, m, n, s) * 3.7  # the prescale must undo this
            out = orthogonalize(xp.asarray(G), preconditioning=mode, safety_factor=safety)
            err = _show(f"sv {xp.name} {mode} {m}x{n} safety={safety}", maxerr(svals(xp.to_numpy(out)), want))
            assert err < F32_SV_ATOL


@pytest.mark.parametrize("safety", [1.0, 1.01])
@pytest.mark.parametrize("mode", MODES)
def test_prescale_itself(xp, rng, mode, safety):
    """The identity polynomial exposes the prescaled matrix: spectral puts the top
    singular value exactly at 1/safety, frobenius the F-norm, schatten the S4
    norm; AOL's row scaling has spectral norm <= 1/safety and equals
    ``D^-1/2 G / safety`` computed in NumPy float64."""
    G = gaussian(rng, (16, 24)) * 3.7
    for M_ in (G, G.T):
        X = xp.to_numpy(orthogonalize(xp.asarray(M_), coefficients=IDENTITY, steps=1,
                                      preconditioning=mode, safety_factor=safety))
        X64 = orthogonalize(M_, coefficients=IDENTITY, steps=1, preconditioning=mode, safety_factor=safety)
        sv = svals(X).max()
        if mode == "spectral":
            assert abs(svals(X64).max() * safety - 1.0) < 1e-14
            assert _show(f"spectral top {xp.name}", abs(sv * safety - 1.0)) < F32_REL
        elif mode == "frobenius":
            assert abs(np.linalg.norm(X) * safety - 1.0) < F32_REL
        elif mode == "schatten":
            assert abs(np.sum(svals(X) ** 4) ** 0.25 * safety - 1.0) < F32_REL
        else:
            assert svals(X64).max() * safety <= 1.0 + 1e-14
            assert sv * safety <= 1.0 + F32_REL
        np.testing.assert_allclose(X64, prescaled(M_, mode, safety), rtol=1e-13, atol=0)
        np.testing.assert_allclose(X, prescaled(M_, mode, safety), rtol=0, atol=F32_REL * np.abs(X64).max())


def test_aol_prescale_bounded_for_adversarial_inputs(rng):
    """Gershgorin: ||D^-1/2 G||_2 <= 1 for any G, including the cases where the
    Frobenius prescale is loose (rank one, one dominant row, near-orthogonal)."""
    cases = {
        "rank1": np.outer(rng.standard_normal(24), rng.standard_normal(40)),
        "dominant_row": np.vstack([1e3 * rng.standard_normal((1, 40)), rng.standard_normal((23, 40))]),
        "orthogonal": np.linalg.qr(rng.standard_normal((40, 24)))[0].T,
        "lowrank_noise": rng.standard_normal((24, 2)) @ rng.standard_normal((2, 40)) + 1e-3 * rng.standard_normal((24, 40)),
        "complex": gaussian(rng, (24, 40), True),
    }
    for name, G in cases.items():
        X = orthogonalize(G, coefficients=IDENTITY, steps=1, preconditioning="aol")
        np.testing.assert_allclose(X, prescaled(G, "aol"), rtol=1e-12, err_msg=name)
        top = svals(X).max()
        assert top <= 1.0 + 1e-14, (name, top)
    # for an orthogonal-rows input AOL is exact (D = I): the prescale is the identity map
    Q = cases["orthogonal"]
    np.testing.assert_allclose(orthogonalize(Q, coefficients=IDENTITY, steps=1, preconditioning="aol"), Q, atol=1e-14)


@pytest.mark.parametrize("mode", MODES)
def test_zero_matrix_maps_to_zero(xp, mode):
    for shape in ((8, 12), (2, 12, 8)):
        out = xp.to_numpy(orthogonalize(xp.asarray(np.zeros(shape)), preconditioning=mode))
        assert np.all(out == 0), mode


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("mode", ["aol", "schatten"])
def test_scale_invariance_without_overflow(xp, rng, mode, scale):
    """AOL and Schatten square G (G G^H: 1e60 overflows float32, 1e-60
    underflows); core divides by the largest entry first, which both modes are
    invariant to, so the result at 1e+-30 equals the unscaled one."""
    G = gaussian(rng, (16, 24))
    base = xp.to_numpy(orthogonalize(xp.asarray(G), preconditioning=mode))
    out = xp.to_numpy(orthogonalize(xp.asarray(G * scale), preconditioning=mode))
    assert np.all(np.isfinite(out))
    assert _show(f"scale {xp.name} {mode} {scale}", maxerr(out, base)) < F32_ATOL
    # the naive computation overflows / underflows in float32: the test has teeth
    g32 = (G * scale).astype(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        gram = g32 @ g32.T
    assert not np.all(np.isfinite(gram)) or np.all(gram == 0)


def _all_normal_matrix(rng):
    """64 x 128 (the issue's shape), unit Frobenius norm, every |entry| within 1:20 of
    the largest: so a scale factor keeps all entries normal floats or none."""
    G = rng.standard_normal((64, 128))
    G = np.sign(G) * (0.25 + np.abs(G))
    return G / np.linalg.norm(G)


def _normal_range_scales(G):
    """The two ends of float32's normal range for ``G``, and points between.

    ``lo``: the smallest entry lands just above float32's smallest normal
    (2^-126 = 1.2e-38); ``hi``: the largest just below float32's max (3.4e38).
    1e-8 and 1e-30 put ||G|| under the old absolute eps floor (1e-7).
    """
    f32 = np.finfo(np.float32)
    lo = float(f32.smallest_normal) / np.min(np.abs(G)) * (1 + 1e-4)
    hi = float(f32.max) / np.max(np.abs(G)) * (1 - 1e-4)
    return [lo, 1e-30, 1e-8, 1e-3, 1e8, 1e30, hi]


@pytest.mark.parametrize("mode", MODES)
def test_scale_invariant_over_float32_normal_range(xp, rng, mode):
    """``orthogonalize(c G) == orthogonalize(G)`` for every c that keeps c G's
    entries normal float32 numbers, in every mode (issue 17, item 5).

    Before, ``frobenius`` and ``spectral`` floored the norm itself at eps=1e-7:
    a unit-norm 64 x 128 matrix times 1e-8 or 1e-30 came back as ``G / eps``
    pushed through the polynomials, up to 0.32 per entry away from the
    orthogonalised one.  Now every mode divides by a power of two near max|G|
    first and floors the norm of *that* (>= 1 for a nonzero matrix), so only the
    float32 rounding of c G itself differs between scales: measured <= 1.1e-6
    (entries ~0.1) on every backend; F32_ATOL (2e-5) as for float32 vs float64.
    The two ends are where JAX (XLA CPU flushes subnormals to zero, and divides
    by multiplying with the reciprocal: x / 2^127 was 0) broke a naive rescale.
    """
    G = _all_normal_matrix(rng)
    # 2-D and a batch (torch takes different one-pass norm paths for the two)
    for G in (G, np.stack([G, G[::-1]])):
        base = xp.to_numpy(orthogonalize(xp.asarray(G), preconditioning=mode))
        assert np.max(np.abs(base)) > 0.05  # orthogonalised: entries ~ 1/sqrt(64)
        for c in _normal_range_scales(G):
            X = (G * c).astype(np.float32)
            assert np.all(np.isfinite(X)) and np.min(np.abs(X)) >= np.finfo(np.float32).smallest_normal
            out = xp.to_numpy(orthogonalize(xp.asarray(X), preconditioning=mode))
            assert _show(f"scale {xp.name} {mode} {G.ndim}-D {c:.3g}", maxerr(out, base)) < F32_ATOL, c


def test_eps_floors_the_rescaled_norm(rng):
    """eps floors ``||G / p2||`` with ``p2 = 2^floor(log2 max|G|)``, not ``||G||`` (as aol's and
    schatten's floors): where it acts (here eps=1e3 > ||G / p2||; by default only on a zero
    matrix, which stays zero) the prescaled matrix is ``G / (eps p2)``, the same for ``G`` times
    any power of two; other factors move ``p2`` relative to ``G``, so the invariance to every
    factor holds where the floor does not act (safety_factor >= eps, G nonzero)."""
    G = _all_normal_matrix(rng)[:8, :16]
    ident = dict(coefficients=IDENTITY, steps=1)
    for mode in ("frobenius", "spectral"):
        base = orthogonalize(G, eps=1e3, preconditioning=mode, **ident)
        p2 = 2.0 ** np.floor(np.log2(np.max(np.abs(G))))
        assert np.linalg.norm(G / p2) < 1e3
        np.testing.assert_allclose(base, G / (1e3 * p2), rtol=1e-12)
        for k in (-100, -27, 27, 100):
            np.testing.assert_array_equal(orthogonalize(G * 2.0**k, eps=1e3, preconditioning=mode, **ident), base)
        assert np.all(orthogonalize(np.zeros((8, 16)), eps=0.5, preconditioning=mode) == 0)


@pytest.mark.parametrize("mode", MODES)
def test_batched_equals_loop(xp, rng, mode):
    G = gaussian(rng, (2, 2, 16, 24))
    out = xp.to_numpy(orthogonalize(xp.asarray(G), preconditioning=mode))
    for i in range(2):
        for j in range(2):
            single = xp.to_numpy(orthogonalize(xp.asarray(G[i, j]), preconditioning=mode))
            # batched GEMM / SVD may block sums differently: float32 rounding only
            # (measured 0 here: same kernels; 2e-6 = a few ulps of the entries)
            assert _show(f"batch {xp.name} {mode}", maxerr(out[i, j], single)) < 2e-6


@pytest.mark.parametrize("mode", MODES)
def test_jit_equals_eager(rng, mode):
    jax = pytest.importorskip("jax")
    G = jax.numpy.asarray(gaussian(rng, (3, 16, 24)).astype(np.float32))
    for coefficients in ("quintic", "polar_express"):
        eager = orthogonalize(G, coefficients=coefficients, preconditioning=mode)
        jitted = jax.jit(lambda g: orthogonalize(g, coefficients=coefficients, preconditioning=mode))(G)
        # XLA may fuse differently under jit: float32 rounding only, amplified by
        # up to 8 NS steps (measured <= 1.2e-6, Polar Express); 1e-5 keeps 8x
        assert _show(f"jit {mode} {coefficients}", maxerr(jitted, eager)) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_bf16_compute_stays_in_band(xp, rng, mode):
    """bf16 is checked by property (DESIGN.md): the output's singular values lie
    in the band of the quintic polynomial over the prescaled singular values'
    range, widened by tests/test_newton_schulz.py's BF16_BAND_MARGIN (0.02;
    measured overshoot <= 0.0024 here, torch and JAX)."""
    if xp.name not in ("torch", "jax"):
        pytest.skip(f"{xp.name} has no native bfloat16")
    s = np.geomspace(0.022, 1.0, 16)
    G = matrix_with_spectrum(rng, 16, 64, s / np.linalg.norm(s))
    sv_in = svals(prescaled(G, mode))
    p = scalar_iteration(np.linspace(sv_in.min(), sv_in.max(), 100_001), "quintic")
    lo, hi = p.min(), p.max()
    out = orthogonalize(xp.asarray(G), compute_dtype="bfloat16", preconditioning=mode)
    assert out.dtype == xp.asarray(G).dtype
    sv = svals(xp.to_numpy(out))
    _show(f"bf16 band {xp.name} {mode}", max(lo - sv.min(), sv.max() - hi, 0.0))
    assert lo - 0.02 <= sv.min() and sv.max() <= hi + 0.02, (lo, hi, sv.min(), sv.max())


def test_modes_differ_far_beyond_tolerance(rng):
    """Each option matters: on a Gaussian input with quintic 5 steps the modes'
    outputs are 1e-2 .. 1e-1 apart, >= 500x F32_ATOL, so a mode silently mapped
    to another would fail the oracle tests above."""
    G = gaussian(rng, (24, 40))
    outs = {m: orthogonalize(G, preconditioning=m) for m in MODES}
    for i, a in enumerate(MODES):
        for b in MODES[i + 1:]:
            assert _show(f"mode gap {a}-{b}", maxerr(outs[a], outs[b])) > 500 * F32_ATOL, (a, b)


# ---------------------------------------------------------------- complex


def _complex_case(xp):
    if xp.name == "cupy":
        return
    try:
        xp.asarray(np.ones((2, 2), np.complex64), "complex64")
    except Exception as e:  # pragma: no cover - every backend we test has complex64
        pytest.skip(f"{xp.name} has no complex64: {e}")


@pytest.mark.parametrize("mode", MODES)
def test_complex_matches_oracle_and_polar_factor(xp, rng, mode):
    """Complex G: NS with X X^H.  The oracle equals U p(S) V^H of the prescaled
    complex matrix; float32 (complex64) on each backend matches the oracle; with
    Polar Express's own 8 steps the output is the polar factor U V^H of G itself
    (of D^-1/2 G for AOL, which is not a scalar prescale)."""
    _complex_case(xp)
    for shape in ((16, 24), (3, 24, 16)):
        G = gaussian(rng, shape, complex_=True)
        ref = orthogonalize(G, preconditioning=mode)
        assert ref.dtype == np.complex128
        assert _show(f"c oracle-vs-svd {mode}", maxerr(ref, expected(G, mode))) < F64_ATOL
        x = xp.asarray(G, "complex64")
        out = orthogonalize(x, preconditioning=mode)
        assert out.dtype == x.dtype
        assert _show(f"c64 {xp.name} {mode} {shape}", maxerr(xp.to_numpy(out), ref)) < F32_ATOL

        polar_in = prescaled(G, "aol") if mode == "aol" else G
        U, _, Vh = np.linalg.svd(polar_in, full_matrices=False)
        pe = xp.to_numpy(orthogonalize(x, coefficients="polar_express", preconditioning=mode))
        # Gaussian 24x40 complex: condition ~5, so 8 Polar Express steps converge
        # fully in float64 (measured 2e-15); complex64 adds rounding only
        # (measured <= 1.4e-6)
        assert _show(f"c polar {xp.name} {mode}", maxerr(pe, U @ Vh)) < F32_ATOL


@pytest.mark.parametrize("mode", MODES)
def test_real_input_unchanged_by_complex_support(xp, rng, mode):
    """A real G gives the same result as G + 0j (real part; imaginary part 0):
    complex support did not change the real path's maths.  (The real path was
    also checked bit-for-bit against the parent commit c953c56 for frobenius on
    numpy/torch/jax when this file was written.)"""
    _complex_case(xp)
    G = gaussian(rng, (16, 24))
    r = xp.to_numpy(orthogonalize(xp.asarray(G), preconditioning=mode))
    c = xp.to_numpy(orthogonalize(xp.asarray(G.astype(np.complex64), "complex64"), preconditioning=mode))
    assert np.isrealobj(r)
    # complex GEMM adds exact zeros to the same real sums, in its own order:
    # float32 rounding (measured <= 9.5e-7); 1e-5 keeps 10x
    assert _show(f"real-vs-complex {xp.name} {mode}", maxerr(c.real, r)) < 1e-5
    assert np.abs(c.imag).max() < 1e-5


# ---------------------------------------------------------------- compute_dtype / steps


def test_compute_dtype_auto_follows_has_native_bf16(xp, rng, monkeypatch):
    """``"auto"`` is bfloat16 exactly where ``backend.has_native_bf16`` says so,
    else ``None`` (the input dtype).  Checked bitwise against the explicit
    choice, with the backend's answer as it is and flipped (monkeypatched), on
    every backend that has a bfloat16 dtype; bf16 and float32 outputs differ by
    ~1e-2, so the comparison cannot confuse them."""
    G = xp.asarray(gaussian(rng, (16, 24)))
    backend = get_backend(G)
    has_bf16 = xp.name in ("torch", "jax")
    none = xp.to_numpy(orthogonalize(G))
    if has_bf16:
        bf = xp.to_numpy(orthogonalize(G, compute_dtype="bfloat16"))
        assert _show(f"bf16 vs f32 {xp.name}", maxerr(bf, none)) > 1e-3
    flips = (False, True) if has_bf16 else (False,)
    for native in flips:
        monkeypatch.setattr(backend, "has_native_bf16", lambda x, native=native: native)
        auto = xp.to_numpy(orthogonalize(G, compute_dtype="auto"))
        np.testing.assert_array_equal(auto, bf if native else none)
    monkeypatch.undo()
    real_answer = backend.has_native_bf16(G)
    auto = xp.to_numpy(orthogonalize(G, compute_dtype="auto"))
    np.testing.assert_array_equal(auto, bf if real_answer else none)
    assert orthogonalize(G, compute_dtype="auto").dtype == G.dtype


def test_compute_dtype_auto_with_complex_stays_complex(xp, rng, monkeypatch):
    """No complex bfloat16 exists: ``"auto"`` with complex G runs in G's dtype even
    where bf16 is native (monkeypatched True), while an explicit bfloat16 is an error."""
    _complex_case(xp)
    G = xp.asarray(gaussian(rng, (16, 24), True), "complex64")
    monkeypatch.setattr(get_backend(G), "has_native_bf16", lambda x: True)
    out = orthogonalize(G, compute_dtype="auto")
    assert out.dtype == G.dtype
    np.testing.assert_array_equal(xp.to_numpy(out), xp.to_numpy(orthogonalize(G)))
    if xp.name in ("torch", "jax"):
        with pytest.raises(TypeError, match="no complex counterpart"):
            orthogonalize(G, compute_dtype="bfloat16")


def test_complex_compute_dtype_maps_precision(rng):
    G = gaussian(rng, (16, 24), True)
    lo = orthogonalize(G, compute_dtype="float32")
    assert lo.dtype == np.complex128                              # returned in G's dtype
    np.testing.assert_array_equal(lo, orthogonalize(G.astype(np.complex64)).astype(np.complex128))


def test_steps_none_is_the_presets_own_length(rng):
    assert {k: preset_steps(k) for k in COEFFICIENTS} == {
        "original": 5, "quintic": 5, "polar_express": 8, "polar_express_safer": 8}
    assert DEFAULT_STEPS == 5
    for name, seq in COEFFICIENTS.items():
        assert resolve_coefficients(name) == resolve_coefficients(name, None) == resolve_coefficients(
            name, preset_steps(name))
        assert len(resolve_coefficients(name)) == (len(seq) if len(seq) > 1 else 5)
    assert resolve_coefficients("polar_express") == COEFFICIENTS["polar_express"]
    assert preset_steps((3.0, -3.2, 1.2)) == 5 and resolve_coefficients((3.0, -3.2, 1.2)) == ((3.0, -3.2, 1.2),) * 5
    pair = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    assert preset_steps(pair) == 2 and resolve_coefficients(pair) == tuple(pair)
    G = gaussian(rng, (16, 24))
    for name in COEFFICIENTS:
        np.testing.assert_array_equal(orthogonalize(G, coefficients=name),
                                      orthogonalize(G, coefficients=name, steps=preset_steps(name)))
        np.testing.assert_array_equal(scalar_iteration(0.3, name), scalar_iteration(0.3, name, preset_steps(name)))
    # and it matters: Polar Express's 8 steps differ from 5 of them
    assert maxerr(orthogonalize(G, coefficients="polar_express"),
                  orthogonalize(G, coefficients="polar_express", steps=5)) > 1e-3


def test_bad_preconditioning_names_it():
    with pytest.raises(ValueError, match=r"preconditioning='newton'.*frobenius.*spectral.*aol.*schatten"):
        orthogonalize(np.ones((4, 4)), preconditioning="newton")
    with pytest.raises(ValueError, match="preconditioning='Frobenius'"):
        M.orthogonalized_updates([np.ones((4, 4))], preconditioning="Frobenius")


# ---------------------------------------------------------------- Muon: adaptive / debias / rms


def _np_ortho(m):
    """Frobenius-prescaled quintic NS of a float64 matrix, via the SVD (no core code)."""
    U, s, Vh = np.linalg.svd(m, full_matrices=False)
    return (U * scalar_iteration(s / np.linalg.norm(s), "quintic")) @ Vh


def traj_err(ours, theirs) -> float:
    """``_peers.trajectory_error`` (relative to the displacement) for real or
    complex params: a complex array is compared as its (real, imag) pair."""
    from _peers import trajectory_error

    def split(step):
        return [np.stack([np.real(x), np.imag(x)]) if np.iscomplexobj(x) else x for x in step]

    return trajectory_error([split(s) for s in ours], [split(s) for s in theirs])


def _debias_written_out(mu, t, nesterov, form):
    # constant g: ema buffer (1-mu^t) g, nesterov mix (1-mu^(t+1)) g; classic = ema / (1-mu)
    c = 1.0 / (1.0 - mu ** (t + 1 if nesterov else t))
    return c * (1.0 - mu) if form == "classic" else c


def _reference_adaptive(ps, grads_seq, *, lr, mu, wd, nesterov, form, rms):
    """Float64 Muon with ``adaptive``, every formula written out here."""
    bufs = [np.zeros_like(p) for p in ps]
    traj = [ps]
    for t, gs in enumerate(grads_seq, start=1):
        new = []
        for i, (p, g) in enumerate(zip(ps, gs)):
            if form == "ema":
                bufs[i] = mu * bufs[i] + (1 - mu) * g
                u = (1 - mu) * g + mu * bufs[i] if nesterov else bufs[i]
            else:
                bufs[i] = mu * bufs[i] + g
                u = g + mu * bufs[i] if nesterov else bufs[i]
            m = u.reshape(u.shape[0], -1)
            O = _np_ortho(m)
            g_hat = _debias_written_out(mu, t, nesterov, form) * m
            dual = np.sum(np.real(np.conj(g_hat) * O))        # <g_hat, O>, real
            d = (rms * math.sqrt(max(m.shape)) * dual * O).reshape(p.shape)
            new.append(p * (1 - lr * wd) - lr * d)
        ps = new
        traj.append(ps)
    return traj


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("form, nesterov", [("ema", False), ("ema", True), ("classic", True)])
def test_adaptive_equals_written_out_formula(xp, rng, form, nesterov, complex_):
    """``adaptive``: each update is ``<debias * u, O> * O`` (real part of the
    Frobenius inner product over the whole parameter), then the LR scale."""
    if complex_:
        _complex_case(xp)
    dt = "complex64" if complex_ else "float32"
    shapes = [(16, 24), (24, 16), (8, 4, 3, 3)]       # wide, tall, conv kernel (flattened)
    ps = [gaussian(rng, s, complex_) * 0.1 for s in shapes]
    gseq = [[gaussian(rng, s, complex_) for s in shapes] for _ in range(3)]
    lr, mu, wd, rms = 1e-3, 0.9, 0.1, 0.3
    want = _reference_adaptive(ps, gseq, lr=lr, mu=mu, wd=wd, nesterov=nesterov, form=form, rms=rms)
    xps = [xp.asarray(p, dt) for p in ps]
    bufs = [xp.asarray(np.zeros(s), dt) for s in shapes]
    got = [[xp.to_numpy(p) for p in xps]]
    for t, gs in enumerate(gseq, start=1):
        xps, bufs = M.muon_step(xps, [xp.asarray(g, dt) for g in gs], bufs, lr=lr, momentum=mu,
                                nesterov=nesterov, momentum_form=form, weight_decay=wd, rms=rms,
                                adaptive=True, step=t)
        got.append([xp.to_numpy(p) for p in xps])
    # relative to how far the params moved (tests/_peers.py): 3 float32 steps,
    # measured <= 2.1e-6; the nuclear-norm scale (~20) multiplies the update,
    # not its relative error.  1e-5 keeps ~5x.
    err = _show(f"adaptive {xp.name} {form} nesterov={nesterov} {dt}", traj_err(got, want))
    assert err < 1e-5
    # teeth: the same first step without adaptive is far from the reference
    # (the dual-norm scale is ~20 here, not 1)
    no_adapt = M.muon_step([xp.asarray(p, dt) for p in ps], [xp.asarray(g, dt) for g in gseq[0]],
                           [xp.asarray(np.zeros(s), dt) for s in shapes], lr=lr, momentum=mu,
                           nesterov=nesterov, momentum_form=form, weight_decay=wd, rms=rms)[0]
    assert traj_err([got[0], [xp.to_numpy(p) for p in no_adapt]], want[:2]) > 0.5


def test_adaptive_needs_step():
    with pytest.raises(ValueError, match="adaptive=True needs step="):
        M.muon_step([np.ones((4, 4))], [np.ones((4, 4))], [np.zeros((4, 4))], lr=0.1, adaptive=True)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("form", ["ema", "classic"])
def test_debias_factor_is_unbiased(form, nesterov):
    """For a constant gradient g, ``debias_factor * update == g`` at every step.

    Derivation (buffer from zero, mu = momentum):
      ema:      buf_t = mu buf_{t-1} + (1-mu) g = (1 - mu^t) g;
                nesterov u = (1-mu) g + mu buf_t = (1 - mu^(t+1)) g.
      classic:  buf_t = mu buf_{t-1} + g = (1 - mu^t)/(1-mu) g;
                nesterov u = g + mu buf_t = (1 - mu^(t+1))/(1-mu) g.
    So c = 1/(1 - mu^t) (or mu^(t+1) with nesterov), times (1-mu) for classic.
    """
    mu = 0.95
    g = np.array([[1.5, -2.0], [0.25, 3.0]])
    buf = np.zeros_like(g)
    for t in range(1, 9):
        buf, u = M.momentum_update(buf, g, momentum=mu, nesterov=nesterov, form=form)
        c = M.debias_factor(mu, t, nesterov=nesterov, form=form)
        assert c == pytest.approx(_debias_written_out(mu, t, nesterov, form), rel=1e-15)
        np.testing.assert_allclose(c * u, g, rtol=1e-14)
    # a 0-d array step (optax state under jit) gives the same factor in float32
    jnp = pytest.importorskip("jax.numpy")
    c32 = float(M.debias_factor(mu, jnp.asarray(3, jnp.int32), nesterov=nesterov, form=form))
    assert c32 == pytest.approx(_debias_written_out(mu, 3, nesterov, form), rel=1e-6)


def test_debias_differs_from_optax_nesterov_correction():
    """optax's nesterov mix ``mu m/(1-mu^(t+1)) + (1-mu) g/(1-mu^t)`` applied to a
    constant g is k_t g with k_1 = 1 + mu/(1+mu) = 1.487 (mu=0.95): biased.  Ours
    gives exactly g (above).  The parity file checks optax's updates carry k_t."""
    mu = 0.95
    k = [mu * (1 - mu**t) / (1 - mu ** (t + 1)) + (1 - mu) / (1 - mu**t) for t in range(1, 6)]
    assert k[0] == pytest.approx(1 + mu / (1 + mu), rel=1e-15) and round(k[0], 3) == 1.487
    assert all(x > 1.01 for x in k)


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (3, 4, 5, 5)], ids=["wide", "tall", "conv"])
def test_consistent_rms_scales_exactly(xp, rng, shape):
    """``rms=c`` (optax's consistent_rms) multiplies the orthogonalised update by
    exactly ``c * sqrt(max(out, in))`` (flattened fan for a conv kernel)."""
    u = xp.asarray(gaussian(rng, shape))
    O = M.orthogonalized_updates([u], adjust_lr_fn="none")[0]
    out, fan_in = shape[0], math.prod(shape[1:])
    for c in (0.2, 0.35, 1.0):
        d = M.orthogonalized_updates([u], adjust_lr_fn="match_rms_adamw", rms=c)[0]
        scale = c * math.sqrt(max(out, fan_in))
        assert M.lr_scale(out, fan_in, "match_rms_adamw", rms=c) == scale
        # The scale rides on Newton-Schulz's last GEMM (a*s X + s BX rather than
        # s (aX + BX)): the two round differently, by float32 ulps of the terms
        # before they cancel (|aX| <= ~3.5 for entries <= ~1.2), so compare
        # against the largest entry: 1e-6 of it is a few ulps, while a wrong c
        # (0.2 vs 0.35) is off by 75%.
        Os = xp.to_numpy(O) * np.float32(scale)
        np.testing.assert_allclose(xp.to_numpy(d), Os, rtol=0, atol=1e-6 * np.abs(Os).max())
    # default is 0.2 (Moonshot), and the rms actually changes the update
    np.testing.assert_array_equal(xp.to_numpy(M.orthogonalized_updates([u])[0]),
                                  xp.to_numpy(M.orthogonalized_updates([u], rms=0.2)[0]))
    assert M.DEFAULT_RMS == 0.2


def test_lr_scale_rms_argument():
    assert M.lr_scale(64, 256, "match_rms_adamw", rms=0.5) == 0.5 * 16
    assert M.lr_scale(256, 64, "match_rms_adamw", rms=0.5) == 0.5 * 16
    assert M.lr_scale(64, 256, "match_rms_adamw") == 0.2 * 16
    # rms only belongs to match_rms_adamw
    assert M.lr_scale(256, 64, "original", rms=0.5) == 2.0
    assert M.lr_scale(64, 256, "rms_to_rms", rms=0.5) == 0.5
    jnp = pytest.importorskip("jax.numpy")
    assert float(M.lr_scale(64, 256, "match_rms_adamw", rms=jnp.float32(0.5))) == 8.0  # 0-d array (schedules)


# ---------------------------------------------------------------- AdamW


def _adamw_f64(p, gs, *, lr, b1, b2, eps, wd):
    m = np.zeros_like(p)
    v = np.zeros(p.shape)
    for t, g in enumerate(gs, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * np.abs(g) ** 2
        p = p * (1 - lr * wd) - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p, m, v


def _huge_grads(rng, shape, steps):
    # |g| in [0.5e20, 1e20]: g*g = 1e40 overflows float32 (max 3.4e38), while the
    # second moment stays finite for the first ~30 steps at b2 = 0.999
    # (v_t = (1 - b2^t) g^2 <= 1e38 for t <= 10)
    return [(rng.uniform(0.5, 1.0, shape) * rng.choice([-1.0, 1.0], shape) * 1e20).astype(np.float32)
            for _ in range(steps)]


def test_adamw_second_moment_does_not_overflow(xp, rng):
    shape, steps, lr, wd = (6, 5), 8, 1e-3, 0.01
    p0 = rng.standard_normal(shape).astype(np.float32)
    gs = _huge_grads(rng, shape, steps)
    with np.errstate(over="ignore"):
        assert np.all(np.isinf(0.001 * (gs[0] * gs[0])))  # the naive order overflows: teeth
    want_p, want_m, want_v = _adamw_f64(p0.astype(np.float64), [g.astype(np.float64) for g in gs],
                                        lr=lr, b1=0.9, b2=0.999, eps=1e-8, wd=wd)
    p, m, v = xp.asarray(p0), xp.asarray(np.zeros(shape)), xp.asarray(np.zeros(shape))
    for t, g in enumerate(gs, start=1):
        p, m, v = adamw_step(p, xp.asarray(g), m, v, t, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
        assert np.all(np.isfinite(xp.to_numpy(v))) and np.all(np.isfinite(xp.to_numpy(p)))
    # state: a few float32 roundings, relative (measured 2.4e-7).  Params: each
    # of the 8 steps rounds p (|p| <= 2.4: half an ulp = 1.2e-7) and moves it by
    # ~lr with a ~1e-6 relative direction error: <= 1e-6 in all (measured
    # 7.7e-7 on every backend); 4e-6 for other summation orders.
    assert _show(f"adam huge v {xp.name}", float(np.max(np.abs(xp.to_numpy(v) / want_v - 1)))) < 2e-6
    np.testing.assert_allclose(xp.to_numpy(m), want_m, rtol=2e-6)
    assert _show(f"adam huge p {xp.name}", maxerr(xp.to_numpy(p), want_p)) < 4e-6


def test_adamw_overflow_matches_torch(rng):
    torch = pytest.importorskip("torch")
    shape, steps, lr, wd = (6, 5), 8, 1e-3, 0.01
    p0 = rng.standard_normal(shape).astype(np.float32)
    gs = _huge_grads(rng, shape, steps)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.AdamW([tp], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    p, m, v = p0, np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(gs, start=1):
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        p, m, v = adamw_step(p, g, m, v, t, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    st = opt.state[tp]
    assert torch.isfinite(st["exp_avg_sq"]).all()
    # same float32 operation order as torch (addcmul, sqrt(v)/sqrt(bc2)):
    # measured bitwise equal here; 1e-6 allows a few ulps elsewhere
    np.testing.assert_allclose(v, st["exp_avg_sq"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(m, st["exp_avg"].numpy(), rtol=1e-6)
    assert _show("adam huge vs torch p", maxerr(p, tp.detach().numpy())) < 1e-6


def test_adamw_complex_second_moment_is_real_ema_of_abs_squared(xp, rng):
    """Complex g: m is complex, v is real and the EMA of |g|^2 (one second moment
    per complex entry, optax's convention), the step is m_hat / (sqrt(v_hat)+eps)."""
    _complex_case(xp)
    shape, lr, wd = (5, 3), 1e-2, 0.1
    p0 = gaussian(rng, shape, True)
    gs = [gaussian(rng, shape, True) for _ in range(6)]
    want_p, want_m, want_v = _adamw_f64(p0, gs, lr=lr, b1=0.9, b2=0.95, eps=1e-8, wd=wd)
    p = xp.asarray(p0, "complex64")
    m = xp.asarray(np.zeros(shape), "complex64")
    v = xp.asarray(np.zeros(shape), "float32")
    for t, g in enumerate(gs, start=1):
        p, m, v = adamw_step(p, xp.asarray(g, "complex64"), m, v, t, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=wd)
    vn = xp.to_numpy(v)
    assert np.isrealobj(vn) and vn.dtype == np.float32
    np.testing.assert_allclose(vn, want_v, rtol=2e-6)
    np.testing.assert_allclose(xp.to_numpy(m), want_m, rtol=0, atol=2e-6)
    # float32 rounding of p (|p| ~ 2) over 6 steps (measured 3.7e-7 on every backend)
    assert _show(f"adam complex p {xp.name}", maxerr(xp.to_numpy(p), want_p)) < 2e-6
    # teeth: the per-real-component convention (torch.optim's view_as_real) differs
    d_c, _, _ = adam_update(gs[0], np.zeros(shape, complex), np.zeros(shape), 1, beta1=0.9, beta2=0.95, eps=1e-8)
    np.testing.assert_allclose(np.abs(d_c), 1.0, rtol=1e-7)          # |g| / |g| at t=1
    per_real = np.sign(gs[0].real) + 1j * np.sign(gs[0].imag)
    assert maxerr(d_c, per_real) > 0.1


# ---------------------------------------------------------------- adapters: "auto" with complex

# Found by these tests: the adapters used to resolve ns_dtype='auto' to bfloat16
# from the device alone, so on a native-bf16 device a complex parameter hit
# core's "bfloat16 has no complex counterpart" TypeError.  Now core resolves
# 'auto' per matrix (complex stays complex).


def test_torch_adapter_auto_ns_dtype_with_complex_param(rng, monkeypatch):
    torch = pytest.importorskip("torch")
    from xpopt.adapters.torch import Muon
    from xpopt.backends import torch as torch_backend

    # a device with native bf16 (this is what a GPU or an AMX CPU reports)
    monkeypatch.setattr(torch_backend, "has_native_bf16", lambda x: True)
    W0 = torch.from_numpy(gaussian(rng, (8, 12), True).astype(np.complex64))
    G = torch.from_numpy(gaussian(rng, (8, 12), True).astype(np.complex64))
    out = {}
    for ns_dtype in (None, "auto"):
        W = torch.nn.Parameter(W0.clone())
        opt = Muon([W], lr=0.02, ns_dtype=ns_dtype)
        W.grad = G.clone()
        opt.step()
        out[ns_dtype] = W.detach().numpy()
        assert opt.routes()[0].ns_dtype == "complex64"
    np.testing.assert_array_equal(out["auto"], out[None])
    # and a real parameter on the same "device" does get bf16
    R = torch.nn.Parameter(torch.randn(8, 12))
    assert Muon([R], ns_dtype="auto").routes()[0].ns_dtype == "bfloat16"


def test_optax_adapter_auto_ns_dtype_with_complex_leaf(rng, monkeypatch):
    jnp = pytest.importorskip("jax.numpy")
    pytest.importorskip("optax")
    from xpopt.adapters import optax as xo
    from xpopt.backends import jax as jax_backend

    monkeypatch.setattr(jax_backend, "has_native_bf16", lambda x: True)   # a GPU/TPU
    p = {"w": jnp.asarray(gaussian(rng, (12, 8), True), jnp.complex64)}
    g = {"w": jnp.asarray(gaussian(rng, (12, 8), True), jnp.complex64)}
    out = {}
    for ns_dtype in (None, "auto"):
        tx = xo.muon(0.02, ns_dtype=ns_dtype, labels="muon")
        out[ns_dtype] = np.asarray(tx.update(g, tx.init(p), p)[0]["w"])
    np.testing.assert_array_equal(out["auto"], out[None])


def test_adapters_reject_bad_preconditioning():
    with pytest.raises(ValueError, match="preconditioning='svd'"):
        from xpopt.adapters import arrays

        arrays.muon(0.02, preconditioning="svd")
    torch = pytest.importorskip("torch")
    from xpopt.adapters.torch import Muon

    with pytest.raises(ValueError, match="preconditioning='svd'"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], preconditioning="svd")
    pytest.importorskip("optax")
    from xpopt.adapters import optax as xo

    with pytest.raises(ValueError, match="preconditioning='svd'"):
        xo.muon(0.02, preconditioning="svd")
    with pytest.raises(ValueError, match="preconditioning='svd'"):
        xo.scale_by_muon(preconditioning="svd")
