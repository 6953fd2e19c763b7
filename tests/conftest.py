"""Shared fixtures: ``xp`` runs a core test once per installed backend.

Each backend case converts NumPy float64 inputs (the oracle's) into its own
arrays, so every comparison starts from bit-identical data.

Trajectory tests (several steps whose gradients depend on the params, compared
across backends, adapters or peers) also take ``nudge_seed`` (the start moved
by a few float32 ulps, tests/_nudge.py) and, where torch runs,
``torch_threads`` (1 and 2 intra-op threads, or the count pinned by
``$XPOPT_TEST_TORCH_THREADS``, tests/_peers.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Callable

import numpy as np
import pytest


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


from xpopt.backends.cupy import cuda_available  # noqa: E402  (one probe, shared with validate)

from _nudge import NUDGES, SLOW_NUDGES  # noqa: E402
from _peers import forced_torch_threads, torch_thread_counts  # noqa: E402


# ------------------------------------------------- start nudges, torch threads

@pytest.fixture(params=[pytest.param(s, marks=pytest.mark.slow) if s in SLOW_NUDGES else s for s in NUDGES],
                ids=lambda s: f"nudge{s}")
def nudge_seed(request) -> int:
    """Seed for ``_nudge.nudge``: 0 = the unperturbed start, others move it by <= 4 float32 ulps."""
    return request.param


@pytest.fixture(params=torch_thread_counts(), ids=lambda n: f"threads{n}")
def torch_threads(request):
    """Run the test with this many torch intra-op threads (1 and 2 unless pinned), then restore."""
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install xpopt[torch])")
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)


def _early_modules(items):
    """Test modules with subprocess-backed fixtures that can start before their tests
    (``start_early(items)`` / ``stop_early()``: test_dist_jax's 8-device worker, test_readme's runner)."""
    mods = {}
    for item in items:
        mod = getattr(item, "module", None)
        if hasattr(mod, "start_early"):
            mods.setdefault(mod, []).append(item)
    return mods


@pytest.hookimpl(trylast=True)   # after -m / -k deselection
def pytest_collection_modifyitems(config, items):
    """Start those subprocesses now: they run beside the tests collected before their modules,
    on the second core, instead of stalling the run when their module comes up."""
    if config.getoption("collectonly") or hasattr(config, "workerinput"):   # xdist workers see every item
        return
    for mod, its in _early_modules(items).items():
        mod.start_early(its)
    config._xpopt_early = list(_early_modules(items))


def pytest_sessionfinish(session):
    for mod in getattr(session.config, "_xpopt_early", ()):
        mod.stop_early()


@pytest.fixture(scope="session", autouse=True)
def _pinned_torch_threads():
    """``$XPOPT_TEST_TORCH_THREADS=N``: every test runs with N torch threads."""
    n = forced_torch_threads()
    if n is None or not _has("torch"):
        yield
        return
    import torch

    torch.set_num_threads(n)
    yield


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    xp: Any
    asarray: Callable[..., Any]     # (numpy array, dtype name) -> backend array
    to_numpy: Callable[[Any], np.ndarray]
    has_float64: bool = True

    def __repr__(self) -> str:  # shows up in test ids and failure messages
        return self.name


def _numpy_case():
    return Case("numpy", np, lambda a, dt="float32": np.asarray(a, dtype=dt), np.asarray)


def _strict_case():
    import array_api_strict as xs

    return Case(
        "array_api_strict",
        xs,
        lambda a, dt="float32": xs.asarray(np.asarray(a, dtype=dt)),
        lambda x: np.asarray(x),  # __array__ / buffer protocol on CPU
    )


def _torch_case():
    import array_api_compat.torch as xpt
    import torch

    return Case(
        "torch",
        xpt,
        lambda a, dt="float32": torch.from_numpy(np.array(a, dtype=dt)),
        lambda x: x.detach().float().cpu().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy(),
    )


def _jax_case():
    import jax.numpy as jnp

    # x64 stays off (JAX's default): users run float32, and so do we.
    return Case(
        "jax",
        jnp,
        lambda a, dt="float32": jnp.asarray(np.asarray(a, dtype=dt)),
        lambda x: np.asarray(x, dtype=np.float32) if str(x.dtype) == "bfloat16" else np.asarray(x),
        has_float64=False,
    )


def _cupy_case():
    import cupy

    return Case("cupy", cupy, lambda a, dt="float32": cupy.asarray(np.asarray(a, dtype=dt)), cupy.asnumpy)


_CASES = {
    "numpy": (_numpy_case, None),
    "array_api_strict": (_strict_case, None if _has("array_api_strict") else "array_api_strict not installed"),
    "torch": (_torch_case, None if _has("torch") else "torch not installed (pip install xpopt[torch])"),
    "jax": (_jax_case, None if _has("jax") else "jax not installed (pip install xpopt[jax])"),
    "cupy": (_cupy_case, None if cuda_available() else "cupy needs a CUDA GPU; none on this machine"),
}


@pytest.fixture(params=[
    pytest.param(name, marks=[pytest.mark.gpu] if name == "cupy" else [])
    for name in _CASES
])
def xp(request) -> Case:
    """A backend :class:`Case` (``.xp``, ``.asarray``, ``.to_numpy``)."""
    return backend_case(request.param)


def backend_case(name: str) -> Case:
    """The :class:`Case` of backend ``name``; skips the test where it is not available."""
    make, skip = _CASES[name]
    if skip:
        pytest.skip(skip)
    return make()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def matrix_with_spectrum(rng, m: int, n: int, s) -> np.ndarray:
    """Float64 ``U diag(s) V^T`` of shape (m, n) with the given singular values."""
    k = min(m, n)
    s = np.asarray(s, dtype=np.float64)
    assert s.shape == (k,)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (U * s) @ V.T
