"""PartitionSpecs of an xpopt optax state (:func:`partition_specs`), for sharded training.

Above the transforms: it describes the states of the Muon and Kron transforms
(and builds a Kron transform when none is given); the per-leaf specs and their
checks are :mod:`.sharding`'s.
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import PartitionSpec as P

from ._kron import scale_by_kron
from .sharding import leaf_specs
from .states import KronState, MuonAdamWState, MuonState

__all__ = ["partition_specs"]


def partition_specs(params, param_specs=None, *, tx=None, mesh=None, **kron_options):
    """PartitionSpecs of an xpopt optax state, a pytree shaped like ``tx.init(params)``.

    Kron's (and Muon's) momentum and the fallback's moments are sharded like their
    params; Kron's factors and Lipschitz estimates, the step count and the keys are
    replicated (factors are at most ``block_size`` squared per block: small next to
    the params, and every device needs them whole to precondition its gathered
    matrix).  Leaves of other transforms in a chain (optax's own counts) are
    replicated, ``None`` / ``MaskedNode`` stay as they are.

    Args:
      params: the params pytree (arrays or ``jax.ShapeDtypeStruct``).
      param_specs: one ``PartitionSpec`` per param leaf; None = read from the
        params' shardings (replicated where they have none).
      tx: the transform whose state is described (``xo.quad(...)``, ``xo.muon(...)``,
        any chain of them); None = ``scale_by_kron(**kron_options)``, like the
        seed's ``get_opt_state_partition_specs(params, **quad_kwargs)``.
      mesh: a ``Mesh``/``AbstractMesh`` to check the specs against (axis names
        exist, dims divide); None = the params' own mesh, if any.

    Raises ``ValueError`` naming the parameter whose spec names a mesh axis that
    does not exist, has more entries than the param has axes, or does not divide.
    """
    if tx is None:
        tx = scale_by_kron(**kron_options)
    elif kron_options:
        raise TypeError(f"give either tx or Kron options, not both (got {sorted(kron_options)})")
    treedef, specs = leaf_specs(params, param_specs, mesh)
    state = jax.eval_shape(tx.init, params)

    def like_params(sub):
        # None (b1 == 0) and MaskedNode (the other half of muon's routing) stay.
        parts = treedef.flatten_up_to(sub)
        return treedef.unflatten([x if x is None or isinstance(x, optax.MaskedNode) else s
                                  for x, s in zip(parts, specs)])

    def convert(node):
        if isinstance(node, KronState):
            factors = tuple(type(f)(*(None if q is None else P() for q in f)) for f in node.factors)
            return KronState(P(), P(), like_params(node.mu), factors, jax.tree.map(lambda _: P(), node.param_keys))
        if isinstance(node, MuonState):
            return MuonState(P(), like_params(node.mu))
        if isinstance(node, MuonAdamWState):
            return MuonAdamWState(P(), like_params(node.mu), like_params(node.exp_avg),
                                  like_params(node.exp_avg_sq))
        return P()

    return jax.tree.map(convert, state,
                        is_leaf=lambda x: isinstance(x, (KronState, MuonState, MuonAdamWState)))
