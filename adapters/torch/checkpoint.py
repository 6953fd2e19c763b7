"""torch side of ``xpopt.checkpoint``: ``Muon`` / ``Kron`` state <-> :class:`xpopt.checkpoint.Portable`.

Import goes through the optimizer's own ``load_state_dict`` (its checks, its
dtypes: float32 state for bf16 params), with a state dict built completely
before anything is touched, so a checkpoint that does not fit leaves the
optimizer as it was.
"""

from __future__ import annotations

import numpy as np
import torch

from ... import _checkpoint_format as CK
from ...core import kron as K
from ._base import dtype_name
from .kron import Kron, _options
from .muon import Muon

_MUON_FIELDS = {"momentum_buffer": "momentum", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
_KRON_FIELDS = ("mu",) + K.Factors._fields


def _put(port, i, name, t):
    if t.dtype == torch.bfloat16:  # bits, without needing ml_dtypes
        port.arrays[f"{i}.{name}"] = t.detach().cpu().view(torch.int16).numpy().view(np.uint16).copy()
        port.bf16.add(f"{i}.{name}")
    else:
        port.put(i, name, t.detach().cpu().numpy())


def _from_port(port, i, name, device, dtype=None) -> torch.Tensor:
    a, dt = port.get(i, name)
    if dt == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.array(a, copy=True))
    return t.to(device=device, dtype=dtype if dtype is not None else t.dtype)


def _names(opt, sd, names):
    n = sum(len(g["params"]) for g in sd["param_groups"])
    if names is not None:
        names = list(names)
        if len(names) != n:
            raise CK.CheckpointError(f"names has {len(names)} entries, the optimizer {n} parameters")
        return names
    if isinstance(opt, Muon):
        return [r.name for r in opt.routes()]
    out = []
    for g, group in enumerate(opt.param_groups if opt is not None else sd["param_groups"]):
        pn = group.get("param_names")
        out += [pn[j] if pn else f"group {g}, param {j}" for j in range(len(group["params"]))]
    return out


def _hypers(sd) -> dict:
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: CK.json_value(v) for k, v in g.items() if k not in ("params", "param_names")})
    return {"param_groups": groups}


def export_torch(source, *, params=None, names=None) -> "CK.Portable":
    del params  # torch optimizers hold their params
    opt = source if isinstance(source, torch.optim.Optimizer) else None
    if opt is not None and not isinstance(opt, (Muon, Kron)):
        raise TypeError(f"xpopt.checkpoint: {type(opt).__name__} is not an xpopt Muon or Kron; portable "
                        "checkpoints cover xpopt's optimizers")
    sd = opt.state_dict() if opt is not None else source
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    states = [sd["state"].get(i) for i in ids]
    if opt is not None:
        kron = isinstance(opt, Kron)
    else:
        kron = any(st and "Qr" in st for st in states)
    live = [p for g in opt.param_groups for p in g["params"]] if opt is not None else [None] * len(ids)
    routes = opt.routes() if isinstance(opt, Muon) else None
    pnames = _names(opt, sd, names)
    groups = [g for g, group in enumerate(sd["param_groups"]) for _ in group["params"]]
    port = CK.Portable(optimizer="kron" if kron else "muon", params=[], arrays={},
                       hyperparameters=_hypers(sd), source="torch")
    for i, (st, p, name, g) in enumerate(zip(states, live, pnames, groups)):
        st = st or {}
        shape = tuple(p.shape) if p is not None else None
        if kron:
            route = "kron"
        elif routes is not None:
            route = routes[i].route
        else:
            route = "muon" if "momentum_buffer" in st else "fallback" if "exp_avg" in st else None
        step = None
        if st:
            s = st.get("step")
            step = int(float(s)) if s is not None else 10 ** 6  # torch.optim.Muon: no count (warmed up)
        entry = {"name": name, "shape": list(shape) if shape is not None else None,
                 "dtype": dtype_name(p.dtype) if p is not None else None, "route": route, "step": step,
                 "group": g}
        for k, v in st.items():
            if not torch.is_tensor(v) or k == "step":
                continue
            if kron:
                if k == "key":
                    port.put(i, "key", np.asarray(v.tolist(), dtype=np.int64).astype(np.uint32))
                else:
                    _put(port, i, k, v)
            else:
                _put(port, i, _MUON_FIELDS[k], v)
                if shape is None:
                    shape = tuple(v.shape)
        if entry["shape"] is None and shape is not None:
            entry["shape"] = list(shape)
        port.params.append(entry)
    if kron and opt is not None:
        seed = int(opt._seed) % 2 ** 64
        port.kron_root_key = [seed >> 32, seed & 0xFFFFFFFF]
    port.step = port.common_step()
    port.nonfinite_steps = _skipped(sd)
    return port


def _skipped(sd) -> int:
    v = sd["state"].get("nonfinite_steps")
    return int(v) if v is not None else 0


def import_torch(port: "CK.Portable", opt, *, params=None, names=None, match="auto", hyperparameters=None):
    del params, hyperparameters  # torch optimizers hold their params and their hyperparameters
    if not isinstance(opt, (Muon, Kron)):
        raise TypeError(f"xpopt.checkpoint.load: like={type(opt).__name__} is not an xpopt Muon or Kron")
    kron = isinstance(opt, Kron)
    CK.check_optimizer(port, "kron" if kron else "muon")
    sd = opt.state_dict()
    live = [p for g in opt.param_groups for p in g["params"]]
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    groups = [g for g, group in enumerate(sd["param_groups"]) for _ in group["params"]]
    tnames = _names(opt, sd, None)
    idx = CK.pair(port, [(n, tuple(p.shape)) for n, p in zip(tnames, live)], names, match)
    CK.check_hyperparameters(port, _hypers(sd), list(zip(idx, groups)), stacklevel=5)
    routes = None if kron else opt.routes()
    state: dict = {}
    for k, (pid, p, tname, j) in enumerate(zip(ids, live, tnames, idx)):
        saved = port.params[j]
        if saved.get("step") is None:
            continue
        if kron:
            st = {"step": int(saved["step"])}
            # the saved parameter's own key: its random stream goes where it goes
            st["key"] = torch.as_tensor(CK.kron_key(port, j, tname).astype(np.int64))
            for f in _KRON_FIELDS:
                if port.get(j, f)[0] is not None:
                    st[f] = _from_port(port, j, f, p.device)
            _check_kron_fields(opt, p, st, tname, port, j)
        else:
            route = routes[k].route
            CK.check_route(port, j, tname, route)
            # Muon's load keeps float32 state for bf16 params (its post-hook re-copies).
            st = {"step": torch.tensor(float(saved["step"]))}
            for tk, pk in _MUON_FIELDS.items():
                if port.get(j, pk)[0] is not None:
                    st[tk] = _from_port(port, j, pk, p.device)
        state[pid] = st
    if port.nonfinite_steps:
        state["nonfinite_steps"] = torch.tensor(float(port.nonfinite_steps))
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    return opt


def _check_kron_fields(opt, p, st, tname, port, j) -> None:
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    opts = _options(group, "the target")
    CK.check_state_dtype(port, j, ("Ql", "Qr"), opts.dtype, tname, "dtype")
    mdt = opts.momentum_dtype(torch.finfo(p.dtype).bits)   # the state-dtype rule; None: the param's dtype
    CK.check_state_dtype(port, j, ("mu",), mdt or dtype_name(p.dtype), tname, "mu_dtype")
    want = {"Qr", "Ll", "Lr"} | ({"mu"} if group["b1"] != 0 else set())
    lay = opt._layouts[p]
    if lay.left is not None:
        want.add("Ql")
    have = set(st) - {"step", "key"}
    if have != want:
        raise CK.CheckpointError(
            f"parameter {tname!r}: the saved Kron state has {sorted(have)}, this optimizer needs {sorted(want)} "
            f"(layout {lay.describe()}, b1={group['b1']}); use the same b1, block_size and max_size_dense")
