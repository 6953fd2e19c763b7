"""Param-group keys the torch optimizers do not know: a warning instead of silence.

torch.optim keeps any extra key in a param group and never reads it, so a typo
(``{"params": ..., "lrr": 1e-4}``) trains with the default silently.  ``Muon``
and ``Kron`` warn when a group is added (construction or ``add_param_group``)
with a key that is neither one of their options nor one that torch, its LR
schedulers or common tooling put in groups (listed below).
"""

from __future__ import annotations

import difflib
import warnings
from typing import Iterable

from ._base import user_stacklevel

#: Keys other code puts in param groups, which our optimizers may ignore without a warning.
FOREIGN_GROUP_KEYS = frozenset({
    # torch.optim itself: the params, their names (``named_parameters()``), and the options
    # of torch's own optimizers (a group copied from one of them carries these)
    "params", "param_names", "differentiable", "foreach", "maximize", "capturable", "fused",
    "decoupled_weight_decay",
    # torch LR schedulers: every LRScheduler ("initial_lr"), OneCycleLR ("max_lr", "min_lr",
    # and with cycle_momentum "max_momentum", "base_momentum", as CyclicLR), SWALR ("swa_lr")
    "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr",
    # labels: mup_param_groups' "name" / "role"; timm's layer-wise LR decay "lr_scale"
    "name", "role", "lr_scale",
})


def warn_unknown_keys(group: dict, known: Iterable[str], where: str, owner: str) -> None:
    """One ``UserWarning`` naming every key of ``group`` that ``owner`` does not use."""
    known = set(known)
    unknown = sorted(k for k in group if k not in known and k not in FOREIGN_GROUP_KEYS)
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), sorted(known), n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    warnings.warn(
        f"{owner}: {where} has key(s) {', '.join(hints)} that {owner} does not use; they are kept in the "
        f"group but ignored. {owner}'s group keys: {', '.join(sorted(known - {'params'}))}",
        UserWarning, stacklevel=user_stacklevel())


def setstate_keeping_defaults(opt, state: dict, base_setstate) -> None:
    """``torch.optim.Optimizer.__setstate__`` without the key it adds to ``defaults``.

    torch's ``__setstate__`` (run by ``load_state_dict``, ``copy.deepcopy`` and
    unpickling) does ``defaults.setdefault("differentiable", False)`` for its own
    optimizers' ``step`` decorator, which ours do not use.  Left there, every
    group added afterwards (``add_param_group`` fills groups from ``defaults``)
    and every group our ``__setstate__`` completes from ``defaults`` would gain
    it, and ``state_dict()`` after a round trip would not equal the one saved.
    """
    defaults = state.get("defaults", opt.__dict__.get("defaults"))
    had = defaults is not None and "differentiable" in defaults
    base_setstate(state)
    if not had:
        opt.defaults.pop("differentiable", None)
