"""muP / spectral scaling for JAX pytrees and optax (adapters/optax/mup.py, commands/_mup_jax.py).

(a) every rule is standard parametrisation at the base width; (b) the torch and
JAX helpers give the same role and multipliers for the same shapes; (c)
``scale_by_mup`` under jit in a chain equals per-leaf learning rates; (d) one JAX
coordinate check; (e) tied readouts; (f) bad input names what is wrong.
"""

from __future__ import annotations

import importlib.util
import math
import time

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from xpopt.adapters.optax import mup as MO  # noqa: E402
from xpopt.adapters import optax as xo  # noqa: E402
from xpopt.core import mup as M  # noqa: E402

V, D_IN, D_OUT = 50, 12, 7
FIELDS = ("init", "lr", "output", "wd", "eps")


def flax_params(w: int, seed: int = 0) -> dict:
    """A flax-layout pytree: embedding, Dense, Conv, LayerNorm, a 4w MLP, readout (standard init)."""
    k = iter(jax.random.split(jax.random.PRNGKey(seed), 16))

    def dense(fi, fo):
        return {"kernel": jax.random.normal(next(k), (fi, fo)) / math.sqrt(fi),
                "bias": jax.random.normal(next(k), (fo,)) * 0.1}

    return {"emb": {"embedding": jax.random.normal(next(k), (V, w))},
            "inp": dense(D_IN, w),
            "conv": {"kernel": jax.random.normal(next(k), (3, 3, w, w)) / math.sqrt(9 * w),
                     "bias": jnp.zeros((w,))},
            "ln": {"scale": jnp.ones((w,)), "bias": jnp.zeros((w,))},
            "up": dense(w, 4 * w), "down": dense(4 * w, w),
            "head": dense(w, D_OUT)}


def shapes(w: int):
    return jax.eval_shape(lambda: flax_params(w))


def mults_of(rows) -> dict:
    return {r["name"]: r["mult"] for r in rows}


# ------------------------------------------------------------------ (a) base width = SP


@pytest.mark.parametrize("optimizer", M.OPTIMIZERS)
@pytest.mark.parametrize("rule", M.RULES)
def test_base_width_is_standard(rule, optimizer):
    params = flax_params(16)
    for base in (params, shapes(16), MO.base_shapes(params)):
        rows = MO.mup_plan(params, base, rule=rule, optimizer=optimizer)
        for r in rows:
            for f in FIELDS:
                assert getattr(r["mult"], f) == 1.0, (r["name"], f)
    base = shapes(16)
    # mup_init leaves params unchanged
    new = MO.mup_init(params, base, rule=rule)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert MO.output_multipliers(params, base, rule=rule, tied=["emb/embedding"]) == {}
    # scale_by_mup is the identity
    m = MO.mup_lr_multipliers(params, base, rule=rule, optimizer=optimizer)
    assert all(v == 1.0 for v in jax.tree_util.tree_leaves(m))
    tx = MO.scale_by_mup(m)
    g = jax.tree.map(lambda x: x * 0.5 + 0.25, params)
    u, _ = jax.jit(tx.update)(g, tx.init(params))
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(u)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_roles_and_names():
    params, base = flax_params(64), shapes(16)
    rows = MO.mup_plan(params, base, rule="mup", optimizer="adam")
    roles = {r["name"]: r["role"] for r in rows}
    assert roles == {"conv/bias": "vector", "conv/kernel": "hidden", "down/bias": "vector", "down/kernel": "hidden",
                     "emb/embedding": "input", "head/bias": "vector", "head/kernel": "output",
                     "inp/bias": "vector", "inp/kernel": "input", "ln/bias": "vector", "ln/scale": "vector",
                     "up/bias": "vector", "up/kernel": "hidden"}
    assert MO.leaf_names({"params": [jnp.ones(2), {"a": jnp.ones(3)}]}) == ["params/0", "params/1/a"]
    # at the base width nothing grows: the last kernel in flatten order (dict keys sorted: "up") is taken as
    # the readout, a wrong guess here, which roles= corrects (every multiplier is 1 there either way)
    at_base = {r["name"]: r["role"] for r in MO.mup_plan(base, base)}
    assert at_base["up/kernel"] == "output" and at_base["head/kernel"] == at_base["inp/kernel"] == "hidden"
    fixed = {r["name"]: r["role"] for r in MO.mup_plan(base, base, roles={"inp/*": "input", "head/kernel": "output",
                                                                          "up/kernel": "hidden"})}
    assert (fixed["inp/kernel"], fixed["head/kernel"], fixed["up/kernel"]) == ("input", "output", "hidden")
    labels = MO.mup_labels(params, base)
    assert labels["head"]["kernel"] == "output" and labels["ln"]["scale"] == "vector"
    mlabels = MO.mup_labels(params, base, optimizer="muon")
    assert mlabels["up"]["kernel"] == "muon" and mlabels["conv"]["kernel"] == "muon"
    assert {mlabels[k]["kernel"] for k in ("inp", "head")} == {"fallback"} and mlabels["emb"]["embedding"] == "fallback"


def test_values_against_table_and_json(tmp_path):
    """A few entries by hand, mup_init's scaling, the JSON base and print_effective_hparams."""
    params, base = flax_params(64), shapes(16)
    path = tmp_path / "base.json"
    MO.save_base_shapes(base, path)
    m = mults_of(MO.mup_plan(params, str(path), rule="mup", optimizer="adam"))
    assert m["up/kernel"].lr == 1 / 4 and m["down/kernel"].lr == 1 / 4 and m["emb/embedding"].lr == 1
    assert m["head/kernel"].init == 2.0 and m["head/kernel"].output == 1 / 4
    mm = mults_of(MO.mup_plan(params, base, rule="mup", optimizer="muon"))
    # Muon column divides out match_rms_adamw's sqrt(max(out, in)); fallback leaves take the Adam column
    assert mm["up/kernel"].lr == pytest.approx(math.sqrt(4 / 4) / math.sqrt(256 / 64))
    assert mm["head/kernel"].lr == 1.0 and mm["ln/scale"].lr == 1.0
    new = MO.mup_init(params, base, rule="mup")
    np.testing.assert_allclose(np.asarray(new["head"]["kernel"]), 2 * np.asarray(params["head"]["kernel"]))
    assert new["up"]["kernel"] is params["up"]["kernel"]
    assert MO.output_multipliers(params, base, rule="mup") == {"head/kernel": 0.25}
    text = MO.print_effective_hparams(params, base, lr=1e-3, weight_decay=0.1, rule="mup", optimizer="adam")
    assert "head/kernel" in text and "2.500e-04" in text
    # seed 002's fan_mapping passes through (fans given by hand; base fans scale by the same ratio)
    fm = mults_of(MO.mup_plan(params, base, rule="spectral", optimizer="adam",
                              fan_mapping={"conv/kernel": (64, 64)}))
    assert fm["conv/kernel"].lr == pytest.approx(1 / 4)
    # a plain pytree in torch layout
    tp = {"w": jnp.ones((64, 12)), "v": jnp.ones((64, 64)), "o": jnp.ones((7, 64))}
    tb = {"w": (16, 12), "v": (16, 16), "o": (7, 16)}
    rt = {r["name"]: r["role"] for r in MO.mup_plan(tp, tb, layout="torch")}
    assert rt == {"o": "output", "v": "hidden", "w": "input"}


# ------------------------------------------------------------------ (b) torch == JAX


def _torch_pair(w):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.emb = nn.Embedding(V, w)
            self.inp = nn.Linear(D_IN, w)
            self.conv = nn.Conv2d(w, w, 3)
            self.ln = nn.LayerNorm(w)
            self.up = nn.Linear(w, 4 * w)
            self.down = nn.Linear(4 * w, w)
            self.head = nn.Linear(w, D_OUT)

    return Net(w)


def _jax_name(torch_name: str) -> str:
    mod, p = torch_name.split(".")
    if p == "weight":
        p = {"emb": "embedding", "ln": "scale"}.get(mod, "kernel")
    return f"{mod}/{p}"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
@pytest.mark.parametrize("width", [16, 64])
def test_torch_and_jax_agree(width):
    from xpopt.adapters.torch.mup import mup_plan as torch_plan

    tmodel, tbase = _torch_pair(width), _torch_pair(16)
    params, base = flax_params(width), shapes(16)
    # torch knows the readout at the base width (the last Linear in module order); a pytree's flatten order
    # sorts dict keys ("up" after "head"), so the JAX side is told (at width 64 the fans tell both)
    roles = {"head/kernel": "output", "up/kernel": "hidden"}
    n = 0
    for rule in M.RULES:
        for opt in M.OPTIMIZERS:
            for wd in M.WD_SCALINGS:
                trows = torch_plan(tmodel, tbase, rule=rule, optimizer=opt, wd_scaling=wd)
                jrows = {r["name"]: r for r in MO.mup_plan(params, base, rule=rule, optimizer=opt, wd_scaling=wd,
                                                             roles=roles)}
                assert len(trows) == len(jrows)
                for tr in trows:
                    jr = jrows[_jax_name(tr["name"])]
                    assert (tr["role"], tr["route"]) == (jr["role"], jr["route"]), tr["name"]
                    assert (tr["fan_in"], tr["fan_out"]) == (jr["fan_in"], jr["fan_out"]), tr["name"]
                    for f in FIELDS:
                        assert getattr(tr["mult"], f) == getattr(jr["mult"], f), (tr["name"], rule, opt, f)
                        n += 1
    assert n == len(M.RULES) * len(M.OPTIMIZERS) * len(M.WD_SCALINGS) * 13 * len(FIELDS)


# ------------------------------------------------------------------ (c) scale_by_mup


def _loss(p, x):
    h = jnp.tanh(x @ p["inp"]["kernel"] + p["inp"]["bias"])
    h = jnp.tanh(h @ p["up"]["kernel"] + p["up"]["bias"]) @ p["down"]["kernel"] + p["down"]["bias"]
    return jnp.mean((h @ p["head"]["kernel"] + p["head"]["bias"]) ** 2) + 1e-3 * jnp.sum(p["ln"]["scale"] ** 2)


def _train(tx, params, steps=3):
    x = jax.random.normal(jax.random.PRNGKey(1), (8, D_IN))
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(_loss)(p, x)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    return params


def _small(w):
    p = flax_params(w)
    return {k: p[k] for k in ("inp", "up", "down", "head", "ln")}


@pytest.mark.parametrize("rule", ["mup", "spectral"])
def test_scale_by_mup_equals_per_leaf_lr(rule):
    params, base = _small(32), jax.eval_shape(lambda: _small(8))
    lr = 1e-2
    m = MO.mup_lr_multipliers(params, base, rule=rule, optimizer="adam")
    assert len(set(jax.tree_util.tree_leaves(m))) > 1
    ours = _train(optax.chain(optax.scale_by_adam(), MO.scale_by_mup(m), optax.scale_by_learning_rate(lr)), params)
    names = jax.tree_util.tree_structure(params).unflatten(MO.leaf_names(params))
    flat = dict(zip(MO.leaf_names(params), jax.tree_util.tree_leaves(m)))
    ref = _train(optax.multi_transform({n: optax.adam(lr * v) for n, v in flat.items()}, names), params)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_scale_by_mup_muon_multi_transform_matches_xo_muon():
    """The docstring's multi_transform recipe equals xo.muon(labels=mup_labels) + scale_by_mup."""
    params, base = _small(32), jax.eval_shape(lambda: _small(8))
    m = MO.mup_lr_multipliers(params, base, optimizer="muon")
    labels = MO.mup_labels(params, base, optimizer="muon")
    a = _train(optax.chain(xo.muon(0.02, fallback_learning_rate=3e-3, labels=labels), MO.scale_by_mup(m)), params)
    tx = optax.multi_transform(
        {"muon": optax.chain(xo.scale_by_muon(), MO.scale_by_mup(m), optax.scale_by_learning_rate(0.02)),
         "fallback": optax.chain(optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8), MO.scale_by_mup(m),
                                 optax.scale_by_learning_rate(3e-3))}, labels)
    b = _train(tx, params)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    moved = np.abs(np.asarray(a["up"]["kernel"]) - np.asarray(params["up"]["kernel"])).max()
    assert moved > 1e-3


# ------------------------------------------------------------------ (d) coordinate check


def test_jax_coord_check_adam_mup():
    from xpopt.commands.mup_tools import coord_check

    t = time.time()
    c = coord_check("jax", optimizer="adam", rule="mup", widths=(128, 256, 512), steps=3)
    print(c.table(), f"({time.time() - t:.1f} s)")
    assert c.passed and c.changes_passed, c.table()
    assert list(c.stats)[:4] == ["input", "hidden1", "hidden2", "output"]


def test_jax_coord_check_discriminates():
    """Negative control: at the coordinate check's LR (3e-2) standard parametrisation grows (slopes ~1),
    muP does not.  (At 3e-3 both pass: standard's internal slopes are ~0.13 then, under the 0.2 limit.)
    """
    from xpopt.commands.mup_tools import coord_check

    sp = coord_check("jax", optimizer="adam", rule="standard", widths=(128, 256, 512), steps=3, lr=3e-2)
    mup = coord_check("jax", optimizer="adam", rule="mup", widths=(128, 256, 512), steps=3, lr=3e-2)
    print(sp.table(), mup.table(), sep="\n")
    assert not sp.passed and sp.slopes["hidden2"] > 0.5
    assert mup.passed


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "muon", "kron"])
def test_jax_coord_check_slow(optimizer):
    from xpopt.commands.mup_tools import coord_check

    c = coord_check("jax", optimizer=optimizer, rule="mup", widths=(128, 256, 512), steps=3)
    print(c.table())
    assert c.passed and c.changes_passed, c.table()


def test_jax_run_base_width_unchanged_by_rule():
    """At the base width every rule trains the same model the same way."""
    from xpopt.commands._mup_jax import jax_run

    ref, _ = jax_run(64, optimizer="adam", rule="standard", lr=3e-3, steps=3, base_width=64)
    for rule in ("mup", "spectral"):
        ls, _ = jax_run(64, optimizer="adam", rule=rule, lr=3e-3, steps=3, base_width=64)
        assert ls == ref
    assert ref[-1] < ref[0]


# ------------------------------------------------------------------ (e) tied embeddings


def test_tied_readout_multiplier():
    params, base = flax_params(64), shapes(16)
    out = MO.output_multipliers(params, base, rule="mup", tied=["emb/embedding"])
    assert out["emb/embedding"] == 16 / 64 == M.tied_output_multiplier("mup", width=64, base_width=16)
    assert "emb/embedding" not in MO.output_multipliers(params, base, rule="standard", tied=["emb/embedding"])
    assert "emb/embedding" not in MO.output_multipliers(params, base, rule="spectral", tied="emb/embedding")
    # the tied table keeps the embedding (input) row: init and Adam LR 1
    m = mults_of(MO.mup_plan(params, base))["emb/embedding"]
    assert (m.role, m.init, m.lr, m.output) == ("input", 1.0, 1.0, 1.0)


# ------------------------------------------------------------------ (f) bad input


def test_bad_input_names_the_problem():
    params, base = flax_params(64), shapes(16)
    with pytest.raises(ValueError, match=r"role='readout'.*'head/kernel'"):
        MO.mup_plan(params, base, roles={"head/kernel": "readout"})
    with pytest.raises(ValueError, match=r"'hed/kernel' matches no parameter.*'conv/kernel'.*'/'-joined pytree paths"):
        MO.mup_plan(params, base, roles={"hed/kernel": "output"})
    with pytest.raises(ValueError, match=r"rule='mupp'"):
        MO.mup_plan(params, base, rule="mupp")
    with pytest.raises(ValueError, match=r"optimizer='adamw'"):
        MO.mup_lr_multipliers(params, base, optimizer="adamw")
    with pytest.raises(ValueError, match=r"layout='jax'"):
        MO.mup_plan(params, base, layout="jax")
    with pytest.raises(ValueError, match=r"'up/kernel'.*narrower than its base"):
        MO.mup_plan(shapes(16), {**MO.base_shapes(shapes(16)), "up/kernel": (32, 64)})
    with pytest.raises(ValueError, match=r"narrower than its base"):
        MO.mup_init(flax_params(16), shapes(64))
    missing = MO.base_shapes(base)
    del missing["ln/scale"]
    with pytest.raises(ValueError, match=r"missing from the base shapes: \['ln/scale'\]"):
        MO.mup_plan(params, missing)
    with pytest.raises(ValueError, match=r"'conv/kernel' has shape .* base shape"):
        MO.mup_plan(params, {**MO.base_shapes(base), "conv/kernel": (16, 16)})
    with pytest.raises(ValueError, match=r"fan_mapping names \['nope'\]"):
        MO.mup_plan(params, base, fan_mapping={"nope": (1, 2)})
    with pytest.raises(ValueError, match=r"tied='head'"):
        MO.output_multipliers(params, base, tied=["head"])
    with pytest.raises(ValueError, match=r"wd_scaling='always'"):
        MO.mup_plan(params, base, wd_scaling="always")
    tx = MO.scale_by_mup({"a": 1.0})
    with pytest.raises(ValueError, match="multipliers tree does not match"):
        tx.update({"b": jnp.ones(2), "c": jnp.ones(2)}, tx.init(None))
