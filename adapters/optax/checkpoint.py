"""optax side of ``xpopt.checkpoint``: our optax states <-> :class:`xpopt.checkpoint.Portable`.

The state of ``xo.muon`` (``MuonAdamWState``), ``xo.scale_by_muon``
(``MuonState``) or a Kron transform (``KronState``) is found wherever it sits
in the state tree (``optax.chain``, ``inject_hyperparams``, ...); there must
be exactly one.  On import, the counts of ``optax.ScaleByScheduleState`` and
``inject_hyperparams`` states in the same tree are set to the saved step, so
schedules resume where they were.  Names are the pytree key paths of
``params`` (else of the state's own params-like trees).  Hyperparameters: the
``optimizer=`` transform's record, else the values an ``inject_hyperparams``
state in the tree holds.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import optax

from ... import _checkpoint_format as CK
from ...core import kron as K
from .states import KronState, MuonAdamWState, MuonState

_OURS = (MuonAdamWState, MuonState, KronState)
_MASKED = optax.MaskedNode


def _nodes(tree, dicts: bool = False):
    """Every node of a state tree, parents first: through tuples (NamedTuples too) and lists, and
    through dicts' values if ``dicts``."""
    yield tree
    if isinstance(tree, (tuple, list)) or (dicts and isinstance(tree, dict)):
        for c in (tree.values() if isinstance(tree, dict) else tree):
            yield from _nodes(c, dicts)


def _has_field(t, name: str) -> bool:
    return isinstance(t, tuple) and hasattr(t, "_fields") and name in t._fields


def _one(tree, what):
    found = [t for t in _nodes(tree, dicts=True) if isinstance(t, _OURS)]
    if len(found) != 1:
        raise TypeError(
            f"xpopt.checkpoint: {what} holds {len(found)} xpopt optimizer states (MuonAdamWState, MuonState, "
            "KronState); pass the state of one xo.muon / xo.scale_by_muon / xo.quad / xo.skew / "
            "xo.scale_by_kron (optax.chain and inject_hyperparams around it are fine)")
    return found[0]


def _is_masked(x) -> bool:
    return isinstance(x, _MASKED)


def _paths(tree, is_leaf=None):
    pl, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [jax.tree_util.keystr(p) or "params" for p, _ in pl], [x for _, x in pl], treedef


def _np(x):
    return np.asarray(jax.device_get(x))


def _param_info(params, n):
    if params is None:
        return None, None
    names, leaves, _ = _paths(params)
    if len(leaves) != n:
        raise CK.CheckpointError(f"params has {len(leaves)} leaves, the optimizer state {n}")
    return names, [str(jnp.dtype(x.dtype)) for x in leaves]


def _injected(tree, optimizer: str):
    """The hyperparameters an ``optax.inject_hyperparams`` state in ``tree`` holds, as a header record
    (None without one)."""
    found = {}
    for t in _nodes(tree):
        if _has_field(t, "hyperparams") and isinstance(t.hyperparams, dict):
            found.update(t.hyperparams)
    rec = CK.record_options(optimizer, found)
    return rec if rec["param_groups"][0] else None


def export_optax(state, *, params=None, names=None) -> "CK.Portable":
    node = _one(state, "the state")
    step = int(node.count)
    if isinstance(node, KronState):
        port = _export_kron(node, step, params, names)
    else:
        port = _export_muon(node, step, params, names)
    port.hyperparameters = _injected(state, port.optimizer) or {}
    port.nonfinite_steps = _nonfinite(state)
    return port


def _muon_leaves(node):
    """``(names, treedef, mu, exp_avg, exp_avg_sq)`` of a Muon state's leaves (MaskedNode where a
    field does not apply; every fallback field is one for a ``MuonState``)."""
    tnames, mu, treedef = _paths(node.mu, _is_masked)
    if isinstance(node, MuonAdamWState):
        return tnames, treedef, mu, _paths(node.exp_avg, _is_masked)[1], _paths(node.exp_avg_sq, _is_masked)[1]
    return tnames, treedef, mu, [_MASKED()] * len(mu), [_MASKED()] * len(mu)


def _kron_leaves(node, params):
    """Per leaf of a KronState: ``(names, keys, keys' treedef, mu, mu's treedef, whether there is
    momentum, params' names, dtypes and shapes)``, the last three None without ``params``."""
    n = len(node.factors)
    knames, keys, kdef = _paths(node.param_keys)
    _, mus, mdef = _paths(node.mu)
    pnames, pdtypes = _param_info(params, n)
    pshapes = [tuple(x.shape) for x in jax.tree.leaves(params)] if params is not None else None
    return knames, keys, kdef, mus, mdef, len(mus) == n and n > 0, pnames, pdtypes, pshapes


def _export_muon(node, step, params, names):
    port = CK.Portable(optimizer="muon", params=[], arrays={}, source="optax", step=step)
    tnames, _, mu, ms, vs = _muon_leaves(node)
    pnames, pdtypes = _param_info(params, len(mu))
    tnames = names or pnames or tnames
    for i, (b, m, v) in enumerate(zip(mu, ms, vs)):
        muon = not _is_masked(b)
        ref = b if muon else m
        port.params.append({"name": tnames[i], "shape": list(ref.shape),
                            "dtype": pdtypes[i] if pdtypes else None,
                            "route": "muon" if muon else "fallback", "step": step})
        if muon:
            port.put(i, "momentum", _np(b))
        else:
            port.put(i, "exp_avg", _np(m))
            port.put(i, "exp_avg_sq", _np(v))
    return port


def _nonfinite(state) -> int:
    return sum(int(t.nonfinite_steps) for t in _nodes(state) if _has_field(t, "nonfinite_steps"))


def _export_kron(node, step, params, names):
    port = CK.Portable(optimizer="kron", params=[], arrays={}, source="optax", step=step)
    knames, keys, _, mus, _, use_mu, pnames, pdtypes, pshapes = _kron_leaves(node, params)
    tnames = names or pnames or knames
    root = _np(node.key).astype(np.uint32)
    port.kron_root_key = [int(root[0]), int(root[1])]
    for i, f in enumerate(node.factors):
        shape = list(pshapes[i]) if pshapes else (list(mus[i].shape) if use_mu else None)
        port.params.append({"name": tnames[i], "shape": shape, "dtype": pdtypes[i] if pdtypes else None,
                            "route": "kron", "step": step})
        port.put(i, "key", _np(keys[i]).astype(np.uint32))
        if use_mu:
            port.put(i, "mu", _np(mus[i]))
        for k in ("Ql", "Qr", "Ll", "Lr"):
            q = getattr(f, k)
            if q is not None:
                port.put(i, k, _np(q))
    return port


def _arr(port, j, name, like_leaf, tname):
    return jnp.asarray(port.get_checked(j, name, like_leaf.shape, tname), dtype=like_leaf.dtype)


def _import_muon(port, node, params, names, match, target):
    CK.check_optimizer(port, "muon")
    tnames, treedef, mu, ms, vs = _muon_leaves(node)
    pnames, _ = _param_info(params, len(mu))
    tnames = pnames or tnames
    shapes = [tuple((b if not _is_masked(b) else m).shape) for b, m in zip(mu, ms)]
    idx = CK.pair(port, list(zip(tnames, shapes)), names, match)
    CK.check_hyperparameters(port, target, [(j, 0) for j in idx], stacklevel=6)
    new_mu, new_m, new_v = list(mu), list(ms), list(vs)
    for k, (tname, j) in enumerate(zip(tnames, idx)):
        if port.params[j].get("step") is None:
            continue  # never stepped where it was saved: fresh state
        muon = not _is_masked(mu[k])
        CK.check_route(port, j, tname, "muon" if muon else "fallback")
        if muon:
            new_mu[k] = _arr(port, j, "momentum", mu[k], tname)
        else:
            new_m[k] = _arr(port, j, "exp_avg", ms[k], tname)
            new_v[k] = _arr(port, j, "exp_avg_sq", vs[k], tname)
    step = CK.uniform_step(port, "an optax Muon state")
    count = jnp.asarray(step, dtype=node.count.dtype)
    if isinstance(node, MuonAdamWState):
        return MuonAdamWState(count=count, mu=treedef.unflatten(new_mu), exp_avg=treedef.unflatten(new_m),
                              exp_avg_sq=treedef.unflatten(new_v)), step
    return MuonState(count=count, mu=treedef.unflatten(new_mu)), step


def _import_kron(port, node, params, names, match, target):
    CK.check_optimizer(port, "kron")
    knames, keys, kdef, mus, mdef, use_mu, pnames, _, pshapes = _kron_leaves(node, params)
    tnames = pnames or knames
    shapes = pshapes or ([tuple(m.shape) for m in mus] if use_mu else [None] * len(node.factors))
    idx = CK.pair(port, list(zip(tnames, shapes)), names, match)
    CK.check_hyperparameters(port, target, [(j, 0) for j in idx], stacklevel=6)
    new_mu, new_f, new_keys = list(mus), list(node.factors), list(keys)
    for k, (tname, j) in enumerate(zip(tnames, idx)):
        if port.params[j].get("step") is None:
            continue
        # The saved parameter's own key comes with its state: its draws continue wherever it now sits.
        new_keys[k] = jnp.asarray(CK.kron_key(port, j, tname), dtype=keys[k].dtype)
        f = node.factors[k]
        for q in ("Ql",):
            if (getattr(f, q) is None) != (port.get(j, q)[0] is None):
                raise CK.CheckpointError(f"parameter {tname!r}: the saved Kron factors have another layout "
                                         "(one-sided vs two-sided); use the same max_size_dense and block_size")
        CK.check_state_dtype(port, j, ("Ql", "Qr"), str(f.Qr.dtype), tname, "dtype")
        new_f[k] = K.Factors(*(None if getattr(f, q) is None else _arr(port, j, q, getattr(f, q), tname)
                               for q in ("Ql", "Qr", "Ll", "Lr")))
        if use_mu:
            CK.check_state_dtype(port, j, ("mu",), str(mus[k].dtype), tname, "mu_dtype")
            new_mu[k] = _arr(port, j, "mu", mus[k], tname)
    step = CK.uniform_step(port, "an optax Kron state")
    mu_tree = mdef.unflatten(new_mu) if use_mu else node.mu
    # The root key only seeds parameters that start fresh (none here); keep the saved one as a record.
    root = node.key if port.kron_root_key is None else jnp.asarray(np.asarray(port.kron_root_key, np.uint32),
                                                                    node.key.dtype)
    return KronState(jnp.asarray(step, node.count.dtype), root, mu_tree, tuple(new_f),
                     kdef.unflatten(new_keys)), step


def _replace(tree, new, step):
    """``tree`` with our node replaced by ``new`` and schedule counts set to ``step``."""
    if isinstance(tree, _OURS):
        return new
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        kids = [_replace(c, new, step) for c in tree]
        out = type(tree)(*kids)
        name = type(tree).__name__
        if "count" in tree._fields and (name == "ScaleByScheduleState" or name.startswith("Inject")):
            out = out._replace(count=jnp.asarray(step, dtype=jnp.asarray(tree.count).dtype))
        return out
    if isinstance(tree, (tuple, list)):
        return type(tree)(_replace(c, new, step) for c in tree)
    if isinstance(tree, dict):
        return {k: _replace(v, new, step) for k, v in tree.items()}
    return tree


def import_optax(port: "CK.Portable", like, *, params=None, names=None, match="auto", hyperparameters=None):
    node = _one(like, "like")
    target = hyperparameters if hyperparameters is not None else _injected(like, port.optimizer)
    if isinstance(node, KronState):
        new, step = _import_kron(port, node, params, names, match, target)
    else:
        new, step = _import_muon(port, node, params, names, match, target)
    out = _replace(like, new, step)
    return _set_nonfinite(out, port.nonfinite_steps)


def _set_nonfinite(tree, value):
    if _has_field(tree, "nonfinite_steps"):
        tree = tree._replace(nonfinite_steps=jnp.asarray(value, dtype=jnp.asarray(tree.nonfinite_steps).dtype))
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*[_set_nonfinite(c, value) for c in tree])
    if isinstance(tree, (tuple, list)):
        return type(tree)(_set_nonfinite(c, value) for c in tree)
    return tree
