"""Validation of option values, shared by every optimizer's options dataclass.

Messages name the option, the value and what is allowed.  Continuous
hyperparameters may be 0-d arrays (``optax.inject_hyperparams``, a torch
tensor ``lr``): checked when concrete, left alone when traced (reading a
traced value is impossible, and a device check would sync every step).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import array_api_compat

from ..backends import get_backend

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def _check_real(value, argname: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argname} must be a real number, got {value!r}")
    bad = value <= minimum if strict else value < minimum
    if bad or math.isnan(value):
        op = ">" if strict else ">="
        raise ValueError(f"{argname} must be {op} {minimum}, got {value!r}")
    return float(value)


def check_nonnegative(value, argname: str) -> float:
    return _check_real(value, argname, minimum=0.0)


def _check_bool(value, argname: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{argname} must be True or False, got {value!r}")
    return value


def _check_choice(value, choices, argname: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{argname}={value!r} is not valid; use one of {list(choices)}")
    return value


def is_array_scalar(x) -> bool:
    """A 0-d array (e.g. a value injected by ``optax.inject_hyperparams``, maybe traced)."""
    return not isinstance(x, numbers.Number) and getattr(x, "shape", None) == () and hasattr(x, "dtype")


def is_traced(x) -> bool:
    """True for an abstract array (inside ``jax.jit``): its value is unknown until run time."""
    return get_backend(x).is_traced(x)


def check_array_hyper(value, argname: str, *, minimum: float = 0.0, strict: bool = False,
                      below: Optional[float] = None):
    """Range-check a 0-d array hyperparameter when it is concrete; returns ``value`` unchanged.

    A traced one (``optax.inject_hyperparams`` under ``jax.jit``) is left unchecked:
    reading it is impossible there, and checking on device would cost a sync per step.
    """
    if is_traced(value):
        return value
    v = float(value)
    ok = (v > minimum if strict else v >= minimum) and (below is None or v < below)
    if not ok:  # NaN fails every comparison
        rng = f"in [{minimum:g}, {below:g})" if below is not None else f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{argname} must be {rng}, got {value!r}")
    return value


def check_scalar_hyper(value, argname: str, *, minimum: float = 0.0, strict: bool = False,
                       below: Optional[float] = None):
    """A continuous hyperparameter: a real number or a 0-d array.

    Numbers and concrete 0-d arrays are range-checked and returned as float;
    a traced 0-d array is returned unchanged (see :func:`check_array_hyper`).
    """
    if is_array_scalar(value):
        check_array_hyper(value, argname, minimum=minimum, strict=strict, below=below)
        return value if is_traced(value) else float(value)
    if below is not None and isinstance(value, numbers.Real) and not isinstance(value, bool) \
            and not value < below:
        raise ValueError(f"{argname} must be in [{minimum:g}, {below:g}), got {value!r}")
    return _check_real(value, argname, minimum=minimum, strict=strict)


def static_number(value, argname: str, *, integer: bool):
    """A Python int/float for an option that shapes the computation (None stays None).

    A concrete 0-d array is converted; a traced one cannot be, so the error says
    how to keep the option static under ``optax.inject_hyperparams``.
    """
    if not is_array_scalar(value):
        return value
    if is_traced(value):
        raise TypeError(
            f"{argname} is a traced array: optax.inject_hyperparams turns numeric arguments into "
            f"arrays, traced under jax.jit, but {argname} sets the shape of the computation and "
            f"must be a Python number. List it in static_args, e.g. optax.inject_hyperparams(xo.muon, "
            f"static_args=xo.STATIC_ARGS) (xo = xpopt.adapters.optax), or leave it at its default")
    xp = array_api_compat.array_namespace(value)
    if integer:
        if not xp.isdtype(value.dtype, "integral"):
            raise ValueError(f"{argname} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _host_number(value):
    """A NumPy 0-d array / scalar as a Python float; any other array unchanged.

    A NumPy value is concrete and on the host, so nothing is lost by reading it,
    and a float keeps the update in the parameters' dtype: ``np.asarray(0.1)`` is
    float64, and multiplying float32 updates by it would promote them (and the
    parameters after ``apply_updates``) to float64.  Other arrays stay arrays: a
    jax value may be traced under ``optax.inject_hyperparams``, a torch tensor
    ``lr`` is torch.optim's own convention.
    """
    return float(value) if type(value).__module__ == "numpy" else value


def host_numbers(options) -> None:
    """Replace every NumPy 0-d field of a frozen options dataclass by its Python number.

    For options that are validated as numbers (``KronOptions``' ``b1``,
    ``block_size``, ...): a 0-d NumPy value is then accepted wherever a number
    is, and gives the float's result (see :func:`_host_number`).
    """
    import dataclasses

    for f in dataclasses.fields(options):
        v = getattr(options, f.name)
        if type(v).__module__ == "numpy" and getattr(v, "shape", None) == ():
            object.__setattr__(options, f.name, v.item())


def check_lr(value, argname: str):
    """A float >= 0, a 0-d array (checked when concrete), or a schedule (callable step -> float).

    Schedules and arrays are returned unchanged, except NumPy 0-d arrays, returned as float.
    """
    if callable(value):
        return value
    if is_array_scalar(value):
        return _host_number(check_array_hyper(value, argname))
    return check_nonnegative(value, argname)


def check_hyper(value, argname: str):
    """A float >= 0 or a 0-d array (weight decays, checked when concrete); float or unchanged.

    As :func:`check_lr`: a NumPy 0-d array is returned as float.
    """
    if is_array_scalar(value):
        return _host_number(check_array_hyper(value, argname))
    return check_nonnegative(value, argname)


def is_on(value) -> bool:
    """False only for a Python/NumPy zero; an array (maybe traced) counts as on."""
    return True if is_array_scalar(value) else bool(value)


def _check_dtype_spec(spec, argname: str, *, auto: bool = False):
    if spec is None:
        return None
    if auto and isinstance(spec, str) and spec == "auto":
        return spec
    if isinstance(spec, str):
        if spec not in _FLOAT_NAMES:
            raise ValueError(f"{argname}={spec!r} is not a floating dtype name; use one of {list(_FLOAT_NAMES)}")
        return spec
    name = dtype_name(spec)
    if name not in _FLOAT_NAMES:
        raise TypeError(f"{argname}={spec!r} is not a floating dtype; use float32, float64 or bfloat16")
    # Hand core the name: it resolves names for every backend, while dtype *classes*
    # such as jnp.bfloat16 / np.float32 are not understood by backends.resolve_dtype.
    return name


def dtype_name(dtype) -> str:
    """``"bfloat16"``, ``"float32"``, ... for a dtype object, dtype class or name."""
    if isinstance(dtype, str):
        return dtype
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        name = getattr(dtype, "__name__", None) or str(dtype)
    return name.rsplit(".", 1)[-1]


def is_low_precision(dtype) -> bool:
    return dtype_name(dtype) in ("bfloat16", "float16")


def check_real(value, argname: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    """A real number (not bool) >= ``minimum`` (> if ``strict``), as float."""
    return _check_real(value, argname, minimum=minimum, strict=strict)


def check_bool(value, argname: str) -> bool:
    return _check_bool(value, argname)


def check_choice(value, choices, argname: str) -> str:
    return _check_choice(value, choices, argname)


def check_dtype_spec(spec, argname: str, *, auto: bool = False):
    """None, a floating dtype name, a dtype object (returned as its name) or ``"auto"`` if allowed."""
    return _check_dtype_spec(spec, argname, auto=auto)


def check_int(value, argname: str, *, minimum: int = 1, optional: bool = False):
    """A Python int >= ``minimum`` (a concrete 0-d integer array is converted; None if optional)."""
    if optional and value is None:
        return None
    value = static_number(value, argname, integer=True)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{argname} must be an integer >= {minimum}, got {value!r}")
    return int(value)
