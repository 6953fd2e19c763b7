"""PSGD Kron for NumPy / CuPy arrays, functional (``xpopt.adapters.arrays.kron``).

::

    opt = arrays.kron(lr=1e-3, b1=0.95, weight_decay=0.0, preconditioner_update_style="skew")
    state = opt.init(params)                 # list, tuple or flat dict of arrays
    updates, state = opt.update(grads, state, params)
    params = arrays.apply_updates(params, updates)

Same options, state content and random draws as ``xpopt.adapters.torch.Kron``
(parameter ``i`` in container order starts with the key ``fold_in(PRNGKey(seed), i)``,
kept in ``state.param_keys``, so a checkpoint carries it with the parameter),
so the same seed gives the same numbers; ``update`` returns the deltas
``-lr * (D + weight_decay * W)``.  ``dtype="bfloat16"`` stores factors as
``ml_dtypes.bfloat16`` on NumPy (exact, slow); ``"float32"`` is the NumPy default here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ...backends import resolve_dtype
from ...core import blocking
from ...core._apply import apply_update
from ...core import kron as K
from ...core import random as R
from ...core._xp import is_number, namespace
from .. import _signatures as S
from ._base import _flatten, _flatten_arrays, _matching, _rebuild, nonfinite_update

__all__ = ["KronState", "Kron", "kron"]


class KronState(NamedTuple):
    step: int        # updates taken so far
    key: Any         # uint32[2]: PRNGKey(seed)
    mu: list         # momentum per param (None when b1 == 0)
    factors: list    # core.kron.Factors per param
    nonfinite_steps: int = 0  # steps that saw a non-finite gradient (nonfinite= policy)
    param_keys: Any = None    # each param's own key, uint32[2] (fold_in(key, i) at init; None: derived so)


class Kron:
    """``init`` / ``update`` pair; build it with :func:`kron`."""

    def __init__(self, lr, weight_decay, opts: K.KronOptions, scanned, seed, nonfinite=None):
        self.lr, self.weight_decay, self.opts, self.scanned, self.seed = lr, weight_decay, opts, scanned, seed
        self.nonfinite = nonfinite

    def _layouts(self, values):
        flags = self.scanned if isinstance(self.scanned, (list, tuple)) else [bool(self.scanned)] * len(values)
        return [blocking.layout(x.shape, max_size_dense=self.opts.max_size_dense, block_size=self.opts.block_size,
                                scanned=s) for x, s in zip(values, flags)]

    def init(self, params) -> KronState:
        keys, values, names, _, _ = _flatten_arrays(params, "params")
        use_mu = not (is_number(self.opts.b1) and self.opts.b1 == 0)
        mu, factors = [], []
        for x, lay in zip(values, self._layouts(values)):
            xp, backend = namespace(x, names=("params",))
            fdt = resolve_dtype(xp, backend, self.opts.dtype)
            mname = self.opts.momentum_dtype(xp.finfo(x.dtype).bits)   # the state-dtype rule
            mdt = x.dtype if mname is None else resolve_dtype(xp, backend, mname)
            mu.append(xp.zeros(x.shape, dtype=mdt) if use_mu else None)
            factors.append(K.init_factors(xp.zeros((0,), dtype=xp.float32), lay, dtype=fdt,
                                          init_scale=self.opts.preconditioner_init_scale))
        like = values[0] if values else None
        key = R.PRNGKey(self.seed, like=like if like is not None else _np_like())
        return KronState(0, key, mu, factors, param_keys=[K.param_key(key, i) for i in range(len(values))])

    def update(self, grads, state: KronState, params=None):
        """``(updates, new_state)``; the ``nonfinite=`` policy as ``arrays.muon``."""
        return nonfinite_update(self, self._update, grads, state, params, "arrays.kron")

    def _update(self, grads, state: KronState, params=None):
        keys, gs, _, kind = _flatten(grads, "grads")
        t = state.step + 1
        lays = self._layouts(gs)
        ps = _matching(params, keys, kind, "params", "grads") if params is not None else [None] * len(gs)
        out, new_mu, new_f = [], [], []
        for i, (g, mu, f, lay, p) in enumerate(zip(gs, state.mu, state.factors, lays, ps)):
            namespace(g, names=(f"grads[{keys[i]!r}]",))
            pkey = K.param_key(state.key, i) if state.param_keys is None else state.param_keys[i]
            d, m, nf = K.kron_step(g, mu, f, lay, key=pkey, step=t, opts=self.opts, host_decision=True)
            out.append(apply_update(p, d, self.lr, self.weight_decay))
            new_mu.append(m)
            new_f.append(nf)
        return _rebuild(kind, keys, out), KronState(t, state.key, new_mu, new_f, param_keys=state.param_keys)

    def plan(self, params) -> K.Plan:
        """Per parameter (dict key or list index): layout, state bytes and FLOPs; prints as a
        table with totals (:class:`xpopt.core.kron.Plan`)."""
        keys, values, _, _ = _flatten(params, "params")
        return K.Plan(K.plan_row(lay, self.opts, name=str(k), param_bytes=xp_itemsize(x))
                      for k, x, lay in zip(keys, values, self._layouts(values)))


def xp_itemsize(x) -> int:
    """Bytes per entry of ``x``'s dtype (any array-API array)."""
    xp, _ = namespace(x, names=("params",))
    return xp.finfo(x.dtype).bits // 8


def _np_like():
    import numpy as np

    return np.zeros((0,), np.uint32)


@S.takes("arrays.kron")
def kron(scanned, **args) -> Kron:
    """PSGD Kron for NumPy / CuPy (see the module docstring; options as ``xpopt.adapters.torch.Kron``).

    The returned optimizer's ``hyperparameters`` are the options (what ``xpopt.checkpoint`` records and
    compares with ``optimizer=opt``)."""
    from ... import _checkpoint_format as CK

    record = CK.record_options("kron", args)
    try:
        opts = S.options("arrays.kron", args)
    except (TypeError, ValueError) as e:
        raise type(e)(f"kron: {e}") from None
    opt = Kron(opts.lr, opts.weight_decay, opts, scanned, opts.seed, opts.nonfinite)
    opt.hyperparameters = record
    return opt
