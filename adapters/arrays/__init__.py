"""Muon for NumPy and CuPy arrays, functional (optax-style, no framework needed).

::

    from xpopt.adapters import arrays

    opt = arrays.muon(lr=0.02, weight_decay=0.01)
    state = opt.init(params)                 # params: list, tuple or flat dict of arrays
    for batch in data:
        grads = compute_grads(params, batch)
        updates, state = opt.update(grads, state, params)
        params = arrays.apply_updates(params, updates)

Update rule (the maths is ``xpopt.core``): matrix parameters get Muon,
``W <- W - lr * lr_scale * orthogonalize(momentum(g)) - lr * wd * W``, the rest
(vectors, unsuitable shapes, entries labelled ``"fallback"``) AdamW/NAdamW with
``fallback_lr``.  ``update`` returns the *deltas* (optax convention); add them
with :func:`apply_updates`.  Options, defaults and errors are those of
``docs/adapters.md`` and of :func:`xpopt.adapters.optax.muon`, with torch's
spellings (``lr``, ``fallback_lr``).

Layout defaults to torch's ``(out, in, *spatial)`` (``dimension_numbers="torch"``);
pass ``"flax"`` for ``(in, out)`` / ``(kh, kw, in, out)`` weights, a
:class:`DimensionNumbers`, a container of them matching ``params`` (None =
fallback), or a callable ``params -> such a container``.

Routing: ``labels=None`` asks core ``suitability`` about each weight's
torch-layout shape; else a container like ``params`` of ``"muon"`` /
``"fallback"`` / None (automatic), or a callable returning one.  For dict
params the labels dict may name only some keys (``labels={"emb": "fallback"}``):
the others are automatic; a key that params lacks is a ValueError.

State (:class:`MuonState`) holds plain arrays of the params' library (None where
a field does not apply) and a Python int ``step``: picklable, ``np.savez``-able.
float16 params keep float32 state and get float32 updates, which
:func:`apply_updates` rounds into the param once.

NaN policy: ``nonfinite=None`` (default), no check: a NaN/Inf gradient
propagates into that parameter's state and update, as in torch.optim and
optax; ``"skip"`` / ``"zero"`` / ``"raise"`` as ``xpopt.core.fault``
(``state.nonfinite_steps`` counts).

PSGD Kron (``arrays.kron``) takes the same containers; see its docstring.
The modules behind this facade:

* ``_base.py``       containers (list / tuple / flat dict), ``apply_updates``, the nonfinite gate
* ``_muon.py``       ``muon``, ``Muon``, ``MuonState``
* ``_kron.py``       ``kron``, ``Kron``, ``KronState``
* ``checkpoint.py``  ``xpopt.checkpoint``'s arrays side (export / import)
"""

from ...core.layout import FLAX, TORCH, DimensionNumbers
from ._base import apply_updates, nonfinite_update  # noqa: F401  (nonfinite_update: public in the old arrays.py)
from ._kron import Kron, KronState, kron
from ._muon import Muon, MuonState, muon

__all__ = ["muon", "apply_updates", "MuonState", "Muon", "DimensionNumbers", "FLAX", "TORCH", "Kron", "KronState",
           "kron"]
