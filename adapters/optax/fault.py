"""The ``nonfinite=`` policy around an optax transform (``core.fault`` decides, this wraps).

Under ``jax.jit`` the decision is a ``where``: the inner update runs on
gradients with non-finite entries zeroed, and under ``"skip"`` its new state
and updates are replaced by the old state and zeros when the step saw a
non-finite gradient.  ``"raise"`` raises when the gradients are concrete
(outside jit); traced it acts as ``"skip"`` (see ``core.fault``).

Also here, the other wrapper every xpopt transform goes through on its way
out: :func:`described` attaches the options it was built with.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ...core import fault as F


class NonfiniteState(NamedTuple):
    """The wrapped transform's state and the count of steps that saw a non-finite gradient."""

    inner: Any
    nonfinite_steps: Any  # int32 scalar


def _traced(leaves) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in leaves)


def with_nonfinite(tx, policy):
    """``tx`` with the policy applied (``tx`` unchanged for ``policy=None``)."""
    policy = F.check_policy(policy)
    if policy is None:
        return tx

    def init_fn(params):
        return NonfiniteState(tx.init(params), jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        paths, treedef = jax.tree_util.tree_flatten_with_path(updates)
        leaves = [x for _, x in paths]
        ok = jnp.asarray(F.all_finite(leaves))
        if policy == "raise" and not _traced(leaves) and not bool(ok):
            bad = [jax.tree_util.keystr(paths[i][0]) for i in F.nonfinite_indices(leaves)]
            raise FloatingPointError(
                f"non-finite gradient (NaN or Inf) in {', '.join(bad)} (nonfinite='raise'); nothing was "
                "updated. Use nonfinite='skip' to skip such steps or 'zero' to zero the entries")
        clean = treedef.unflatten([F.zero_nonfinite(x) for x in leaves])
        new_u, new_inner = tx.update(clean, state.inner, params, **extra_args)
        if policy != "zero":
            new_inner = jax.tree.map(lambda n, o: F.select(ok, n, o), new_inner, state.inner)
            new_u = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_u)
        count = state.nonfinite_steps + jnp.where(ok, 0, 1).astype(state.nonfinite_steps.dtype)
        return new_u, NonfiniteState(new_inner, count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class Described(optax.GradientTransformation):
    """An xpopt transform: optax's ``(init, update)`` pair with ``hyperparameters``, the options it
    was built with (``xpopt.checkpoint.record_options``), which ``xpopt.checkpoint`` records on save
    and compares on load (``optimizer=tx``)."""


class DescribedExtraArgs(optax.GradientTransformationExtraArgs):
    __doc__ = Described.__doc__


def described(tx, hyperparameters: dict):
    """``tx`` carrying ``hyperparameters`` (same init / update, same optax class behaviour)."""
    cls = DescribedExtraArgs if isinstance(tx, optax.GradientTransformationExtraArgs) else Described
    out = cls(tx.init, tx.update)
    out.hyperparameters = hyperparameters
    return out
