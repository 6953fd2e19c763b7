"""``xpopt.compat.optax_contrib``: a drop-in for ``optax.contrib.muon`` / ``scale_by_muon`` (optax 0.2.8).

Every test calls the drop-in exactly as optax's function is called (no
wrapper, no option translation here): the mapping is the module's.  The
battery follows what optax's own ``contrib/_muon_test.py`` and
``_common_test.py`` check (convergence, dtypes, state stability under
``lax.cond`` / ``lax.scan``, dimension numbers incl. a 3-D leaf and a
callable, masks, ``inject_hyperparams``, ``MultiSteps``, schedules) and adds
what a drop-in must show: the same signature, and the same trajectory as
``optax.contrib.muon`` itself, option for option.

Runtime: jit compiles dominate (~2 s each on a 2-core CPU), so every
trajectory case compiles one step per implementation, shared by its nudged
starts and by the tests that reuse it (lru_caches below).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install xpopt[jax])")
pytest.importorskip("optax", reason="optax is not installed (pip install xpopt[jax])")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from _nudge import nudge  # noqa: E402
from _peers import F32_TRAJ_TOL, load_optax_muon, trajectory_error  # noqa: E402

from xpopt.compat import optax_contrib as OC  # noqa: E402
from xpopt.compat.optax_contrib import muon, scale_by_muon  # noqa: E402

D = OC.MuonDimensionNumbers
STEPS = 20


# --------------------------------------------------------------- signature


@pytest.mark.parametrize("name", ["muon", "scale_by_muon"])
def test_signature_is_optax_contribs(name):
    """Same names, order, kinds and defaults as optax 0.2.8 (annotations aside)."""
    ours = inspect.signature(getattr(OC, name)).parameters
    theirs = inspect.signature(getattr(optax.contrib, name)).parameters
    assert list(ours) == list(theirs)
    for k in ours:
        assert ours[k].kind == theirs[k].kind, k
        assert ours[k].default == theirs[k].default and theirs[k].default == ours[k].default, k


def test_presets_are_optaxs_numbers():
    """optax's ns_coeffs presets map onto ours with the same numbers (and no preset is missing)."""
    from xpopt.core.newton_schulz import COEFFICIENTS

    omuon = load_optax_muon()
    assert set(OC.NS_PRESETS) == set(omuon._NS_COEFFS_PRESET_DICT)
    for theirs, ours in OC.NS_PRESETS.items():
        want = np.atleast_2d(np.asarray(omuon._NS_COEFFS_PRESET_DICT[theirs], np.float64))
        np.testing.assert_array_equal(np.asarray(COEFFICIENTS[ours], np.float64), want)
    assert tuple(omuon._DEFAULT_NS_COEFFS) == OC._DEFAULT_NS_COEFFS


# --------------------------------------------------------------- the problem
# Two flax-layout matrices (Muon by default), a bias and a 3-D (heads, in,
# out) kernel (Adam by default, Muon per head with dimension numbers); a
# smooth loss (tanh, squared error: no kink, tests/_nudge.py); 4 batches of 32
# (more samples than any matrix side: full-rank gradients), cycled.

SHAPES = {"w1": (12, 16), "b1": (16,), "w2": (16, 8), "heads": (2, 8, 4)}


@functools.lru_cache(maxsize=None)
def _problem():
    rng = np.random.default_rng(0)
    params = {k: (rng.standard_normal(s) / np.sqrt(s[-2] if len(s) > 1 else 16)).astype(np.float32)
              for k, s in SHAPES.items()}
    batches = [(rng.standard_normal((32, 12)).astype(np.float32), rng.standard_normal((32, 2, 4)).astype(np.float32))
               for _ in range(4)]
    return params, batches


def _loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    return jnp.mean((jnp.einsum("bi,hio->bho", jnp.tanh(h), p["heads"]) - y) ** 2)


def _stepper(tx):
    @jax.jit
    def step(p, s, x, y):
        u, s = tx.update(jax.grad(_loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s
    return step


def _run(tx, step, nudge_seed, steps=STEPS):
    params, batches = _problem()
    params = jax.tree.map(jnp.asarray, nudge(params, nudge_seed))
    state = tx.init(params)
    traj = [[np.asarray(params[k]) for k in SHAPES]]
    for t in range(steps):
        params, state = step(params, state, *batches[t % len(batches)])
        traj.append([np.asarray(params[k]) for k in SHAPES])
    return traj, state


DIMS = {"w1": D(0, 1), "b1": None, "w2": D(0, 1), "heads": D(reduction_axis=1, output_axis=2)}
MASK = {"w1": False, "b1": True, "w2": True, "heads": True}
# A per-step table of 4 triples (dion's first four): optax runs every row, ns_steps only >= 4.
TABLE = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037), (2.8769, -3.1427, 1.2046))

# Each case: (optax's kwargs, the drop-in's kwargs); identical except that the
# "dims" case gives the drop-in a callable returning optax's tree.
CASES = {
    # optax's defaults (nesterov=True, 'standard' triple, eps=1e-8, 2-D routing, consistent_rms=None)
    "defaults": dict(learning_rate=0.02),
    # nesterov off; dion; consistent RMS; adaptive; eps large enough that the additive prescale shows
    # (5e-3 against momentum norms ~0.1-1: eps=1e-3 moved the trajectory by only 1.0e-2 when mapped to
    # our floor, too close to the wrong-mapping bar); Adam's own eps_root, weight decay and
    # learning-rate schedule; a weight-decay mask (Muon leaves only, in optax).
    "nesterov_off": dict(learning_rate=0.02, nesterov=False, ns_coeffs="dion", consistent_rms=0.2, adaptive=True,
                         eps=5e-3, adam_eps_root=1e-3, weight_decay=0.1, adam_weight_decay=0.05,
                         adam_learning_rate=optax.linear_schedule(0.01, 0.002, STEPS), weight_decay_mask=MASK,
                         beta=0.9, adam_b1=0.85, adam_b2=0.99),
    # nesterov on; dimension numbers (the 3-D leaf to Muon, per head); AOL; a per-step table; a schedule
    "dims": dict(learning_rate=optax.cosine_decay_schedule(0.03, STEPS), nesterov=True, preconditioning="aol",
                 ns_coeffs=TABLE, ns_steps=6, eps=1e-3, weight_decay=0.05, muon_weight_dimension_numbers=DIMS),
}
SLOW_CASES = {
    "spectral_adaptive": dict(learning_rate=0.02, preconditioning="spectral", adaptive=True, eps=1e-3,
                              consistent_rms=0.3),
    "schatten_nesterov_off": dict(learning_rate=0.02, preconditioning="schatten", nesterov=False, eps=1e-4,
                                  muon_weight_dimension_numbers=DIMS, mu_dtype=jnp.float32),
}
ALL_CASES = {**CASES, **SLOW_CASES}


def _ours_kwargs(case):
    kw = dict(ALL_CASES[case])
    if "muon_weight_dimension_numbers" in kw:
        dims = kw["muon_weight_dimension_numbers"]
        kw["muon_weight_dimension_numbers"] = lambda params: dims   # optax's callable form
    return kw


@functools.lru_cache(maxsize=None)
def _compiled(case, which):
    """``(tx, jitted step)`` of ``which`` ("ours" / "optax") for ``case``: one compile per pair."""
    tx = muon(**_ours_kwargs(case)) if which == "ours" else optax.contrib.muon(**ALL_CASES[case])
    return tx, _stepper(tx)


@functools.lru_cache(maxsize=None)
def _traj(case, which, nudge_seed):
    return _run(*_compiled(case, which), nudge_seed)


# Tolerance.  Both sides compute the same rule in float32; they differ in op
# order only: the prescale (optax: jnp.linalg.norm then + eps; ours: divide by
# a power of two first, then norm + eps/p2), Newton-Schulz (a fori_loop/scan
# under vmap vs our fused GEMMs), the bias corrections (optax: 1 - beta**t in
# float32; ours: -expm1(t log beta), a few ulps apart), Adam's sqrt(v + eps_root)
# vs sqrt(v + eps_root*bc2)/sqrt(bc2), and the decay order of apply_update.
# That is ~1e-6 relative per step, carried through the gradients of a smooth
# model.  Measured trajectory_error (relative to each leaf's displacement)
# over nudge seeds 0..7 (jax 0.10.2, optax 0.2.8, CPU): MEASURED below (the
# slow cases: spectral_adaptive 8.8e-6, schatten_nesterov_off 8.9e-6);
# the worst is 11x under F32_TRAJ_TOL (1e-4, argued in tests/_peers.py: float32
# storage of params ~0.3 is already ~1e-5 of one step).  A wrong mapping
# moves the trajectory by >= 100 x F32_TRAJ_TOL (test_wrong_mapping_is_caught).
MEASURED = {"defaults": 8.6e-6, "nesterov_off": 5.3e-6, "dims": 8.2e-6}


@pytest.mark.parametrize("case", [*CASES, *(pytest.param(c, marks=pytest.mark.slow) for c in SLOW_CASES)])
def test_trajectory_matches_optax_contrib_muon(case, nudge_seed):
    ours, _ = _traj(case, "ours", nudge_seed)
    theirs, _ = _traj(case, "optax", nudge_seed)
    assert trajectory_error(ours, theirs) < F32_TRAJ_TOL


def test_routing_follows_optax():
    """Default routing: 2-D leaves to Muon, the 3-D one to Adam; with dimension numbers the 3-D leaf
    (heads, in, out) goes to Muon, orthogonalised per head (optax vmaps), and a None leaf to Adam."""
    _, state = _traj("defaults", "ours", 0)
    masked = optax.MaskedNode
    assert {k for k, v in state.mu.items() if not isinstance(v, masked)} == {"w1", "w2"}
    assert {k for k, v in state.exp_avg.items() if not isinstance(v, masked)} == {"b1", "heads"}
    _, state = _traj("dims", "ours", 0)
    assert {k for k, v in state.mu.items() if not isinstance(v, masked)} == {"w1", "w2", "heads"}
    assert {k for k, v in state.exp_avg.items() if not isinstance(v, masked)} == {"b1"}


def _with(monkeypatch, **wrong):
    """Make the drop-in forward ``wrong`` to xo.muon in place of its own mapping (for one test)."""
    real = OC._xo.muon
    monkeypatch.setattr(OC._xo, "muon", lambda *a, **kw: real(*a, **{**kw, **wrong}))


WRONG = [
    ("defaults", {"fallback": "nadamw"}),                  # timm's NAdamW look-ahead instead of Dozat's
    ("nesterov_off", {"eps_mode": "floor"}),               # our scale-invariant prescale, not ||G|| + eps
    pytest.param("defaults", {"momentum_bias_correction": False}, marks=pytest.mark.slow),  # nesterov mix
    pytest.param("dims", {"normalize_spatial": True}, marks=pytest.mark.slow),   # sqrt(heads) on the LR scale
    pytest.param("dims", {"conv_mode": "flatten"}, marks=pytest.mark.slow),      # one matrix for both heads
    pytest.param("nesterov_off", {"fallback_weight_decay": None}, marks=pytest.mark.slow),  # Adam decays by wd
    pytest.param("nesterov_off", {"weight_decay_mask": None}, marks=pytest.mark.slow),     # mask ignored
]


@pytest.mark.parametrize("case, wrong", WRONG)
def test_wrong_mapping_is_caught(case, wrong, monkeypatch):
    """The comparison has teeth: one option mapped wrongly puts the trajectory >= 100 x the tolerance
    away (measured, in WRONG's order: 0.29, 0.021, 0.086, 0.29, 0.82, 0.066, 0.36 of the displacement)."""
    _with(monkeypatch, **wrong)
    tx = muon(**_ours_kwargs(case))
    ours, _ = _run(tx, _stepper(tx), 0)
    theirs, _ = _traj(case, "optax", 0)
    assert trajectory_error(ours, theirs) > 100 * F32_TRAJ_TOL


def test_inject_hyperparams():
    """``optax.inject_hyperparams(muon)(learning_rate=...)``, as for optax's: no static_args needed
    (ns_steps' default passes through as a Python value), the same trajectory as without it (the
    hyperparameters become float32 arrays: rounding only), and the learning rate can be changed in
    the state; an explicit ns_steps must be static (a clear error says so)."""
    tx = optax.inject_hyperparams(muon)(learning_rate=0.02)
    traj, state = _run(tx, _stepper(tx), 0)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.02)
    assert "ns_steps" not in state.hyperparams
    assert trajectory_error(traj, _traj("defaults", "ours", 0)[0]) < F32_TRAJ_TOL
    explicit = optax.inject_hyperparams(muon)(learning_rate=0.02, ns_steps=5)
    params = jax.tree.map(jnp.asarray, _problem()[0])
    with pytest.raises(TypeError, match=r"ns_steps.*static_args"):
        jax.jit(explicit.update)(params, explicit.init(params), params)


# --------------------------------------------------------------- dtypes, state stability

MIXED = {"a": (jnp.bfloat16, (6, 4)), "b": (jnp.float16, (4,)), "c": (jnp.float32, (5, 3)),
         "d": (jnp.bfloat16, (3,)), "e": (jnp.float16, (3, 5))}


def _mixed():
    rng = np.random.default_rng(3)
    params = {k: jnp.asarray(rng.standard_normal(s), dt) for k, (dt, s) in MIXED.items()}
    grads = {k: jnp.asarray(rng.standard_normal(s), dt) for k, (dt, s) in MIXED.items()}
    return params, grads


def test_dtypes_preserved_and_state_stable_under_cond_and_scan():
    """bf16 / f16 / f32 leaves in one tree: updates in each param's dtype, state (momentum, Adam's
    moments) in it too, as optax keeps them; the state's types survive ``lax.cond(pred, update,
    lambda: (params, state))`` and a ``lax.scan`` carry (either would fail to trace otherwise)."""
    params, grads = _mixed()
    tx = muon(0.02, weight_decay=0.1, adam_weight_decay=0.1)
    state = tx.init(params)

    @jax.jit
    def run(params, state):
        def body(carry, pred):
            p, s = carry
            u, s = jax.lax.cond(pred, lambda: tx.update(grads, s, p), lambda: (p, s))
            return (optax.apply_updates(p, u), s), u
        return jax.lax.scan(body, (params, state), jnp.asarray([True, False, True]))

    (new_params, new_state), updates = run(params, state)
    for k, (dt, _) in MIXED.items():
        assert updates[k].dtype == dt and new_params[k].dtype == dt, k
        assert bool(jnp.all(jnp.isfinite(updates[k].astype(jnp.float32)))), k
    for field in ("mu", "exp_avg", "exp_avg_sq"):
        for k, leaf in getattr(new_state, field).items():
            if not isinstance(leaf, optax.MaskedNode):
                assert leaf.dtype == MIXED[k][0], (field, k)
    assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)
    assert not np.array_equal(np.asarray(new_params["c"]), np.asarray(params["c"]))


def test_multisteps_accumulates_in_the_params_dtype():
    """``optax.MultiSteps(muon, every_k_schedule=4)``: the first 3 updates are zeros of each param's
    dtype (optax's gradient-accumulation test); the 4th is the inner update, in the same dtypes."""
    params, grads = _mixed()
    tx = optax.MultiSteps(muon(0.02), every_k_schedule=4)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(4):
        u, state = update(grads, state, params)
        for k, (dt, _s) in MIXED.items():
            x = np.asarray(u[k], np.float32)
            assert u[k].dtype == dt and (np.all(x == 0) if t < 3 else np.all(np.isfinite(x)) and np.any(x)), (t, k)


def test_converges_with_a_schedule():
    """optax's mixed 1-D + 2-D target (``_common_test``), driven by lax.scan with a decaying schedule."""
    target = (jnp.asarray([1.0, -1.0, 2.0]), jnp.asarray([[1.0, 0.0], [-1.0, 1.0]]))

    def loss(p):
        return sum(jnp.sum((a - b) ** 2) for a, b in zip(p, target))

    tx = muon(optax.cosine_decay_schedule(0.1, 400))
    params = (jnp.zeros(3), jnp.zeros((2, 2)))

    @jax.jit
    def run(params):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None
        return jax.lax.scan(body, (params, tx.init(params)), length=400)[0][0]

    for got, want in zip(run(params), target):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-2)


# --------------------------------------------------------------- scale_by_muon


def test_scale_by_muon_matches_optax():
    """The direction alone (no shape scale, LR or decay) with nesterov and ``adaptive``, 5 steps of fixed
    gradients, on leaves whose dimension numbers leave batch axes (optax vmaps them): per head
    ``(2, 5, 3)``, a unit fan-out ``(3, 8, 1)``, and ``(1, 2, 3)`` leaves in two axis orders.

    NS_REL: one float32 Newton-Schulz call in another op order, relative to the update's largest entry
    (tests/test_parity_optax_muon.py: measured <= 2.7e-6, 2e-5 allowed); here measured 1.4e-6."""
    rng = np.random.default_rng(5)
    dims = {"a": D(0, 1), "h": D(1, 2), "u": D(1, 2), "p": D(0, 2), "q": D(2, 0)}
    shapes = {"a": (6, 8), "h": (2, 5, 3), "u": (3, 8, 1), "p": (1, 2, 3), "q": (1, 2, 3)}
    gs = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()} for _ in range(5)]
    kw = dict(beta=0.9, eps=1e-3, adaptive=True, weight_dimension_numbers=dims)
    outs = []
    for tx in (scale_by_muon(**kw), optax.contrib.scale_by_muon(**kw)):
        state, upd, us = tx.init(gs[0]), jax.jit(tx.update), []
        for g in gs:
            u, state = upd(g, state)
            us.append(u)
        outs.append(us)
    for mine, theirs in zip(*outs):
        for k in mine:
            rel = float(jnp.max(jnp.abs(mine[k] - theirs[k])) / jnp.max(jnp.abs(theirs[k])))
            assert rel < 2e-5, (k, rel)


def test_a_3d_leaf_with_dimension_numbers_goes_to_muon():
    """Any leaf with dimension numbers goes to Muon whatever its shape, a (1, 2, 3) one included (core's
    shape rules play no part); the one layout we cannot honour is an error naming the leaf and the fix."""
    params = {"p": jnp.zeros((1, 2, 3)), "b": jnp.zeros(3)}
    state = muon(0.02, muon_weight_dimension_numbers={"p": D(0, 2), "b": None}).init(params)
    assert not isinstance(state.mu["p"], optax.MaskedNode) and isinstance(state.exp_avg["p"], optax.MaskedNode)
    with pytest.raises(ValueError, match=r"params\['p'\] \(shape \(1, 2, 3\)\).*put the batch axes first"):
        muon(0.02, muon_weight_dimension_numbers={"p": D(1, 0), "b": None}).init(params)


def test_scale_by_muon_without_dimension_numbers_wants_matrices():
    """optax's rule: weight_dimension_numbers=None means every leaf is 2-D; a 3-D one is an error."""
    tx = scale_by_muon()
    tx.init({"w": jnp.zeros((4, 6))})
    with pytest.raises(ValueError, match=r"params\['h'\].*shape \(2, 4, 6\).*weight_dimension_numbers"):
        tx.init({"w": jnp.zeros((4, 6)), "h": jnp.zeros((2, 4, 6))})


# --------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(ns_coeffs="muon"), ValueError, r"ns_coeffs='muon'.*\['dion', 'standard'\]"),
    (dict(ns_coeffs="dion", ns_steps=3), ValueError, r"ns_steps=3 is fewer than the 5"),
    (dict(ns_coeffs=(1.0, 2.0)), ValueError, r"ns_coeffs must have shape \(3,\) or \(n, 3\)"),
    (dict(ns_steps=0), ValueError, r"ns_steps"),
    (dict(preconditioning="newton"), ValueError, r"preconditioning='newton'"),
    (dict(beta=1.0), ValueError, r"momentum must be in \[0, 1\).*momentum is optax's beta"),
    (dict(adam_eps_root=-1.0), ValueError, r"fallback_eps_root.*optax's adam_eps_root"),
    (dict(muon_weight_dimension_numbers={"w": D(0, 1)}), ValueError, r"muon_weight_dimension_numbers"),
])
def test_bad_options_are_errors(kwargs, err, match):
    params = {"w": jnp.zeros((4, 6)), "b": jnp.zeros(6)}
    with pytest.raises(err, match=match):
        muon(0.02, **kwargs).init(params)
