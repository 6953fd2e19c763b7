"""Per-framework fast paths, chosen from the array's type.

Like einops, the backend is identified from ``type(x).__module__`` so that
asking "which framework is this?" never imports a framework the caller does
not already use.  Each backend module exposes the same small surface:

``NAME``
    short name (``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"``, ``"generic"``).
``addmm(C, A, B, *, beta, alpha)``
    ``beta * C + alpha * (A @ B)`` over 2-D or same-shape batched stacks, fused
    where the framework can (torch ``addmm``/``baddbmm``, BLAS beta).
``lerp(start, end, weight)``
    ``start + weight * (end - start)``, fused where the framework can.
``lerp_(start, end, weight)``, ``div_(x, y)``, ``MUTABLE``
    the same written into the first argument where arrays are mutable
    (``MUTABLE``: torch, NumPy, CuPy); JAX and the generic path return a new
    array.  Core uses them only on arrays it owns or was told it may overwrite.
``frobenius_norm(X)``
    per-matrix Frobenius norm in one pass where that is safe from
    over/underflow (an array with kept dims, or a Python float for one
    matrix), else None (core then takes its generic safe path).
``batch_limit(x)``
    the largest ``m*m*n`` for which one batched Newton-Schulz over same-shape
    matrices beats a loop on ``x``'s device (measured; infinite on GPUs).
``bfloat16(xp)``
    the framework's bfloat16 dtype, or ``TypeError`` if it has none.
``is_traced(x)``
    True inside ``jax.jit`` tracing (Python branching on values is forbidden).
``has_native_bf16(x)``
    whether bf16 matmuls run at hardware speed where ``x`` lives.
``cond(pred, true_fn, false_fn, operand)``
    a branch on a bool / 0-d array: Python ``if`` eagerly, ``lax.cond`` in JAX.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["backend_name", "get_backend", "resolve_dtype"]

_MODULE_TO_BACKEND = {
    "numpy": "numpy",
    "torch": "torch",
    "jax": "jax",
    "jaxlib": "jax",
    "cupy": "cupy",
    "array_api_strict": "generic",
}


def backend_name(x) -> str:
    """Backend name for one array, from its type's module (imports nothing)."""
    root = type(x).__module__.split(".", 1)[0]
    try:
        return _MODULE_TO_BACKEND[root]
    except KeyError:
        raise TypeError(
            f"xpopt cannot handle arrays of type {type(x).__module__}.{type(x).__name__}; "
            "pass numpy, torch, jax, cupy or array_api_strict arrays"
        ) from None


def get_backend(*arrays, names: tuple[str, ...] | None = None) -> ModuleType:
    """The backend module shared by ``arrays``.

    ``names`` labels the arrays in error messages (e.g. ``("G",)``), so that a
    mix of frameworks in one call says which argument is the odd one out.
    """
    if not arrays:
        raise ValueError("get_backend needs at least one array")
    found = [backend_name(a) for a in arrays]
    if len(set(found)) > 1:
        labels = names or tuple(f"argument {i}" for i in range(len(arrays)))
        desc = ", ".join(f"{n}: {b}" for n, b in zip(labels, found))
        raise TypeError(
            f"arrays from different backends in one call ({desc}); convert them to one "
            "framework first"
        )
    return importlib.import_module(f"{__name__}.{found[0]}")


_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def resolve_dtype(xp, backend: ModuleType, spec, *, argname: str = "dtype"):
    """Turn ``None``, a dtype name or a framework dtype into a floating dtype of ``xp``."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in _FLOAT_NAMES:
            raise ValueError(f"{argname}={spec!r} is not a floating dtype name; use one of {_FLOAT_NAMES}")
        if spec == "bfloat16":
            return backend.bfloat16(xp)
        if not hasattr(xp, spec):
            raise TypeError(f"{argname}={spec!r} is not available in {getattr(xp, '__name__', xp)}")
        return getattr(xp, spec)
    # dtype instances carry .name (np.dtype, torch via str); dtype *classes*
    # such as jnp.bfloat16 or np.float32 carry __name__.
    name = getattr(spec, "name", None) or getattr(spec, "__name__", None) or str(spec).rsplit(".", 1)[-1]
    if name.endswith("bfloat16") or name in _FLOAT_NAMES:
        return spec
    raise TypeError(f"{argname}={spec!r} is not a floating dtype; use float32, float64 or bfloat16")
