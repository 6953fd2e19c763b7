"""Worker for tests/test_dist_jax.py: runs in a subprocess with 8 host CPU devices.

XLA_FLAGS must be set before JAX is imported, and the pytest process has usually
imported JAX already, hence a separate process.  Usage::

    python tests/_dist_jax_worker.py CASE [CASE ...]   -> one JSON object on stdout

Cases: ``traj:<method>:<axis>:<mesh>`` (10 steps on a mesh vs the single-device
run), ``eager:<method>:<axis>`` (one update outside jit), ``hlo:<method>:<axis>`` (collectives of the compiled update),
``keep:<method>:<axis>:<mesh>`` (updates without weight decay keep the params' shardings), ``optax_muon:<axis>``
(optax.contrib.muon's collectives, for contrast), ``errors`` (bad input),
``specs:<method>`` (partition_specs against the real state's shardings).
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from xpopt.adapters import optax as xo  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
STEPS = 10

# flax layout (in, out).  10 and 12 are not multiples of 8: those axes stay
# unsharded (a sharded axis must divide by its devices; see "errors").
SHAPES = {"w1": (16, 32), "w2": (32, 32), "w3": (32, 32), "w4": (32, 10), "b": (32,)}
# Param specs per mesh: rows, columns, both, transposed axes, a replicated head row.
SPECS = {
    "1d": {"w1": P("data", None), "w2": P(None, "data"), "w3": P("data", None), "w4": P("data", None),
           "b": P("data")},
    "2d": {"w1": P(None, "model"), "w2": P("data", "model"), "w3": P("model", "data"), "w4": P("data", None),
           "b": P("model")},
}
MESHES = {"1d": ((8,), ("data",)), "2d": ((4, 2), ("data", "model"))}


def count_collectives(hlo: str) -> dict:
    # Ops appear as `all-gather(`, or split async as `all-gather-start(` / `-done(`;
    # count the start (or the sync op) once.
    return {k: len(re.findall(rf"\s{k}(?:-start)?\(", hlo)) for k in COLLECTIVES}


def init_params():
    rng = np.random.default_rng(0)
    out = {}
    for k, s in SHAPES.items():
        scale = 1.0 / np.sqrt(s[0]) if len(s) == 2 else 0.1
        out[k] = (rng.standard_normal(s) * scale).astype(np.float32)
    return out


def data():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    y = np.tanh(x @ rng.standard_normal((16, 10)).astype(np.float32) * 0.5)
    return x, y


def make_tx(method, ns_steps=None, weight_decay=0.01):
    if method == "muon":
        # The bias goes to the AdamW fallback; weight decay exercises the param path.
        return xo.muon(0.02, weight_decay=weight_decay, ns_steps=ns_steps)
    if method == "scale_by_muon":
        mats = lambda p: {k: ("muon" if v.ndim == 2 else "adam") for k, v in p.items()}  # noqa: E731
        return optax.chain(optax.partition({"muon": xo.scale_by_muon(ns_steps=ns_steps),
                                            "adam": optax.scale_by_adam()}, mats),
                           optax.scale_by_learning_rate(0.02))
    # float32 factors: bf16 storage would round a 1-ulp difference into a 2**-8 one.
    kw = dict(learning_rate=3e-3, weight_decay=weight_decay, dtype="float32", seed=3)
    if method == "quad":
        return xo.quad(**kw)
    if method == "skew":
        # Probability < 1: the keyed "fit this step?" draw must not depend on sharding.
        return xo.skew(preconditioner_update_probability=0.5, **kw)
    raise ValueError(method)


def gather_for_forward(w, mesh):
    # FSDP-style forward: whole weights for the matmuls (Explicit axes refuse a
    # contraction over differently sharded dims); the gradient comes back sharded.
    rep = NamedSharding(mesh, P())
    if mesh.axis_types[0] == AxisType.Explicit:
        return jax.sharding.reshard(w, rep)
    return jax.lax.with_sharding_constraint(w, rep)


def loss_fn(params, x, y, mesh=None):
    p = params if mesh is None else {k: gather_for_forward(v, mesh) for k, v in params.items()}
    h = jnp.tanh(x @ p["w1"] + p["b"])
    h = jnp.tanh(h @ p["w2"])
    h = jnp.tanh(h @ p["w3"])
    return jnp.mean((h @ p["w4"] - y) ** 2)


def run(method, mesh=None, specs=None):
    tx = make_tx(method)
    params = {k: jnp.asarray(v) for k, v in init_params().items()}
    x, y = (jnp.asarray(a) for a in data())
    if mesh is not None:
        params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
        x, y = (jax.device_put(a, NamedSharding(mesh, P("data", None))) for a in (x, y))
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(params, x, y, mesh)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, loss, u

    losses = []
    for _ in range(STEPS):
        params, state, loss, u = step(params, state, x, y)
        losses.append(float(loss))
    info = {}
    if mesh is not None:
        info["param_specs_kept"] = all(
            params[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), params[k].ndim) for k in params)
        info["update_specs_kept"] = all(
            u[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), u[k].ndim) for k in u)
    return {k: np.asarray(v) for k, v in params.items()}, losses, info


def make_mesh(name, axis):
    shape, names = MESHES[name]
    t = AxisType.Explicit if axis == "explicit" else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(t,) * len(names))


_REF = {}


def case_traj(method, axis, mesh_name):
    if method not in _REF:
        _REF[method] = run(method)
    ref, ref_losses, _ = _REF[method]
    mesh = make_mesh(mesh_name, axis)
    got, losses, info = run(method, mesh, SPECS[mesh_name])
    init = init_params()
    err = {k: float(np.max(np.abs(got[k] - ref[k]))) for k in ref}
    moved = {k: float(np.max(np.abs(ref[k] - init[k]))) for k in ref}
    return dict(max_abs_err=max(err.values()), err=err, moved=min(moved.values()),
                loss_first=ref_losses[0], loss_last=ref_losses[-1],
                loss_err=max(abs(a - b) for a, b in zip(losses, ref_losses)), **info)


def _update_hlo(tx, mesh, specs):
    params = {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in init_params().items()}
    state = tx.init(params)
    grads = jax.tree.map(lambda v: v * 0.5, params)
    lowered = jax.jit(lambda g, s, p: tx.update(g, s, p)[0]).lower(grads, state, params)
    return count_collectives(lowered.compile().as_text())


def case_hlo(method, axis):
    mesh = make_mesh("2d", axis)
    out = {}
    for ns in (5, 10) if "muon" in method else (None,):
        c = _update_hlo(make_tx(method, ns_steps=ns), mesh, SPECS["2d"])
        out[f"ns{ns}" if ns else "counts"] = c
    # Gather once: at most one all-gather per (leaf, mesh axis it is sharded on)
    # for what enters the maths -- Muon's matrices; Kron's bias-corrected momentum
    # (every leaf: vectors get a diagonal preconditioner).
    axes = {k: sum(0 if e is None else len(e) if isinstance(e, tuple) else 1 for e in s)
            for k, s in SPECS["2d"].items()}
    if "muon" in method:
        out["gather_bound"] = sum(n for k, n in axes.items() if len(SHAPES[k]) == 2)
    else:
        out["gather_bound"] = sum(axes.values())
    return out


def case_eager(method, axis):
    """One update outside jit on sharded params: the same numbers, the params' shardings."""
    mesh = make_mesh("2d", axis)
    p0 = {k: jnp.asarray(v) for k, v in init_params().items()}
    ps = {k: jax.device_put(v, NamedSharding(mesh, SPECS["2d"][k])) for k, v in p0.items()}
    tx = make_tx(method)
    half = lambda t: jax.tree.map(lambda v: v * 0.5, t)  # noqa: E731
    u, _ = tx.update(half(ps), tx.init(ps), ps)
    r, _ = tx.update(half(p0), tx.init(p0), p0)
    return dict(max_abs_err=max(float(np.max(np.abs(np.asarray(u[k]) - np.asarray(r[k])))) for k in u),
                update_specs_kept=all(u[k].sharding.is_equivalent_to(ps[k].sharding, u[k].ndim) for k in u))


def case_keep(method, axis, mesh_name):
    """Updates come back in the params' shardings, also without weight decay.

    With weight decay the update adds ``wd * param``, whose sharding XLA then
    gives the sum; without it (``xo.muon``'s default) nothing but the adapter
    ties the orthogonalised, replicated direction to the param's sharding, and
    under Auto axes a jit returned it replicated.  One jitted and one eager
    update, every leaf: the four matrices (sharded on one or two mesh axes,
    rows or columns) and the bias.
    """
    mesh = make_mesh(mesh_name, axis)
    specs = SPECS[mesh_name]
    tx = make_tx(method, weight_decay=0.0)
    ps = {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in init_params().items()}
    gs = jax.tree.map(lambda v: v * 0.5, ps)
    state = tx.init(ps)
    u_jit, _ = jax.jit(tx.update)(gs, state, ps)
    u_eager, _ = tx.update(gs, state, ps)

    def kept(u):
        return {k: bool(u[k].sharding.is_equivalent_to(ps[k].sharding, u[k].ndim)) for k in u}

    return dict(jit=kept(u_jit), eager=kept(u_eager),
                jit_specs={k: str(u_jit[k].sharding.spec) for k in u_jit},
                max_abs_err=max(float(np.max(np.abs(np.asarray(u_jit[k]) - np.asarray(u_eager[k])))) for k in u_jit))


def case_optax_muon(axis, mesh_name="2d"):
    mesh = make_mesh(mesh_name, axis)
    specs = {"w2": P("data", None), "w3": P("data", None)}  # two matrices, as in the issue
    params = {k: jax.device_put(jnp.asarray(init_params()[k]), NamedSharding(mesh, s)) for k, s in specs.items()}
    tx = optax.contrib.muon(0.02)
    try:
        state = tx.init(params)
        lowered = jax.jit(lambda g, s, p: tx.update(g, s, p)[0]).lower(params, state, params)
        return {"counts": count_collectives(lowered.compile().as_text())}
    except Exception as e:  # the issue reports ShardingTypeError under Explicit axes
        return {"error": type(e).__name__, "message": str(e)[:300]}


def _message(fn):
    try:
        fn()
    except Exception as e:
        return {"type": type(e).__name__, "message": str(e)}
    return None


def case_errors():
    out = {}
    mesh = make_mesh("1d", "explicit")
    params = {k: jnp.asarray(v) for k, v in init_params().items()}
    # A spec naming an axis the mesh lacks.
    bad = dict(SPECS["1d"], w2=P(None, "model"))
    out["missing_axis"] = _message(lambda: xo.partition_specs(params, bad, mesh=mesh))
    # A spec that does not divide (w4's 10 columns over 8 devices).
    bad = dict(SPECS["1d"], w4=P(None, "data"))
    out["not_divisible"] = _message(lambda: xo.partition_specs(params, bad, mesh=mesh))
    # Inside shard_map a param is a per-device shard: Muon/Kron cannot orthogonalise it.
    sharded = {k: jax.device_put(v, NamedSharding(mesh, SPECS["1d"][k])) for k, v in params.items()}
    for method in ("muon", "quad"):
        tx = make_tx(method)
        state = tx.init(sharded)
        state_specs = xo.partition_specs(sharded, tx=tx)

        def inside(g, s, p, tx=tx):
            return tx.update(g, s, p)[0]

        def call(tx=tx, state=state, state_specs=state_specs):
            f = jax.shard_map(inside, mesh=mesh, in_specs=(SPECS["1d"], state_specs, SPECS["1d"]),
                              out_specs=SPECS["1d"])
            jax.jit(f)(sharded, state, sharded)

        out[f"shard_map_{method}"] = _message(call)
    return out


def case_specs(method):
    out = {}
    for mesh_name in ("1d", "2d"):
        mesh = make_mesh(mesh_name, "explicit")
        tx = make_tx(method)
        params = {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, SPECS[mesh_name][k]))
                  for k, v in init_params().items()}
        state = tx.init(params)
        specs = xo.partition_specs(params, tx=tx)
        s_leaves, s_def = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, P))
        x_leaves, x_def = jax.tree.flatten(state)
        same_structure = s_def == x_def
        # An uncommitted single-device scalar (the step count) goes wherever jit puts
        # it: it matches a replicated spec.
        matches = same_structure and all(
            x.sharding.is_equivalent_to(NamedSharding(mesh, s), x.ndim) or (not x.committed and s == P())
            for s, x in zip(s_leaves, x_leaves))
        # The state placed by the specs can be jitted with them as in/out shardings.
        placed = jax.tree.map(lambda s, x: jax.device_put(x, NamedSharding(mesh, s)), specs, state,
                              is_leaf=lambda x: isinstance(x, P))
        out[mesh_name] = dict(same_structure=same_structure, matches=matches,
                              n_leaves=len(x_leaves), n_sharded=sum(1 for s in s_leaves if s != P()),
                              placed=len(jax.tree.leaves(placed)) == len(x_leaves))
    return out


def main(cases):
    results = {"devices": jax.device_count()}
    for case in cases:
        kind, *args = case.split(":")
        try:
            fn = {"traj": case_traj, "hlo": case_hlo, "eager": case_eager, "optax_muon": case_optax_muon, "errors": case_errors,
                  "specs": case_specs, "keep": case_keep}[kind]
            results[case] = fn(*args)
        except Exception as e:
            results[case] = {"crash": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
