"""Drop-ins for ``optax.contrib.muon`` and ``optax.contrib.scale_by_muon`` (optax 0.2.8).

Change the import, keep the call::

    from xpopt.compat.optax_contrib import muon     # was: from optax.contrib import muon
    tx = muon(learning_rate=0.02, weight_decay=0.1)

Same signature (names, order, defaults, positional/keyword-only), the same
defaults, option meanings and routing rule as optax 0.2.8; the maths is
xpopt's one definition of Muon (``core.muon.MuonOptions``), run by
``xpopt.adapters.optax.muon`` / ``scale_by_muon``.  This module is only the
mapping table from optax's options to those (below, and with the reasons in
``docs/compat.md``); every value is validated by the definition, errors name
the option.

Trajectories agree with optax's to float32 rounding
(``tests/test_compat_optax_contrib.py``).  What differs, on purpose:

* the state is xpopt's (:class:`xpopt.adapters.optax.MuonAdamWState` /
  ``MuonState``), not optax's ``PartitionState``: the same information
  (momentum, Adam moments, the count), not the same tree;
* bf16/f16 parameters: state and updates are stored in the parameter's dtype,
  as optax stores them, but computed in float32 (optax computes the momentum,
  Newton-Schulz and Adam in the low precision itself);
* ``ns_steps`` stays a Python int under ``optax.inject_hyperparams``: its
  default is a marker equal to 5 that ``inject_hyperparams`` passes through
  (it injects ints, floats and arrays only), because xpopt unrolls the
  Newton-Schulz steps; an explicit ``ns_steps`` there must be listed in
  ``static_args`` (optax's own tests treat it as uninjectable);
* ``scale_by_muon`` also takes optax's preset names ``'standard'`` /
  ``'dion'`` for ``ns_coeffs`` (optax's fails on a string in ``init``);
* one layout is a ``ValueError`` instead of optax's per-slice matrices: a
  fan-out of size 1 on axis 0, the fan-in on axis 1 and batch axes after them
  (torch's own axis order, where xpopt reads ``(1, n, ...)`` as an ``(n, ...)``
  matrix, torch's convention).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np
from optax.contrib import MuonDimensionNumbers

from ..adapters.optax import _muon as _xo
from ..core._check import is_array_scalar, is_traced, static_number
from ..core.layout import is_dim_numbers, layout_for, resolve_dim_spec

__all__ = ["muon", "scale_by_muon", "MuonDimensionNumbers", "NS_PRESETS", "NS_STEPS_DEFAULT"]

#: optax's default ``ns_coeffs`` (Keller Jordan's triple; our preset ``"original"``).
_DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)
#: optax's ``ns_coeffs`` presets -> ours (the same numbers; the tests compare them with optax's table).
NS_PRESETS = {"standard": "original", "dion": "quintic"}


class _NsStepsDefault:
    """optax's ``ns_steps=5`` default, as a value ``optax.inject_hyperparams`` leaves alone.

    It compares equal to 5 (so the signature's default equals optax's) and is
    not an int, so ``inject_hyperparams`` passes it through as a static
    argument instead of turning it into an array that is traced under jit.
    """

    __slots__ = ()

    def __eq__(self, other):
        if isinstance(other, _NsStepsDefault):
            return True
        return isinstance(other, numbers.Integral) and not isinstance(other, bool) and other == 5

    def __hash__(self):
        return hash(5)

    def __int__(self):
        return 5

    __index__ = __int__

    def __repr__(self):
        return "5"


#: The ``ns_steps`` default of :func:`muon` and :func:`scale_by_muon` (equal to optax's 5).
NS_STEPS_DEFAULT = _NsStepsDefault()


# --------------------------------------------------------------------------- the mapping


def _ns(ns_coeffs, ns_steps) -> dict:
    """optax's ``(ns_coeffs, ns_steps)`` -> ``ns_coefficients`` / ``ns_steps``.

    optax's rule (``scale_by_muon``'s init): a single triple runs ``ns_steps``
    times; a table of per-step triples (``'dion'`` among them) runs every row
    once, and optax rejects an ``ns_steps`` below the row count.
    """
    if isinstance(ns_steps, _NsStepsDefault):
        steps = 5
    elif is_array_scalar(ns_steps) and is_traced(ns_steps):
        raise TypeError(
            "ns_steps is a traced array: optax.inject_hyperparams turns an explicit ns_steps into one, but "
            "xpopt unrolls the Newton-Schulz steps, so it must be a Python int. List it in static_args "
            "(optax.inject_hyperparams(muon, static_args=('ns_steps',)), as optax's own tests do) or leave "
            "it at its default")
    else:
        steps = static_number(ns_steps, "ns_steps", integer=True)  # a concrete array -> int; the rest as given
    if isinstance(ns_coeffs, str):
        if ns_coeffs not in NS_PRESETS:
            raise ValueError(f"ns_coeffs={ns_coeffs!r} is not an optax.contrib.muon preset; use one of "
                             f"{sorted(NS_PRESETS)} or (a, b, c) triples")
        preset = NS_PRESETS[ns_coeffs]
        table = ns_coeffs == "dion"
        coefficients, rows = preset, 5
    else:
        if isinstance(ns_coeffs, jax.core.Tracer):
            raise TypeError("ns_coeffs is a traced array (optax.inject_hyperparams injects arrays): give it as "
                            "a tuple, or list 'ns_coeffs' in static_args")
        arr = np.asarray(ns_coeffs, dtype=np.float64)
        if arr.ndim not in (1, 2) or arr.shape[-1] != 3:
            raise ValueError(f"ns_coeffs must have shape (3,) or (n, 3) (optax's rule), got shape {arr.shape}")
        table, rows = arr.ndim == 2, arr.shape[0]
        coefficients = tuple(map(tuple, arr.tolist())) if table else tuple(arr.tolist())
    if not table:
        return {"ns_coefficients": coefficients, "ns_steps": steps}
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps < rows:
        raise ValueError(f"ns_steps={steps} is fewer than the {rows} per-step triples of ns_coeffs: optax runs "
                         f"every listed triple (ns_steps only has to be >= their count) and rejects this; give "
                         f"ns_steps >= {rows} or fewer triples")
    return {"ns_coefficients": coefficients, "ns_steps": None}


def _is_dims_leaf(x) -> bool:
    return x is None or is_dim_numbers(x)


def _full_dims(spec, tree):
    """``spec`` (a tree or prefix of dimension numbers / None, or a callable) broadcast to ``tree``."""
    spec = spec(tree) if callable(spec) else spec
    try:
        return jax.tree.broadcast(spec, tree, is_leaf=_is_dims_leaf)
    except (ValueError, TypeError) as e:
        raise ValueError(f"muon_weight_dimension_numbers does not match the params tree (give the same "
                         f"structure, or a prefix of it, with None for Adam's leaves): {e}") from None


def _routing(dimension_numbers):
    """optax's routing as ``(labels, dimension_numbers)`` for ``xo.muon``.

    optax (L.660-675): without dimension numbers every 2-D leaf goes to Muon
    (``MuonDimensionNumbers()``: axis 0 fan-in, axis 1 fan-out) and the rest
    to Adam; with them, exactly the leaves with a ``MuonDimensionNumbers``
    (whatever their shape) go to Muon.  Our labels say so outright, so core's
    shape ``suitability`` plays no part.
    """
    if dimension_numbers is None:
        return (lambda t: jax.tree.map(lambda x: "muon" if x.ndim == 2 else "fallback", t)), MuonDimensionNumbers()

    def label(path, d, x):
        if d is None:
            return "fallback"
        if x.ndim > 2 and layout_for(x.shape, resolve_dim_spec(d), "").native and x.shape[0] == 1:
            raise ValueError(
                f"muon_weight_dimension_numbers gives params{jax.tree_util.keystr(path)} (shape "
                f"{tuple(x.shape)}) a fan-out of size 1 on axis 0, the fan-in on axis 1 and batch axes after "
                "them: that is torch's own layout, where xpopt reads a (1, n, ...) parameter as an (n, ...) "
                "matrix (torch's convention), so optax's per-slice (1, n) matrices cannot be honoured; put the "
                "batch axes first (transpose the parameter) or send it to Adam (None)")
        return "muon"

    def labels(t):
        return jax.tree_util.tree_map_with_path(label, _full_dims(dimension_numbers, t), t, is_leaf=_is_dims_leaf)

    return labels, dimension_numbers


def _decay_mask(weight_decay_mask, labels):
    """optax masks Muon's weight decay only (its Adam half decays every leaf by ``adam_weight_decay``);
    ``xo.muon``'s mask covers both halves, so Adam's leaves are always True in it."""
    if weight_decay_mask is None:
        return None

    def mask(t):
        user = weight_decay_mask(t) if callable(weight_decay_mask) else weight_decay_mask
        try:
            user = jax.tree.broadcast(user, t)
        except (ValueError, TypeError) as e:
            raise ValueError(f"weight_decay_mask does not match the params tree (give the same structure, or "
                             f"a prefix of it, of bools): {e}") from None
        return jax.tree.map(lambda lab, m: m if lab == "muon" else True, labels(t), user)

    return mask


def _ns_eps(eps, preconditioning):
    """The Newton-Schulz ``eps``: optax's for ``frobenius`` / ``spectral`` (added to the norm, L.340-342);
    ``aol`` / ``schatten`` have no norm prescale, and their first step floors its row sums / norm at its
    own default 1e-8 (optax 0.2.8's iterators do not pass ``eps`` on, L.253-270), whatever ``eps`` is."""
    return 1e-8 if isinstance(preconditioning, str) and preconditioning in ("aol", "schatten") else eps


#: Options of ``xo.muon`` that optax has no name for: fixed to what optax computes.
_FIXED = dict(
    momentum_form="ema",                # optax.tree.update_moment: mu = beta*mu + (1-beta)*g
    momentum_bias_correction=True,      # mu / (1-beta^t); nesterov: the separately corrected mix (L.486-497)
    eps_mode="add",                     # x / (||x|| + eps) (L.340-342)
    safety_factor=1.0,
    conv_mode="batched",                # extra axes are vmapped, one matrix per slice (L.366) ...
    normalize_spatial=False,            # ... each with the slice's own LR scale
    ns_dtype=None,                      # float32 for bf16/f16 leaves (optax: the leaf's dtype)
    ns_method="standard",
    batched="auto",
    low_precision_dtype="param",        # state and updates in each param's dtype, as optax
    nonfinite=None,
)


#: xpopt's names of the options optax spells otherwise (error messages name both).
_OUR_NAMES = {
    "momentum": "beta", "ns_coefficients": "ns_coeffs", "betas": "adam_b1/adam_b2",
    "fallback_eps_root": "adam_eps_root", "fallback_weight_decay": "adam_weight_decay",
    "fallback_learning_rate": "adam_learning_rate", "fallback_lr": "adam_learning_rate",
    "dimension_numbers": "muon_weight_dimension_numbers / weight_dimension_numbers",
}


def _forward(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; an error about an option optax names otherwise says optax's name too."""
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError) as e:
        named = [f"{ours} is optax's {theirs}" for ours, theirs in _OUR_NAMES.items() if ours in str(e)]
        if not named:
            raise
        raise type(e)(f"{e} (xpopt.compat.optax_contrib: {'; '.join(named)})") from None


def muon(
    learning_rate,
    ns_coeffs=_DEFAULT_NS_COEFFS,
    ns_steps=NS_STEPS_DEFAULT,
    beta=0.95,
    eps=1e-8,
    weight_decay=0.0,
    weight_decay_mask=None,
    mu_dtype=None,
    *,
    nesterov=True,
    adaptive=False,
    preconditioning="frobenius",
    adam_b1=0.9,
    adam_b2=0.999,
    adam_eps_root=0.0,
    adam_weight_decay=0.0,
    adam_learning_rate=None,
    muon_weight_dimension_numbers=None,
    consistent_rms=None,
) -> Any:
    """``optax.contrib.muon`` (0.2.8): Muon for matrices, AdamW for the rest; xpopt's maths.

    Arguments as optax's; each one's mapping onto ``xpopt.adapters.optax.muon``
    is listed in ``docs/compat.md``.  Returns xpopt's transform
    (``GradientTransformationExtraArgs``, state ``MuonAdamWState``).
    """
    labels, dims = _routing(muon_weight_dimension_numbers)
    return _forward(
        _xo.muon,
        learning_rate,
        **_ns(ns_coeffs, ns_steps),
        momentum=beta,
        eps=_ns_eps(eps, preconditioning),           # Newton-Schulz prescale ...
        fallback_eps=eps,                            # ... and Adam, one eps as in optax
        weight_decay=weight_decay,                   # Muon leaves only (masked) ...
        fallback_weight_decay=adam_weight_decay,     # ... Adam leaves, unmasked
        weight_decay_mask=_decay_mask(weight_decay_mask, labels),
        mu_dtype=mu_dtype,
        nesterov=nesterov,
        fallback="nadamw_dozat" if nesterov else "adamw",   # optax.adamw(nesterov=nesterov)
        adaptive=adaptive,
        preconditioning=preconditioning,
        betas=(adam_b1, adam_b2),
        fallback_eps_root=adam_eps_root,
        fallback_learning_rate=adam_learning_rate,   # None: learning_rate, as optax
        labels=labels,
        dimension_numbers=dims,
        adjust_lr_fn="original" if consistent_rms is None else "match_rms_adamw",
        consistent_rms=consistent_rms,
        **_FIXED,
    )


def _every_leaf_2d(t):
    """optax's ``weight_dimension_numbers=None`` for scale_by_muon: every leaf is a 2-D matrix."""
    paths, _ = jax.tree_util.tree_flatten_with_path(t)
    for path, x in paths:
        if x.ndim != 2:
            raise ValueError(
                f"scale_by_muon(weight_dimension_numbers=None) treats every leaf as a 2-D matrix (optax's "
                f"rule), but params{jax.tree_util.keystr(path)} has shape {tuple(x.shape)}: give "
                "weight_dimension_numbers (MuonDimensionNumbers per leaf) or route it elsewhere (optax.partition)")
    return jax.tree.map(lambda _: MuonDimensionNumbers(), t)


def scale_by_muon(
    ns_coeffs=_DEFAULT_NS_COEFFS,
    ns_steps=NS_STEPS_DEFAULT,
    beta=0.95,
    eps=1e-8,
    mu_dtype=None,
    *,
    nesterov=True,
    adaptive=False,
    preconditioning="frobenius",
    weight_dimension_numbers=None,
) -> Any:
    """``optax.contrib.scale_by_muon`` (0.2.8): the orthogonalised, bias-corrected momentum.

    No shape scaling (optax applies it in ``muon``'s chain, ``scale_by_shape``),
    no learning rate, no weight decay: chain them yourself, as with optax's.
    Returns xpopt's transform (state ``MuonState``).
    """
    if weight_dimension_numbers is None:
        dims = _every_leaf_2d
    else:
        check = _routing(weight_dimension_numbers)[0]   # raises for per-slice layouts we cannot honour

        def dims(t):
            check(t)
            return weight_dimension_numbers(t) if callable(weight_dimension_numbers) else weight_dimension_numbers
    return _forward(
        _xo.scale_by_muon,
        dimension_numbers=dims,
        **_ns(ns_coeffs, ns_steps),
        momentum=beta,
        eps=_ns_eps(eps, preconditioning),
        mu_dtype=mu_dtype,
        nesterov=nesterov,
        adaptive=adaptive,
        preconditioning=preconditioning,
        adjust_lr_fn="none",
        consistent_rms=None,
        **_FIXED,
    )
