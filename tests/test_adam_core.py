"""AdamW / NAdamW core against the written rule and torch.optim.AdamW."""

from __future__ import annotations

import numpy as np
import pytest

from xpopt.core.adam import adamw_step, check_betas


def _reference(p, g_seq, *, lr, b1, b2, eps, wd, nesterov, eps_root=0.0):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(g_seq, start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if nesterov == "nadamw_dozat":   # Dozat: the two terms corrected separately (optax's nesterov)
            m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
        else:
            m_hat = (b1 * m + (1 - b1) * g if nesterov else m) / (1 - b1**t)
        p = p - lr * m_hat / (np.sqrt(v / (1 - b2**t) + eps_root) + eps)
    return p


@pytest.mark.parametrize("nesterov, eps_root", [(False, 0.0), (True, 0.0), ("nadamw_dozat", 0.0), (False, 1e-3),
                                                ("nadamw_dozat", 1e-3)])
def test_matches_reference_on_every_backend(xp, rng, nesterov, eps_root):
    p0 = rng.standard_normal((7, 3))
    gs = [rng.standard_normal((7, 3)) for _ in range(5)]
    want = _reference(p0, gs, lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, nesterov=nesterov, eps_root=eps_root)
    p, m, v = xp.asarray(p0), xp.asarray(np.zeros((7, 3))), xp.asarray(np.zeros((7, 3)))
    for t, g in enumerate(gs, start=1):
        p, m, v = adamw_step(p, xp.asarray(g), m, v, t, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=0.1, nesterov=nesterov, eps_root=eps_root)
    # Each step moves p by <= lr (Adam's normalised step): float32 rounding of
    # ~|p| * 6e-8 per op over 5 steps stays well under 1e-6.
    np.testing.assert_allclose(xp.to_numpy(p), want, atol=1e-6)


def test_nesterov_rules_differ_from_the_first_step():
    """timm's NAdamW and Dozat's NAdam are different rules, not roundings: at t=1 the look-ahead is
    (1 + b1) g vs (1 + b1 / (1 + b1)) g before the same division (b1 = 0.9: 1.9 vs 1.474)."""
    g, z = np.array([2.0, -3.0]), np.zeros(2)
    timm = adamw_step(z, g, z, z, 1, lr=1.0, betas=(0.9, 0.999), eps=0.0, nesterov=True)[0]
    dozat = adamw_step(z, g, z, z, 1, lr=1.0, betas=(0.9, 0.999), eps=0.0, nesterov="nadamw_dozat")[0]
    np.testing.assert_allclose(timm, -np.sign(g) * 1.9, rtol=1e-12)
    np.testing.assert_allclose(dozat, -np.sign(g) * (1 + 0.9 / 1.9), rtol=1e-12)


def test_matches_torch_adamw(rng):
    torch = pytest.importorskip("torch")
    p0 = rng.standard_normal((5, 4)).astype(np.float32)
    gs = [rng.standard_normal((5, 4)).astype(np.float32) for _ in range(10)]
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.AdamW([tp], lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    p, m, v = p0, np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(gs, start=1):
        tp.grad = torch.from_numpy(g)
        opt.step()
        p, m, v = adamw_step(p, g, m, v, t, lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    # Same float32 maths in a different operation order: a few ulps of |p|~3.
    np.testing.assert_allclose(p, tp.detach().numpy(), atol=2e-6)


def test_jax_traced_step_count(rng):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    g = jnp.asarray(rng.standard_normal(4).astype(np.float32))
    z = jnp.zeros(4)

    @jax.jit
    def f(p, t):
        return adamw_step(p, g, z, z, t, lr=0.1)[0]

    # The step count may be a traced int array (optax state): bias correction is
    # then computed in float32, where 1 - 0.999**t cancels: 0.999 rounds to
    # 0.99900001, so 1 - b2 is off by 1.3e-5 relative and its sqrt by 6.4e-6.
    # Eager Python ints compute it in float64.  rtol 2e-5 covers that, no more.
    np.testing.assert_allclose(np.asarray(f(z, jnp.asarray(1))), np.asarray(adamw_step(z, g, z, z, 1, lr=0.1)[0]),
                               rtol=2e-5)


@pytest.mark.parametrize("betas", [(0.9,), (1.0, 0.9), (0.9, -0.1), "ab"])
def test_bad_betas(betas):
    with pytest.raises(ValueError, match="betas"):
        check_betas(betas)
