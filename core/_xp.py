"""One namespace lookup per call tree, with errors that name the argument."""

from __future__ import annotations

import numbers

import array_api_compat

from ..backends import get_backend

# (xp, backend) per array type.  A dict lookup keyed by ``type(x)`` is what
# torch.compile can trace; array_api_compat's own lookup and the backend's
# first import are not (graph breaks), so they run once per type, eagerly.
_BY_TYPE: dict = {}


def namespace(*arrays, names: tuple[str, ...]):
    """``(xp, backend)`` for ``arrays``; TypeError naming arguments on a mix."""
    t = type(arrays[0]) if arrays else None
    if t is not None and all(type(a) is t for a in arrays):
        hit = _BY_TYPE.get(t)
        if hit is not None:
            return hit
    backend = get_backend(*arrays, names=names)
    found = array_api_compat.array_namespace(*arrays), backend
    if t is not None and all(type(a) is t for a in arrays):
        _BY_TYPE[t] = found
    return found


def check_floating(xp, x, name: str, *, complex_ok: bool = False) -> None:
    kinds = ("real floating", "complex floating") if complex_ok else "real floating"
    if not xp.isdtype(x.dtype, kinds):
        allowed = "float32, float64, bfloat16, float16" + (", complex64, complex128" if complex_ok else "")
        raise TypeError(f"{name} has dtype {x.dtype}; xpopt needs a floating dtype ({allowed}): cast it first")


def is_complex(xp, x) -> bool:
    return xp.isdtype(x.dtype, "complex floating")


def is_number(v) -> bool:
    """A Python / NumPy real number (not bool): something core can validate eagerly.

    Hyperparameters may also be 0-d arrays (an ``optax.inject_hyperparams``
    value, maybe traced under ``jax.jit``, or a torch tensor ``lr``); core
    leaves those unchecked, since checking would force a device sync or fail
    under tracing.  Adapters validate them where they are concrete.
    """
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def device(x):
    """``x``'s device; None for a traced JAX array (no ``.device``: asking for it raises an
    error whose message walks the whole trace so far, which made tracing quadratic in the
    number of parameters, 230 s for 24 matrices; jnp places new arrays right under jit)."""
    _, backend = namespace(x, names=("x",))
    if backend.is_traced(x):
        return None
    placement = getattr(backend, "placement", None)  # where new arrays beside x go, if not x's device
    return placement(x) if placement is not None else array_api_compat.device(x)
