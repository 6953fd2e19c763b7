"""The eager side of the ``nonfinite=`` policy (torch, arrays): see ``core.fault``.

Eager adapters read the finiteness flag on the host (one device sync per
step, as ``torch.amp.GradScaler.step`` does), so a skipped step costs
nothing else and ``"raise"`` can name the parameters.
"""

from __future__ import annotations

from ..core import fault as F


def eager_gate(policy, grads: list, names: list, who: str, agree=None):
    """``(proceed, grads, counted)`` for one step.

    ``proceed``: take the step; ``grads``: what to take it with (non-finite
    entries zeroed under ``"zero"``); ``counted``: the step saw a non-finite
    gradient (add 1 to ``nonfinite_steps``).  ``"raise"`` raises before
    anything changes.  ``agree(ok) -> bool``: the decision every process takes
    when each holds only shards of the gradients (FSDP2: one rank's NaN must
    skip the step on all ranks, or their collectives would mismatch).
    """
    if policy is None:
        return True, grads, False
    ok = bool(F.all_finite(grads))
    if (agree(ok) if agree is not None else ok):
        return True, grads, False
    if policy == "raise":
        bad = [names[i] for i in F.nonfinite_indices(grads)] or ["a shard held by another rank"]
        raise FloatingPointError(
            f"{who}: non-finite gradient (NaN or Inf) in {', '.join(map(str, bad))} (nonfinite='raise'); nothing "
            "was updated. Use nonfinite='skip' to skip such steps (GradScaler's rule) or 'zero' to zero the "
            "entries")
    if policy == "skip":
        return False, grads, True
    return True, [None if g is None else F.zero_nonfinite(g) for g in grads], True
