"""Loading the peer optimizers that parity tests compare against.

Each loader returns the peer's module or calls ``pytest.skip`` with the concrete
reason (what is missing and the exact command that installs it), so a parity
test never fails just because an optional peer is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

# timm's own dependencies (torchvision, huggingface_hub, ...) are not needed by
# its optimizer files, and a plain `pip install timm` pulls torchvision plus a
# CUDA torch build: install timm alone.
TIMM_PIP = "pip install --no-deps timm"

_TIMM_PKG = "_xpopt_peer_timm_optim"   # private name: never shadows a real `timm`
_TIMM_FILES = ("_types", "_helpers", "adamw", "nadamw", "muon")


def load_torch_muon():
    """``torch.optim.Muon`` (torch >= 2.9), or skip."""
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed (pip install torch)")
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        pytest.skip(f"torch {torch.__version__} has no torch.optim.Muon (added in torch 2.9)")
    return muon


def load_optax_muon():
    """``optax.contrib._muon`` (the module: tests also read its helpers), or skip."""
    try:
        import optax
    except ImportError:
        pytest.skip("optax is not installed (pip install optax)")
    try:
        return importlib.import_module("optax.contrib._muon")
    except ImportError as e:
        pytest.skip(f"this optax ({optax.__version__}) has no optax.contrib._muon ({e}); "
                    "the parity tests were written against optax 0.2.8")


def _timm_optim_dir() -> Path | None:
    # find_spec("timm") only locates the package: it does not run timm/__init__.py
    # (which imports timm.layers -> torchvision and fails beside torch 2.13).
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "optim"


def load_timm_muon():
    """timm's ``optim/muon.py`` as a module, loaded WITHOUT ``import timm``.

    ``timm/__init__.py`` imports the model zoo, which needs torchvision; the
    optimizer files only need torch.  We register a synthetic package module
    whose ``__path__`` is timm's ``optim`` directory (so ``from .adamw import
    adamw`` resolves there) and execute just the files Muon needs.  The
    package's own ``__init__.py`` is never run.
    """
    if _TIMM_PKG + ".muon" in sys.modules:
        return sys.modules[_TIMM_PKG + ".muon"]
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("torch is not installed; timm's Muon needs it")
    optim_dir = _timm_optim_dir()
    if optim_dir is None:
        pytest.skip(f"timm is not installed (install with `{TIMM_PIP}`: --no-deps avoids torchvision)")
    missing = [f for f in _TIMM_FILES if not (optim_dir / f"{f}.py").is_file()]
    if missing:
        pytest.skip(f"this timm ({optim_dir}) lacks optim/{', '.join(missing)}.py; "
                    f"the parity tests were written against timm 1.0.31 (`{TIMM_PIP}`)")

    pkg = types.ModuleType(_TIMM_PKG)
    pkg.__path__ = [str(optim_dir)]
    pkg.__package__ = _TIMM_PKG
    pkg.__file__ = None
    pkg.__spec__ = importlib.util.spec_from_loader(_TIMM_PKG, loader=None, is_package=True)
    pkg.__spec__.submodule_search_locations = [str(optim_dir)]
    sys.modules[_TIMM_PKG] = pkg
    try:
        for name in _TIMM_FILES:
            full = f"{_TIMM_PKG}.{name}"
            if full in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(full, optim_dir / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[full] = mod
            try:
                spec.loader.exec_module(mod)
            except Exception:
                del sys.modules[full]
                raise
            setattr(pkg, name, mod)
    except Exception as e:  # an incompatible timm/torch pair: say which and why
        for name in _TIMM_FILES:
            sys.modules.pop(f"{_TIMM_PKG}.{name}", None)
        sys.modules.pop(_TIMM_PKG, None)
        pytest.skip(f"timm's optim/muon.py from {optim_dir} does not load beside this torch: "
                    f"{type(e).__name__}: {e}")
    return sys.modules[_TIMM_PKG + ".muon"]


# ------------------------------------------------------------ torch threads
#
# torch's intra-op thread count changes how a GEMM or a convolution splits its
# work, and with it the rounding of float32 results.  The trajectory tests take
# the ``torch_threads`` fixture (tests/conftest.py), which runs each of them
# with 1 and with 2 threads.  ``XPOPT_TEST_TORCH_THREADS=N`` pins the whole
# session to N threads instead (every test, trajectory tests then run only
# with N): ``XPOPT_TEST_TORCH_THREADS=1 python -m pytest -q`` and ``=2`` are
# the two whole-suite runs the suite must pass.

TORCH_THREADS_ENV = "XPOPT_TEST_TORCH_THREADS"


def forced_torch_threads() -> int | None:
    """The thread count pinned by ``$XPOPT_TEST_TORCH_THREADS``, or None."""
    import os

    raw = os.environ.get(TORCH_THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"{TORCH_THREADS_ENV}={raw!r}: want an integer >= 1")
    return int(raw)


def torch_thread_counts() -> tuple[int, ...]:
    """What ``torch_threads`` runs: (1, 2), or the pinned count alone."""
    forced = forced_torch_threads()
    return (forced,) if forced else (1, 2)


@pytest.fixture(scope="module")
def torch_module_threads():
    """Run torch on one intra-op thread for the module (or on the pinned count), then restore.

    The problems here are tiny (<= 64x64 matrices): on a shared 2-core
    machine torch's thread pool only adds contention (measured: the same
    float32 parity runs took 3.9 s on one thread and 29 s on two while other
    jobs were running).  Trajectory tests override it per test with
    ``torch_threads``.  Import it into a test module and list it in
    ``pytestmark = pytest.mark.usefixtures("torch_module_threads")``.
    """
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(forced_torch_threads() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def trajectory_error(ours, theirs) -> float:
    """How far two parameter trajectories are apart, relative to how far they moved.

    ``ours`` and ``theirs``: sequences over steps (step 0 = the shared start)
    of sequences of arrays in the same order (anything ``np.asarray`` takes).
    Returns ``max over t >= 1 and tensors of max|a_t - b_t| / max|b_t - b_0|``.
    Dividing by the displacement rather than by the params keeps the measure
    honest: params of size ~0.5 that moved by ~1e-2 would hide a 1% error in
    the optimiser behind a 2e-4 "relative" one.
    """
    import numpy as np

    worst = 0.0
    start = [np.asarray(x, dtype=np.float64) for x in theirs[0]]
    for a_t, b_t in list(zip(ours, theirs))[1:]:
        for a, b, b0 in zip(a_t, b_t, start):
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            moved = float(np.max(np.abs(b - b0)))
            assert moved > 0, "a tensor did not move: the comparison would be vacuous"
            worst = max(worst, float(np.max(np.abs(a - b))) / moved)
    return worst


# Tolerance of ``trajectory_error`` for two float32 implementations of the
# same rule, used by every parity file.  Its floor is float32 *storage*: a
# param of size ~0.5 has ulp 6e-8, while one step moves it by lr * |O| ~ 5e-3,
# so one rounding of the param is already ~1e-5 of the first step's
# displacement; NS computed in a different op order adds ~1e-6 relative per
# call (amplified at small singular values, and without bound in a gradient's
# null space: keep test gradients full rank), fed back through the gradients
# of a smooth model (no ReLU kink, see tests/_nudge.py).  Measured worst
# cases over 12 nudged starts (8 for optax) and 1 and 2 torch threads:
# torch.optim.Muon rule 9.8e-6, timm 1.55e-5, optax 9.7e-6 (optax's
# 20 steps; the 1 thread / 2 thread difference is within the seeds' spread).
# 1e-4 keeps a 6x margin over the worst; a wrongly mapped option (LR rule,
# sqrt(taps), NAdamW vs AdamW, fallback lr/eps/wd, momentum bias correction)
# is >= 1e-2 of the displacement (each file's wrong-mapping test).
F32_TRAJ_TOL = 1e-4
