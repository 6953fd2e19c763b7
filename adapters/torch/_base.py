"""What ``Muon`` and ``Kron`` (and their sharded paths) share: torch conventions, no maths.

The in-place update, the eager ``nonfinite=`` gate, the closure, the rollback
of a param group that fails its checks, and the stack level that points a
warning at the user's line.  Only ``distributed.py`` (the DTensor basics the
gate needs) is below this module; every other module of the package may
import it, and it imports none of them.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from ...core.fault import check_policy
from .._fault import eager_gate
from . import distributed as _dist


def scalar(x):
    """A 1-element tensor hyperparameter as 0-d (broadcasts into any param); numbers unchanged."""
    return x.reshape(()) if isinstance(x, torch.Tensor) and x.dim() else x


def is_on(x) -> bool:
    """False only for a Python zero: a tensor counts as on (no sync to look at it)."""
    return True if isinstance(x, torch.Tensor) else bool(x)


def dtype_name(dt) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (a string stays as it is)."""
    return str(dt).replace("torch.", "")


def apply_update(p: torch.Tensor, direction: torch.Tensor, lr, wd, dtype: torch.dtype) -> None:
    """``W <- W * (1 - lr*wd) - lr * direction`` in ``dtype`` (Muon, Kron, and their sharded paths).

    The in-place torch form of ``core._apply.apply_update``'s contract (the
    functional adapters return that delta instead).  A bf16/f16 param is updated in float32 and rounded once.  ``lr`` / ``wd``
    are numbers or 0-d tensors (no sync: a tensor stays a tensor).
    """
    target = p if p.dtype == dtype else p.to(dtype)
    if is_on(wd):
        target.mul_(1.0 - lr * wd)
    if isinstance(lr, torch.Tensor):
        target.sub_(direction * lr)
    else:
        target.add_(direction, alpha=-lr)
    if target is not p:
        p.copy_(target)


def nonfinite_policy(nonfinite, who: str):
    """The checked ``nonfinite=`` argument (``core.fault``); its error names the optimizer."""
    try:
        return check_policy(nonfinite)
    except ValueError as e:
        raise ValueError(f"{who}: {e}") from None


def torch_nonfinite_gate(opt, name_of, who: str) -> bool:
    """The eager ``nonfinite=`` gate shared by Muon and Kron (see ``Muon._nonfinite_gate``)."""
    ps = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    grads = _dist.local([p.grad for p in ps])      # DTensor grads: check this rank's shards ...
    agree = None                                    # ... and decide together
    if any(_dist.is_dtensor(p.grad) for p in ps):
        agree = lambda ok: _dist.all_agree(ok, grads[0].device)   # noqa: E731
    proceed, grads, counted = eager_gate(opt._nonfinite, grads, [name_of(p) for p in ps], who, agree)
    if counted:
        opt.state["nonfinite_steps"] = int(opt.state.get("nonfinite_steps", 0)) + 1
        if proceed:  # "zero": the cleaned gradients, in place (as GradScaler.unscale_ writes .grad)
            for g_old, g in zip(_dist.local([p.grad for p in ps]), grads):
                g_old.copy_(g)
    return proceed


def run_closure(closure):
    """``step(closure)``'s loss: the closure run with gradients on (None without one)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


@contextlib.contextmanager
def added_group(opt, base_add, param_group: dict):
    """``base_add(param_group)`` (torch's ``add_param_group``), then the block on ``(index, group)``.

    A block that raises takes the group out again: the optimizer is left as it was.
    """
    base_add(param_group)
    g = len(opt.param_groups) - 1
    try:
        yield g, opt.param_groups[g]
    except Exception:
        opt.param_groups.pop()
        raise


def user_stacklevel() -> int:
    """``warn``'s stacklevel, called from the function that warns, of the first frame outside
    ``xpopt.adapters``, ``xpopt.compat`` (the drop-ins that subclass the adapters) and torch (the
    user's call): the warning points there, and warns again for another optimizer built elsewhere."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # xpopt/adapters
    compat = os.path.join(os.path.dirname(here), "compat")              # xpopt/compat
    f, level = sys._getframe(1), 1
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if not (fn.startswith(here + os.sep) or fn.startswith(compat + os.sep)
                or f"{os.sep}torch{os.sep}optim{os.sep}" in fn
                or f"{os.sep}torch{os.sep}_" in fn):
            return level
        f, level = f.f_back, level + 1
    return 2
