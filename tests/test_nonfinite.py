"""The ``nonfinite=`` policy (``xpopt.core.fault``) on every adapter, Muon and Kron.

Every check is an exact comparison within one framework (no tolerance):

* ``"skip"``: a run with a NaN/Inf gradient at step 3 ends bit-identical to
  the run that never saw step 3 (params *and* everything after: momentum,
  factors, step counts and Kron's random draws are where they were), and
  ``nonfinite_steps == 1``.
* ``"zero"``: identical to the run given the same gradient with those
  entries set to 0 by hand; ``nonfinite_steps == 1``.
* ``"raise"``: ``FloatingPointError`` naming the parameter and nothing
  changed (eager); traced under ``jax.jit`` it acts as ``"skip"``.
* ``None``: the NaN propagates (the documented default; a test that the
  policy is what removes it).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from xpopt.adapters import arrays  # noqa: E402
from xpopt.adapters import optax as xo  # noqa: E402
from xpopt.adapters.torch import Kron, Muon  # noqa: E402
from xpopt.core import fault  # noqa: E402

SHAPES = [(8, 6), (6,), (5, 8)]
KRON_KW = dict(b1=0.9, block_size=4, preconditioner_update_probability=0.5, noise_scale=1e-2, seed=1)


def _start():
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _grads(steps=5):
    rng = np.random.default_rng(1)
    return [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]


BAD_STEP, BAD_PARAM = 2, 2


def _poison(gs, value=np.nan):
    gs = [g.copy() for g in gs]
    gs[BAD_PARAM][1, 3] = value
    gs[BAD_PARAM][0, 0] = np.inf
    return gs


def _zeroed(gs):
    gs = [g.copy() for g in gs]
    gs[BAD_PARAM][1, 3] = 0.0
    gs[BAD_PARAM][0, 0] = 0.0
    return gs


# ---------------------------------------------------------------- one runner per adapter: (params, count)


def run_torch(kind, seq, policy):
    ps = [torch.nn.Parameter(torch.tensor(p)) for p in _start()]
    opt = (Muon(ps, lr=0.02, nonfinite=policy) if kind == "muon"
           else Kron(ps, lr=0.01, dtype=torch.float32, nonfinite=policy, **KRON_KW))
    for gs in seq:
        for p, g in zip(ps, gs):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy().copy() for p in ps], opt.state.get("nonfinite_steps", 0)


@functools.lru_cache(maxsize=None)
def _optax_tx(kind, policy, jit):
    """One transform (and its jitted update) per configuration: compiled once for the file."""
    tx = (xo.muon(0.02, dimension_numbers="torch", nonfinite=policy) if kind == "muon"
          else xo.skew(0.01, weight_decay=0.0, dtype="float32", nonfinite=policy, **KRON_KW))
    return tx, (jax.jit(tx.update) if jit else tx.update)


def run_optax(kind, seq, policy, jit=True):
    tx, upd = _optax_tx(kind, policy, jit)
    params = [jnp.asarray(p) for p in _start()]
    state = tx.init(params)
    for gs in seq:
        u, state = upd([jnp.asarray(g) for g in gs], state, params)
        params = optax.apply_updates(params, u)
    count = int(state.nonfinite_steps) if policy is not None else 0
    return [np.asarray(p) for p in params], count


def run_arrays(kind, seq, policy):
    opt = (arrays.muon(lr=0.02, nonfinite=policy) if kind == "muon"
           else arrays.kron(lr=0.01, dtype="float32", nonfinite=policy, **KRON_KW))
    params = _start()
    state = opt.init(params)
    for gs in seq:
        u, state = opt.update(gs, state, params)
        params = arrays.apply_updates(params, u)
    return params, state.nonfinite_steps


RUN = {"torch": run_torch, "optax": run_optax, "arrays": run_arrays}
KINDS = pytest.mark.parametrize("kind", ["muon", "kron"])
# Every adapter x kind, but optax's Kron under -m slow: optax applies the policy in one wrapper
# around the whole transform (adapters/optax/fault.py ``with_nonfinite``, Kron's and Muon's
# alike), which the Muon cases check; the Kron maths' handling is checked by the torch and
# arrays Kron cases.  Each optax Kron policy compiles its own step (~10 s each).
KIND_ADAPTERS = pytest.mark.parametrize(
    "kind, fw", [pytest.param(k, f, marks=pytest.mark.slow) if (k, f) == ("kron", "optax") else (k, f)
                 for f in ("torch", "optax", "arrays") for k in ("muon", "kron")])


def _equal(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@KIND_ADAPTERS
def test_skip_is_as_if_the_step_never_happened(fw, kind):
    gs = _grads()
    seq = gs[:BAD_STEP] + [_poison(gs[BAD_STEP])] + gs[BAD_STEP + 1:]
    got, count = RUN[fw](kind, seq, "skip")
    want, _ = RUN[fw](kind, gs[:BAD_STEP] + gs[BAD_STEP + 1:], "skip")
    _equal(got, want)
    assert count == 1


@KIND_ADAPTERS
def test_zero_replaces_the_entries_by_zero(fw, kind):
    gs = _grads()
    got, count = RUN[fw](kind, gs[:BAD_STEP] + [_poison(gs[BAD_STEP])] + gs[BAD_STEP + 1:], "zero")
    want, _ = RUN[fw](kind, gs[:BAD_STEP] + [_zeroed(gs[BAD_STEP])] + gs[BAD_STEP + 1:], "zero")
    _equal(got, want)
    assert all(np.isfinite(p).all() for p in got)
    assert count == 1


@pytest.mark.parametrize("fw", ["torch", "arrays"])
@KINDS
def test_raise_names_the_parameter_and_changes_nothing(fw, kind):
    gs = _grads(3)
    bad = _poison(gs[1])
    if fw == "torch":
        ps = [torch.nn.Parameter(torch.tensor(p)) for p in _start()]
        opt = (Muon(ps, lr=0.02, nonfinite="raise") if kind == "muon"
               else Kron(ps, lr=0.01, dtype=torch.float32, nonfinite="raise", **KRON_KW))
        for p, g in zip(ps, gs[0]):
            p.grad = torch.tensor(g)
        opt.step()
        before = [p.detach().clone() for p in ps]
        state_before = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                        for i, p in enumerate(ps)}
        for p, g in zip(ps, bad):
            p.grad = torch.tensor(g)
        with pytest.raises(FloatingPointError, match="group 0, param 2" if kind == "muon" else "param 2"):
            opt.step()
        for p, b in zip(ps, before):
            assert torch.equal(p.detach(), b)
        for i, p in enumerate(ps):
            for k, v in state_before[i].items():
                assert (torch.equal(v, opt.state[p][k]) if torch.is_tensor(v) else v == opt.state[p][k])
    else:
        opt = (arrays.muon(lr=0.02, nonfinite="raise") if kind == "muon"
               else arrays.kron(lr=0.01, dtype="float32", nonfinite="raise", **KRON_KW))
        params = _start()
        state = opt.init(params)
        u, state = opt.update(gs[0], state, params)
        with pytest.raises(FloatingPointError, match=r"grads\[2\]"):
            opt.update(bad, state, params)


@pytest.mark.parametrize("kind", ["muon", pytest.param("kron", marks=pytest.mark.slow)])  # see KIND_ADAPTERS
def test_optax_raise_eager_and_under_jit(kind):
    gs = _grads(4)
    seq = [gs[0], _poison(gs[1]), gs[2]]
    with pytest.raises(FloatingPointError, match=r"\[2\]"):
        run_optax(kind, seq, "raise", jit=False)
    # traced: an exception cannot come from a value; the step is skipped and counted
    got, count = run_optax(kind, seq, "raise", jit=True)
    want, _ = run_optax(kind, [gs[0], gs[2]], "raise", jit=True)
    _equal(got, want)
    assert count == 1


@KIND_ADAPTERS
def test_without_a_policy_the_nan_propagates(fw, kind):
    gs = _grads(3)
    got, _ = RUN[fw](kind, [gs[0], _poison(gs[1]), gs[2]], None)
    assert not np.isfinite(got[BAD_PARAM]).all()


def test_policy_names_are_checked():
    with pytest.raises(ValueError, match="nonfinite='ignore' is not a policy"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], nonfinite="ignore")
    with pytest.raises(ValueError, match="not a policy"):
        xo.muon(0.1, nonfinite="nan")
    with pytest.raises(ValueError, match="not a policy"):
        arrays.kron(nonfinite=True)


def test_core_decision_traces_under_jit():
    """The core functions branch on no value: the same results jitted."""
    g = [jnp.asarray([1.0, jnp.nan, 2.0]), jnp.asarray([[jnp.inf, 1.0]])]
    ok = jax.jit(lambda gs: fault.all_finite(gs))(g)
    assert not bool(ok)
    z = jax.jit(fault.zero_nonfinite)(g[0])
    np.testing.assert_array_equal(np.asarray(z), [1.0, 0.0, 2.0])
    assert bool(jax.jit(fault.all_finite)([jnp.ones(3), jnp.zeros((0, 2))]))


def test_nonfinite_count_travels_through_a_checkpoint(tmp_path):
    from xpopt import checkpoint as ckpt

    gs = _grads(3)
    ps = [torch.nn.Parameter(torch.tensor(p)) for p in _start()]
    opt = Muon(ps, lr=0.02, nonfinite="skip")
    for step in (gs[0], _poison(gs[1])):
        for p, g in zip(ps, step):
            p.grad = torch.tensor(g)
        opt.step()
    ckpt.save(tmp_path / "m.npz", opt)
    tx = xo.muon(0.02, dimension_numbers="torch", nonfinite="skip")
    params = [jnp.asarray(p.detach().numpy()) for p in ps]
    state = ckpt.load(tmp_path / "m.npz", like=tx.init(params), params=params)
    assert int(state.nonfinite_steps) == 1 and int(state.inner.count) == 1


def test_kron_factors_never_take_a_non_finite_value():
    """A finite but huge gradient whose fit would overflow leaves the factors finite (rejected)."""
    from xpopt.core import blocking
    from xpopt.core import kron as K

    lay = blocking.layout((6, 6), max_size_dense=64, block_size=64)
    f = K.init_factors(np.zeros(0, np.float32), lay, dtype=np.float32, init_scale=1e30)
    g = np.full((6, 6), 3e38, np.float32)
    opts = K.KronOptions(b1=0.0, preconditioner_init_scale=1e30, dtype="float32")
    for step in range(1, 4):
        (d,), _, (f,) = K.kron_updates([g], [None], [f], [lay], step=step, opts=opts, update=True)
        assert all(np.isfinite(np.asarray(q)).all() for q in f if q is not None)
