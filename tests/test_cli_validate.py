"""``xpopt validate``: the command, its exit codes, and the model's gradients.

Runs are short (a few steps) so the file stays fast; the numbers checked are
properties (agreement with the float64 oracle within the command's own
tolerance, finite losses), never values copied from a previous run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from _nudge import nudge

from xpopt import cli
from xpopt.commands import validate as V

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_JAX = importlib.util.find_spec("jax") is not None and importlib.util.find_spec("optax") is not None
INSTALLED = ["numpy"] + (["torch"] if HAVE_TORCH else []) + (["jax"] if HAVE_JAX else [])
STEPS = 12


def _validate(tmp_path, *extra):
    out = tmp_path / "out"
    rc = cli.main(["validate", "--steps", str(STEPS), "--out", str(out), *extra])
    return rc, out


def _report(out):
    return json.loads((out / "validate-muon.json").read_text())


# ----------------------------------------------------------------- the happy path


def test_validate_all_installed_backends_agree(tmp_path, capsys):
    rc, out = _validate(tmp_path, "--backends", ",".join(INSTALLED))
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rep = _report(out)
    got = [(r["backend"], r["dtype"]) for r in rep["rows"]]
    assert got == [("numpy", "float64")] + [(b, "float32") for b in INSTALLED]
    tol = V.TOLERANCE["float32"]
    for r in rep["rows"]:
        assert r["ok"] and np.isfinite(r["final_loss"]) and r["max_rel_diff"] <= tol
        assert r["steps_per_s"] > 0
        # The table shows every run, with its backend and dtype on one line.
        assert any(line.split()[:2] == [r["backend"], r["dtype"]] for line in printed.splitlines())
    assert rep["rows"][0]["oracle"] and rep["ok"] and rep["diverged"] == []
    for key in ("final loss", "max rel diff", "steps/s", "tolerance", "OK"):
        assert key in printed
    # Training happened: the oracle's loss went down over the run (the first
    # steps of Muon at lr 0.02 on this model cut the loss by far more than the
    # batch-to-batch noise).
    losses = rep["losses"]["numpy float64"]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    png = (out / "validate-muon.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


# validate's model is smooth: embedding lookup, tanh hidden layer, softmax
# cross-entropy; no ReLU/abs/max kink for rounding to flip.  The ``max``
# subtracted from the logits inside its log-softmax (``loss_and_grads``) is
# not a kink either: log_softmax(z - c) = log_softmax(z) for every constant c,
# so neither the loss nor its gradient depends on which logit is the largest
# (a tie only changes the rounding of the shift).  It still gets the nudge
# guard below, like every cross-backend trajectory test.

def test_validate_agrees_from_nudged_starts(tmp_path, capsys, monkeypatch, nudge_seed, torch_threads):
    """Every backend agrees with the oracle from a start moved by a few float32 ulps.

    The init goes through tests/_nudge.py (float32-representable values, so
    the float64 oracle starts where the float32 runs do; moved by 1..4 ulps
    for seeds > 0), and torch runs with 1 and 2 threads.  Measured
    max_rel_diff over 12 steps: 2.8e-7 .. 3.5e-7 (numpy, torch and jax,
    nudge seeds 0..7, 1 and 2 threads), against the command's own 1e-3;
    test_divergence_in_one_backend_exits_1_and_names_it shows the command
    catching a real bug.
    """
    real = V.make_problem

    def nudged(*args, **kwargs):
        p = real(*args, **kwargs)
        return dataclasses.replace(p, params=nudge(p.params, nudge_seed))

    monkeypatch.setattr(V, "make_problem", nudged)
    monkeypatch.setattr(V, "plot_losses", lambda *a, **k: None)   # the PNG is the happy path's test
    rc, out = _validate(tmp_path, "--backends", ",".join(INSTALLED), "--torch-threads", str(torch_threads))
    assert rc == 0, capsys.readouterr().out
    rows = _report(out)["rows"]
    assert [(r["backend"], r["dtype"]) for r in rows] == [("numpy", "float64")] + [(b, "float32") for b in INSTALLED]
    assert all(r["ok"] and r["max_rel_diff"] <= V.TOLERANCE["float32"] for r in rows), rows


def test_float64_runs_agree_to_float64_tolerance(tmp_path, capsys):
    rc, out = _validate(tmp_path, "--backends", ",".join(INSTALLED), "--dtype", "float64")
    assert rc == 0, capsys.readouterr().out
    rows = _report(out)["rows"]
    assert [r["dtype"] for r in rows] == ["float64"] * len(rows)
    assert all(r["max_rel_diff"] <= V.TOLERANCE["float64"] for r in rows)


# ------------------------------------------------------------ divergence detected


def _perturbed_torch(spec):
    """The torch factory with a 25% larger peak LR: a realistic adapter bug."""
    inner = spec.make_torch

    def make_torch(mod, named_params, hp, schedule):
        return inner(mod, named_params, hp, lambda t: 1.25 * schedule(t))

    return dataclasses.replace(spec, make_torch=make_torch)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_divergence_in_one_backend_exits_1_and_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(V.OPTIMIZERS, "muon", _perturbed_torch(V.OPTIMIZERS["muon"]))
    rc, out = _validate(tmp_path, "--backends", "numpy,torch")
    printed = capsys.readouterr().out
    assert rc == 1
    diverged = [line for line in printed.splitlines() if line.startswith("DIVERGED")]
    assert len(diverged) == 1 and "torch float32" in diverged[0] and "numpy float32" not in diverged[0]
    rows = {(r["backend"], r["dtype"]): r for r in _report(out)["rows"]}
    assert not rows[("torch", "float32")]["ok"] and rows[("torch", "float32")]["status"] == "DIVERGED"
    assert rows[("numpy", "float32")]["ok"]


def test_bad_gradient_in_float32_numpy_is_detected(tmp_path, capsys, monkeypatch):
    """A float32 run whose embedding gradient is credited to the neighbouring
    character (an index off-by-one) is flagged.  (Scaling a gradient would not
    do: Newton-Schulz and Adam are both invariant to the gradient's scale.)"""
    real = V.loss_and_grads

    def wrong(xp, params, x, y, vocab_size):
        loss, grads = real(xp, params, x, y, vocab_size)
        if params["embedding"].dtype == xp.float32:
            grads = dict(grads, embedding=xp.roll(grads["embedding"], 1, axis=0))
        return loss, grads

    monkeypatch.setattr(V, "loss_and_grads", wrong)
    rc, out = _validate(tmp_path, "--backends", "numpy")
    printed = capsys.readouterr().out
    assert rc == 1
    assert "DIVERGED: numpy float32" in printed and "worst: embedding" in printed


def test_backend_that_raises_is_reported_as_failed(tmp_path, capsys, monkeypatch):
    spec = V.OPTIMIZERS["muon"]

    def broken(mod, hp, schedule):
        raise RuntimeError("adapter exploded")

    # make_arrays also builds the oracle, so break only the optax factory.
    monkeypatch.setitem(V.OPTIMIZERS, "muon", dataclasses.replace(spec, make_optax=broken))
    if not HAVE_JAX:
        pytest.skip("jax/optax not installed")
    rc, out = _validate(tmp_path, "--backends", "jax")
    printed = capsys.readouterr().out
    assert rc == 1 and "jax float32: failed: RuntimeError: adapter exploded" in printed
    row = _report(out)["rows"][-1]   # strict JSON: the missing numbers are null
    assert row["status"] == "FAILED" and row["final_loss"] is None


# ----------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("argv, message", [
    (["--backends", "numpy,tensorflow"], "unknown backend"),
    (["--backends", ","], "--backends is empty"),
    (["--backends", "numpy,numpy"], "listed twice"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--steps", "ten"], "invalid int value"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--dtype", "bfloat16"], "invalid choice"),
    (["--optimizer", "adam"], "invalid choice"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_arguments_exit_2_with_message(tmp_path, capsys, argv, message):
    rc = cli.main(["validate", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "usage: xpopt" in err
    assert not (tmp_path / "o").exists()


def test_missing_backend_exits_2(tmp_path, capsys, monkeypatch):
    real = V._has
    monkeypatch.setattr(V, "_has", lambda m: False if m == "jax" else real(m))
    rc = cli.main(["validate", "--backends", "numpy,jax", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "backend 'jax' is not available: jax not installed" in err


def test_cupy_without_gpu_exits_2(tmp_path, capsys):
    if V.backend_status("cupy")[0]:
        pytest.skip("a CUDA GPU with cupy is present")
    rc = cli.main(["validate", "--backends", "cupy", "--out", str(tmp_path)])
    assert rc == 2 and "backend 'cupy' is not available" in capsys.readouterr().err


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc = cli.main(["validate", "--out", str(f)])
    assert rc == 2 and "is not a directory" in capsys.readouterr().err


def test_unwritable_out_exits_2_before_running(tmp_path, capsys, monkeypatch):
    """An --out below a file cannot be created: exit 2 at once (it used to fail with a
    traceback after the whole run)."""
    f = tmp_path / "file"
    f.write_text("x")
    monkeypatch.setattr(V, "make_problem", lambda *a, **k: pytest.fail("ran before checking --out"))
    rc = cli.main(["validate", "--backends", "numpy", "--out", str(f / "sub")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "xpopt validate: error: --out " in err and "give a folder you can write to" in err


def test_json_carries_settings(tmp_path, capsys):
    rc, out = _validate(tmp_path, "--backends", "numpy", "--seed", "2")
    assert rc == 0, capsys.readouterr().out
    s = _report(out)["settings"]
    assert s["optimizer"] == "muon" and s["lr"] == V.MUON_HP["lr"] and s["steps"] == STEPS and s["seed"] == 2
    assert s["dtype"] == "float32" and s["backends"] == ["numpy"] and s["tolerance"] == V.TOLERANCE["float32"]
    assert s["versions"]["xpopt"] and s["versions"]["numpy"] and s["versions"]["python"]
    assert s["machine"]["platform"] and s["machine"]["cpu_count"]
    assert s["command_line"] == f"xpopt validate --steps {STEPS} --out {out} --backends numpy --seed 2"


# -------------------------------------------------------- gradients of the model


def _problem():
    p = V.make_problem(2, seed=3)
    # Non-zero biases, so their gradients go through every term.
    g = np.random.default_rng(7)
    p.params["hidden.bias"] = 0.3 * g.standard_normal(p.params["hidden.bias"].shape)
    p.params["out.bias"] = 0.3 * g.standard_normal(p.params["out.bias"].shape)
    return p


def _manual(p):
    import array_api_compat

    xp = array_api_compat.array_namespace(p.params["embedding"])
    loss, grads = V.loss_and_grads(xp, p.params, p.x[0], p.y[0], len(p.vocab))
    return float(loss), {n: np.asarray(g) for n, g in grads.items()}


# Float64 throughout: manual and autograd differ only in summation order, so
# ~1e-15 relative; 1e-12 is far below any real gradient bug (a dropped term or
# a transpose changes entries at O(1) relative).
GRAD_RTOL = 1e-12


def _close(a, b):
    scale = max(float(np.abs(b).max()), 1e-300)
    return float(np.abs(a - b).max()) / scale <= GRAD_RTOL


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_manual_backprop_matches_torch_autograd_float64():
    import torch

    p = _problem()
    loss, grads = _manual(p)
    t = {n: torch.tensor(a, requires_grad=True) for n, a in p.params.items()}
    x, y = torch.from_numpy(p.x[0]), torch.from_numpy(p.y[0])
    a0 = torch.nn.functional.embedding(x, t["embedding"]).reshape(x.shape[0], -1)
    logits = torch.tanh(a0 @ t["hidden.weight"].T + t["hidden.bias"]) @ t["out.weight"].T + t["out.bias"]
    tl = torch.nn.functional.cross_entropy(logits, y)
    tl.backward()
    assert abs(loss - tl.item()) <= GRAD_RTOL * abs(tl.item())
    for n in V.PARAM_NAMES:
        assert grads[n].shape == tuple(t[n].shape)
        assert _close(grads[n], t[n].grad.numpy()), n


@pytest.mark.skipif(not HAVE_JAX, reason="jax not installed")
def test_manual_backprop_matches_jax_grad_float64():
    """Also checks the JAX model (flax layout) is the same function."""
    import jax
    import jax.numpy as jnp

    p = _problem()
    loss, grads = _manual(p)
    with jax.enable_x64(True):
        jp = {n: jnp.asarray(a.T if n in V.WEIGHTS else a) for n, a in p.params.items()}
        jl, jg = jax.value_and_grad(V._jax_loss)(jp, jnp.asarray(p.x[0]), jnp.asarray(p.y[0]))
        jl, jg = float(jl), {n: np.asarray(g) for n, g in jg.items()}
    assert abs(loss - jl) <= GRAD_RTOL * abs(jl)
    for n in V.PARAM_NAMES:
        assert _close(grads[n], jg[n].T if n in V.WEIGHTS else jg[n]), n


def test_manual_backprop_matches_finite_differences():
    """Independent of any framework: central differences on a few entries."""
    p = _problem()
    _, grads = _manual(p)
    rng = np.random.default_rng(0)
    h = 1e-6
    for n in V.PARAM_NAMES:
        for _ in range(3):
            idx = tuple(int(rng.integers(s)) for s in p.params[n].shape)
            if n == "embedding":   # pick a character that occurs in the batch
                idx = (int(p.x[0].flat[int(rng.integers(p.x[0].size))]), idx[1])
            plus, minus = dict(p.params), dict(p.params)
            plus[n], minus[n] = p.params[n].copy(), p.params[n].copy()
            plus[n][idx] += h
            minus[n][idx] -= h
            fd = (_manual(dataclasses.replace(p, params=plus))[0]
                  - _manual(dataclasses.replace(p, params=minus))[0]) / (2 * h)
            # Central differences in float64: truncation O(h^2) ~ 1e-12 and
            # cancellation ~ 1e-16 / h ~ 1e-10 absolute; 1e-7 is far above both
            # and far below the gradient entries (~1e-3..1e-1).
            assert abs(fd - grads[n][idx]) <= 1e-7, (n, idx, fd, grads[n][idx])


def test_manual_backprop_is_array_api_standard_only():
    """What cupy runs: the same function under array_api_strict, which rejects
    anything outside the standard, gives the NumPy result."""
    xs = pytest.importorskip("array_api_strict")
    p = _problem()
    loss, grads = _manual(p)
    sl, sg = V.loss_and_grads(xs, {n: xs.asarray(a) for n, a in p.params.items()},
                              xs.asarray(p.x[0]), xs.asarray(p.y[0]), len(p.vocab))
    assert abs(float(sl) - loss) <= GRAD_RTOL * abs(loss)
    for n in V.PARAM_NAMES:
        assert _close(np.asarray(sg[n]), grads[n]), n


def test_problem_is_deterministic_and_independent_of_steps():
    a, b = V.make_problem(5, seed=11), V.make_problem(9, seed=11)
    for n in V.PARAM_NAMES:
        assert np.array_equal(a.params[n], b.params[n])
    assert np.array_equal(a.x, b.x[:5]) and np.array_equal(a.y, b.y[:5])
    c = V.make_problem(5, seed=12)
    assert not np.array_equal(a.params["hidden.weight"], c.params["hidden.weight"])
    # every target is the character that follows its context in the text
    assert a.x.shape == (5, V.MODEL.batch, V.MODEL.context) and a.y.shape == (5, V.MODEL.batch)


# ------------------------------------------------------------------ entry points


def test_help_documents_options():
    out = subprocess.run([sys.executable, "-m", "xpopt", "validate", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for opt in ("--optimizer", "--steps", "--backends", "--dtype", "--out", "--seed"):
        assert opt in out
    top = subprocess.run([sys.executable, "-m", "xpopt", "--help"], capture_output=True, text=True, check=True)
    assert "validate" in top.stdout


def test_python_m_xpopt_validate_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "xpopt", "validate", "--steps", "3", "--backends", "numpy",
         "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "numpy    float32" in out.stdout and (tmp_path / "validate-muon.json").exists()


def test_importing_validate_imports_no_framework():
    code = ("import sys, xpopt.commands.validate, xpopt._corpus\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('numpy', 'torch', 'jax', 'optax', 'cupy', 'matplotlib', 'tqdm'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_progress_bar_without_tqdm(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)   # makes `from tqdm import tqdm` raise ImportError
    rc = cli.main(["validate", "--steps", "3", "--backends", "numpy", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 0 and "numpy float32" in captured.err and "3/3" in captured.err
