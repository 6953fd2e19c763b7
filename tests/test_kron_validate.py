"""``xpopt validate --optimizer kron``: every adapter's Kron against the float64 NumPy oracle.

Runs are short (60 steps) and nudged (tests/_nudge.py), so the file stays fast
and does not pass by one CPU's rounding; the checked numbers are the command's
own agreement test (max relative parameter difference <= 1e-3 in float32),
never values copied from a previous run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest

from _nudge import nudge

from xpopt import cli
from xpopt.commands import validate as V

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_JAX = importlib.util.find_spec("jax") is not None and importlib.util.find_spec("optax") is not None
INSTALLED = ["numpy"] + (["torch"] if HAVE_TORCH else []) + (["jax"] if HAVE_JAX else [])
STEPS = 60


@pytest.fixture(params=[0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)],
                ids=lambda s: f"nudge{s}")
def nudge_seed(request) -> int:
    """conftest's nudge_seed with the nudged starts under -m slow here: each run of the command
    compiles JAX's Kron step (~35 s of the ~45 s), and Kron on every backend against the float64
    oracle from nudged starts is tests/test_kron_core.py's test_trajectory_matches_oracle (nudge0
    and nudge1 by default); this file checks the command's own path from the plain start."""
    return request.param


def _run(tmp_path, monkeypatch, *extra, nudge_seed=0, backends=INSTALLED):
    real = V.make_problem
    monkeypatch.setattr(V, "make_problem",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), params=nudge(real(*a, **k).params, nudge_seed)))
    monkeypatch.setattr(V, "plot_losses", lambda *a, **k: None)
    out = tmp_path / "out"
    rc = cli.main(["validate", "--optimizer", "kron", "--steps", str(STEPS), "--out", str(out),
                   "--backends", ",".join(backends), *extra])
    return rc, json.loads((out / "validate-kron.json").read_text())


def test_kron_backends_agree_with_the_oracle(tmp_path, capsys, monkeypatch, nudge_seed):
    """NumPy float32, torch and JAX (jitted) Kron follow the float64 oracle.

    Same seed, same parameter order, so the noise (noise_scale 1e-4, see
    validate.KRON_HP) and every draw are the same numbers on every backend.
    Measured over 60 steps, nudge seeds 0..2, 1 and 2 torch threads (the
    suite's thread pin covers both; tests/test_equivalence.py runs them per
    test): numpy
    float32 and torch <= 2e-6, jax <= 1e-5 (its erfinv rounds the noise's
    last bits differently), against the command's 1e-3 (500 steps: 1.8e-6 /
    1.8e-6 / 9.7e-6).
    """
    rc, rep = _run(tmp_path, monkeypatch, nudge_seed=nudge_seed)
    assert rc == 0, capsys.readouterr().out
    rows = rep["rows"]
    assert [(r["backend"], r["dtype"]) for r in rows] == [("numpy", "float64")] + [(b, "float32") for b in INSTALLED]
    assert all(r["ok"] and r["max_rel_diff"] <= V.TOLERANCE["float32"] for r in rows), rows
    losses = rep["losses"]["numpy float64"]
    assert losses[-1] < losses[0]          # Kron trains the model


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_kron_divergence_is_caught(tmp_path, capsys, monkeypatch):
    """A realistic adapter bug (torch's parameters in another order: other noise draws) fails the check."""
    spec = V.OPTIMIZERS["kron"]

    def shuffled(mod, named_params, hp, schedule):
        import torch

        peak = hp["lr"]
        hp["dtype"] = getattr(torch, hp["dtype"])
        opt = mod.Kron([p for _, p in named_params], **hp)          # not JAX's sorted order
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: schedule(t) / peak)

    monkeypatch.setitem(V.OPTIMIZERS, "kron", dataclasses.replace(spec, make_torch=shuffled))
    # numpy and torch alone: the check is the torch row failing beside a passing one, and JAX's
    # run would only add its ~35 s compile
    rc, rep = _run(tmp_path, monkeypatch, backends=["numpy", "torch"])
    rows = {(r["backend"], r["dtype"]): r for r in rep["rows"]}
    assert rc == 1 and not rows[("torch", "float32")]["ok"], rows
    assert rows[("numpy", "float32")]["ok"]
