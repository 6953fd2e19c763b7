"""Muon and Kron optax transforms on 8 JAX host devices: sharded == single-device, bounded collectives.

The checks run in a subprocess (tests/_dist_jax_worker.py) because
``--xla_force_host_platform_device_count`` only takes effect before JAX starts,
and pytest has usually imported JAX already.  Compilation dominates the time, so
the default selection runs one subprocess with the cases that cover each claim
once (Muon Explicit 2-D, Kron Auto 2-D, the HLO count under Auto axes, bad
input, partition_specs, Muon's update sharding under Auto 2-D); ``-m slow`` runs
every method x axis type x mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from jax.sharding import PartitionSpec as P  # noqa: E402

WORKER = Path(__file__).with_name("_dist_jax_worker.py")

# Tolerances, float32, after 10 steps, on params of size ~0.1-1.
# The sharded and single-device runs differ only in summation order: the loss
# mean over the batch is reduced in 4 or 8 partial sums across devices (and XLA
# may fuse the replicated Newton-Schulz / Kron maths differently per program).
# A reordered float32 sum of 64 terms is typically ~sqrt(64) * 2**-24 ~ 5e-7
# relative off, and one step moves a param by ~lr * O(1): Muon lr=0.02 with the
# match_rms_adamw scale (0.2 * sqrt(32) ~ 1.1), Kron lr=3e-3 with an RMS-clipped
# direction.  Orthogonalisation and the preconditioner fit can amplify a
# relative gradient error by ~1/(smallest singular value gap) -- up to ~100 on
# these 32x32 matrices -- so 10 steps give at most ~10 * lr * 100 * 5e-7:
# 1e-5 for Muon and 1.5e-6 for Kron, rounded up to 2e-5 and 1e-5 (float32 ulp at
# 1.0 is 1.2e-7: 80-160 ulps).  Measured: ~5e-7 for both, so a nudge of the start
# by a few ulps (another BLAS) stays well inside.  A shard orthogonalised on its
# own, or a factor fitted on a shard, is off by O(lr) = 1e-3..1e-2 and fails.
TOL = {"muon": 2e-5, "scale_by_muon": 2e-5, "quad": 1e-5, "skew": 1e-5}
# Each run must move its params by far more than TOL, or agreeing would prove nothing.
MIN_MOVED = {"muon": 1e-2, "scale_by_muon": 1e-2, "quad": 1e-3, "skew": 1e-3}

# Muon Explicit in the trajectory and Auto in the HLO count, so both axis types
# run by default; Kron's step is the costliest compile (~10 s per program on a
# CPU), so one Kron trajectory.  specs:muon's structure is also checked in-process.
# keep:muon:auto:2d is the case that came back replicated (issue 17, item 4).
DEFAULT_CASES = ["traj:muon:explicit:2d", "traj:quad:auto:2d", "hlo:muon:auto", "errors", "specs:quad",
                 "keep:muon:auto:2d"]
SLOW_CASES = ([f"{kind}:{m}:{a}:{g}" for kind in ("traj", "keep") for m in ("muon", "scale_by_muon", "quad", "skew")
              for a in ("auto", "explicit") for g in ("1d", "2d")
              if f"{kind}:{m}:{a}:{g}" not in DEFAULT_CASES]
              + ["hlo:muon:explicit", "hlo:quad:auto", "hlo:quad:explicit", "specs:muon"]
              + [f"eager:{m}:{a}" for m in ("muon", "quad") for a in ("auto", "explicit")])


def start_worker(cases):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen([sys.executable, str(WORKER), *cases], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_worker(proc, cases, timeout):
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, stderr[-4000:]
    out = json.loads(stdout)
    assert out["devices"] == 8, out
    for case in cases:
        assert "crash" not in out[case], f"{case}: {out[case]['crash']}\n{out[case]['traceback']}"
    return out


def run_worker(cases, timeout):
    return finish_worker(start_worker(cases), cases, timeout)


_EARLY: dict = {}


def start_early(items):
    """Called by conftest once the selection is known: the default cases' subprocess starts
    then and runs beside the tests that come before this module's (it is ~40 s of JAX compiles)."""
    if any("default_results" in item.fixturenames for item in items):
        _EARLY["default"] = start_worker(DEFAULT_CASES)


def stop_early():
    for proc in _EARLY.values():
        proc.kill()


@pytest.fixture(scope="module")
def default_results():
    proc = _EARLY.pop("default", None) or start_worker(DEFAULT_CASES)
    return finish_worker(proc, DEFAULT_CASES, timeout=600)


def check_traj(case, r):
    method = case.split(":")[1]
    assert r["moved"] > MIN_MOVED[method], (case, r["moved"])
    assert r["max_abs_err"] <= TOL[method], (case, r["err"])
    assert r["loss_last"] < r["loss_first"], (case, r)  # it trains
    assert r["param_specs_kept"] and r["update_specs_kept"], (case, r)


@pytest.mark.parametrize("case", [c for c in DEFAULT_CASES if c.startswith("traj:")])
def test_sharded_equals_single_device(default_results, case):
    check_traj(case, default_results[case])


def check_keep(case, r):
    # Every update leaf (4 matrices, 1 bias) in its param's sharding, jitted and eager,
    # and the two agree (eager runs the same kernels: float32 rounding, measured <= 5e-8).
    assert all(r["jit"].values()) and all(r["eager"].values()), (case, r)
    assert len(r["jit"]) == 5 and r["max_abs_err"] <= 1e-6, (case, r)


@pytest.mark.parametrize("case", [c for c in DEFAULT_CASES if c.startswith("keep:")])
def test_update_keeps_param_sharding_without_weight_decay(default_results, case):
    """xo.muon's update of a P('data', 'model') param came back P() under Auto axes."""
    check_keep(case, default_results[case])


def check_hlo(case, r):
    counts = [v for k, v in r.items() if k.startswith("ns") or k == "counts"]
    if "ns5" in r:
        # The point of the design: Newton-Schulz iterations add no communication.
        assert r["ns5"] == r["ns10"], r
    bound = r["gather_bound"]
    for c in counts:
        assert c["all-reduce"] == 0 and c["all-to-all"] == 0 and c["reduce-scatter"] == 0, r
        assert c["collective-permute"] == 0, r
        assert 1 <= c["all-gather"] <= bound, (r, bound)


def test_collectives_independent_of_ns_steps(default_results):
    check_hlo("hlo:muon:auto", default_results["hlo:muon:auto"])


def test_bad_input_names_the_parameter(default_results):
    e = default_results["errors"]
    assert e["missing_axis"]["type"] == "ValueError"
    assert "params['w2']" in e["missing_axis"]["message"] and "'model'" in e["missing_axis"]["message"]
    assert "params['w4']" in e["not_divisible"]["message"] and "divisible" in e["not_divisible"]["message"]
    for method in ("muon", "quad"):
        m = e[f"shard_map_{method}"]
        assert m is not None and m["type"] == "ValueError", m
        assert "params['" in m["message"] and "shard_map" in m["message"], m


def check_specs(r):
    for mesh_name, m in r.items():
        assert m["same_structure"] and m["matches"] and m["placed"], (mesh_name, m)
        assert m["n_sharded"] >= 5, m  # momentum (and fallback moments) sharded like the params


def test_partition_specs_match_state(default_results):
    check_specs(default_results["specs:quad"])


@pytest.mark.slow
def test_all_methods_axis_types_meshes():
    out = run_worker(SLOW_CASES, timeout=1800)
    for case in SLOW_CASES:
        if case.startswith("eager:"):
            # Eager op-by-op on the gathered arrays runs the same kernels: 1 ulp of room.
            assert out[case]["max_abs_err"] <= 1e-6 and out[case]["update_specs_kept"], (case, out[case])
        elif case.startswith("specs:"):
            check_specs(out[case])
        elif case.startswith("keep:"):
            check_keep(case, out[case])
        else:
            (check_traj if case.startswith("traj:") else check_hlo)(case, out[case])


# ---------------------------------------------------------------- in-process: partition_specs on shapes


def _shapes():
    import jax
    import jax.numpy as jnp

    return {"w": jax.ShapeDtypeStruct((32, 16), jnp.float32), "b": jax.ShapeDtypeStruct((16,), jnp.float32)}


def test_partition_specs_without_devices():
    """Specs from shapes and an AbstractMesh alone (planning before allocating)."""
    import jax
    import optax
    from jax.sharding import AbstractMesh

    from xpopt.adapters import optax as xo

    mesh = AbstractMesh((4, 2), ("data", "model"))
    specs = {"w": P("data", "model"), "b": P("model")}
    is_p = lambda x: isinstance(x, P)  # noqa: E731

    # Kron, b1 = 0: no momentum (None leaves stay None), factors replicated.
    k = xo.partition_specs(_shapes(), specs, mesh=mesh, b1=0.0)
    assert k.mu == {"w": None, "b": None} and k.count == P() and k.key == P()
    assert all(s == P() for s in jax.tree.leaves(k.factors, is_leaf=is_p))
    # Kron with momentum, through quad's chain: momentum like the params, the rest replicated.
    q = xo.partition_specs(_shapes(), specs, mesh=mesh, tx=xo.quad(dtype="float32"))
    assert q[0].mu == specs
    assert jax.tree.structure(q, is_leaf=is_p) == jax.tree.structure(
        jax.eval_shape(xo.quad(dtype="float32").init, _shapes()))
    # Muon: the bias goes to AdamW (its moments sharded like it), the matrix to Muon.
    m = xo.partition_specs(_shapes(), specs, mesh=mesh, tx=xo.muon(0.02))
    assert m.mu["w"] == specs["w"] and isinstance(m.mu["b"], optax.MaskedNode)
    assert m.exp_avg["b"] == specs["b"] and isinstance(m.exp_avg["w"], optax.MaskedNode)


@pytest.mark.parametrize("specs, words", [
    ({"w": P("data", "pipe"), "b": P()}, ["params['w']", "'pipe'", "does not exist"]),
    ({"w": P("data", None, None), "b": P()}, ["params['w']", "3 entries"]),
    ({"w": P(None, ("data", "model")), "b": P()}, ["params['w']", "divisible"]),
    ({"w": P("data", "data"), "b": P()}, ["params['w']", "twice"]),
])
def test_partition_specs_bad_input_names_the_parameter(specs, words):
    from jax.sharding import AbstractMesh

    from xpopt.adapters import optax as xo

    mesh = AbstractMesh((4, 2), ("data", "model"))
    shapes = _shapes()
    shapes["w"] = type(shapes["w"])((32, 12), shapes["w"].dtype)  # 12 columns: not over 8 devices
    with pytest.raises(ValueError) as e:
        xo.partition_specs(shapes, specs, mesh=mesh)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_partition_specs_tx_and_options_conflict():
    from xpopt.adapters import optax as xo

    with pytest.raises(TypeError, match="not both"):
        xo.partition_specs(_shapes(), tx=xo.quad(), b1=0.0)
