"""One definition per optimizer: every adapter's options are its core dataclass's.

For each adapter of Muon and Kron, the signature's option names and defaults
equal ``MuonOptions`` / ``KronOptions`` field by field, except where
``adapters._signatures.SIGNATURES`` lists a framework convention (optax's
``learning_rate``, None for static options under ``inject_hyperparams``,
layout arguments).  A default changed in one adapter only, or an option added
to core but not to an adapter, fails here.

Then the defaults are run: torch, optax and NumPy optimizers built from the
params alone follow the same trajectory (Muon; Kron skew, its default style,
and QUAD), NumPy 0-d array hyperparameters give the float's result, and the
README's options table is what ``xpopt.commands.options_table`` renders.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import numpy as np

import pytest

from xpopt.adapters import _signatures as C
from xpopt.core._check import dtype_name
from xpopt.core.kron import KronOptions
from xpopt.core.muon import MuonOptions


def _adapter(name):
    fw, fn = name.split(".")
    if fw == "torch":
        torch_adapter = pytest.importorskip("xpopt.adapters.torch")
        return getattr(torch_adapter, fn).__init__
    if fw == "optax":
        pytest.importorskip("optax")
        from xpopt.adapters import optax as xo
        return getattr(xo, fn)
    from xpopt.adapters import arrays
    return getattr(arrays, fn)


def _norm(v):
    """Dtype objects by name (torch.float32 == "float32"); everything else as is."""
    if v is inspect.Parameter.empty:
        return C.REQUIRED
    if not isinstance(v, (str, int, float, bool, tuple, type(None))):
        return dtype_name(v)
    return v


@pytest.mark.parametrize("name", sorted(C.SIGNATURES))
def test_adapter_signature_equals_the_definition(name):
    definition = MuonOptions if "muon" in name.lower() else KronOptions
    spec = C.SIGNATURES[name]
    renamed, omitted, only = spec.get("renamed", {}), spec.get("omitted", {}), spec.get("only")
    want = {}
    for f in dataclasses.fields(definition):
        if f.name in omitted or (only is not None and f.name not in only):
            continue
        default = spec.get("defaults", {}).get(f.name, f.default)
        want[renamed.get(f.name, f.name)] = _norm(default)
    got = {k: _norm(p.default) for k, p in inspect.signature(_adapter(name)).parameters.items()
           if k != "self" and k not in spec.get("extra", ())}
    assert got == want, f"{name}: differs from {definition.__name__} (fix the adapter, or list the " \
                        f"framework convention in adapters._signatures.SIGNATURES)"


def test_every_adapter_is_listed():
    pytest.importorskip("optax")
    pytest.importorskip("torch")
    from xpopt.adapters import arrays, optax as xo, torch as xt
    listed = set(C.SIGNATURES) - {"optax.kron_plan"}
    public = {"torch.Muon", "torch.Kron", "arrays.muon", "arrays.kron", "optax.muon", "optax.scale_by_muon",
              "optax.quad", "optax.skew", "optax.scale_by_kron"}
    assert public <= listed
    for n in public:
        assert callable(_adapter(n))
    assert xt and xo and arrays


def test_omitted_options_say_why():
    for name, spec in C.SIGNATURES.items():
        for opt, why in spec.get("omitted", {}).items():
            assert isinstance(why, str) and why, f"{name}: omitted {opt} without a reason"


def test_a_generated_signature_binds_as_a_def_would():
    """Signatures are generated (``_signatures.takes``): unknown names, extra positional
    arguments and a missing required one are TypeErrors naming the adapter; the
    defaults reach the definition."""
    from xpopt.adapters import arrays
    with pytest.raises(TypeError, match=r"arrays\.muon: .*unexpected keyword argument 'beta'"):
        arrays.muon(0.02, beta=0.9)
    with pytest.raises(TypeError, match=r"arrays\.muon: .*positional"):
        arrays.muon(0.02, 0.9)
    opt = arrays.muon(0.03, nesterov=False)
    assert (opt.options.lr, opt.options.nesterov, opt.options.momentum) == (0.03, False, MuonOptions.momentum)
    pytest.importorskip("optax")
    from xpopt.adapters import optax as xo
    with pytest.raises(TypeError, match=r"optax\.muon: .*learning_rate"):
        xo.muon()


# =========================================================================== the defaults, run
# The signature test above says every adapter *declares* the same defaults; the
# tests below run them: each framework's optimizer built from nothing but the
# params (Kron: plus one shared lr, see below) follows the same trajectory.
#
# Model: a tanh MLP 8 -> 16 -> 16 -> 4 with biases, squared error, float32,
# one batch of 64, parameters in torch layout (out, in) and in module order
# ([W1, b1, W2, b2, W3, b3]; JAX and NumPy get the same list, so Kron's
# per-parameter noise keys, drawn by position, are the same).  Smooth (no kink)
# and run from three starts nudged by up to 4 float32 ulps and with 1 and 2
# torch threads (tests/_nudge.py, tests/_peers.py), as the other trajectory tests.
#
# Tolerance: F32_TRAJ_TOL = 1e-4 of each tensor's displacement (tests/_peers.py).
# Every run computes the same rule in float32; the runs differ by each
# framework's op order: float32 storage of the params (ulp 3e-8 at |p| ~ 0.5)
# and ~1e-6 relative per Newton-Schulz call or factor fit (Kron's 16x16 factors
# are well conditioned here), fed back through the gradients of a smooth model
# for 8 steps.  Kron runs at lr = 1e-2 in every framework (every other option at
# its default): at its default 1e-3 a bias moves ~1e-3 per step, so one float32
# ulp of the params is already ~3e-5 of the first step's displacement and the
# measured error (7.1e-5) sat at the tolerance from storage rounding alone.
# Measured (2-core AMD EPYC, torch 2.13.0+cpu, jax CPU), worst over nudges 0..5,
# 1 and 2 threads: Muon 1.97e-5, Kron skew 2.25e-5, Kron QUAD 1.11e-5; one option
# off its default (test_a_changed_default_is_seen) moves them by >= 2e-2.  (Kron's
# seed is not among those: at the default noise_scale 1e-9 and update probability 1
# the noise it draws is below float32 rounding.)

TRAJ_STEPS = 8
KRON_LR = 1e-2
_MLP = [(16, 8), (16,), (16, 16), (16,), (4, 16), (4,)]


def _mlp_start(nudge_seed):
    from _nudge import nudge

    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s) / np.sqrt(s[1] if len(s) == 2 else 8) for s in _MLP]
    x, y = rng.standard_normal((64, 8)), rng.standard_normal((64, 4))
    return nudge((params, x, y), nudge_seed)


def _mlp_loss(ps, x, y, tanh):
    h = x
    for i in range(0, len(ps), 2):
        h = h @ ps[i].T + ps[i + 1]
        if i + 2 < len(ps):
            h = tanh(h)
    return ((h - y) ** 2).mean()


def _run_torch(make, nudge_seed):
    torch = pytest.importorskip("torch")
    ps, x, y = _mlp_start(nudge_seed)
    tp = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float32)) for p in ps]
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    opt = make(tp)
    traj = [[p.detach().numpy().copy() for p in tp]]
    for _ in range(TRAJ_STEPS):
        opt.zero_grad()
        _mlp_loss(tp, x, y, torch.tanh).backward()
        opt.step()
        traj.append([p.detach().numpy().copy() for p in tp])
    return traj


@functools.lru_cache(maxsize=None)
def _optax_step(name):
    """``(tx, jitted step)`` of ``name``'s optax optimizer at its defaults, compiled once per name.

    ``name``: "muon", "kron_skew" or "kron_quad".  (Compiling Kron's skew takes ~14 s
    on a 2-core CPU; every start and thread count reuses the one compilation.)
    """
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    import jax.numpy as jnp

    from xpopt.adapters import optax as xo

    # optax.muon requires learning_rate (an optax convention): MuonOptions' default, spelled out
    tx = {"muon": lambda: xo.muon(MuonOptions.lr, dimension_numbers=xo.TORCH),
          "kron_skew": lambda: xo.skew(KRON_LR), "kron_quad": lambda: xo.quad(KRON_LR)}[name]()

    @jax.jit
    def step(p, state, x, y):
        g = jax.grad(_mlp_loss)(p, x, y, jnp.tanh)
        u, state = tx.update(g, state, p)
        return [a + b for a, b in zip(p, u)], state

    return tx, step


@functools.lru_cache(maxsize=None)
def _run_optax(name, nudge_seed):
    import jax.numpy as jnp

    tx, step = _optax_step(name)
    ps, x, y = _mlp_start(nudge_seed)
    p = [jnp.asarray(a, jnp.float32) for a in ps]
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    state = tx.init(p)
    traj = [[np.asarray(a) for a in p]]
    for _ in range(TRAJ_STEPS):
        p, state = step(p, state, x, y)
        traj.append([np.asarray(a) for a in p])
    return traj


def _run_arrays(opt, nudge_seed):
    """NumPy float32 params; gradients by torch autograd in float32 on the run's own params."""
    torch = pytest.importorskip("torch")
    from xpopt.adapters import arrays

    ps, x, y = _mlp_start(nudge_seed)
    p = [np.asarray(a, np.float32) for a in ps]
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    state = opt.init(p)
    traj = [[a.copy() for a in p]]
    for _ in range(TRAJ_STEPS):
        tp = [torch.tensor(a, requires_grad=True) for a in p]
        _mlp_loss(tp, x, y, torch.tanh).backward()
        u, state = opt.update([t.grad.numpy() for t in tp], state, p)
        p = arrays.apply_updates(p, u)
        assert all(a.dtype == np.float32 for a in p)
        traj.append([a.copy() for a in p])
    return traj


def _torch_default(name, **change):
    """A maker of ``name``'s torch optimizer at its defaults (Kron: at KRON_LR), ``change`` applied."""
    from xpopt.adapters.torch import Kron, Muon

    if name == "muon":
        return lambda ps: Muon(ps, **change)
    style = {"kron_skew": "skew", "kron_quad": "QUAD"}[name]
    if style == "skew":   # KronOptions' default style: not passed
        return lambda ps: Kron(ps, lr=KRON_LR, **change)
    return lambda ps: Kron(ps, lr=KRON_LR, preconditioner_update_style=style, **change)


def _default_runs(name, nudge_seed):
    """(torch, optax, arrays) trajectories of ``name``'s optimizer at its defaults."""
    pytest.importorskip("torch")
    from xpopt.adapters import arrays

    if name == "muon":
        opt = arrays.muon()
    elif name == "kron_skew":
        opt = arrays.kron(lr=KRON_LR)
    else:
        opt = arrays.kron(lr=KRON_LR, preconditioner_update_style="QUAD")
    return _run_torch(_torch_default(name), nudge_seed), _run_optax(name, nudge_seed), _run_arrays(opt, nudge_seed)


@pytest.mark.parametrize("name", ["muon", "kron_skew", "kron_quad"])
def test_defaults_give_the_same_trajectory_in_every_framework(name, nudge_seed, torch_threads):
    from _peers import F32_TRAJ_TOL, trajectory_error

    assert KronOptions.preconditioner_update_style == "skew"   # what kron_skew stands for
    t, o, a = _default_runs(name, nudge_seed)
    errs = {"optax vs torch": trajectory_error(o, t), "arrays vs torch": trajectory_error(a, t),
            "arrays vs optax": trajectory_error(a, o)}
    assert max(errs.values()) < F32_TRAJ_TOL, errs


@pytest.mark.parametrize("name, change", [
    ("muon", dict(weight_decay=0.1)),            # measured 0.20 of the displacement
    ("muon", dict(adjust_lr_fn="original")),     # 0.82
    ("muon", dict(ns_coefficients="polar_express")),  # 0.50
    ("muon", dict(nesterov=False)),              # 0.090
    ("muon", dict(fallback="nadamw")),           # 0.90
    ("kron_skew", dict(weight_decay=0.1)),       # 0.87: eformer's default, the optax functions' until issue 18
    ("kron_skew", dict(dtype="bfloat16")),       # 0.021: the factors' storage
    ("kron_skew", dict(b1=0.5)),                 # 0.069
    ("kron_skew", dict(preconditioner_lr=0.1)),  # 0.89
    ("kron_skew", dict(preconditioner_update_style="QUAD")),  # 0.31
    ("kron_skew", dict(lr_style=None)),          # 4.4
])
def test_a_changed_default_is_seen(name, change):
    """The comparison has teeth: one option off its default in one framework is >= 1e-2 away (measured >= 2e-2)."""
    torch = pytest.importorskip("torch")
    from _peers import trajectory_error

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = _run_torch(_torch_default(name), 0)
        other = _run_torch(_torch_default(name, **change), 0)
    finally:
        torch.set_num_threads(n)
    assert trajectory_error(other, t) > 1e-2, change


#: The options that reproduce optax.contrib.muon (``xpopt.compat.optax_contrib`` sets them), all on.
OPTAX_RULE = dict(momentum_bias_correction=True, eps_mode="add", eps=1e-2, fallback="nadamw_dozat",
                  fallback_eps_root=1e-4, adaptive=True)


def test_optax_rule_options_run_the_same_in_every_framework():
    """The options added for optax's rule are the one definition's: torch, optax and NumPy follow one
    trajectory with all of them on (F32_TRAJ_TOL, as the defaults; measured 6.3e-6 optax, 5.5e-6 NumPy,
    against torch), and it is not the defaults' (measured 0.70 of the displacement away)."""
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp

    from _peers import F32_TRAJ_TOL, trajectory_error
    from xpopt.adapters import arrays, optax as xo

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = _run_torch(_torch_default("muon", **OPTAX_RULE), 0)
        t0 = _run_torch(_torch_default("muon"), 0)
    finally:
        torch.set_num_threads(n)
    tx = xo.muon(MuonOptions.lr, dimension_numbers=xo.TORCH, **OPTAX_RULE)

    @jax.jit
    def step(p, state, x, y):
        u, state = tx.update(jax.grad(_mlp_loss)(p, x, y, jnp.tanh), state, p)
        return [a + b for a, b in zip(p, u)], state

    ps, x, y = _mlp_start(0)
    p = [jnp.asarray(a, jnp.float32) for a in ps]
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    state, o = tx.init(p), [[np.asarray(a) for a in p]]
    for _ in range(TRAJ_STEPS):
        p, state = step(p, state, x, y)
        o.append([np.asarray(a) for a in p])
    a = _run_arrays(arrays.muon(**OPTAX_RULE), 0)
    errs = {"optax vs torch": trajectory_error(o, t), "arrays vs torch": trajectory_error(a, t)}
    assert max(errs.values()) < F32_TRAJ_TOL, errs
    assert trajectory_error(t0, t) > 1e-2


# --------------------------------------------------------------- 0-d array hyperparameters
# optax takes every numeric option as a 0-d array (inject_hyperparams); the
# NumPy adapter takes a NumPy 0-d array for each of them and gives the float's
# result: the same bits, and float32 updates stay float32 (a float64
# np.asarray(0.1) used to promote them, and the params after apply_updates).

def _numeric_options(definition):
    out = {}
    for f in dataclasses.fields(definition):
        v = f.default
        if f.name == "betas":
            continue   # a pair: its entries are checked below
        if f.name in ("fallback_lr", "fallback_weight_decay", "consistent_rms"):
            v = {"fallback_lr": 0.01, "fallback_weight_decay": 0.05, "consistent_rms": 0.2}[f.name]
        if f.name == "weight_decay":
            v = 0.1   # on: the default 0 skips the decay
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f.name] = v
    return out


def _two_updates(opt, params, grads):
    state = opt.init(params)
    for _ in range(2):
        upd, state = opt.update(grads, state, params)
    return upd


@pytest.mark.parametrize("definition", [MuonOptions, KronOptions], ids=["muon", "kron"])
def test_zero_d_array_hyperparameters_match_the_float(definition):
    from xpopt.adapters import arrays

    make = arrays.muon if definition is MuonOptions else arrays.kron
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal(8).astype(np.float32)]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    cases = {k: ({k: v}, {k: np.asarray(v)}) for k, v in _numeric_options(definition).items()}
    if definition is MuonOptions:
        cases["betas"] = ({"betas": (0.8, 0.9)}, {"betas": (np.asarray(0.8), np.asarray(0.9))})
        # float32 0-d values: the same as the float they hold (float32(0.05) is not 0.05)
        cases["lr+weight_decay float32"] = ({"lr": float(np.float32(0.05)), "weight_decay": float(np.float32(0.1))},
                                            {"lr": np.float32(0.05), "weight_decay": np.asarray(0.1, np.float32)})
    assert {"lr", "weight_decay"} <= set(cases)
    for name, (as_float, as_array) in cases.items():
        want = _two_updates(make(**as_float), params, grads)
        got = _two_updates(make(**as_array), params, grads)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype == np.float32, name
            np.testing.assert_array_equal(g, w, err_msg=name)


# Kron one option at a time: -m slow (one compiled step per option and value, ~25 s); the
# default suite passes them all at once (test_optax_kron_takes_every_zero_d_array_at_once).
@pytest.mark.parametrize("definition", [MuonOptions, pytest.param(KronOptions, marks=pytest.mark.slow)],
                         ids=["muon", "kron"])
def test_optax_takes_the_same_zero_d_arrays(definition):
    """Every option the NumPy test above passes as a 0-d array, optax takes as one too (same result)."""
    pytest.importorskip("optax")
    import jax.numpy as jnp

    from xpopt.adapters import optax as xo

    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal((8, 6)), jnp.float32), jnp.asarray(rng.standard_normal(8), jnp.float32)]
    grads = [jnp.asarray(rng.standard_normal(p.shape), jnp.float32) for p in params]
    for name, v in _numeric_options(definition).items():
        arg = C.SIGNATURES["optax.muon" if definition is MuonOptions else "optax.skew"].get("renamed", {}).get(name, name)
        base = {"learning_rate": MuonOptions.lr, "dimension_numbers": xo.TORCH} if definition is MuonOptions else {}
        make = xo.muon if definition is MuonOptions else xo.skew
        # jnp.asarray(v) holds float32(v) (x64 off): compare with the float it holds.  The array
        # is then used in float32 arithmetic where a Python float is used in float64 and rounded
        # once (Kron's bias correction 1 - b1**t): measured <= 2.5e-6 of the update's size (b1),
        # 0 for every other option.  1e-5 of it: rounding, not a different rule.
        v32 = type(v)(np.float32(v)) if isinstance(v, float) else v
        want = _two_updates(make(**{**base, arg: v32}), params, grads)
        got = _two_updates(make(**{**base, arg: jnp.asarray(v)}), params, grads)
        for g, w in zip(got, want):
            w = np.asarray(w)
            np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-5 * float(np.abs(w).max()), err_msg=name)


def test_optax_kron_takes_every_zero_d_array_at_once():
    """Kron's numeric options of the test above, every one a 0-d array in one transform, give
    the floats' result.  Tolerance as above (the float32 bias correction of b1): measured
    2.3e-7 of the update's size."""
    pytest.importorskip("optax")
    import jax.numpy as jnp

    from xpopt.adapters import optax as xo

    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal((8, 6)), jnp.float32), jnp.asarray(rng.standard_normal(8), jnp.float32)]
    grads = [jnp.asarray(rng.standard_normal(p.shape), jnp.float32) for p in params]
    renamed = C.SIGNATURES["optax.skew"].get("renamed", {})
    options = {renamed.get(k, k): v for k, v in _numeric_options(KronOptions).items()}
    assert {"learning_rate", "weight_decay", "b1"} <= set(options)
    want = _two_updates(xo.skew(**{k: type(v)(np.float32(v)) if isinstance(v, float) else v
                                   for k, v in options.items()}), params, grads)
    got = _two_updates(xo.skew(**{k: jnp.asarray(v) for k, v in options.items()}), params, grads)
    for g, w in zip(got, want):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-5 * float(np.abs(w).max()))


# --------------------------------------------------------------- the options table

@pytest.mark.parametrize("doc", ["README.md", "docs/adapters.md"])
def test_options_table_is_the_generated_one(doc):
    """README's and docs/adapters.md's options tables are exactly what the definitions render.

    After changing an option or SIGNATURES: ``python -m xpopt.commands.options_table
    --write README.md docs/adapters.md``.
    """
    import pathlib

    from xpopt.commands import options_table as T

    text = (pathlib.Path(__file__).resolve().parents[1] / doc).read_text(encoding="utf-8")
    assert text.count(T.BEGIN) == 1 and text.count(T.END) == 1, f"{doc}: one options table"
    assert T.section(text) == T.render(), f"{doc}: run python -m xpopt.commands.options_table --write {doc}"


def test_options_table_has_every_option_and_adapter():
    from xpopt.commands import options_table as T

    table = T.render()
    for definition in (MuonOptions, KronOptions):
        for f in dataclasses.fields(definition):
            assert f"| `{f.name}` |" in table, f.name
    assert {k for _, _, cols in T.TABLES for _, keys in cols for k in keys} == set(C.SIGNATURES) - {"optax.kron_plan"}
    assert "| `lr` | `0.02` | = | `learning_rate`, required |" in table
