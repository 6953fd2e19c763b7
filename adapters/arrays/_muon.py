"""``xpopt.adapters.arrays.muon``: Muon + AdamW/NAdamW fallback for NumPy / CuPy.

The options, routing, state and NaN policy are described in the package
docstring (:mod:`xpopt.adapters.arrays`); the containers come from ``_base``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from ...backends import backend_name, get_backend
from ...core.layout import is_dim_numbers, resolve_dim_spec
from ...core.routing import check_decay_flag, check_label, plan_leaf
from ...core.muon import MuonOptions
from .. import _signatures as S
from ...core._apply import apply_update
from ._base import (_cast, _check_shapes, _compute_dtype, _flatten_arrays, _matching, _rebuild, _zeros,
                    nonfinite_update)

__all__ = ["muon", "MuonState", "Muon"]


class MuonState(NamedTuple):
    """Optimizer state; the containers have the params' type (list/tuple/dict)."""

    step: int        # updates taken so far
    mu: Any          # Muon momentum buffers (None for fallback entries)
    exp_avg: Any     # fallback first moments (None for Muon entries)
    exp_avg_sq: Any  # fallback second moments (None for Muon entries)
    nonfinite_steps: int = 0  # steps that saw a non-finite gradient (nonfinite= policy)


_BUFFERS = ("mu", "exp_avg", "exp_avg_sq")  # MuonState's containers


def _state(step: int, kind, keys, *buffers) -> MuonState:
    """A MuonState of the entry lists ``buffers`` (mu, exp_avg, exp_avg_sq), rebuilt as ``kind``."""
    return MuonState(step, *(_rebuild(kind, keys, b) for b in buffers))


# --------------------------------------------------------------------------- routing


def _per_leaf(spec, params, keys, kind, argname: str, is_value, some_keys: bool = False) -> list:
    """``spec`` (one value, a container like ``params`` or a callable returning
    either) per entry.  ``some_keys`` (``labels``): a dict for dict params may list
    only some keys, the others get None (automatic), as if listed with None; a key
    params lacks is an error (a typo would otherwise route nothing).  Lists/tuples
    match params entry for entry."""
    if callable(spec) and not is_value(spec):
        spec = spec(params)
    if is_value(spec):
        return [spec] * len(keys)
    if some_keys and kind is dict and isinstance(spec, dict):
        unknown = [k for k in spec if k not in params]
        if unknown:
            raise ValueError(f"{argname} has keys that params lacks: {sorted(map(str, unknown))}; "
                             f"params keys are {sorted(map(str, keys))}")
        return [spec.get(k) for k in keys]
    return _matching(spec, keys, kind, argname)


def _real_dtype(x, dtype):
    """Adam's second moment is real: float32 for complex64, float64 for complex128."""
    xp = array_api_compat.array_namespace(x)
    if xp.isdtype(dtype, "complex floating"):
        return xp.float32 if dtype == xp.complex64 else xp.float64
    return dtype


def _is_label_value(v) -> bool:
    return v is None or isinstance(v, str)


def _is_dims_value(v) -> bool:
    return isinstance(v, str) or is_dim_numbers(v)


# --------------------------------------------------------------------------- optimizer


class Muon:
    """Returned by :func:`muon`: ``init(params)`` and ``update(grads, state, params)``."""

    def __init__(self, opts: MuonOptions, *, mu_dtype, weight_decay_mask, labels, dimension_numbers):
        self.options, self.fallback, self.nonfinite = opts, opts.fallback_options, opts.nonfinite
        self.mu_dtype, self.weight_decay_mask, self.labels = mu_dtype, weight_decay_mask, labels
        self.dimension_numbers = dimension_numbers
        self._warned: list = []

    def __repr__(self) -> str:
        o = self.options
        return (f"arrays.Muon(lr={o.lr!r}, momentum={o.momentum}, nesterov={o.nesterov}, "
                f"weight_decay={o.weight_decay}, fallback={self.fallback.fallback!r})")

    # routing ------------------------------------------------------------------
    def _plan(self, params, argname: str = "params"):
        keys, values, names, kind, lib = _flatten_arrays(params, argname)
        n = len(keys)
        labels = ([None] * n if self.labels is None else
                  _per_leaf(self.labels, params, keys, kind, "labels", _is_label_value, some_keys=True))
        dspec = "torch" if self.dimension_numbers is None else self.dimension_numbers
        dims = [resolve_dim_spec(d) for d in
                _per_leaf(dspec, params, keys, kind, "dimension_numbers", _is_dims_value)]
        if self.weight_decay_mask is None:
            decay = [True] * n
        else:
            flags = _per_leaf(self.weight_decay_mask, params, keys, kind, "weight_decay_mask",
                              lambda v: isinstance(v, bool))
            decay = [check_decay_flag(f, nm) for f, nm in zip(flags, names)]
        plans = [
            plan_leaf(x, nm, label=lab, dims=d, decay=dc, min_dim_size=self.options.min_dim_size,
                        max_aspect_ratio=self.options.max_aspect_ratio)
            for x, nm, lab, d, dc in zip(values, names, labels, dims, decay)
        ]
        return keys, values, names, kind, lib, plans

    def _stored_dtype(self, x):
        """What leaf ``x`` stores (state, updates) in: its compute dtype, or its own (``low_precision_dtype="param"``)."""
        return x.dtype if self.options.low_precision_dtype == "param" else _compute_dtype(x)

    def _state_dtype(self, x):
        if self.mu_dtype is None:
            return self._stored_dtype(x)
        xp = array_api_compat.array_namespace(x)
        if xp.isdtype(x.dtype, "complex floating") and not xp.isdtype(self.mu_dtype, "complex floating"):
            return xp.complex128 if self.mu_dtype == xp.float64 else xp.complex64
        return self.mu_dtype

    # API ------------------------------------------------------------------------
    def init(self, params) -> MuonState:
        """Zero state for ``params`` (a list, tuple or flat dict of NumPy/CuPy arrays)."""
        keys, values, _, kind, _, plans = self._plan(params)
        muon_vals = [x for x, p in zip(values, plans) if p.layout is not None]
        if muon_vals:
            x0 = muon_vals[0]
            self.options.warn_emulated_bf16(get_backend(x0).has_native_bf16(x0), self._warned)
        mu, m, v = [], [], []
        for x, p in zip(values, plans):
            if p.layout is not None:
                mu.append(_zeros(x, self._state_dtype(x)))
                m.append(None)
                v.append(None)
            else:
                mu.append(None)
                m.append(_zeros(x, self._state_dtype(x)))
                v.append(_zeros(x, _real_dtype(x, self._stored_dtype(x))))
        return _state(0, kind, keys, mu, m, v)

    def update(self, grads, state: MuonState, params=None):
        """``(updates, new_state)``; ``params`` is needed when weight decay is on.

        ``updates`` are deltas (add them with :func:`apply_updates`), in float32
        for float16 params and in the param dtype otherwise (every param's own
        dtype with ``low_precision_dtype="param"``).  A step skipped by
        ``nonfinite="skip"`` returns zero updates and the state unchanged but
        for ``nonfinite_steps``.
        """
        return nonfinite_update(self, self._update, grads, state, params, "arrays.muon")

    def _update(self, grads, state: MuonState, params=None):
        if not isinstance(state, MuonState):
            raise TypeError(f"state must be the MuonState returned by init(), got {type(state).__name__}")
        _flatten_arrays(grads, "grads")  # a container of arrays of one library (TypeError otherwise)
        if params is not None:
            keys, pvals, names, kind, lib, plans = self._plan(params)
            gvals = _matching(grads, keys, kind, "grads")
            glib = backend_name(gvals[0]) if gvals else lib
            if glib != lib:
                raise TypeError(f"grads are {glib} arrays but params are {lib} arrays")
            _check_shapes(gvals, pvals, names, "grad")
        else:
            keys, _, names, kind, lib, plans = self._plan(grads, "grads")
            pvals = [None] * len(keys)
        wd, fwd = self.options.weight_decay, self.options.fallback_weight_decay_value
        if params is None and any(p.decay and (wd if p.layout is not None else fwd) for p in plans):
            raise ValueError("weight decay needs the current parameters: call update(grads, state, params)")
        bufs, ms, vs = (_matching(getattr(state, f), keys, kind, f"state.{f}", "grads") for f in _BUFFERS)
        for nm, p, b, m in zip(names, plans, bufs, ms):
            if (b if p.layout is not None else m) is None:
                raise ValueError(
                    f"{nm} is routed to {'Muon' if p.layout is not None else 'the fallback'} now but was "
                    "not at init: labels/dimension_numbers must route the same way on every call")

        step = int(state.step)
        lr_t, flr_t = (r(step) if callable(r) else r for r in (self.options.lr, self.options.fallback_lr_value))
        out: list = [None] * len(keys)
        new_mu, new_m, new_v = list(bufs), list(ms), list(vs)

        idx, mats = [], []
        for i, (g, p, b) in enumerate(zip(gvals, plans, bufs)):
            if p.layout is None:
                continue
            cdt = _compute_dtype(g)
            nb, u = self.options.momentum_step(_cast(b, cdt), _cast(g, cdt), step=step + 1)
            new_mu[i] = _cast(nb, b.dtype)
            idx.append(i)
            mats.append(p.layout.to_torch(u))
        # ns_dtype="auto" is resolved by core per matrix (complex ones stay complex)
        squeeze = [plans[i].layout.native for i in idx]  # torch's (1, seq, d) convention: torch-layout leaves only
        for i, d in zip(idx, self.options.orthogonalize(mats, step=step + 1, squeeze_leading=squeeze)):
            d = plans[i].layout.from_torch(d)
            out[i] = _cast(apply_update(pvals[i], d, lr_t, wd if plans[i].decay else 0), self._stored_dtype(gvals[i]))

        for i, (g, p, m, v) in enumerate(zip(gvals, plans, ms, vs)):
            if p.layout is not None:
                continue
            cdt = _compute_dtype(g)
            direction, m2, v2 = self.fallback.direction(_cast(g, cdt), _cast(m, cdt),
                                                         _cast(v, _real_dtype(g, cdt)), step + 1)
            new_m[i], new_v[i] = _cast(m2, m.dtype), _cast(v2, v.dtype)
            out[i] = _cast(apply_update(pvals[i], direction, flr_t, fwd if p.decay else 0), self._stored_dtype(g))

        return _rebuild(kind, keys, out), _state(step + 1, kind, keys, new_mu, new_m, new_v)


@S.takes("arrays.muon")
def muon(weight_decay_mask, labels, dimension_numbers, **args) -> Muon:
    """Muon (matrices) + AdamW/NAdamW (the rest) for NumPy/CuPy params.

    ``lr`` and ``fallback_lr`` (None = ``lr``) are floats >= 0 or callables
    ``step -> float`` (``step`` = updates taken so far, 0 at the first).
    ``weight_decay_mask``: None (decay all), True/False, a container like params
    of bools, or a callable ``params -> such a container``.  ``mu_dtype``: dtype of
    Muon's momentum and the fallback's first moment (None: float32 for float16
    params, else the param dtype).  Every other option is documented in
    ``docs/adapters.md`` and :func:`xpopt.adapters.optax.muon`; ``nonfinite``:
    None (no check), ``"skip"``, ``"zero"`` or ``"raise"`` (``xpopt.core.fault``).
    The returned optimizer's ``hyperparameters`` are the options (what ``xpopt.checkpoint``
    records and compares with ``optimizer=opt``).
    """
    from ... import _checkpoint_format as CK

    record = CK.record_options("muon", args)
    opts = S.options("arrays.muon", args)
    mu_dtype = opts.mu_dtype
    if isinstance(mu_dtype, str):
        import numpy as np  # a dtype name -> a numpy dtype, which cupy accepts too

        try:
            mu_dtype = np.dtype(mu_dtype)
        except TypeError:
            raise TypeError(f"mu_dtype={mu_dtype!r} is not available for numpy/cupy state") from None
    if isinstance(dimension_numbers, str) or is_dim_numbers(dimension_numbers):
        resolve_dim_spec(dimension_numbers)
    if isinstance(labels, str):
        check_label(labels, "every entry")
    opt = Muon(opts, mu_dtype=mu_dtype, weight_decay_mask=weight_decay_mask, labels=labels,
               dimension_numbers=dimension_numbers)
    opt.hyperparameters = record
    return opt
