"""The state types of the optax transforms, and the leaf names they share.

The bottom of ``xpopt.adapters.optax``: the transforms (``muon``, ``kron``),
the sharding helpers and the checkpoint exporter import these; this module
imports none of them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

__all__ = ["MuonState", "MuonAdamWState", "KronState", "named_leaves"]


class MuonState(NamedTuple):
    """State of :func:`scale_by_muon`."""

    count: jax.Array    # int32 scalar: steps taken
    mu: optax.Updates   # momentum buffer per leaf (mu_dtype)


class MuonAdamWState(NamedTuple):
    """State of :func:`muon`; ``optax.MaskedNode()`` where a field does not apply."""

    count: jax.Array         # int32 scalar: steps taken (schedules see it before the increment)
    mu: optax.Updates        # Muon momentum buffers (Muon leaves)
    exp_avg: optax.Updates   # fallback first moments (fallback leaves)
    exp_avg_sq: optax.Updates  # fallback second moments (fallback leaves)


class KronState(NamedTuple):
    count: Any      # int32 steps taken
    key: Any        # uint32[2], PRNGKey(seed)
    mu: Any         # params-like tree (None leaves when b1 == 0)
    factors: Any    # tuple of core.kron.Factors, one per leaf
    param_keys: Any  # params-like tree: each leaf's own key, uint32[2] (fold_in(key, i) at init)


def named_leaves(tree):
    """``(leaves, treedef, names)``: each leaf named by its path, ``params['w']`` (``params`` for a bare leaf)."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [f"params{jax.tree_util.keystr(p)}" for p, _ in path_leaves]
    return [leaf for _, leaf in path_leaves], treedef, names
