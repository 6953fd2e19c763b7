"""Muon core: momentum forms, LR rules, suitability, N-D handling, whole steps per backend."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xpopt.core import muon as M
from xpopt.core.newton_schulz import orthogonalize


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("form", ["ema", "classic"])
def test_momentum_forms(rng, form, nesterov):
    mu = 0.9
    buf, g = rng.standard_normal((2, 5, 3))
    new_buf, upd = M.momentum_update(buf, g, momentum=mu, nesterov=nesterov, form=form)
    if form == "ema":
        want_buf = mu * buf + (1 - mu) * g
        want_upd = (1 - mu) * g + mu * want_buf if nesterov else want_buf
    else:
        want_buf = mu * buf + g
        want_upd = g + mu * want_buf if nesterov else want_buf
    np.testing.assert_allclose(new_buf, want_buf, rtol=1e-14)
    np.testing.assert_allclose(upd, want_upd, rtol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("form", ["ema", "classic"])
def test_momentum_bias_correction(rng, form, nesterov):
    """optax.contrib.muon's rule (module docstring): the EMA buffer B over 1 - mu^t, or with nesterov
    the two terms corrected separately; the same update from either buffer form (float64 oracle)."""
    mu, t = 0.9, 3
    ema, g = rng.standard_normal((2, 5, 3))
    buf = ema if form == "ema" else ema / (1 - mu)
    _, u = M.momentum_update(buf, g, momentum=mu, nesterov=nesterov, form=form, bias_correction=True, step=t)
    B = mu * ema + (1 - mu) * g
    want = mu * B / (1 - mu ** (t + 1)) + (1 - mu) * g / (1 - mu ** t) if nesterov else B / (1 - mu ** t)
    np.testing.assert_allclose(u, want, rtol=1e-13)
    # already unbiased: adaptive's debias factor is 1
    opts = M.MuonOptions(adaptive=True, momentum_bias_correction=True, nesterov=nesterov, momentum_form=form)
    assert opts.debias(t) == 1.0
    with pytest.raises(ValueError, match="step="):
        M.momentum_update(buf, g, momentum=mu, bias_correction=True)


def test_lr_scale_rules():
    assert M.lr_scale(256, 64, "original") == pytest.approx(2.0)
    assert M.lr_scale(64, 256, "original") == 1.0
    assert M.lr_scale(64, 256, "match_rms_adamw") == pytest.approx(0.2 * 16)
    assert M.lr_scale(64, 256, "rms_to_rms") == pytest.approx(0.5)
    assert M.lr_scale(64, 256, "none") == 1.0
    with pytest.raises(ValueError, match="adjust_lr_fn='kimi'"):
        M.lr_scale(4, 4, "kimi")


def test_match_rms_adamw_gives_rms_0p2(rng):
    # The rule's purpose: an orthogonalised full-rank update scaled this way
    # has RMS 0.2 (exactly, for a semi-orthogonal m x n matrix: ||O||_F^2 = min(m,n)).
    G = rng.standard_normal((64, 256))
    U, _, Vt = np.linalg.svd(G, full_matrices=False)
    O = (U @ Vt) * M.lr_scale(64, 256, "match_rms_adamw")
    assert math.sqrt(np.mean(O**2)) == pytest.approx(0.2, rel=1e-12)


@pytest.mark.parametrize("shape, ok, reason", [
    ((64, 128), True, "ok"),
    ((96, 3, 4, 4), True, "ok"),                       # flattened to 96 x 48
    ((4, 2048), False, "extreme_aspect_ratio:512.0"),
    ((64,), False, "insufficient_dims"),
    ((), False, "insufficient_dims"),
    ((1, 196, 768), False, "leading_unit_dims"),       # position embedding
    ((32, 1, 3, 3), False, "leading_unit_dims"),       # depthwise conv
    ((3, 3), False, "min_dim_too_small:3"),
    ((8, 1), False, "insufficient_dims"),
])
def test_suitability(shape, ok, reason):
    assert M.suitability(shape) == (ok, reason)


def test_suitability_thresholds():
    assert M.suitability((4, 2048), max_aspect_ratio=1024) == (True, "ok")
    assert M.suitability((3, 3), min_dim_size=2) == (True, "ok")


@pytest.mark.parametrize("shape, mode, mshape", [
    ((8, 12), "flatten", (8, 12)),
    ((8, 4, 3, 3), "flatten", (8, 36)),
    ((8, 4, 3, 3), "batched", (9, 8, 4)),
    ((1, 1, 8, 12), "flatten", (8, 12)),               # leading unit dims squeezed
    ((1, 8, 4, 2), "batched", (2, 8, 4)),
])
def test_matrix_view_roundtrip(xp, rng, shape, mode, mshape):
    assert M.matrix_shape(shape, mode) == mshape
    x = xp.asarray(rng.standard_normal(shape))
    m = M.to_matrix(x, mode)
    assert tuple(m.shape) == mshape
    back = M.from_matrix(m, shape, mode)
    np.testing.assert_array_equal(xp.to_numpy(back), xp.to_numpy(x))


def test_explicit_unit_fan_out_is_kept(rng):
    """squeeze=False (a parameter moved from dimension numbers): a leading unit dim is the fan-out."""
    x = rng.standard_normal((1, 8, 3))   # (out=1, in=8, batch=3)
    assert M.matrix_shape(x.shape, "batched", squeeze=False) == (3, 1, 8)
    m = M.to_matrix(x, "batched", squeeze=False)
    np.testing.assert_array_equal(M.from_matrix(m, x.shape, "batched", squeeze=False), x)
    # per slice a (1, 8) row, orthogonalised on its own (squeezed, it would be one (8, 3) matrix)
    d = M.orthogonalized_updates([x], conv_mode="batched", normalize_spatial=False, adjust_lr_fn="none",
                                 squeeze_leading=[False], coefficients="original")[0]
    for j in range(3):
        row = d[0, :, j]
        np.testing.assert_allclose(row / np.linalg.norm(row), x[0, :, j] / np.linalg.norm(x[0, :, j]), rtol=1e-12)


def test_batched_conv_is_per_tap(rng):
    W = rng.standard_normal((8, 4, 3, 3))
    (d,) = M.orthogonalized_updates([W], conv_mode="batched", normalize_spatial=False, adjust_lr_fn="none")
    for i in range(3):
        for j in range(3):
            np.testing.assert_allclose(d[:, :, i, j], orthogonalize(W[:, :, i, j]), atol=1e-12)
    (dn,) = M.orthogonalized_updates([W], conv_mode="batched", normalize_spatial=True, adjust_lr_fn="none")
    np.testing.assert_allclose(dn, d / 3.0, rtol=1e-12)  # 9 taps -> 1/sqrt(9)


def test_flatten_conv_uses_flattened_fan(rng):
    W = rng.standard_normal((8, 4, 3, 3))
    (d,) = M.orthogonalized_updates([W], conv_mode="flatten", adjust_lr_fn="original")
    want = orthogonalize(W.reshape(8, 36)).reshape(W.shape) * M.lr_scale(8, 36, "original")
    np.testing.assert_allclose(d, want, atol=1e-12)


def test_batching_equals_loop(xp, rng):
    shapes = [(16, 24), (16, 24), (24, 16), (8, 4, 3, 3), (16, 24)]
    us = [xp.asarray(rng.standard_normal(s)) for s in shapes]
    a = M.orthogonalized_updates(us, batch=True)
    b = M.orthogonalized_updates(us, batch=False)
    for x, y in zip(a, b):
        # Batched GEMM may sum in a different order: float32 rounding only.
        np.testing.assert_allclose(xp.to_numpy(x), xp.to_numpy(y), atol=2e-6)


def _reference_step(p, g, buf, *, lr, mu, wd):
    """Float64 Muon step written from the paper's rule, SVD-exact orthogonalisation
    replaced by the same quintic NS so the comparison is like for like."""
    buf = mu * buf + (1 - mu) * g
    u = (1 - mu) * g + mu * buf
    m = u.reshape(u.shape[0], -1)
    d = orthogonalize(m, coefficients="quintic", steps=5).reshape(u.shape)
    scale = 0.2 * math.sqrt(max(m.shape))
    return p * (1 - lr * wd) - lr * scale * d, buf


def test_muon_step_matches_reference_on_every_backend(xp, rng):
    shapes = [(16, 24), (16, 24), (12, 4, 3, 3)]
    ps = [rng.standard_normal(s) for s in shapes]
    bufs = [np.zeros(s) for s in shapes]
    xps, xbufs = [xp.asarray(p) for p in ps], [xp.asarray(b) for b in bufs]
    for _ in range(3):
        gs = [rng.standard_normal(s) for s in shapes]
        ref = [_reference_step(p, g, b, lr=0.02, mu=0.95, wd=0.1) for p, g, b in zip(ps, gs, bufs)]
        ps, bufs = [r[0] for r in ref], [r[1] for r in ref]
        xps, xbufs = M.muon_step(xps, [xp.asarray(g) for g in gs], xbufs, lr=0.02, weight_decay=0.1)
    for p, x in zip(ps, xps):
        # 3 float32 steps of lr*scale*O (|O| ~ 0.1, scale <= 1.2): per-step error
        # ~ lr*scale*2e-5, plus float32 rounding of p itself (~1e-7 * |p| ~ 4e-7).
        np.testing.assert_allclose(xp.to_numpy(x), p, atol=5e-6)


def test_bad_options():
    with pytest.raises(ValueError, match="momentum_form='adam'"):
        M.momentum_update(np.zeros(2), np.zeros(2), momentum=0.9, form="adam")
    with pytest.raises(ValueError, match="conv_mode='spatial'"):
        M.matrix_shape((4, 4, 3, 3), "spatial")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        M.muon_step([np.zeros((4, 4))], [np.zeros((4, 4))], [np.zeros((4, 4))], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        M.matrix_shape((5,))
    for bad, match in ((dict(eps_mode="sum"), "eps_mode='sum'"), (dict(low_precision_dtype="bf16"),
                       "low_precision_dtype='bf16'"), (dict(fallback="nadam"), "fallback='nadam'.*nadamw_dozat"),
                       (dict(momentum_bias_correction="yes"), "momentum_bias_correction"),
                       (dict(fallback_eps_root=-1.0), "fallback_eps_root")):
        with pytest.raises((ValueError, TypeError), match=match):
            M.MuonOptions(**bad)
