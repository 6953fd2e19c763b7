"""arrays-adapter side of ``xpopt.checkpoint``: ``MuonState`` / ``KronState`` <-> Portable.

Names are the container's keys (dict) or positions (list / tuple; positions
are not names, so such parameters pair by order).  A Kron state's containers
are lists: its names come from ``params=`` (a dict of the params) when given.  CuPy
state is copied to the host on export; import creates arrays of the ``like``
state's library (NumPy or CuPy) and dtypes.
"""

from __future__ import annotations

import numpy as np

from ... import _checkpoint_format as CK
from ...core import kron as K
from ._base import _flatten, _rebuild
from ._kron import KronState
from ._muon import _BUFFERS, MuonState


def _host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def _like_array(a, like):
    if type(like).__module__.startswith("cupy"):
        import cupy

        return cupy.asarray(a, dtype=like.dtype)
    return np.array(a, dtype=like.dtype, copy=True)


def _like_key(a, like):
    """A Kron key ``a`` as an array like ``like`` (a key that is no array stays as it is)."""
    return _like_array(a, like) if hasattr(like, "dtype") else a


def _buffers(state, argname: str):
    """``(keys, kind, mu, exp_avg, exp_avg_sq)`` of a MuonState: its containers as entry lists."""
    keys, mu, _, kind = _flatten(state.mu, f"{argname}.mu")
    return (keys, kind, mu, *(_flatten(getattr(state, f), f"{argname}.{f}")[1] for f in _BUFFERS[1:]))


def export_arrays(state, *, params=None, names=None) -> "CK.Portable":
    if isinstance(state, KronState):
        n = len(state.factors)
        port = CK.Portable(optimizer="kron", params=[], arrays={}, source="arrays", step=int(state.step))
        root = _host(state.key).astype(np.uint32)
        port.kron_root_key = [int(root[0]), int(root[1])]
        pkeys, pvals = _flatten(params, "params")[:2] if params is not None else (list(range(n)), [None] * n)
        pkeys_ = state.param_keys
        for i, f in enumerate(state.factors):
            mu = state.mu[i] if state.mu else None
            shape = pvals[i].shape if pvals[i] is not None else (mu.shape if mu is not None else None)
            port.params.append({"name": str(names[i] if names else pkeys[i]),
                                "shape": None if shape is None else list(shape),
                                "dtype": str(pvals[i].dtype) if pvals[i] is not None else None,
                                "route": "kron", "step": int(state.step)})
            own = K.param_key(root, i) if pkeys_ is None else pkeys_[i]
            port.put(i, "key", _host(own).astype(np.uint32))
            if mu is not None:
                port.put(i, "mu", _host(mu))
            for k in ("Ql", "Qr", "Ll", "Lr"):
                q = getattr(f, k)
                if q is not None:
                    port.put(i, k, _host(q))
        port.nonfinite_steps = int(getattr(state, "nonfinite_steps", 0) or 0)
        return port
    if not isinstance(state, MuonState):
        raise TypeError(f"xpopt.checkpoint: {type(state).__name__} is not an arrays MuonState / KronState")
    keys, _, mu, ms, vs = _buffers(state, "state")
    pvals = _flatten(params, "params")[1] if params is not None else [None] * len(keys)
    port = CK.Portable(optimizer="muon", params=[], arrays={}, source="arrays", step=int(state.step))
    for i, (k, b, m, v) in enumerate(zip(keys, mu, ms, vs)):
        ref = b if b is not None else m
        port.params.append({"name": str(names[i] if names else k), "shape": list(ref.shape),
                            "dtype": str(pvals[i].dtype) if pvals[i] is not None else None,
                            "route": "muon" if b is not None else "fallback", "step": int(state.step)})
        if b is not None:
            port.put(i, "momentum", _host(b))
        else:
            port.put(i, "exp_avg", _host(m))
            port.put(i, "exp_avg_sq", _host(v))
    port.nonfinite_steps = int(getattr(state, "nonfinite_steps", 0) or 0)
    return port


def _arr(port, j, name, like, tname):
    return _like_array(port.get_checked(j, name, like.shape, tname), like)


def _saved(port, tnames, shapes, names, match, hyperparameters) -> list:
    """``(k, tname, j)`` for each target entry ``k`` that the checkpoint's entry ``j`` has state for
    (entries pair by name or position; the saved options are compared with ``hyperparameters``)."""
    idx = CK.pair(port, list(zip(tnames, shapes)), names, match)
    # stacklevel: check_hyperparameters, here, import_arrays, import_state, load -> the caller of load
    CK.check_hyperparameters(port, hyperparameters, [(j, 0) for j in idx], stacklevel=6)
    return [(k, tname, j) for k, (tname, j) in enumerate(zip(tnames, idx)) if port.params[j].get("step") is not None]


def import_arrays(port: "CK.Portable", like, *, params=None, names=None, match="auto", hyperparameters=None):
    if isinstance(like, KronState):
        CK.check_optimizer(port, "kron")
        n = len(like.factors)
        pkeys, pvals = _flatten(params, "params")[:2] if params is not None else (range(n), None)
        tnames = [str(k) for k in pkeys]
        if len(tnames) != n:
            raise CK.CheckpointError(f"params has {len(tnames)} entries, the Kron state {n}")
        if pvals is not None:
            shapes = [tuple(x.shape) for x in pvals]
        else:
            shapes = [tuple(m.shape) if m is not None else None for m in like.mu] if like.mu else [None] * n
        saved = _saved(port, tnames, shapes, names, match, hyperparameters)
        mus, fs = list(like.mu), list(like.factors)
        keys = list(like.param_keys) if like.param_keys is not None else [K.param_key(like.key, i) for i in range(n)]
        for k, tname, j in saved:
            # The saved parameter's own key comes with its state: its draws continue wherever it now sits.
            keys[k] = _like_key(CK.kron_key(port, j, tname), like.key)
            f = like.factors[k]
            CK.check_state_dtype(port, j, ("Ql", "Qr"), _dtype_str(f.Qr), tname, "dtype")
            fs[k] = K.Factors(*(None if getattr(f, q) is None else _arr(port, j, q, getattr(f, q), tname)
                                for q in ("Ql", "Qr", "Ll", "Lr")))
            if mus and mus[k] is not None:
                CK.check_state_dtype(port, j, ("mu",), _dtype_str(mus[k]), tname, "mu_dtype")
                mus[k] = _arr(port, j, "mu", mus[k], tname)
        step = CK.uniform_step(port, "an arrays Kron state")
        # The root key only seeds parameters that start fresh; keep the saved one as a record.
        root = like.key if port.kron_root_key is None else np.asarray(port.kron_root_key, dtype=np.uint32)
        return KronState(step, _like_key(root, like.key), mus, fs, int(port.nonfinite_steps), param_keys=keys)
    if not isinstance(like, MuonState):
        raise TypeError(f"xpopt.checkpoint.load: like={type(like).__name__} is not an arrays MuonState / KronState")
    CK.check_optimizer(port, "muon")
    keys, kind, mu, ms, vs = _buffers(like, "like")
    tnames = [str(k) for k in keys]
    shapes = [tuple((b if b is not None else m).shape) for b, m in zip(mu, ms)]
    saved = _saved(port, tnames, shapes, names, match, hyperparameters)
    new_mu, new_m, new_v = list(mu), list(ms), list(vs)
    for k, tname, j in saved:
        if mu[k] is not None:
            CK.check_route(port, j, tname, "muon")
            new_mu[k] = _arr(port, j, "momentum", mu[k], tname)
        else:
            CK.check_route(port, j, tname, "fallback")
            new_m[k] = _arr(port, j, "exp_avg", ms[k], tname)
            new_v[k] = _arr(port, j, "exp_avg_sq", vs[k], tname)
    step = CK.uniform_step(port, "an arrays Muon state")
    out = like._replace(step=step, mu=_rebuild(kind, keys, new_mu), exp_avg=_rebuild(kind, keys, new_m),
                        exp_avg_sq=_rebuild(kind, keys, new_v))
    if "nonfinite_steps" in out._fields:
        out = out._replace(nonfinite_steps=int(port.nonfinite_steps))
    return out


def _dtype_str(a) -> str:
    return "bfloat16" if str(a.dtype) == "bfloat16" else np.dtype(a.dtype).name
