"""optax's generic expectations of an optimizer, run against ``xo.muon`` and ``xo.scale_by_muon``.

optax checks every optimizer it ships with the same battery (``optax/_src/alias_test.py``,
``optax/contrib/_common_test.py``): convergence on a parabola and on Rosenbrock,
``inject_hyperparams``, extra ``update`` arguments, no recompilation, state
dtypes stable under ``lax.cond``, ``MultiSteps``, ``tree_map_params``.  This file
runs that battery (on matrix-shaped params, so that Muon itself is exercised, plus
vector leaves for the AdamW fallback) and the pytree plumbing users rely on:
nested trees, ``None`` and ``MaskedNode`` leaves, ``masked`` / ``multi_transform``
/ ``partition`` / ``chain``, float64, bf16/f16, ``vmap``, ``scan``, ``eval_shape``,
zero-size and scalar leaves.

Already covered in ``test_adapter_optax.py`` and not repeated here: agreement with
the float64 core oracle under jit, ``optax.chain`` with ``optax.scale``, NamedTuple
state fields and ``tree_get(state, "count")`` on a fresh state, jit = eager for the
default options, bf16 params rounding once, the ``static_args=xo.STATIC_ARGS`` form.

The plain ``optax.inject_hyperparams(xo.muon)`` form (every number becomes a 0-d
array, traced under jit) is tested first.

Tolerances.  Where two computations do the same float32 maths on the same inputs
and differ only in program structure (jit vs eager, scan vs a loop, vmap vs one
problem, injected arrays vs Python floats), XLA may fuse and order sums
differently; we reuse ``test_adapter_optax``'s bounds for that:
``SAME_MATH_ATOL`` (1e-7) on updates of ~4e-3 and ``SAME_MATH_PARAM_ATOL`` (1e-6)
on params of magnitude ~1-3 after a few steps.  Optimizer states are compared
relative to each leaf's largest entry (their scale depends on the momentum form:
the classic buffer is ``1 / (1 - mu)`` = 20 times the EMA one), with
``SAME_MATH_STATE_REL`` = 1e-6, 8 float32 ulps (2^-23 each): their updates are
elementwise, and two programs may round each step differently by up to 2 ulps
(a fused multiply-add in one and not the other), over at most 3 steps here, and
the gradients ``p - target`` bring in the params' differences (~1e-7).
Where the scale differs (``scale_by_muon``'s direction has no learning rate;
``adaptive`` multiplies by a nuclear norm), the same bound is used relative to
the leaf's largest entry: ``SAME_MATH_REL`` = 1e-7 / 4e-3 = 2.5e-5; in the tests
that step params with ``adaptive``, the learning rate is lowered so that updates
keep the ~4e-3 scale the absolute bounds were derived for.

Injected hyperparameters are float32 arrays where the direct transform has Python
floats.  XLA rounds a Python ``lr`` to the same float32 ``0.02``; but ``1 - mu``
differs: float32(1 - 0.95) for the float, exactly 1 - float32(0.95) for the array
(Sterbenz), so the two differ by up to half an ulp of ``mu`` (3e-8), relative
``MOMENTUM_REL`` = 3e-8 / 0.05 = 6e-7 of ``1 - mu``, and so do the momentum
buffers.  Newton-Schulz is scale-free, so the updates feel it only through the
nesterov mix, ~6e-7 relative (2e-9 absolute), inside ``SAME_MATH_ATOL``; and
``lr * weight_decay`` becomes a float32 product of rounded values, at most 1 ulp
of a decay term of ~6e-3 (4e-10).
"""

from __future__ import annotations

import inspect
import contextlib
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from test_adapter_optax import (  # noqa: E402
    SAME_MATH_ATOL, SAME_MATH_PARAM_ATOL, flax_tree, torch_layout_problem,
)
from xpopt.adapters import optax as xo  # noqa: E402
from _subset import default_cases  # noqa: E402
from xpopt.core.muon import muon_step  # noqa: E402


def x64():
    """float64 enabled for a ``with`` block only (``jax.enable_x64`` or the older experimental one)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older jax
    return enable_x64()


# --------------------------------------------------------------------------- problems


def problem(seed=0, dtype=jnp.float32):
    """flax-layout params and gradients (entries ~N(0, 1)): a Dense kernel and a Conv
    kernel for Muon, a bias and an embedding (labelled) for the fallback.  Small, so
    that each jit compiles in well under a second."""
    rng = np.random.default_rng(seed)
    shapes = {"dense": (12, 8), "conv": (3, 3, 2, 4), "bias": (8,), "embed": (16, 8)}
    params = {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}
    grads = {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}
    return params, grads


#: A pytree, not a callable: ``inject_hyperparams`` passes it through without static_args.
LABELS = {"dense": None, "conv": None, "bias": None, "embed": "fallback"}


def matrices(tree):
    return {k: v for k, v in tree.items() if v.ndim >= 2 and k != "embed"}


def quadratic_grads(params, targets):
    return jax.tree.map(lambda p, t: p - t, params, targets)


#: ``SAME_MATH_ATOL`` relative to the ~4e-3 updates it was derived on (see the module docstring).
SAME_MATH_REL = SAME_MATH_ATOL / 4e-3
#: States vs their largest entry: 8 float32 ulps (see the module docstring).
SAME_MATH_STATE_REL = 8 * 2.0 ** -23
#: Injected float32 momentum 0.95 vs the Python float: ``1 - mu`` differs by half an ulp of mu.
MOMENTUM_REL = 2.0 ** -25 / (1 - 0.95)


def assert_trees_close(a, b, atol=0.0, err="", rel=0.0):
    """Same structure and dtypes; leafwise ``|a - b| <= atol + rel * max|b|``."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"{err}: tree structures differ: {ta} vs {tb}"
    for i, (x, y) in enumerate(zip(la, lb)):
        assert x.dtype == y.dtype, f"{err}: leaf {i} dtype {x.dtype} vs {y.dtype}"
        y = np.asarray(y)
        tol = atol + (rel * float(np.max(np.abs(y))) if y.size else 0.0)
        np.testing.assert_allclose(np.asarray(x), y, rtol=0, atol=tol, err_msg=f"{err} leaf {i}")


def run_steps(tx, params, targets, steps):
    """``steps`` jitted updates on 0.5*||p - t||^2; returns (params, state, list of updates)."""
    @jax.jit
    def step(p, s):
        u, s = tx.update(quadratic_grads(p, targets), s, p)
        return optax.apply_updates(p, u), s, u

    state = tx.init(params)
    ups = []
    for _ in range(steps):
        params, state, u = step(params, state)
        ups.append(u)
    return params, state, ups


# --------------------------------------------------------------------------- inject_hyperparams, plain form

#: Option sets for the plain-form and generic checks: the defaults and the new options.
#: ``adaptive`` scales each update by <g, O>, a nuclear-norm estimate (~50 on these
#: problems), so it steps with a 50x smaller learning rate: updates stay at ~4e-3.
OPTION_SETS = {
    "default": dict(),
    "aol-adaptive-rms": dict(preconditioning="aol", adaptive=True, consistent_rms=0.3, nesterov=False,
                             learning_rate=4e-4),
    "schatten-classic-polar": dict(preconditioning="schatten", momentum_form="classic",
                                   ns_coefficients="polar_express", conv_mode="batched"),
    "spectral-auto": dict(preconditioning="spectral", ns_dtype="auto"),
}


def split_lr(opts, lr=0.02):
    opts = dict(opts)
    return opts.pop("learning_rate", lr), opts


@pytest.mark.parametrize("opts", list(OPTION_SETS.values()), ids=list(OPTION_SETS))
def test_plain_inject_hyperparams_under_jit_equals_direct(opts):
    params, grads = problem(1)
    targets = jax.tree.map(lambda p, g: p - g, params, grads)
    lr, opts = split_lr(opts)
    kw = dict(weight_decay=0.1, labels=LABELS, **opts)
    tx = optax.inject_hyperparams(xo.muon)(learning_rate=lr, **kw)
    direct = xo.muon(lr, **kw)
    # jit(init) too: the injected numbers are traced there as well.
    st = jax.jit(tx.init)(params)
    expect = {"learning_rate", "momentum", "weight_decay", "eps", "safety_factor", "fallback_eps",
              "fallback_eps_root"}
    expect |= {"consistent_rms"} if "consistent_rms" in opts else set()
    assert set(st.hyperparams) == expect
    assert jax.tree.structure(st.inner_state) == jax.tree.structure(direct.init(params))

    def stepper(tx_):
        def step(p, s):
            u, s = tx_.update(quadratic_grads(p, targets), s, p)
            return optax.apply_updates(p, u), s, u
        return jax.jit(step)

    step_i, step_d = stepper(tx), stepper(direct)   # both jitted: the plain form's arrays are traced
    p_i, p_d, s_d = params, params, direct.init(params)
    for _ in range(3):
        p_i, st, u_i = step_i(p_i, st)
        p_d, s_d, u_d = step_d(p_d, s_d)
        assert_trees_close(u_i, u_d, SAME_MATH_ATOL, "updates")
    assert_trees_close(st.inner_state, s_d, rel=SAME_MATH_STATE_REL + MOMENTUM_REL, err="state")
    assert_trees_close(p_i, p_d, SAME_MATH_PARAM_ATOL, "params")
    assert int(st.count) == 3 and int(st.inner_state.count) == 3


def test_plain_inject_scale_by_muon_under_jit_equals_direct():
    params, grads = problem(2)
    params, grads = matrices(params), matrices(grads)
    kw = dict(momentum=0.9, adaptive=True, consistent_rms=0.25)
    tx = optax.inject_hyperparams(xo.scale_by_muon)(**kw)
    direct = xo.scale_by_muon(**kw)
    st = jax.jit(tx.init)(params)
    assert set(st.hyperparams) == {"momentum", "eps", "safety_factor", "consistent_rms"}
    s_d = direct.init(params)
    up_i, up_d = jax.jit(tx.update), jax.jit(direct.update)
    for _ in range(2):
        u_i, st = up_i(grads, st, params)
        u_d, s_d = up_d(grads, s_d, params)
        assert_trees_close(u_i, u_d, rel=SAME_MATH_REL, err="directions")   # no lr: relative
    assert_trees_close(st.inner_state, s_d, rel=SAME_MATH_REL, err="state")


def _differs(a, b, more_than):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) > more_than


@pytest.mark.parametrize("name,value,direct_kw", [
    ("learning_rate", 0.005, dict(learning_rate=0.005)),
    ("momentum", 0.5, dict(momentum=0.5)),
    ("weight_decay", 0.3, dict(weight_decay=0.3)),
])
def test_changing_state_hyperparams_takes_effect(name, value, direct_kw):
    params, grads = problem(3)
    _, grads2 = problem(4)
    tx = optax.inject_hyperparams(xo.muon)(learning_rate=0.02, weight_decay=0.1, labels=LABELS)
    update = jax.jit(tx.update)
    st = tx.init(params)
    # One step first, and other gradients after it: with a constant gradient the buffer
    # is parallel to it and Muon's (scale-free) direction does not depend on momentum.
    _, st = update(grads, st, params)
    u_same, _ = update(grads2, st, params)
    st.hyperparams[name] = jnp.asarray(value)            # changed at run time ...
    u, _ = update(grads2, st, params)
    kw = dict(dict(learning_rate=0.02, weight_decay=0.1), **direct_kw)
    lr = kw.pop("learning_rate")
    ref = xo.muon(lr, labels=LABELS, **kw)               # ... equals that value, from the same state
    u_ref, _ = ref.update(grads2, st.inner_state, params)
    assert_trees_close(u, u_ref, SAME_MATH_ATOL, name)
    # and the change is visible: far larger than the tolerance.
    assert _differs(u, u_same, 100 * SAME_MATH_ATOL)


def test_scheduled_momentum_weight_decay_and_beta1_equal_a_hand_stepped_run():
    params, grads = problem(4)
    targets = jax.tree.map(lambda p, g: p - g, params, grads)
    mom = optax.linear_schedule(0.6, 0.95, 3)
    wd = optax.linear_schedule(0.0, 0.2, 3)
    b1 = optax.linear_schedule(0.8, 0.9, 3)
    # momentum and weight_decay through inject_hyperparams, beta1 as a tuple element.
    tx = optax.inject_hyperparams(xo.muon)(learning_rate=0.02, momentum=mom, weight_decay=wd,
                                           betas=(b1, 0.95), labels=LABELS)
    p_i, st, u_i = run_steps(tx, params, targets, 3)
    # By hand: a fresh transform per step with that step's values (schedules see 0, 1, ...).
    p_h, inner = params, xo.muon(0.02, labels=LABELS).init(params)
    for t in range(3):
        step_tx = xo.muon(0.02, momentum=float(mom(t)), weight_decay=float(wd(t)),
                          betas=(float(b1(t)), 0.95), labels=LABELS)
        u_h, inner = step_tx.update(quadratic_grads(p_h, targets), inner, p_h)   # eager
        assert_trees_close(u_i[t], u_h, SAME_MATH_ATOL, f"step {t}")
        p_h = optax.apply_updates(p_h, u_h)
    assert_trees_close(st.inner_state, inner, rel=SAME_MATH_STATE_REL, err="state")
    np.testing.assert_allclose(float(st.hyperparams["momentum"]), float(mom(2)), rtol=1e-7)


def test_beta_schedules_without_inject_hyperparams():
    params, grads = problem(5)
    b2 = optax.linear_schedule(0.9, 0.99, 3)
    tx = xo.muon(0.02, betas=(0.9, b2), labels=LABELS)
    st = tx.init(params)
    inner = st
    update = jax.jit(tx.update)
    for t in range(3):
        u, st = update(grads, st, params)
        by_hand = xo.muon(0.02, betas=(0.9, float(b2(t))), labels=LABELS)
        u_h, inner = by_hand.update(grads, inner, params)
        assert_trees_close(u, u_h, SAME_MATH_ATOL, f"step {t}")


@pytest.mark.parametrize("kwargs,match", [
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(momentum=1.0), "momentum"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(fallback_weight_decay=-0.1), "fallback_weight_decay"),
    (dict(fallback_learning_rate=-0.1), "fallback_learning_rate"),
    (dict(eps=-1e-3), "eps"),
    (dict(safety_factor=0.0), "safety_factor"),
    (dict(fallback_eps=-1.0), "fallback_eps"),
    (dict(consistent_rms=-0.2), "consistent_rms"),
])
def test_bad_concrete_values_raise_naming_the_option(kwargs, match):
    params, _ = problem()
    kwargs = dict(kwargs)
    lr = kwargs.pop("learning_rate", 0.02)
    # The plain form: numbers become concrete arrays at init (not under jit).
    with pytest.raises(ValueError, match=match):
        optax.inject_hyperparams(xo.muon)(learning_rate=lr, **kwargs).init(params)
    # A concrete 0-d array given directly.
    with pytest.raises(ValueError, match=match):
        if kwargs:
            xo.muon(lr, **{k: jnp.asarray(v) for k, v in kwargs.items()})
        else:
            xo.muon(jnp.asarray(lr))


def test_bad_values_set_at_run_time_raise_when_concrete():
    params, grads = problem()
    tx = optax.inject_hyperparams(xo.muon)(learning_rate=0.02)
    st = tx.init(params)
    st.hyperparams["momentum"] = jnp.asarray(1.5)
    with pytest.raises(ValueError, match="momentum"):
        tx.update(grads, st, params)                 # eager: concrete, checked
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        xo.muon(0.02, betas=(jnp.asarray(1.0), 0.95))
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        xo.muon(0.02, betas=(0.9, jnp.asarray(-0.5)))


@pytest.mark.parametrize("name,value", [("min_dim_size", 8), ("max_aspect_ratio", 2.0), ("ns_steps", 3)])
def test_structural_options_must_be_static(name, value):
    params, grads = problem(6)
    # Concrete arrays are converted (a plain init, or a direct call) ...
    direct = xo.muon(0.02, **{name: value})
    from_array = xo.muon(0.02, **{name: jnp.asarray(value)})
    u_ref, _ = jax.jit(direct.update)(grads, direct.init(params), params)
    u, _ = jax.jit(from_array.update)(grads, from_array.init(params), params)
    assert_trees_close(u, u_ref, 0.0, name)     # the same program: bitwise
    tx = optax.inject_hyperparams(xo.muon)(learning_rate=0.02, **{name: value})
    st = tx.init(params)
    # ... a traced one cannot shape the computation: the error names it and the fix.
    with pytest.raises(TypeError, match=rf"{name} is a traced array.*static_args"):
        jax.jit(tx.update)(grads, st, params)
    tx = optax.inject_hyperparams(xo.muon, static_args=(name,))(learning_rate=0.02, **{name: value})
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert_trees_close(u, u_ref, SAME_MATH_ATOL, name)
    # Defaults (None) pass through inject_hyperparams untouched.
    assert inspect.signature(xo.muon).parameters[name].default is None


def test_structural_option_errors_for_non_integers():
    with pytest.raises(ValueError, match="min_dim_size must be an integer"):
        xo.muon(0.02, min_dim_size=jnp.asarray(4.0))
    with pytest.raises(ValueError, match="ns_steps must be an integer"):
        xo.muon(0.02, ns_steps=jnp.asarray(2.5))


def test_dtype_classes_need_static_args_or_a_name():
    params, grads = problem()
    # inject_hyperparams calls every callable with the step count: jnp.bfloat16 is one.
    for name in ("mu_dtype", "ns_dtype"):
        with pytest.raises(TypeError, match=rf"{name} is an array.*'bfloat16'.*static_args"):
            optax.inject_hyperparams(xo.muon)(learning_rate=0.02, **{name: jnp.bfloat16}).init(params)
    tx = optax.inject_hyperparams(xo.muon)(learning_rate=0.02, mu_dtype="bfloat16")
    assert tx.init(params).inner_state.mu["dense"].dtype == jnp.bfloat16
    tx = optax.inject_hyperparams(xo.muon, static_args="mu_dtype")(learning_rate=0.02, mu_dtype=jnp.bfloat16)
    assert tx.init(params).inner_state.mu["dense"].dtype == jnp.bfloat16


def test_static_args_lists_are_complete_and_work_with_callables():
    import inspect

    for factory, static in ((xo.muon, xo.STATIC_ARGS), (xo.scale_by_muon, xo.SCALE_BY_MUON_STATIC_ARGS)):
        names = set(inspect.signature(factory).parameters)
        assert set(static) | (set(xo.INJECTABLE) & names) == names
        assert not set(static) & set(xo.INJECTABLE)
        assert {"ns_steps", "dimension_numbers", "ns_dtype", "mu_dtype"} <= set(static)
    assert {"min_dim_size", "max_aspect_ratio", "labels", "weight_decay_mask"} <= set(xo.STATIC_ARGS)
    params, grads = problem(7)
    # Callable labels / mask / dimension numbers are not schedules: static_args keeps them so.
    tx = optax.inject_hyperparams(xo.muon, static_args=xo.STATIC_ARGS)(
        learning_rate=0.02, momentum=0.9, weight_decay=0.1, labels=lambda p: LABELS,
        weight_decay_mask=lambda p: {k: k != "bias" for k in p}, min_dim_size=4)
    st = tx.init(params)
    assert set(st.hyperparams) == {"learning_rate", "momentum", "weight_decay", "eps", "safety_factor",
                                   "fallback_eps", "fallback_eps_root"}
    ref = xo.muon(0.02, momentum=0.9, weight_decay=0.1, labels=LABELS,
                  weight_decay_mask={k: k != "bias" for k in params})
    u, _ = jax.jit(tx.update)(grads, st, params)
    u_ref, _ = ref.update(grads, ref.init(params), params)
    assert_trees_close(u, u_ref, SAME_MATH_ATOL)
    m = matrices(params)
    sbm = optax.inject_hyperparams(xo.scale_by_muon, static_args=xo.SCALE_BY_MUON_STATIC_ARGS)(
        dimension_numbers=lambda p: jax.tree.map(lambda _: xo.FLAX, p), ns_dtype=jnp.float32)
    u, _ = jax.jit(sbm.update)(matrices(grads), sbm.init(m), m)
    ref = xo.scale_by_muon()
    u_ref, _ = ref.update(matrices(grads), ref.init(m), m)
    assert_trees_close(u, u_ref, rel=SAME_MATH_REL)


@pytest.mark.parametrize("preconditioning", ["frobenius", "spectral", "aol", "schatten"])
def test_injected_safety_factor_keeps_bf16_newton_schulz_in_bf16(preconditioning):
    # An injected float32 safety_factor used to promote a bf16 iteration to float32.
    params = {"w": jnp.ones((8, 6), jnp.float32) * jnp.arange(6.0)}
    kw = dict(ns_dtype="bfloat16", preconditioning=preconditioning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # bf16 is emulated on CPU
        direct = xo.muon(0.02, **kw)
        tx = optax.inject_hyperparams(xo.muon)(learning_rate=0.02, **kw)
        jd = jax.make_jaxpr(direct.update)(params, direct.init(params), params)
        ji = jax.make_jaxpr(tx.update)(params, tx.init(params), params)

    def dot_dtypes(jaxpr):
        """Operand dtype of every matmul, sub-jaxprs (pjit, cond, ...) included."""
        out = []
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                out.append(e.invars[0].aval.dtype)
            for v in e.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        out += dot_dtypes(sub)
        return out

    direct_bf16 = dot_dtypes(jd.jaxpr).count(jnp.bfloat16)
    assert direct_bf16 >= 15                               # 5 steps x (X X^T, A A, B X)
    assert dot_dtypes(ji.jaxpr).count(jnp.bfloat16) == direct_bf16


def test_complex_params_with_plain_inject():
    # inject_hyperparams stores numbers in the params' dtype: complex64 here; their real part is used.
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((8, 6)) + 1j * rng.standard_normal((8, 6))).astype(np.complex64)
    params = {"w": jnp.asarray(w), "b": jnp.asarray(rng.standard_normal(6), jnp.float32)}
    grads = jax.tree.map(lambda x: 0.5 * x, params)
    tx = optax.inject_hyperparams(xo.muon)(learning_rate=0.02, weight_decay=0.1)
    st = tx.init(params)
    assert st.hyperparams["momentum"].dtype == jnp.complex64
    u, _ = jax.jit(tx.update)(grads, st, params)
    ref = xo.muon(0.02, weight_decay=0.1)
    u_ref, _ = ref.update(grads, ref.init(params), params)
    assert_trees_close(u, u_ref, SAME_MATH_ATOL)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_params_with_float32_hyperparams(dtype):
    # inject_hyperparams stores numbers in the params' dtype unless told otherwise
    # (float16 would turn fallback_eps = 1e-8 into 0, and a zero gradient entry into
    # 0/0): the documented advice, hyperparam_dtype=float32, gives the direct updates.
    params, grads = problem(20, getattr(jnp, dtype))
    grads["bias"] = grads["bias"].at[0].set(0)
    direct = xo.muon(0.02, weight_decay=0.1, labels=LABELS)
    u_ref, _ = jax.jit(direct.update)(grads, direct.init(params), params)
    tx = optax.inject_hyperparams(xo.muon, hyperparam_dtype=jnp.float32)(
        learning_rate=0.02, weight_decay=0.1, labels=LABELS)
    st = tx.init(params)
    assert all(v.dtype == jnp.float32 for v in st.hyperparams.values())
    u, _ = jax.jit(tx.update)(grads, st, params)
    assert_trees_close(u, u_ref, SAME_MATH_ATOL)           # float32 updates, as without inject
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


# --------------------------------------------------------------------------- convergence (alias_test)

W_STAR = jnp.array([[3.0, -2.0, 0.5, 1.0], [1.0, 4.0, -1.0, 0.0], [0.0, 1.0, 2.0, -3.0], [2.0, 0.5, 1.0, 1.0]])


def _parabola():
    b_star = jnp.array([1.0, -1.0, 1.0])
    p0 = {"w": jnp.zeros((4, 4)), "b": jnp.array([-1.0, 10.0, 1.0])}

    def loss(p):
        return jnp.sum((p["w"] - W_STAR) ** 2) + jnp.sum((p["b"] - b_star) ** 2)

    return p0, {"w": W_STAR, "b": b_star}, loss


def _rosenbrock():
    # Matrix leaf: rows 0-1 are x, rows 2-3 are y, elementwise (1-x)^2 + 100 (y - x^2)^2;
    # vector leaf: the classic 2-D Rosenbrock.  Optimum: all ones.
    p0 = {"w": jnp.zeros((4, 4)), "b": jnp.zeros(2)}

    def loss(p):
        x, y, b = p["w"][:2], p["w"][2:], p["b"]
        return (jnp.sum((1 - x) ** 2 + 100 * (y - x ** 2) ** 2)
                + (1 - b[0]) ** 2 + 100 * (b[1] - b[0] ** 2) ** 2)

    return p0, {"w": jnp.ones((4, 4)), "b": jnp.ones(2)}, loss


def _muon_tx(sched):
    return xo.muon(sched)


def _scale_by_muon_tx(sched):
    # scale_by_muon takes matrices only: optax.partition sends the vector to Adam.
    return optax.partition({"m": optax.chain(xo.scale_by_muon(), optax.scale_by_learning_rate(sched)),
                            "a": optax.adam(sched, b2=0.95)}, {"w": "m", "b": "a"})


@pytest.mark.parametrize("target", [_parabola, _rosenbrock], ids=["parabola", "rosenbrock"])
@pytest.mark.parametrize("make", [_muon_tx, _scale_by_muon_tx], ids=["muon", "scale_by_muon"])
def test_optimization_converges(make, target):
    # optax's bar: within 3e-2 of the optimum.  Muon's steps have a fixed spectral norm
    # (lr * lr_scale), so a constant lr circles the optimum at a radius ~lr; a cosine
    # decay to zero lands on it.  The schedule's total travel (sum of lr = 25) is over
    # twice the longest distance (11, the vector's 10 -> -1); measured worst error
    # 2e-5 over both targets and transforms: the bar has a 1000x margin, so no CPU's
    # rounding matters.
    p0, p_star, loss = target()
    tx = make(optax.cosine_decay_schedule(0.05, 1000))
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    state = optax.tree.map_params(tx, lambda v: v, tx.init(p0))   # a no-op, as optax checks
    params, state = step(p0, state)
    params, state = step(params, state)
    assert len(traces) == 1, "update recompiled on its second call"
    (params, state), _ = jax.lax.scan(lambda c, _: (step(*c), None), (params, state), length=998)
    for k in p_star:
        np.testing.assert_allclose(np.asarray(params[k]), np.asarray(p_star[k]), rtol=3e-2, atol=3e-2)


def test_update_accepts_extra_args_like_optax_optimizers():
    params, grads = problem()
    for tx in (xo.muon(0.02, weight_decay=0.1), optax.inject_hyperparams(xo.muon)(learning_rate=0.02)):
        st = tx.init(params)
        u, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, unexpected_extra_arg=1, value=jnp.ones(())))(
            grads, st, params)
        u_ref, _ = tx.update(grads, st, params)
        assert_trees_close(u, u_ref, SAME_MATH_ATOL)
    m = matrices(params)
    sbm = xo.scale_by_muon()
    assert isinstance(sbm, optax.GradientTransformationExtraArgs)
    sbm.update(matrices(grads), sbm.init(m), m, unexpected_extra_arg=1)


# --------------------------------------------------------------------------- dtypes and state stability

#: Adam's second moment: real, float32 at least.
SECOND_MOMENT = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64",
                 "complex64": "float32", "complex128": "float64"}
DTYPE_CASES = [
    # (param dtype, mu_dtype, expected Muon/first-moment state dtype, expected update dtype)
    ("float16", None, "float32", "float32"),
    ("bfloat16", None, "float32", "float32"),
    ("bfloat16", "bfloat16", "bfloat16", "float32"),
    ("float32", None, "float32", "float32"),
    ("float32", "bfloat16", "bfloat16", "float32"),
    ("float64", None, "float64", "float64"),
    ("complex64", None, "complex64", "complex64"),
    ("complex128", None, "complex128", "complex128"),
]


# By default: low-precision params (float32 state), a bf16 mu_dtype on float32 params, float64
# and complex; -m slow: every row.
@pytest.mark.parametrize("pdt,mu_dtype,state_dt,update_dt", default_cases(
    [pytest.param(*c, id=f"{c[0]}-mu_{c[1]}") for c in DTYPE_CASES],
    ["bfloat16-mu_None", "float32-mu_bfloat16", "float64-mu_None", "complex64-mu_None"]))
def test_state_dtypes_stable_under_cond(pdt, mu_dtype, state_dt, update_dt):
    """optax's ``test_state_shape_dtype_shard_stability`` and ``test_explicit_dtype``.

    ``lax.cond`` requires both branches to return identical structures and dtypes,
    and one branch returns the incoming state: so the state after an update has
    exactly the structure and dtypes it had before (``lax.scan``'s carry condition).
    Low-precision params get float32 state (unless ``mu_dtype``) and float32 updates
    (our documented choice: ``optax.apply_updates`` adds and rounds once), so
    optax's ``test_preserve_dtype`` (updates in the grads' dtype) holds for float32,
    float64 and complex only, and the cond's other branch returns zero *updates*
    rather than the params as in optax's test.
    """
    wide = pdt in ("float64", "complex128")
    with x64() if wide else contextlib.nullcontext():
        rng = np.random.default_rng(9)
        cplx = pdt.startswith("complex")

        def draw(*shape):
            a = rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if cplx else 0)
            return jnp.asarray(a, pdt)

        w = draw(8, 6)
        for tx, p in ((xo.muon(0.02, weight_decay=0.01, mu_dtype=mu_dtype), {"w": w, "v": [draw(6), draw()]}),
                      (xo.scale_by_muon(mu_dtype=mu_dtype), {"w": w})):
            state = tx.init(p)
            assert state.mu["w"].dtype == jnp.dtype(state_dt)
            if "v" in p:
                assert state.exp_avg["v"][0].dtype == jnp.dtype(state_dt)
                assert state.exp_avg_sq["v"][0].dtype == jnp.dtype(SECOND_MOMENT[pdt])
            assert int(optax.tree.get(state, "count")) == 0
            zeros_u = jax.tree.map(lambda x: jnp.zeros(x.shape, update_dt), p)

            @jax.jit
            def step(p, s):
                g = jax.tree.map(lambda x: (0.5 * x).astype(x.dtype), p)
                cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0   # opaque to the compiler
                u, s = jax.lax.cond(cond, lambda: tx.update(g, s, p), lambda: (zeros_u, s))
                return optax.apply_updates(p, u), s, u

            p1, s1, u1 = step(p, state)
            p2, s2, _ = step(p1, s1)
            assert jax.tree.structure(s2) == jax.tree.structure(state)
            assert jax.tree.map(lambda x: x.dtype, s2) == jax.tree.map(lambda x: x.dtype, state)
            assert all(x.dtype == jnp.dtype(update_dt) for x in jax.tree.leaves(u1))
            assert jax.tree.map(lambda x: x.dtype, p2) == jax.tree.map(lambda x: x.dtype, p)
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((p2, s2)))


def test_float64_matches_the_numpy_float64_oracle():
    """With x64 on, the adapter computes in float64 end to end: the core run in NumPy
    float64 agrees to 1e-12.  (Same maths, different summation order: relative 1e-16
    per op, amplified by at most ~4^5 = 1e3 through five Newton-Schulz steps whose
    polynomials have slope <= 4.1, on updates of ~4e-3 -> ~1e-15; 1e-12 is a loose
    bound, still 1e5 below float32's error.)"""
    P, T = torch_layout_problem(12)
    muon_names = ["dense1", "dense2"]
    P = {k: P[k] for k in muon_names}
    T = {k: T[k] for k in muon_names}
    new, _ = muon_step([P[k] for k in muon_names], [P[k] - T[k] for k in muon_names],
                       [np.zeros_like(P[k]) for k in muon_names], lr=0.02, momentum=0.95, nesterov=True,
                       weight_decay=0.1)
    with x64():
        params = flax_tree(P, jnp.float64)
        grads = flax_tree({k: P[k] - T[k] for k in P}, jnp.float64)
        tx = xo.muon(0.02, weight_decay=0.1)
        u, st = jax.jit(tx.update)(grads, tx.init(params), params)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves((u, st.mu)))
        out = optax.apply_updates(params, u)
        for k, ref in zip(muon_names, new):
            np.testing.assert_allclose(np.asarray(out[k]).T, ref, rtol=0, atol=1e-12, err_msg=k)


# --------------------------------------------------------------------------- generic transforms


def _generic_problem(case):
    """(transform, params) for one option set, complex leaves, or scale_by_muon."""
    rng = np.random.default_rng(13)
    if case == "complex":
        def c(*s):
            return jnp.asarray(rng.standard_normal(s) + 1j * rng.standard_normal(s), jnp.complex64)
        return xo.muon(0.02, weight_decay=0.1), {"w": c(8, 6), "b": c(6)}
    params = {"w": jnp.asarray(rng.standard_normal((12, 8)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(8), jnp.float32)}
    if OPTION_SETS.get(case, {}).get("conv_mode") == "batched":
        params["conv"] = jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)
    if case == "scale_by_muon":
        del params["b"]   # (adaptive: a 50x smaller lr, see OPTION_SETS)
        return optax.chain(xo.scale_by_muon(adaptive=True), optax.scale_by_learning_rate(4e-4)), params
    lr, opts = split_lr(OPTION_SETS[case])
    return xo.muon(lr, weight_decay=0.1, **opts), params


#: "default" jit = eager is in test_adapter_optax; these are the new options.
GENERIC_CASES = [c for c in OPTION_SETS if c != "default"] + ["complex", "scale_by_muon"]


# By default the preconditioning with its own iteration (schatten, classic momentum, a per-step
# table, batched convs), complex leaves and scale_by_muon; -m slow: every option set.
@pytest.mark.parametrize("case", default_cases([pytest.param(c, id=c) for c in GENERIC_CASES],
                                               ["schatten-classic-polar", "complex", "scale_by_muon"]))
def test_jit_scan_and_vmap_agree_with_eager(case):
    """jit = eager, ``lax.scan`` = a Python loop, ``vmap`` over two independent
    problems = each problem alone, for the new options (preconditioning, adaptive,
    consistent_rms, ns_dtype="auto"), complex leaves and scale_by_muon."""
    tx, params = _generic_problem(case)
    targets = jax.tree.map(lambda x: 0.5 * x[::-1], params)

    def step(p, s, t):
        u, s = tx.update(quadratic_grads(p, t), s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    jstep = jax.jit(step)
    p_e, s_e = step(*step(params, state, targets), targets)
    p_j, s_j = jstep(*jstep(params, state, targets), targets)
    assert_trees_close(p_j, p_e, SAME_MATH_PARAM_ATOL, "jit vs eager params")
    assert_trees_close(s_j, s_e, rel=SAME_MATH_STATE_REL, err="jit vs eager state")

    (p_s, s_s), _ = jax.lax.scan(lambda c, _: (jstep(*c, targets), None), (params, state), length=2)
    assert_trees_close(p_s, p_j, SAME_MATH_PARAM_ATOL, "scan vs loop params")
    assert_trees_close(s_s, s_j, rel=SAME_MATH_STATE_REL, err="scan vs loop state")

    # Two independent problems: params and targets of the second are -0.5x the first's.
    batch = jax.tree.map(lambda x: jnp.stack([x, -0.5 * x]), params)
    tbatch = jax.tree.map(lambda x: jnp.stack([x, -0.5 * x]), targets)
    bp, bs = jax.jit(jax.vmap(step))(batch, jax.vmap(tx.init)(batch), tbatch)
    for i in range(2):
        pi = jax.tree.map(lambda x: x[i], batch)
        pi, si = jstep(pi, tx.init(pi), jax.tree.map(lambda x: x[i], tbatch))
        assert_trees_close(jax.tree.map(lambda x: x[i], bp), pi, SAME_MATH_PARAM_ATOL, f"vmap problem {i}")
        assert_trees_close(jax.tree.map(lambda x: x[i], bs), si, rel=SAME_MATH_STATE_REL, err=f"vmap state {i}")


@pytest.mark.parametrize("case", ["muon", "scale_by_muon"])
def test_inject_hyperparams_consistent_rms_as_an_array_under_vmap(case):
    # consistent_rms injected (a traced array), vmapped over two values in one call.
    def factory(consistent_rms=None):
        if case == "scale_by_muon":
            return xo.scale_by_muon(adaptive=True, consistent_rms=consistent_rms)
        return xo.muon(4e-4, preconditioning="aol", nesterov=False, adaptive=True, consistent_rms=consistent_rms)

    params = {"w": jnp.asarray(np.random.default_rng(19).standard_normal((12, 8)), jnp.float32)}
    grads = jax.tree.map(lambda x: 0.3 * x + 0.1, params)
    inj = optax.inject_hyperparams(factory)(consistent_rms=0.3)
    st = inj.init(params)
    states = jax.vmap(lambda r: st._replace(hyperparams=dict(st.hyperparams, consistent_rms=r)))(
        jnp.asarray([0.1, 0.3]))
    u, _ = jax.jit(jax.vmap(inj.update, in_axes=(None, 0, None)))(grads, states, params)
    for i, r in enumerate((0.1, 0.3)):
        ref = factory(consistent_rms=r)
        u_ref, _ = ref.update(grads, ref.init(params), params)
        assert_trees_close(jax.tree.map(lambda x: x[i], u), u_ref, rel=SAME_MATH_REL, err=f"rms {r}")


# --------------------------------------------------------------------------- pytrees


def test_nested_trees_none_leaves_and_eval_shape():
    rng = np.random.default_rng(14)

    def a(*s):
        return jnp.asarray(rng.standard_normal(s), jnp.float32)

    flat = {"w1": a(8, 6), "b1": a(6), "w2": a(8, 6), "s": a()}

    def nest(t):
        return {"layers": [t["w1"], (t["b1"], {"w": t["w2"]})], "head": (None,), "scale": t["s"], "empty": None}

    def flatten(t):
        return {"w1": t["layers"][0], "b1": t["layers"][1][0], "w2": t["layers"][1][1]["w"], "s": t["scale"]}

    g_flat = jax.tree.map(lambda x: 0.5 * x - 0.1, flat)
    nested, g_nested = nest(flat), nest(g_flat)
    ref = xo.muon(0.02, weight_decay=0.1)
    u_ref, _ = ref.update(g_flat, ref.init(flat), flat)
    for tx in (ref, optax.inject_hyperparams(xo.muon)(learning_rate=0.02, weight_decay=0.1)):
        st = tx.init(nested)
        # eval_shape of init: the same structure and dtypes without computing anything,
        # also from abstract params (as for sharded initialisation).
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nested)
        shapes = jax.eval_shape(tx.init, abstract)
        assert jax.tree.structure(shapes) == jax.tree.structure(st)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == jax.tree.map(lambda x: (x.shape, x.dtype), st)
        u, st = jax.jit(tx.update)(g_nested, st, nested)
        assert u["head"] == (None,) and u["empty"] is None
        assert_trees_close(flatten(u), u_ref, SAME_MATH_ATOL, "nested vs flat")
    sbm = xo.scale_by_muon()
    m = {"a": [flat["w1"], None], "b": (flat["w2"],)}
    assert jax.tree.structure(jax.eval_shape(sbm.init, m)) == jax.tree.structure(sbm.init(m))
    u, _ = sbm.update({"a": [g_flat["w1"], None], "b": (g_flat["w2"],)}, sbm.init(m), m)
    assert u["a"][1] is None


def test_masked_multi_transform_partition_and_chain_with_clipping():
    rng = np.random.default_rng(15)

    def a(*s):
        return jnp.asarray(rng.standard_normal(s), jnp.float32)

    params = {"w1": a(8, 6), "w2": a(8, 6), "b": a(6), "conv": a(3, 3, 2, 4)}
    grads = jax.tree.map(lambda x: 0.5 * x - 0.1, params)
    mask = {"w1": True, "w2": True, "b": False, "conv": False}
    sub = {k: v for k, v in params.items() if mask[k]}
    g_sub = {k: grads[k] for k in sub}
    rest = {k: v for k, v in params.items() if not mask[k]}
    g_rest = {k: grads[k] for k in rest}

    # optax.masked: masked-out leaves are MaskedNode()s inside; their grads pass through.
    tx = optax.masked(xo.muon(0.02, weight_decay=0.1), mask)
    st = tx.init(params)
    assert isinstance(st.inner_state.mu["conv"], optax.MaskedNode)
    u, _ = jax.jit(tx.update)(grads, st, params)
    ref = xo.muon(0.02, weight_decay=0.1)
    u_ref, _ = ref.update(g_sub, ref.init(sub), sub)
    assert_trees_close(u, {**u_ref, **g_rest}, SAME_MATH_ATOL, "masked")

    # multi_transform / partition: Muon for the matrices, AdamW for the rest.
    labels = {k: "muon" if mask[k] else "adam" for k in params}
    adam = optax.adamw(1e-3)
    u_adam, _ = adam.update(g_rest, adam.init(rest), rest)
    sbm = optax.chain(xo.scale_by_muon(), optax.scale_by_learning_rate(0.02))
    for combine, muon_tx in ((optax.multi_transform, xo.muon(0.02)), (optax.partition, sbm)):
        tx = combine({"muon": muon_tx, "adam": adam}, labels)
        u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        u_m, _ = muon_tx.update(g_sub, muon_tx.init(sub), sub)
        assert_trees_close(u, {**u_m, **u_adam}, SAME_MATH_ATOL, combine.__name__)

    # chain with clipping: Muon and its fallback see the clipped gradients.
    clip = optax.clip_by_global_norm(1.0)
    assert float(optax.tree.norm(grads)) > 2.0      # so the clip is active
    tx = optax.chain(clip, xo.muon(0.02))
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    clipped, _ = clip.update(grads, clip.init(params))
    ref = xo.muon(0.02)
    u_ref, _ = ref.update(clipped, ref.init(params), params)
    assert_trees_close(u, u_ref, SAME_MATH_ATOL, "chain with clipping")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_multisteps_accumulates_then_applies_once(dtype):
    rng = np.random.default_rng(16)

    def a(*s):
        return jnp.asarray(rng.standard_normal(s), dtype)

    params = {"w": a(8, 6), "b": a(6)}
    g_seq = [jax.tree.map(lambda x: a(*x.shape), params) for _ in range(3)]
    tx = optax.MultiSteps(xo.muon(0.02, weight_decay=0.1), every_k_schedule=3)
    st = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    for i, g in enumerate(g_seq):
        u, st = update(g, st, params)
        if i < 2:   # optax's test_gradient_accumulation: nothing applied before the k-th step
            assert all(not bool(jnp.any(x)) for x in jax.tree.leaves(u))
    # The k-th step is one Muon step on the mean gradient, which MultiSteps accumulates
    # in float32 and hands over in the grads' dtype.
    mean = jax.tree.map(lambda *gs: (sum(x.astype(jnp.float32) for x in gs) / 3).astype(gs[0].dtype), *g_seq)
    ref = xo.muon(0.02, weight_decay=0.1)
    u_ref, _ = ref.update(mean, ref.init(params), params)
    # MultiSteps' running mean, acc + (g - acc) / n, rounds differently from sum / 3: a
    # few float32 ulps of the gradient.  In bf16 that rounding can flip the bf16 mean
    # by one ulp (2^-8 relative) in a few entries: a 4e-3 relative change of a gradient
    # entry moves Muon's direction by about as much times the entry's share of the
    # matrix (~1/sqrt(48) of its norm) -> ~6e-4 of an update of 4e-3 -> 2.4e-6, for the
    # fallback (elementwise Adam: g / |g|, a relative 4e-3 change of m and sqrt(v)
    # cancels to first order) less; 1e-5 covers a few such entries.
    tol = SAME_MATH_ATOL if dtype == "float32" else 1e-5
    assert_trees_close(u, u_ref, tol, "k-th update")
    assert int(optax.tree.get(st.inner_opt_state, "count")) == 1


def test_zero_size_and_scalar_leaves():
    rng = np.random.default_rng(18)
    params = {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
              "empty_matrix": jnp.zeros((0, 6), jnp.float32),      # automatic: fallback
              "forced": jnp.zeros((0, 6), jnp.float32),            # labelled Muon
              "empty_vector": jnp.zeros((0,), jnp.float32),
              "scalar": jnp.asarray(1.5, jnp.float32)}
    grads = jax.tree.map(lambda x: 0.5 * x + 0.25, params)
    labels = {k: "muon" if k == "forced" else None for k in params}
    tx = xo.muon(0.02, weight_decay=0.1, labels=labels)
    st = tx.init(params)
    assert st.mu["forced"].shape == (0, 6) and isinstance(st.mu["empty_matrix"], optax.MaskedNode)
    for update in (tx.update, jax.jit(tx.update)):
        u, st2 = update(grads, st, params)
        assert jax.tree.map(lambda x: x.shape, u) == jax.tree.map(lambda x: x.shape, params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
        # The scalar is an AdamW leaf: its first step is -lr * (sign(g) + wd * p).
        np.testing.assert_allclose(float(u["scalar"]), -0.02 * (1.0 + 0.1 * 1.5), rtol=1e-6)
        assert jax.tree.structure(st2) == jax.tree.structure(st)
    sbm = xo.scale_by_muon()
    m = {"w": params["w"], "forced": params["forced"]}
    u, _ = jax.jit(sbm.update)({"w": grads["w"], "forced": grads["forced"]}, sbm.init(m), m)
    assert u["forced"].shape == (0, 6) and bool(jnp.all(jnp.isfinite(u["w"])))
