"""The apply contract, one definition: a direction ``d`` moves the parameter ``W`` by
``-lr * d - (lr * wd) * W`` (decoupled weight decay, ``W * (1 - lr*wd) - lr*d``).

The functional adapters (``arrays``, optax Muon) return this delta;
``adapters.torch.apply_update`` is the same contract in place on a torch
parameter (bf16/f16 updated in float32 and rounded once).
"""

from __future__ import annotations

from ._check import is_on
from ._xp import namespace


def apply_update(p, d, lr, wd):
    """The delta ``-lr * d - (lr * wd) * p`` in ``d``'s dtype; ``wd`` a Python zero: ``-lr * d``
    (``p`` may then be None).  ``lr`` / ``wd``: numbers or 0-d arrays (maybe traced)."""
    delta = -lr * d
    if is_on(wd):
        if p is None:
            raise ValueError("weight decay needs the current parameters: call update(grads, state, params)")
        xp, _ = namespace(d, names=("d",))
        delta = delta - (lr * wd) * xp.astype(p, d.dtype)
    return delta
