"""Nudging a trajectory test's start by a few float32 ulps.

Why: a trajectory comparison (two implementations, or float32 vs the float64
oracle, run for many steps on a model whose gradients depend on the params)
can pass on one CPU and fail on another when the model has a kink (ReLU, abs,
max, ...): a value that lands within rounding of the kink takes a different
branch in float32 and float64, the gradient jumps, and the trajectories part.
Another CPU's BLAS (AVX-512 vs AVX2 kernels, another blocking, another thread
count) rounds differently, which moves every intermediate by a few ulps.  We
cannot run every CPU, but we can move the *start* by a few ulps, which shifts
every later value at least as much as a different rounding would.  A test
that still passes for several nudged starts does not hang on this machine's
rounding; one that fails for some seed was measuring the model, not the
optimiser.

``nudge(tree, seed)`` returns ``tree`` with every floating entry moved by a
random, seeded, non-zero number of float32 ulps (``|k| <= ulps``), stepping
with ``np.nextafter`` in float32 so binade edges and signs are handled
exactly.  The values it returns are float32-representable whatever the input
dtype: a float64 input comes back as float64 holding exactly the nudged
float32 values, so the float64 oracle and the float32 runs start from
*identical* numbers.  ``seed=0`` moves nothing (it only rounds to float32):
the unperturbed case.  Integer and bool arrays (token ids, labels) are
returned unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Seeds the trajectory tests run: 0 is the unperturbed start.  The default suite runs
# 0 and one nudged start; seed 2 (a second nudged start, the same check again) runs
# with the slow sweeps (``-m slow``), which keeps the default suite in its CI budget.
NUDGES = (0, 1, 2)
SLOW_NUDGES = (2,)
# Largest move, in float32 ulps, per entry.  A different BLAS kernel or
# summation order changes a dot product of length n by up to ~sqrt(n) ulps in
# practice; the tests' dot products are 8..64 long, so a few ulps.
MAX_ULPS = 4


def _nudge_array(a: np.ndarray, rng: np.random.Generator, ulps: int) -> np.ndarray:
    x = np.asarray(a, dtype=np.float32).copy()
    if ulps > 0:
        # k in {-ulps..-1, 1..ulps}: every entry moves
        mag = rng.integers(1, ulps + 1, size=x.shape)
        up = rng.integers(0, 2, size=x.shape).astype(bool)
        target = np.where(up, np.float32(np.inf), np.float32(-np.inf))
        for i in range(ulps):
            x = np.where(mag > i, np.nextafter(x, target), x)
    return x.astype(a.dtype)


def nudge(tree: Any, seed: int, ulps: int = MAX_ULPS) -> Any:
    """``tree`` with every float entry moved by ``1..ulps`` float32 ulps (see module doc).

    ``tree``: a NumPy array, a torch tensor, or a dict / list / tuple of them
    (nested); dict entries are visited in sorted-key order, so the result
    depends only on the values, the structure and ``seed``.  Every array in
    the result is a new array of the input's type and dtype.
    """
    rng = np.random.default_rng(seed)
    k = ulps if seed else 0

    def go(x):
        if isinstance(x, dict):
            done = {key: go(x[key]) for key in sorted(x)}
            return type(x)((key, done[key]) for key in x)
        if isinstance(x, (list, tuple)):
            return type(x)(go(v) for v in x)
        if type(x).__module__.startswith("torch"):
            import torch

            if not x.is_floating_point():
                return x.clone()
            # via float32 (a bf16 tensor rounds the nudge away again: nudge
            # float32 copies and cast, if a bf16 start is ever needed)
            out = _nudge_array(x.detach().cpu().to(torch.float32).numpy(), rng, k)
            return torch.from_numpy(out).to(dtype=x.dtype, device=x.device)
        a = np.asarray(x)
        if not np.issubdtype(a.dtype, np.floating):
            return a.copy()
        return _nudge_array(a, rng, k)

    return go(tree)


def f32_exact(tree: Any) -> Any:
    """``tree`` rounded to float32 values, dtypes kept: ``nudge(tree, 0)``."""
    return nudge(tree, 0)
