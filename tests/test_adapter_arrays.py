"""xpopt.adapters.arrays: NumPy runs vs the float64 core oracle, containers, routing, state, errors."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

from _nudge import nudge

from xpopt.adapters import arrays
from xpopt.core.adam import adamw_step
from xpopt.core.muon import muon_step

# float64 adapter vs float64 oracle: the adapter makes the same core calls on the
# same data; only the order of the decay/LR products differs (p + (-lr*d - lr*wd*p)
# vs p*(1 - lr*wd) - lr*d), a few float64 ulps on params ~1-4: measured 1.3e-15.
F64_ATOL = 1e-13
# float32 adapter vs float64 oracle after 4 steps, params |W| <= 4: float32 storage of
# the params (ulp(4) = 4.8e-7), Newton-Schulz in float32 (<= 2e-4 relative, see
# test_newton_schulz, times lr*lr_scale <= 0.016), AdamW's division (1e-6 relative
# of a step of lr).  Both start from the same float32-representable values (nudged
# by a few ulps for nudge seeds > 0).  Measured over nudge seeds 0..11: <= 3.6e-7
# (the embedding, |W| ~ 4: a few roundings of its storage); float64: 1.3e-15.
# 4e-6 leaves room for BLAS order, while a real
# bug (wrong lr_scale, bias correction off by one step) moves params by >= 4e-4.
F32_ATOL = 4e-6

HP = dict(momentum=0.9, nesterov=True, momentum_form="ema", weight_decay=0.1,
          ns_coefficients="quintic", ns_steps=5, adjust_lr_fn="match_rms_adamw",
          betas=(0.9, 0.95), fallback_eps=1e-8)
NAMES = ["dense1", "dense2", "dense3", "conv", "bias", "embed"]
MUON = ["dense1", "dense2", "dense3", "conv"]


def problem(seed=0):
    """float64 params and quadratic-loss targets, torch layout (out, in, *spatial)."""
    rng = np.random.default_rng(seed)
    shapes = {"dense1": (16, 12), "dense2": (16, 16), "dense3": (16, 16), "conv": (8, 4, 3, 3),
              "bias": (16,), "embed": (32, 16)}
    P = {k: rng.standard_normal(s) for k, s in shapes.items()}
    T = {k: rng.standard_normal(s) for k, s in shapes.items()}
    return P, T


def oracle(P, T, *, steps, lr, flr, muon_names, hp, fallback="adamw", conv_mode="flatten"):
    """Core in float64 on loss 0.5*||W - T||^2 (grad W - T)."""
    P = {k: v.copy() for k, v in P.items()}
    bufs = [np.zeros_like(P[k]) for k in muon_names]
    fb = [k for k in P if k not in muon_names]
    m = {k: np.zeros_like(P[k]) for k in fb}
    v = {k: np.zeros_like(P[k]) for k in fb}
    for t in range(steps):
        G = {k: P[k] - T[k] for k in P}
        lr_t = lr(t) if callable(lr) else lr
        flr_t = flr(t) if callable(flr) else flr
        new, bufs = muon_step(
            [P[k] for k in muon_names], [G[k] for k in muon_names], bufs, lr=lr_t,
            momentum=hp["momentum"], nesterov=hp["nesterov"], momentum_form=hp["momentum_form"],
            weight_decay=hp["weight_decay"], conv_mode=conv_mode, adjust_lr_fn=hp["adjust_lr_fn"],
            batch=True, coefficients=hp["ns_coefficients"], steps=hp["ns_steps"])
        P.update(zip(muon_names, new))
        for k in fb:
            P[k], m[k], v[k] = adamw_step(P[k], G[k], m[k], v[k], t + 1, lr=flr_t, betas=hp["betas"],
                                          eps=hp["fallback_eps"], weight_decay=hp["weight_decay"],
                                          nesterov=fallback == "nadamw")
    return P


def run(opt, params, targets, steps):
    """``targets`` in the container type of ``params``."""
    state = opt.init(params)
    keys = range(len(params)) if isinstance(params, (list, tuple)) else list(params)
    for _ in range(steps):
        grads = type(params)(params[k] - targets[k] for k in keys) if not isinstance(params, dict) \
            else {k: params[k] - targets[k] for k in keys}
        updates, state = opt.update(grads, state, params)
        params = arrays.apply_updates(params, updates)
    return params, state


def lr_sched(t):
    return 0.02 * (1.0 - 0.2 * t)


@pytest.mark.parametrize("dtype,atol", [("float64", F64_ATOL), ("float32", F32_ATOL)])
@pytest.mark.parametrize("container", ["dict", "list"])
def test_matches_core_oracle(dtype, atol, container, nudge_seed):
    # float32-representable start and targets (nudged by a few ulps for
    # seeds > 0, tests/_nudge.py): the float32 run and the oracle start equal
    P, T = nudge(problem(), nudge_seed)
    labels = {k: "fallback" if k == "embed" else None for k in NAMES}
    if container == "dict":
        params = {k: P[k].astype(dtype) for k in NAMES}
        targets = {k: T[k].astype(dtype) for k in NAMES}
    else:
        params = [P[k].astype(dtype) for k in NAMES]
        targets = [T[k].astype(dtype) for k in NAMES]
        labels = [labels[k] for k in NAMES]
    opt = arrays.muon(lr_sched, fallback_lr=0.003, labels=labels, **HP)
    out, state = run(opt, params, targets, steps=4)
    ref = oracle(P, T, steps=4, lr=lr_sched, flr=0.003, muon_names=MUON, hp=HP)
    assert state.step == 4 and isinstance(out, type(params))
    for i, k in enumerate(NAMES):
        got = out[k] if container == "dict" else out[i]
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got, ref[k], rtol=0, atol=atol, err_msg=k)


def test_batched_conv_nadamw_classic_and_tuple_params():
    P, T = problem(1)
    hp = dict(HP, momentum_form="classic", nesterov=False)
    params = tuple(P[k] for k in NAMES)
    targets = tuple(T[k] for k in NAMES)
    labels = lambda ps: tuple("fallback" if p.shape == (32, 16) else None for p in ps)  # noqa: E731
    opt = arrays.muon(0.02, fallback="nadamw", conv_mode="batched", labels=labels, **hp)
    out, _ = run(opt, params, targets, steps=3)
    assert isinstance(out, tuple)
    ref = oracle(P, T, steps=3, lr=0.02, flr=0.02, muon_names=MUON, hp=hp, fallback="nadamw",
                 conv_mode="batched")
    for i, k in enumerate(NAMES):
        np.testing.assert_allclose(out[i], ref[k], rtol=0, atol=F64_ATOL, err_msg=k)


def test_automatic_routing_and_flax_layout():
    rng = np.random.default_rng(2)
    # torch layout: (64, 16) is a matrix, (4, 1024) has aspect ratio 256 > 128, (16,) a vector.
    P = {"w": rng.standard_normal((64, 16)), "head": rng.standard_normal((4, 1024)), "b": rng.standard_normal(16)}
    G = {k: rng.standard_normal(v.shape) for k, v in P.items()}
    opt = arrays.muon(0.02)
    st = opt.init(P)
    assert st.mu["w"] is not None and st.exp_avg["w"] is None
    assert st.mu["head"] is None and st.exp_avg["head"].shape == (4, 1024)
    assert st.mu["b"] is None
    u_t, _ = opt.update(G, st, P)
    # The same arrays in flax layout (transposed) with dimension_numbers="flax".
    Pf = {k: (v.T if v.ndim == 2 else v) for k, v in P.items()}
    Gf = {k: (v.T if v.ndim == 2 else v) for k, v in G.items()}
    opt_f = arrays.muon(0.02, dimension_numbers="flax", adjust_lr_fn="rms_to_rms")
    opt_t = arrays.muon(0.02, adjust_lr_fn="rms_to_rms")   # asymmetric scale: layout matters
    u_f, _ = opt_f.update(Gf, opt_f.init(Pf), Pf)
    u_t2, _ = opt_t.update(G, opt_t.init(P), P)
    for k in P:
        got = u_f[k].T if u_f[k].ndim == 2 else u_f[k]
        # Same float64 data, transposed: summation order only.
        np.testing.assert_allclose(got, u_t2[k], rtol=0, atol=1e-15, err_msg=k)
    # rms_to_rms scales a (64, 16) update by sqrt(64/16) = 2 vs match_rms's 0.2*8 = 1.6.
    # The scale rides on Newton-Schulz's last GEMM (a*s X + s BX), so entries that
    # cancel to ~1e-7 of the largest carry float64 rounding of the largest: compare
    # at 1e-12 of the matrix's scale (a wrong scale is off by 25%).
    w = u_t2["w"]
    np.testing.assert_allclose(w, u_t["w"] * (2.0 / 1.6), rtol=0, atol=1e-12 * np.abs(w).max())


def test_labels_and_dimension_numbers_containers():
    rng = np.random.default_rng(3)
    params = [rng.standard_normal((16, 16)), rng.standard_normal((16, 16)), rng.standard_normal(16)]
    grads = [rng.standard_normal(p.shape) for p in params]
    # Force the first matrix to AdamW; its first update is core adamw_step at t=1.
    opt = arrays.muon(0.02, labels=["fallback", "muon", None])
    u, st = opt.update(grads, opt.init(params), params)
    p_new, _, _ = adamw_step(params[0], grads[0], np.zeros((16, 16)), np.zeros((16, 16)), 1, lr=0.02,
                             betas=(0.9, 0.95), eps=1e-8)
    np.testing.assert_allclose(params[0] + u[0], p_new, rtol=0, atol=1e-15)
    assert st.mu[1] is not None and st.mu[2] is None
    # A None entry in a dimension_numbers container also means fallback.
    opt2 = arrays.muon(0.02, dimension_numbers=[None, arrays.DimensionNumbers(1, 0), "torch"])
    u2, _ = opt2.update(grads, opt2.init(params), params)
    for a, b in zip(u, u2):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)


def test_weight_decay_mask_and_fallback_decay():
    rng = np.random.default_rng(4)
    params = {"w": rng.standard_normal((8, 8)), "v": rng.standard_normal((8, 8)), "b": rng.standard_normal(8)}
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    opt = arrays.muon(0.1, weight_decay=0.5, fallback_weight_decay=0.2, weight_decay_mask={"w": False, "v": True, "b": True})
    u, _ = opt.update(zeros, opt.init(params), params)
    np.testing.assert_array_equal(u["w"], 0.0)
    np.testing.assert_allclose(u["v"], -0.05 * params["v"], rtol=1e-14)
    np.testing.assert_allclose(u["b"], -0.02 * params["b"], rtol=1e-14)


def test_float16_params_keep_float32_state_and_round_once():
    rng = np.random.default_rng(5)
    params = [rng.standard_normal((8, 8)).astype(np.float16), rng.standard_normal(8).astype(np.float16)]
    grads = [rng.standard_normal((8, 8)).astype(np.float16), rng.standard_normal(8).astype(np.float16)]
    opt = arrays.muon(0.02)
    st = opt.init(params)
    assert st.mu[0].dtype == np.float32 and st.exp_avg[1].dtype == np.float32 and st.exp_avg_sq[1].dtype == np.float32
    u, st = opt.update(grads, st, params)
    assert u[0].dtype == np.float32 and st.mu[0].dtype == np.float32
    new = arrays.apply_updates(params, u)
    assert new[0].dtype == np.float16
    np.testing.assert_array_equal(new[0], (params[0].astype(np.float32) + u[0]).astype(np.float16))
    # Same as the float32 computation on the upcast data, bit for bit (same ops, same dtype).
    p32 = [p.astype(np.float32) for p in params]
    g32 = [g.astype(np.float32) for g in grads]
    u32, _ = opt.update(g32, opt.init(p32), p32)
    np.testing.assert_array_equal(u[0], u32[0])


def test_low_precision_dtype_param_stores_in_the_param_dtype():
    """``low_precision_dtype="param"`` (optax's convention): float16 state and updates, computed in
    float32 and rounded once each (so the update is the default's float32 one, rounded)."""
    rng = np.random.default_rng(5)
    params = [rng.standard_normal((8, 8)).astype(np.float16), rng.standard_normal(8).astype(np.float16)]
    grads = [rng.standard_normal((8, 8)).astype(np.float16), rng.standard_normal(8).astype(np.float16)]
    opt, ref = arrays.muon(0.02, low_precision_dtype="param"), arrays.muon(0.02)
    st = opt.init(params)
    assert {st.mu[0].dtype, st.exp_avg[1].dtype, st.exp_avg_sq[1].dtype} == {np.dtype(np.float16)}
    u, st = opt.update(grads, st, params)
    assert u[0].dtype == u[1].dtype == st.mu[0].dtype == np.float16
    u32, _ = ref.update(grads, ref.init(params), params)
    for a, b in zip(u, u32):
        np.testing.assert_array_equal(a, b.astype(np.float16))


def test_state_is_portable_namedtuple():
    P, T = problem(6)
    params = {k: P[k] for k in NAMES}
    opt = arrays.muon(0.02, labels={k: "fallback" if k == "embed" else None for k in NAMES})
    _, st = run(opt, params, {k: T[k] for k in NAMES}, steps=2)
    assert isinstance(st, arrays.MuonState) and st._fields == ("step", "mu", "exp_avg", "exp_avg_sq",
                                                                "nonfinite_steps")
    assert type(st.step) is int and st.step == 2
    assert type(st.nonfinite_steps) is int and st.nonfinite_steps == 0
    assert all(type(v) is np.ndarray for f in st[1:4] for v in f.values() if v is not None)
    # A pickled state continues exactly like the original.
    st2 = pickle.loads(pickle.dumps(st))
    g = {k: np.ones_like(v) for k, v in params.items()}
    u1, _ = opt.update(g, st, params)
    u2, _ = opt.update(g, st2, params)
    for k in params:
        np.testing.assert_array_equal(u1[k], u2[k])


def test_bf16_ns_dtype_warns_once():
    pytest.importorskip("ml_dtypes")
    p = [np.ones((8, 8), np.float32)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = arrays.muon(ns_dtype="bfloat16")
        opt.init(p)
        opt.init(p)
        arrays.muon().init(p)
    assert len([w for w in rec if issubclass(w.category, UserWarning)]) == 1


def test_nan_gradient_propagates_to_its_entry_only():
    params = [np.ones((8, 8)), np.ones((8, 8)) * 2]
    grads = [np.full((8, 8), np.nan), np.ones((8, 8))]
    opt = arrays.muon(batched=False)
    u, _ = opt.update(grads, opt.init(params), params)
    assert np.all(np.isnan(u[0])) and np.all(np.isfinite(u[1]))


def test_import_does_not_pull_jax_or_torch():
    code = ("import sys, xpopt.adapters.arrays\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'optax', 'torch', 'cupy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(ns_coefficients=(1.0, 2.0)), ValueError, "ns_coefficients"),
    (dict(ns_steps=2.5), ValueError, "ns_steps"),
    (dict(adjust_lr_fn="spectral"), ValueError, "adjust_lr_fn"),
    (dict(conv_mode="im2col"), ValueError, "conv_mode"),
    (dict(fallback="lion"), ValueError, "fallback"),
    (dict(momentum_form="nag"), ValueError, "momentum_form"),
    (dict(betas=(1.2, 0.9)), ValueError, "betas"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(fallback_lr=-1.0), ValueError, "fallback_lr"),
    (dict(nesterov="yes"), TypeError, "nesterov"),
    (dict(max_aspect_ratio=0.5), ValueError, "max_aspect_ratio"),
    (dict(dimension_numbers="jax"), ValueError, "dimension_numbers"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        arrays.muon(**kwargs)


def test_numpy_and_cupy_arrays_are_not_mixed():
    class FakeCupyArray:   # identified as cupy by its module, as backends.backend_name does
        __module__ = "cupy._core.core"
        shape = (8, 8)
        dtype = np.dtype("float32")

    with pytest.raises(TypeError, match=r"params mixes array libraries \(params\[0\]: numpy, params\[1\]: cupy\)"):
        arrays.muon().init([np.ones((8, 8), np.float32), FakeCupyArray()])


def test_bad_params():
    torch = pytest.importorskip("torch")
    good = np.ones((8, 8), np.float32)
    with pytest.raises(TypeError, match=r"params\[1\].*torch.*xpopt.adapters.torch"):
        arrays.muon().init([good, torch.ones(8, 8)])
    with pytest.raises(TypeError, match=r"params\['n'\].*int64"):
        arrays.muon().init({"w": good, "n": np.arange(8)})
    with pytest.raises(TypeError, match=r"params\[0\].*bool"):
        arrays.muon().init([np.ones((8, 8), bool)])
    with pytest.raises(TypeError, match="list, tuple or flat dict"):
        arrays.muon().init(good)
    with pytest.raises(TypeError, match=r"params\[0\].*list"):
        arrays.muon().init([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"labels has keys that params lacks: \['x'\]"):   # a partial dict is fine
        arrays.muon(labels={"w": "muon", "x": "muon"}).init({"w": good, "b": np.ones(8)})
    with pytest.raises(ValueError, match=r"params\['b'\].*'adamw'"):
        arrays.muon(labels={"w": "muon", "b": "adamw"}).init({"w": good, "b": np.ones(8)})
    opt = arrays.muon(weight_decay=0.1)
    st = opt.init([good])
    with pytest.raises(ValueError, match="params"):
        opt.update([good], st)
    with pytest.raises(ValueError, match="grad for params\\[0\\] has shape"):
        opt.update([np.ones((4, 4))], st, [good])
    with pytest.raises(TypeError, match=r"grads\[0\] is a torch.Tensor"):
        arrays.muon().update([torch.ones(8, 8)], st, [good])
