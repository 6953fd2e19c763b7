"""Small input rough edges (issue 17, item 9): nothing silently wrong.

- ``preconditioner_update_style`` in either case, in every adapter;
- Kron ``plan()``: the parameters' names and a readable table with totals;
- a muP role pattern that matches no parameter is an error naming it;
- an unknown param-group key warns, naming the known keys (torch's and its
  schedulers' own keys do not);
- one state-dtype rule for Muon and Kron: bf16 / f16 parameters keep float32
  momentum unless ``mu_dtype`` says otherwise;
- ``xpopt validate`` says up front about how long it will take.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest

from xpopt.core import kron as K

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_JAX = importlib.util.find_spec("jax") is not None and importlib.util.find_spec("optax") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
needs_jax = pytest.mark.skipif(not HAVE_JAX, reason="jax/optax not installed")


# ------------------------------------------------------------------ update style, either case


@pytest.mark.parametrize("given, canon", [("quad", "QUAD"), ("QUAD", "QUAD"), ("Quad", "QUAD"),
                                          ("skew", "skew"), ("SKEW", "skew")])
def test_update_style_either_case_in_the_options(given, canon):
    assert K.KronOptions(preconditioner_update_style=given).preconditioner_update_style == canon


def test_update_style_still_refuses_unknown_names():
    with pytest.raises(ValueError, match=r"preconditioner_update_style='EQ'.*either case"):
        K.KronOptions(preconditioner_update_style="EQ")
    with pytest.raises(ValueError, match="preconditioner_update_style"):
        K.KronOptions(preconditioner_update_style=None)


def _grads(n, shapes=((6, 5), (5,)), seed=0):
    g = np.random.default_rng(seed)
    return [[g.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(n)]


@needs_torch
def test_lowercase_quad_is_quad_in_torch():
    import torch

    from xpopt.adapters.torch import Kron

    out = {}
    for style in ("quad", "QUAD", "skew"):
        ps = [torch.nn.Parameter(torch.ones(6, 5)), torch.nn.Parameter(torch.zeros(5))]
        opt = Kron(ps, lr=0.1, preconditioner_update_style=style, dtype=torch.float32)
        for gs in _grads(3):
            for p, gg in zip(ps, gs):
                p.grad = torch.tensor(gg)
            opt.step()
        out[style] = [p.detach().clone() for p in ps]
    assert all(torch.equal(a, b) for a, b in zip(out["quad"], out["QUAD"]))
    assert not torch.equal(out["quad"][0], out["skew"][0])


def test_lowercase_quad_in_arrays():
    from xpopt.adapters import arrays

    res = {}
    for style in ("quad", "QUAD"):
        opt = arrays.kron(lr=0.1, preconditioner_update_style=style)
        params = [np.ones((6, 5), np.float32), np.zeros(5, np.float32)]
        state = opt.init(params)
        for gs in _grads(3):
            upd, state = opt.update(gs, state, params)
            params = arrays.apply_updates(params, upd)
        res[style] = params
    assert all(np.array_equal(a, b) for a, b in zip(res["quad"], res["QUAD"]))


@needs_jax
def test_lowercase_quad_in_optax():
    import jax.numpy as jnp

    from xpopt.adapters import optax as xo

    res = {}
    for style in ("quad", "QUAD"):
        tx = xo.scale_by_kron(preconditioner_update_style=style, dtype="float32")
        params = [jnp.ones((6, 5)), jnp.zeros(5)]
        state = tx.init(params)
        for gs in _grads(2):
            upd, state = tx.update([jnp.asarray(g) for g in gs], state, params)
        res[style] = [np.asarray(u) for u in upd]
    assert all(np.array_equal(a, b) for a, b in zip(res["quad"], res["QUAD"]))


# ------------------------------------------------------------------ Kron plan: names and a table


@needs_torch
def test_torch_kron_plan_has_names_and_a_table_with_totals():
    import torch

    from xpopt.adapters.torch import Kron

    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Tanh(), torch.nn.Linear(300, 10))
    opt = Kron(model.named_parameters(), lr=1e-3)
    plan = opt.plan()
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [r["name"] for r in plan] == names                        # rows stay structured dicts
    assert all(isinstance(r, dict) and r["state_bytes"] > 0 for r in plan)
    text = str(plan)
    lines = text.splitlines()
    assert len(lines) == 1 + 1 + 4 + 1 + 1 + 1                       # head, rule, rows, rule, total, ratio
    assert lines[0].split()[:3] == ["parameter", "shape", "layout"] and "state MB" in lines[0]
    for name, line in zip(names, lines[2:6]):
        assert line.startswith(name)
    assert "group 0" not in text and "{" not in text                 # not the raw list of dicts
    t = plan.totals()
    assert t["params"] == 4 and t["state_bytes"] == sum(r["state_bytes"] for r in plan)
    assert lines[7].startswith("total (4 params)") and f"{t['state_bytes'] / 1e6:.3f}" in lines[7]
    assert lines[8].startswith("Kron state / AdamW state = ")
    # without names: the parameter's index (which keys its noise), and the class-level form
    unnamed = Kron.plan(list(model.parameters()), lr=1e-3)
    assert [r["name"] for r in unnamed] == [f"param {i}" for i in range(4)]
    assert str(unnamed).splitlines()[2].startswith("param 0")


def test_arrays_kron_plan_table():
    from xpopt.adapters import arrays

    plan = arrays.kron(lr=1e-3).plan({"w": np.zeros((40, 30), np.float32), "b": np.zeros(30, np.float32)})
    assert sorted(r["name"] for r in plan) == ["b", "w"]
    assert "total (2 params)" in str(plan) and str(plan).splitlines()[0].startswith("parameter")


@needs_jax
def test_optax_kron_plan_table():
    import jax.numpy as jnp

    from xpopt.adapters import optax as xo

    plan = xo.kron_plan({"w": jnp.zeros((40, 30)), "b": jnp.zeros(30)})
    assert [r["name"] for r in plan] == ["['b']", "['w']"]
    assert "total (2 params)" in str(plan)


# ------------------------------------------------------------------ muP: a role pattern that matches nothing


@needs_torch
def test_torch_role_pattern_matching_nothing_is_an_error():
    import torch

    from xpopt.adapters.torch import mup_init_, mup_param_groups, mup_plan

    def model(w):
        return torch.nn.Sequential(torch.nn.Linear(8, w), torch.nn.Tanh(), torch.nn.Linear(w, w),
                                   torch.nn.Tanh(), torch.nn.Linear(w, 4))

    m, base = model(64), model(16)
    for fn, kw in ((mup_plan, {}), (mup_param_groups, dict(lr=1e-3)), (mup_init_, {})):
        with pytest.raises(ValueError, match=r"roles pattern 'head\.weight' matches no parameter.*'0\.weight'"):
            fn(m, base, roles={"head.weight": "output"}, **kw)
        with pytest.raises(ValueError, match=r"roles pattern 'blocks\.\*' matches no parameter"):
            fn(m, base, roles={"4.weight": "output", "blocks.*": "hidden"}, **kw)
    rows = mup_plan(m, base, roles={"4.*": "output", "0.weight": "input"})   # patterns that match are fine
    assert {r["name"]: r["role"] for r in rows}["4.bias"] == "output"


@needs_torch
def test_torch_role_pattern_on_a_tied_alias_names_the_first_name():
    import torch

    from xpopt.adapters.torch import mup_plan

    class Tied(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.emb = torch.nn.Embedding(50, w)
            self.h = torch.nn.Linear(w, w)
            self.head = torch.nn.Linear(w, 50, bias=False)
            self.head.weight = self.emb.weight

    with pytest.raises(ValueError, match=r"'head\.weight' matches only the second name .*\['emb\.weight'\]"):
        mup_plan(Tied(64), Tied(16), roles={"head.weight": "output"})


# ------------------------------------------------------------------ unknown param-group keys


def _unknown_key_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and "does not use" in str(w.message)]


@needs_torch
@pytest.mark.parametrize("which", ["Muon", "Kron"])
def test_unknown_param_group_key_warns_naming_the_known_keys(which):
    import torch

    from xpopt.adapters import torch as xt

    cls = getattr(xt, which)
    w1, w2 = torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8, 8))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = cls([{"params": [w1], "lrr": 1e-4}], lr=1e-3)
    got = _unknown_key_warnings(rec)
    assert len(got) == 1, [str(w.message) for w in rec]
    msg = str(got[0].message)
    assert f"{which}: param group 0 has key(s) 'lrr' (did you mean 'lr'?)" in msg
    assert "group keys: " in msg and " lr," in msg and "weight_decay" in msg
    assert got[0].filename == __file__                       # points at the user's line
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.add_param_group({"params": [w2], "weight_decy": 0.1, "foo": 1})
    msg = str(_unknown_key_warnings(rec)[0].message)
    assert "param group 1 has key(s) 'foo', 'weight_decy' (did you mean 'weight_decay'?)" in msg


@needs_torch
@pytest.mark.parametrize("which", ["Muon", "Kron"])
def test_torch_and_scheduler_keys_do_not_warn(which):
    import torch

    from xpopt.adapters import torch as xt

    cls = getattr(xt, which)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        kw = {"Muon": dict(betas=(0.9, 0.95)), "Kron": dict(b1=0.9)}[which]
        opt = cls(model.named_parameters(), lr=1e-2, **kw)         # param_names
        scheds = [torch.optim.lr_scheduler.StepLR(opt, 1)]          # initial_lr
        if which == "Muon":                                         # needs betas/momentum to cycle
            scheds.append(torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10))
        scheds.append(torch.optim.swa_utils.SWALR(opt, swa_lr=0.05))
        opt.step()
        for s in scheds:
            s.step()
        # groups carrying every key the schedulers added, and torch's own options, rebuild silently
        groups = [dict(g) for g in opt.param_groups]
        for g in groups:
            g.update(foreach=None, maximize=False, differentiable=False, capturable=False, fused=None,
                     name="block", role="hidden", lr_scale=1.0)
        assert {"initial_lr", "swa_lr"} <= set(groups[0])
        cls(groups)
    assert _unknown_key_warnings(rec) == [], [str(w.message) for w in rec]


@needs_torch
def test_mup_param_groups_do_not_warn():
    import torch

    from xpopt.adapters.torch import Kron, Muon, mup_param_groups

    def model(w):
        return torch.nn.Sequential(torch.nn.Linear(8, w), torch.nn.Tanh(), torch.nn.Linear(w, 4))

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        Muon(mup_param_groups(model(32), model(16), lr=0.02, optimizer="muon"))
        Kron(mup_param_groups(model(32), model(16), lr=1e-3, optimizer="kron"))
    assert _unknown_key_warnings(rec) == []


# ------------------------------------------------------------------ one state-dtype rule


@needs_torch
@pytest.mark.parametrize("pdtype", ["bfloat16", "float16", "float32", "float64"])
def test_torch_muon_and_kron_momentum_follow_one_rule(pdtype):
    """mu_dtype=None: float32 momentum for bf16 / f16 params, the param's dtype otherwise."""
    import torch

    from xpopt.adapters.torch import Kron, Muon

    dt = getattr(torch, pdtype)
    want = torch.float32 if pdtype in ("bfloat16", "float16") else dt
    for cls in (Muon, Kron):
        p = torch.nn.Parameter(torch.ones(8, 6, dtype=dt))
        opt = cls([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        mu = opt.state[p]["momentum_buffer" if cls is Muon else "mu"]
        assert mu.dtype == want, (cls.__name__, pdtype, mu.dtype)
    # an explicit mu_dtype is honoured
    p = torch.nn.Parameter(torch.ones(8, 6, dtype=dt))
    opt = Kron([p], lr=1e-3, mu_dtype=torch.bfloat16)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["mu"].dtype == torch.bfloat16


@needs_jax
def test_optax_kron_momentum_follows_the_rule():
    import jax.numpy as jnp

    from xpopt.adapters import optax as xo

    params = {"bf": jnp.ones((6, 5), jnp.bfloat16), "f32": jnp.ones((6, 5), jnp.float32)}
    st = xo.scale_by_kron().init(params)
    assert st.mu["bf"].dtype == jnp.float32 and st.mu["f32"].dtype == jnp.float32
    st = xo.scale_by_kron(mu_dtype="bfloat16").init(params)
    assert st.mu["bf"].dtype == jnp.bfloat16 and st.mu["f32"].dtype == jnp.bfloat16


def test_arrays_kron_momentum_follows_the_rule():
    from xpopt.adapters import arrays

    st = arrays.kron().init([np.ones((6, 5), np.float16), np.ones((6, 5), np.float64)])
    assert st.mu[0].dtype == np.float32 and st.mu[1].dtype == np.float64


def test_plan_counts_the_momentum_by_the_rule():
    lay = K.blocking.layout((768, 3072), max_size_dense=16384, block_size=256)
    opts = K.KronOptions()                                      # bf16 factors, mu_dtype None
    n = 768 * 3072
    assert K.plan_row(lay, opts, name="w", param_bytes=2)["momentum_bytes"] == 4 * n    # bf16 param: float32
    assert K.plan_row(lay, opts, name="w", param_bytes=4)["momentum_bytes"] == 4 * n
    assert K.plan_row(lay, K.KronOptions(mu_dtype="bfloat16"), name="w")["momentum_bytes"] == 2 * n


# ------------------------------------------------------------------ validate says how long it takes


def test_validate_prints_an_estimate_up_front(tmp_path, capsys):
    from xpopt import cli
    from xpopt.commands import validate as V

    rc = cli.main(["validate", "--optimizer", "kron", "--steps", "4", "--backends", "numpy", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0
    first = err.lstrip().splitlines()[0]
    assert first.startswith("xpopt validate: kron, 2 runs of 4 steps (numpy float64, numpy float32); expect about ")
    full = [("numpy", "float64"), ("numpy", "float32"), ("torch", "float32"), ("jax", "float32")]
    # Kron's default run is the long one (measured 46 s on 2 shared cores, Muon's 11.5 s)
    kron, muon = (V.estimate_seconds(o, full, V.DEFAULT_STEPS) for o in ("kron", "muon"))
    assert 30 < kron < 120 and 5 < muon < 30 and kron > 3 * muon
    assert "[2/2] numpy float32" in err


def test_validate_help_says_how_long(capsys):
    from xpopt import cli

    cli.main(["validate", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "kron takes about" in flat and "muon about" in flat


def test_validate_blas_single_threaded_unless_set():
    """``xpopt validate`` (a fresh process) puts NumPy's BLAS on one thread, keeping a user's setting."""
    import os
    import subprocess
    import sys

    code = ("import os, sys\nfrom xpopt import cli\ncli.main(['validate', '--help'])\n"
            "import numpy\nprint('BLAS', os.environ.get('OPENBLAS_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.splitlines()[-1] == "BLAS 1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(env, OPENBLAS_NUM_THREADS="2"))
    assert out.stdout.splitlines()[-1] == "BLAS 2"


@needs_torch
def test_validate_runs_torch_on_one_thread_and_restores(tmp_path, capsys, monkeypatch):
    import dataclasses
    import json

    import torch

    from xpopt import cli
    from xpopt.commands import validate as V

    seen = []
    spec = V.OPTIMIZERS["muon"]

    def make_torch(*a):
        seen.append(torch.get_num_threads())
        return spec.make_torch(*a)

    monkeypatch.setitem(V.OPTIMIZERS, "muon", dataclasses.replace(spec, make_torch=make_torch))
    before = torch.get_num_threads()
    rc = cli.main(["validate", "--steps", "3", "--backends", "torch", "--out", str(tmp_path)])
    assert rc == 0 and seen == [1] and torch.get_num_threads() == before
    assert json.loads((tmp_path / "validate-muon.json").read_text())["settings"]["torch_threads"] == 1
    rc = cli.main(["validate", "--steps", "3", "--backends", "torch", "--torch-threads", "2", "--out", str(tmp_path)])
    assert rc == 0 and seen == [1, 2]
    rc = cli.main(["validate", "--torch-threads", "0", "--out", str(tmp_path)])
    assert rc == 2 and "--torch-threads must be an integer >= 1" in capsys.readouterr().err
