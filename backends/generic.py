"""Generic array-API path (array_api_strict and anything standard-only).

It uses nothing outside the standard, which is why array_api_strict running
through it is the guard that core/ stays inside the standard.
"""

NAME = "generic"


def addmm(C, A, B, *, beta: float, alpha: float):
    out = A @ B
    if alpha != 1.0:
        out = alpha * out
    if beta != 0.0:
        out = beta * C + out
    return out


def lerp(start, end, weight):
    """``start + weight * (end - start)`` (weight a float or 0-d array)."""
    return start + weight * (end - start)


def lerp_(start, end, weight):
    """In-place ``lerp`` where arrays are mutable; here (immutable) a new array."""
    return lerp(start, end, weight)


def div_(x, y):
    """``x / y``, written into ``x`` where arrays are mutable; here a new array."""
    return x / y


MUTABLE = False


def frobenius_norm(X):
    """Per-matrix ``||X||_F`` (keepdims) if this backend can get it safely in one
    pass; None sends core to its generic over/underflow-safe path."""
    return None


def batch_limit(x) -> float:
    """Largest ``m*m*n`` (m <= n) for which one batched Newton-Schulz beats a loop.

    Measured with ``benchmarks/batching.py`` on a 2-core AMD EPYC (Zen 5):
    stacking costs a copy and the CPU batched GEMMs run a little slower than
    single ones, so batching only pays while per-call overhead dominates.
    array_api_strict runs on NumPy: NumPy's limit.
    """
    return 2.0 ** 18


def bfloat16(xp):
    raise TypeError(f"{getattr(xp, '__name__', xp)} has no bfloat16 dtype; use float32")


def is_traced(x) -> bool:
    return False


def has_native_bf16(x) -> bool:
    return False


def cond(pred, true_fn, false_fn, operand):
    """``true_fn(operand) if pred else false_fn(operand)``; ``pred`` a bool or 0-d array.

    Eager backends branch in Python (a device sync for a device array); JAX
    uses ``lax.cond``, so a traced ``pred`` works under ``jax.jit``.
    """
    return true_fn(operand) if bool(pred) else false_fn(operand)
