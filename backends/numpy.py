"""NumPy backend: the float64 oracle and the CPU reference."""

import numpy as np

from ._inplace import addmm, div_, lerp, lerp_
from .generic import cond, frobenius_norm  # noqa: F401  (no one-pass safe norm: core's path)  # noqa: F401  (re-exported: part of the backend surface)

MUTABLE = True
NAME = "numpy"


def batch_limit(x) -> float:
    # NumPy matmul on stacks: batched wins up to 64^3 (0.64x of the loop at
    # 32 x 64^2), loses from 128^3 on (1.10x); benchmarks/batching.py.
    return 2.0 ** 18


def bfloat16(xp):
    # NumPy has no bfloat16; ml_dtypes (shipped with JAX) supplies one that is
    # exact but slow (no BLAS), good enough as an emulation reference.
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(
            "numpy has no bfloat16; install ml_dtypes, or use compute_dtype='float32'"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def is_traced(x) -> bool:
    return False


def has_native_bf16(x) -> bool:
    return False
