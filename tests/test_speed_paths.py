"""The fast paths of issue 11 item 4 compute the same numbers as the plain ones.

Each speed device is checked against the formula it replaces, on every backend
where it applies: the backend ``lerp``/``lerp_``/``div_`` hooks, in-place
momentum, the LR scale folded into Newton-Schulz's last GEMM, ``cast_back=False``,
the one-pass Frobenius norm (and its refusal outside the safe range), the
``batch="auto"`` policy (``batch_groups``) and ``ns_dtype="auto"``.  None of
them may write into an array the caller still owns.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from xpopt.backends import get_backend
from xpopt.core import muon as M
from xpopt.core.newton_schulz import orthogonalize

SHAPES = [(12, 20), (20, 12), (3, 12, 20)]


# ------------------------------------------------------------------ backend hooks

def test_lerp_hooks_match_the_formula(xp, rng):
    a, b = rng.standard_normal((6, 7)), rng.standard_normal((6, 7))
    A, B = xp.asarray(a), xp.asarray(b)
    be = get_backend(A)
    want = a + 0.05 * (b - a)
    # float32 rounding of one fused lerp vs the float64 formula: a few ulps of |a|,|b| <= 4.
    np.testing.assert_allclose(xp.to_numpy(be.lerp(A, B, 0.05)), want, atol=2e-6)
    out = be.lerp_(A, B, 0.05)
    np.testing.assert_allclose(xp.to_numpy(out), want, atol=2e-6)
    if be.MUTABLE:  # written into A, as promised; immutable backends leave A alone
        assert out is A
    else:
        np.testing.assert_array_equal(xp.to_numpy(A), a.astype(np.float32))
    np.testing.assert_array_equal(xp.to_numpy(B), b.astype(np.float32))  # never the other operand


@pytest.mark.parametrize("form", ["ema", "classic"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_inplace_momentum_equals_functional(xp, rng, form, nesterov):
    b0, g0 = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))
    buf_f, u_f = M.momentum_update(xp.asarray(b0), xp.asarray(g0), momentum=0.9, nesterov=nesterov, form=form)
    buf = xp.asarray(b0)
    G = xp.asarray(g0)
    buf_i, u_i = M.momentum_update(buf, G, momentum=0.9, nesterov=nesterov, form=form, inplace=True)
    # Same operations, same order: bitwise equal.
    np.testing.assert_array_equal(xp.to_numpy(buf_i), xp.to_numpy(buf_f))
    np.testing.assert_array_equal(xp.to_numpy(u_i), xp.to_numpy(u_f))
    np.testing.assert_array_equal(xp.to_numpy(G), g0.astype(np.float32))
    if get_backend(buf).MUTABLE:
        np.testing.assert_array_equal(xp.to_numpy(buf), xp.to_numpy(buf_f))


# ------------------------------------------------------------------ Newton-Schulz

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("preconditioning", ["frobenius", "aol"])
def test_folded_scale_equals_scaling_after(xp, rng, shape, preconditioning):
    G = xp.asarray(rng.standard_normal(shape))
    O = xp.to_numpy(orthogonalize(G, preconditioning=preconditioning))
    Os = xp.to_numpy(orthogonalize(G, preconditioning=preconditioning, scale=2.5))
    # a*s*X + s*(BX) rounds each term once more than s*(aX + BX): float32 ulps
    # of entries <= ~1.2 (times 2.5).
    np.testing.assert_allclose(Os, 2.5 * O, rtol=0, atol=2e-6)


@pytest.mark.parametrize("compute_dtype", [None, "float32", "float64"])
def test_orthogonalize_never_writes_into_its_input(xp, rng, compute_dtype):
    if compute_dtype == "float64" and not xp.has_float64:
        pytest.skip("no float64 on this backend (jax without x64)")
    g = rng.standard_normal((12, 20))
    G = xp.asarray(g)
    for preconditioning in ("frobenius", "spectral", "aol", "schatten"):
        orthogonalize(G, compute_dtype=compute_dtype, preconditioning=preconditioning)
        np.testing.assert_array_equal(xp.to_numpy(G), g.astype(np.float32))
        orthogonalize(xp.matrix_transpose(G) if hasattr(xp, "matrix_transpose") else G.T,
                      compute_dtype=compute_dtype, preconditioning=preconditioning)
        np.testing.assert_array_equal(xp.to_numpy(G), g.astype(np.float32))


def test_cast_back_false_keeps_compute_dtype_and_values():
    torch = pytest.importorskip("torch")
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    back = orthogonalize(G, compute_dtype="bfloat16")
    kept = orthogonalize(G, compute_dtype="bfloat16", cast_back=False)
    assert back.dtype == torch.float32 and kept.dtype == torch.bfloat16
    # bf16 -> float32 is exact, so the two differ in dtype only.
    assert torch.equal(kept.float(), back)


def test_torch_one_pass_norm_matches_generic_and_refuses_outside_safe_range():
    torch = pytest.importorskip("torch")
    from xpopt.backends import torch as tb

    X = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(1))
    n = tb.frobenius_norm(X)
    np.testing.assert_allclose(n.numpy(), np.linalg.norm(X.numpy(), axis=(-2, -1), keepdims=True), rtol=1e-6)
    assert isinstance(tb.frobenius_norm(X[0]), float)
    for scale in (1e30, 1e-30, float("inf")):
        # torch's own norm overflows to inf / underflows to 0 here: refused, so core
        # takes its power-of-two path.
        assert tb.frobenius_norm(X * scale) is None
        assert tb.frobenius_norm((X * scale)[0]) is None
    assert tb.frobenius_norm(X.double()) is None


@pytest.mark.parametrize("scale", [1e30, 1e20, 1e-20])
def test_huge_and_tiny_inputs_give_the_unit_scale_result(scale):
    """Both norm paths: the result of a rescaled input equals the unscaled one's.

    (1e-30 would hit the eps floor, as documented; 1e-20 with eps=1e-30 does not.)
    """
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(3).standard_normal((12, 20)).astype(np.float32)
    ref = orthogonalize(torch.from_numpy(g), eps=1e-30)
    got = orthogonalize(torch.from_numpy(g * np.float32(scale)), eps=1e-30)
    # The scaled input itself is rounded to float32: ulps of the entries.
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=2e-6)


# ------------------------------------------------------------------ batching policy

def test_batch_groups_policy(xp, rng, monkeypatch):
    arrays = [xp.asarray(rng.standard_normal(s)) for s in [(8, 8), (8, 8), (16, 8), (8, 8), (8, 16)]]
    assert M.batch_groups(arrays, batch=False) == [[0], [1], [2], [3], [4]]
    assert M.batch_groups(arrays, batch=True) == [[0, 1, 3], [2], [4]]
    be = get_backend(arrays[0])
    # "auto" batches a same-shape group iff m*m*n <= the backend's measured limit.
    monkeypatch.setattr(be, "batch_limit", lambda x: 8 * 8 * 8)
    assert M.batch_groups(arrays, batch="auto") == [[0, 1, 3], [2], [4]]
    monkeypatch.setattr(be, "batch_limit", lambda x: 8 * 8 * 8 - 1)
    assert M.batch_groups(arrays, batch="auto") == [[0], [1], [2], [3], [4]]
    with pytest.raises(ValueError, match="batch='yes'"):
        M.batch_groups(arrays, batch="yes")


def test_measured_batch_limits_are_sane():
    """CPU limits sit between the sizes where batching was measured to win and lose
    (benchmarks/batching.py); accelerators always batch."""
    torch = pytest.importorskip("torch")
    from xpopt.backends import numpy as nb
    from xpopt.backends import torch as tb

    assert 256**3 <= tb.batch_limit(torch.zeros(1)) < 512**3
    assert 64**3 <= nb.batch_limit(np.zeros(1)) < 128**3
    if torch.cuda.is_available():
        assert tb.batch_limit(torch.zeros(1, device="cuda")) == math.inf


@pytest.mark.parametrize("batch", [True, False, "auto"])
def test_batching_choice_never_changes_results_beyond_rounding(xp, rng, batch):
    us = [xp.asarray(rng.standard_normal(s)) for s in [(16, 24)] * 3 + [(24, 16)] * 2]
    ref = M.orthogonalized_updates(us, batch=False)
    got = M.orthogonalized_updates(us, batch=batch)
    for r, g in zip(ref, got):
        # batched vs single GEMMs may sum in another order: float32 rounding.
        np.testing.assert_allclose(xp.to_numpy(g), xp.to_numpy(r), atol=2e-6)


# ------------------------------------------------------------------ adapters

def test_torch_adapter_ns_dtype_auto_follows_the_hardware(monkeypatch):
    torch = pytest.importorskip("torch")
    from xpopt.adapters.torch import Muon
    from xpopt.backends import torch as tb

    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(tb, "has_native_bf16", lambda x, native=native: native)
        w = torch.nn.Parameter(torch.randn(16, 8))
        opt = Muon([("w", w)], ns_dtype="auto")
        assert opt.routes()[0].ns_dtype == want
        w.grad = torch.randn(16, 8)
        with torch.no_grad():
            ref = w.detach().clone()
        opt.step()
        assert w.dtype == torch.float32 and not torch.equal(w.detach(), ref)


def test_torch_adapter_bf16_ns_matches_explicit_bf16_and_keeps_float32_params():
    """ns_dtype="auto" on a native-bf16 machine is ns_dtype=bfloat16, bitwise;
    the bf16 direction is widened exactly into float32 params (cast_back=False)."""
    torch = pytest.importorskip("torch")
    from xpopt.adapters.torch import Muon

    def run(ns_dtype):
        g = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(32, 48, generator=g))
        opt = Muon([w], ns_dtype=ns_dtype, weight_decay=0.1)
        for _ in range(3):
            w.grad = torch.randn(32, 48, generator=g)
            opt.step()
        return w.detach()

    a = run(torch.bfloat16)
    assert a.dtype == torch.float32
    b = run("bfloat16")
    assert torch.equal(a, b)
    # and it is a bf16 computation, not a float32 one
    assert not torch.equal(a, run(None))
