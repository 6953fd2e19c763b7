"""The containers both arrays optimizers share (bottom of ``xpopt.adapters.arrays``).

A container is a list, tuple or flat dict of NumPy / CuPy arrays:
:func:`_flatten` takes one apart, :func:`_rebuild` puts it back, :func:`_matching`
lines a second one up with the first, :func:`_check_arrays` says which library
they belong to.  :func:`nonfinite_update` runs an ``update`` under the
``nonfinite=`` policy; :func:`apply_updates` adds the deltas.  Nothing here
imports the optimizer modules above it.
"""

from __future__ import annotations


import array_api_compat

from ...backends import backend_name
from ...core._check import is_low_precision
from .._fault import eager_gate

_LIBS = ("numpy", "cupy")


def _flatten(container, argname: str):
    """``(keys, values, names, kind)`` for a list, tuple or flat dict."""
    if isinstance(container, dict):
        keys = list(container)
        return keys, [container[k] for k in keys], [f"{argname}[{k!r}]" for k in keys], dict
    if isinstance(container, (list, tuple)):
        n = len(container)
        return list(range(n)), list(container), [f"{argname}[{i}]" for i in range(n)], type(container)
    raise TypeError(
        f"{argname} must be a list, tuple or flat dict of arrays, got {type(container).__name__}"
    )


def _rebuild(kind, keys, values):
    if kind is dict:
        return dict(zip(keys, values))
    return kind(values) if kind in (list, tuple) else list(values)


def _matching(container, keys, kind, argname: str, ref: str = "params") -> list:
    """Values of ``container`` in ``keys`` order; ValueError unless it matches ``ref``."""
    if isinstance(container, dict) != (kind is dict) or not isinstance(container, (dict, list, tuple)):
        raise ValueError(
            f"{argname} must be a {'dict' if kind is dict else 'list/tuple'} matching {ref}, "
            f"got {type(container).__name__}")
    k2, vals, _, _ = _flatten(container, argname)
    if (kind is dict and set(k2) != set(keys)) or len(k2) != len(keys):
        raise ValueError(
            f"{argname} does not match {ref}: expected {'keys ' + str(sorted(map(str, keys))) if kind is dict else str(len(keys)) + ' entries'}, "
            f"got {'keys ' + str(sorted(map(str, k2))) if kind is dict else str(len(k2)) + ' entries'}")
    if kind is dict:
        return [container[k] for k in keys]
    return vals



def _check_arrays(values, names, argname: str) -> str:
    """The library (numpy/cupy) shared by ``values``; TypeError on anything else or a mix."""
    libs = []
    for x, nm in zip(values, names):
        try:
            lib = backend_name(x)
        except TypeError:
            lib = None
        if lib not in _LIBS:
            what = type(x).__module__ + "." + type(x).__name__
            hint = {"torch": " (use xpopt.adapters.torch)", "jax": " (use xpopt.adapters.optax)"}.get(lib or "", "")
            raise TypeError(f"{nm} is a {what}; xpopt.adapters.arrays takes NumPy or CuPy arrays{hint}")
        libs.append(lib)
    if len(set(libs)) > 1:
        i = next(j for j, lib in enumerate(libs) if lib != libs[0])
        raise TypeError(
            f"{argname} mixes array libraries ({names[0]}: {libs[0]}, {names[i]}: {libs[i]}); "
            "move them all to one (numpy or cupy) first")
    return libs[0] if libs else "numpy"


def _flatten_arrays(container, argname: str):
    """:func:`_flatten` and :func:`_check_arrays`: ``(keys, values, names, kind, lib)``."""
    keys, values, names, kind = _flatten(container, argname)
    return keys, values, names, kind, _check_arrays(values, names, argname)


def _check_shapes(values, params, names, what: str) -> None:
    """ValueError unless each of ``values`` (grads, updates) has its param's shape."""
    for x, p, nm in zip(values, params, names):
        if tuple(x.shape) != tuple(p.shape):
            raise ValueError(f"{what} for {nm} has shape {tuple(x.shape)}, param has {tuple(p.shape)}")


def _compute_dtype(x):
    xp = array_api_compat.array_namespace(x)
    return xp.float32 if is_low_precision(x.dtype) else x.dtype


def _cast(x, dtype):
    return x if x.dtype == dtype else x.astype(dtype)


def _zeros(x, dtype):
    return array_api_compat.array_namespace(x).zeros_like(x, dtype=dtype)



def nonfinite_update(opt, update, grads, state, params, who):
    """``update(grads, state, params)`` under ``opt.nonfinite`` (shared with arrays.kron)."""
    carried = getattr(state, "nonfinite_steps", 0)
    if opt.nonfinite is None:
        upd, new = update(grads, state, params)
        return upd, new._replace(nonfinite_steps=carried)
    keys, gvals, gnames, kind = _flatten(grads, "grads")
    proceed, gvals, counted = eager_gate(opt.nonfinite, gvals, gnames, who)
    if not proceed:
        return _rebuild(kind, keys, [_zeros(g, getattr(opt, "_stored_dtype", _compute_dtype)(g)) for g in gvals]), \
            state._replace(nonfinite_steps=carried + 1)
    upd, new = update(_rebuild(kind, keys, gvals) if counted else grads, state, params)
    return upd, new._replace(nonfinite_steps=carried + int(counted))


def apply_updates(params, updates):
    """``params + updates`` entry by entry, cast back to each param's dtype (one rounding)."""
    keys, pvals, names, kind = _flatten(params, "params")
    uvals = _matching(updates, keys, kind, "updates")
    _check_shapes(uvals, pvals, names, "update")
    return _rebuild(kind, keys, [_cast(p + u, p.dtype) for p, u in zip(pvals, uvals)])

