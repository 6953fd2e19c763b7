"""Non-finite gradients: the ``nonfinite=`` policy every optimizer takes, decided here.

Policies (``POLICIES``):

* ``None`` (default): no check.  A NaN/Inf gradient propagates into that
  parameter's state and value, as in ``torch.optim`` and optax; nothing is
  added to the step (no reduction, and in torch no host sync).
* ``"skip"``: if any gradient entry of the step is NaN/Inf, the whole step is
  skipped (``torch.amp.GradScaler``'s rule): every parameter and every piece
  of optimizer state (momentum, moments, Kron factors, step counts, schedule
  positions) is left as it was, and ``nonfinite_steps`` is incremented.
* ``"zero"``: non-finite gradient entries are replaced by 0 and the step is
  taken; ``nonfinite_steps`` counts the steps where that happened.
* ``"raise"``: ``FloatingPointError`` naming the parameters, before anything
  changes (eager torch / arrays / optax).  Inside ``jax.jit`` an exception
  cannot be raised from a value: traced, ``"raise"`` acts as ``"skip"`` (the
  state is untouched and ``nonfinite_steps`` counts it); check that counter on
  the host, or run the step outside jit to get the error.

The step is all-or-nothing across parameters (one bad gradient skips every
parameter's update), since a partial step would leave the model in a state
no run reaches.  These functions are pure array code: no Python branch on a
value, so they trace under ``jax.jit``.
"""

from __future__ import annotations

from ._xp import namespace

__all__ = ["POLICIES", "check_policy", "all_finite", "zero_nonfinite", "select", "nonfinite_indices"]

POLICIES = (None, "skip", "zero", "raise")


def check_policy(policy):
    """``policy`` if it is one of :data:`POLICIES`, else ValueError naming the choices."""
    if policy is not None and not (isinstance(policy, str) and policy in POLICIES):
        raise ValueError(f"nonfinite={policy!r} is not a policy: use None (no check), 'skip', 'zero' or 'raise'")
    return policy


def all_finite(grads):
    """A 0-d bool array: True iff every entry of every array in ``grads`` is finite (True for none)."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return True
    xp, _ = namespace(*grads[:1], names=("grads[0]",))
    ok = None
    for g in grads:
        f = xp.all(xp.isfinite(g))  # True for an empty array
        ok = f if ok is None else ok & f
    return ok


def zero_nonfinite(g):
    """``g`` with NaN / Inf entries replaced by 0 (same dtype)."""
    xp, _ = namespace(g, names=("g",))
    return xp.where(xp.isfinite(g), g, xp.zeros_like(g))


def select(ok, new, old):
    """``new`` where the 0-d bool ``ok`` holds, else ``old`` (``old`` may be None: returned as is)."""
    if old is None or new is None:
        return new
    xp, _ = namespace(new, names=("new",))
    return xp.where(ok, new, xp.astype(old, new.dtype) if old.dtype != new.dtype else old)


def nonfinite_indices(grads) -> list:
    """Positions of the arrays with a NaN / Inf entry (eager: reads the values on the host)."""
    out = []
    for i, g in enumerate(grads):
        if g is None or 0 in tuple(g.shape):
            continue
        xp, _ = namespace(g, names=("g",))
        if not bool(xp.all(xp.isfinite(g))):
            out.append(i)
    return out
