"""Portable optimizer state: one file format for torch, optax and the arrays adapter.

::

    import xpopt.checkpoint as ckpt

    ckpt.save("run.xpopt.npz", opt)                 # torch Muon / Kron (or its state_dict())
    ckpt.save("run.xpopt.npz", state, params=params)  # optax state of xo.muon / xo.kron..., or arrays state

    ckpt.load("run.xpopt.npz", like=opt)            # fills a torch optimizer in place (returns it)
    state = ckpt.load("run.xpopt.npz", like=tx.init(params), params=params)   # an optax state
    state = ckpt.load("run.xpopt.npz", like=arrays_opt.init(params))          # an arrays state

The file is a NumPy ``.npz`` (no pickle: ``np.load(..., allow_pickle=False)``
reads it) holding one array per piece of state and a JSON header in the
``__header__`` entry; the format, the array names and the version policy are
in ``docs/checkpoints.md``.  Parameters are matched between frameworks by
order (torch: param-group order; optax: pytree flattening order; arrays:
container order) and their shapes checked; ``names={target_name:
saved_name}`` matches by name instead.  A torch parameter and a JAX leaf must
have the same shape: for flax's ``(in, out)`` kernels either keep the JAX
params in torch's layout (``dimension_numbers=xo.TORCH``) or transpose them
and the state yourself.

Importing this module imports no framework (NumPy included): each side is
imported when it is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["save", "load", "export_state", "import_state", "Portable", "FORMAT", "FORMAT_VERSION",
           "CheckpointError"]

FORMAT = "xpopt-optimizer-state"
#: Bumped when the meaning of a header field or array changes; see ``_MIGRATIONS``.
FORMAT_VERSION = 1
HEADER_KEY = "__header__"

#: The state fields a parameter may carry, per route.  Kron's ``key`` is the
#: parameter's own Threefry key (``fold_in(root_key, index)``), ``mu`` its momentum.
FIELDS = {
    "muon": ("momentum",),
    "fallback": ("exp_avg", "exp_avg_sq"),
    "kron": ("mu", "Ql", "Qr", "Ll", "Lr", "key"),
}


class CheckpointError(ValueError):
    """A checkpoint that does not fit its target, or a file this version cannot read."""


@dataclass
class Portable:
    """The framework-free state: what the file holds, in memory.

    ``params``: one dict per parameter, in the source's order, with ``name``,
    ``shape`` (list, or None when a torch state_dict had no state for it),
    ``dtype`` (the parameter's, when known), ``route`` (``"muon"``,
    ``"fallback"`` or ``"kron"``) and ``step`` (its update count, None without
    state).  ``arrays``: ``"<index>.<field>"`` -> NumPy array (bfloat16 as
    ``ml_dtypes.bfloat16`` or raw uint16 bits, see :func:`save`).
    """

    optimizer: str                      # "muon" | "kron"
    params: list
    arrays: dict
    hyperparameters: dict = field(default_factory=dict)
    step: Optional[int] = None          # the common step of every stepped parameter, None if they differ
    kron_root_key: Optional[list] = None  # [hi, lo] uint32 words of PRNGKey(seed), when known
    nonfinite_steps: int = 0
    source: str = ""                    # "torch" | "optax" | "arrays"
    #: keys of ``arrays`` that hold bfloat16 as its raw uint16 bits (NumPy has no bfloat16)
    bf16: set = field(default_factory=set)

    def put(self, index: int, name: str, a) -> None:
        """Store a NumPy array (``ml_dtypes.bfloat16`` ones as their bits)."""
        import numpy as np

        a = np.ascontiguousarray(a)
        key = f"{index}.{name}"
        if a.dtype.name == "bfloat16":
            a = a.view(np.uint16)
            self.bf16.add(key)
        self.arrays[key] = a

    def get(self, index: int, name: str):
        """``(array, dtype_name)`` or ``(None, None)``; bfloat16 comes back as uint16 bits."""
        key = f"{index}.{name}"
        if key not in self.arrays:
            return None, None
        a = self.arrays[key]
        return a, ("bfloat16" if key in self.bf16 else a.dtype.name)

    def get_numpy(self, index: int, name: str):
        """The array with its real dtype (bfloat16 through ``ml_dtypes``), or None."""
        a, dt = self.get(index, name)
        if a is not None and dt == "bfloat16":
            import ml_dtypes

            a = a.view(ml_dtypes.bfloat16)
        return a

    def get_checked(self, index: int, name: str, shape, target_name) -> Any:
        """``get_numpy``, or a CheckpointError naming the parameter when the array is missing or
        its shape is not ``shape`` (the target state's)."""
        a = self.get_numpy(index, name)
        if a is None:
            raise CheckpointError(f"parameter {target_name!r}: the checkpoint has no {name!r} for it")
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"parameter {target_name!r}: saved {name!r} has shape {tuple(a.shape)}, the "
                                  f"target's state {tuple(shape)}")
        return a

    def common_step(self) -> Optional[int]:
        steps = {p["step"] for p in self.params if p.get("step") is not None}
        return steps.pop() if len(steps) == 1 else (0 if not steps else None)


# --------------------------------------------------------------------------- dispatch


def _kind(obj) -> str:
    mod = type(obj).__module__ or ""
    if mod.startswith("torch") or mod.endswith("adapters.torch") or mod.endswith("_kron_torch"):
        return "torch"
    if mod.endswith("adapters.arrays") or mod.endswith("_kron_arrays"):
        return "arrays"
    if isinstance(obj, dict) and "state" in obj and "param_groups" in obj:
        return "torch"  # a torch state_dict()
    try:
        import torch

        if isinstance(obj, torch.optim.Optimizer):
            return "torch"
    except ImportError:
        pass
    return "optax"


def export_state(source, *, params=None, names=None, hyperparameters=None) -> Portable:
    """The :class:`Portable` state of ``source`` (see :func:`save` for what it may be)."""
    kind = _kind(source)
    if kind == "torch":
        from .adapters._checkpoint_torch import export_torch as f
    elif kind == "arrays":
        from .adapters._checkpoint_arrays import export_arrays as f
    else:
        from .adapters._checkpoint_optax import export_optax as f
    port = f(source, params=params, names=names)
    if hyperparameters:
        port.hyperparameters.update(hyperparameters)
    return port


def import_state(port: Portable, like, *, params=None, names=None):
    """``like`` filled from ``port``: a torch optimizer in place (returned), else a new state."""
    kind = _kind(like)
    if kind == "torch":
        from .adapters._checkpoint_torch import import_torch as f
    elif kind == "arrays":
        from .adapters._checkpoint_arrays import import_arrays as f
    else:
        from .adapters._checkpoint_optax import import_optax as f
    return f(port, like, params=params, names=names)


# --------------------------------------------------------------------------- file


def save(path, source, *, params=None, names=None, hyperparameters=None) -> Portable:
    """Write ``source``'s optimizer state to ``path`` (an ``.npz``); returns what was written.

    ``source``: a torch ``Muon`` / ``Kron`` (preferred: it knows parameter
    names, routes and Kron's seed) or its ``state_dict()``; the state of
    ``xo.muon`` / ``xo.scale_by_muon`` / ``xo.quad`` / ``xo.skew`` /
    ``xo.scale_by_kron`` (alone or inside ``optax.chain`` / ``inject_hyperparams``;
    ``params`` gives the leaf names and dtypes); or the state of
    ``arrays.muon`` / ``arrays.kron``.  ``names``: torch only, a list of
    parameter names in param-group order (default: the names the optimizer
    was built with, else ``"group g, param i"``).  ``hyperparameters``: extra
    JSON-able entries for the header (a record; loading uses the target's own).
    The write is atomic (a temporary file renamed over ``path``).
    """
    port = export_state(source, params=params, names=names, hyperparameters=hyperparameters)
    write(path, port)
    return port


def load(path, like, *, params=None, names=None):
    """Read ``path`` into ``like``: see :func:`import_state`.

    ``like``: a torch ``Muon`` / ``Kron`` (filled in place through its
    ``load_state_dict``, all or nothing), an optax state to take the shape of
    (``tx.init(params)``), or an arrays state (``opt.init(params)``).
    ``names``: ``{target_name: saved_name}`` to match parameters by name
    (default: by order, shapes checked).  Hyperparameters are the target's;
    the header's are a record (``read(path).hyperparameters``).
    """
    return import_state(read(path), like, params=params, names=names)


def _json_default(o):
    try:
        return float(o)
    except (TypeError, ValueError):
        return repr(o)


def write(path, port: Portable) -> None:
    import numpy as np

    arrays, dtypes = {}, {}
    for k, a in port.arrays.items():
        a = np.asarray(a)
        dtypes[k] = "bfloat16" if k in port.bf16 else a.dtype.name
        arrays[k] = a
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "optimizer": port.optimizer,
        "source": port.source,
        "step": port.step,
        "nonfinite_steps": int(port.nonfinite_steps),
        "kron_root_key": port.kron_root_key,
        "hyperparameters": port.hyperparameters,
        "params": port.params,
        "arrays": dtypes,
    }
    from ._version import __version__

    header["xpopt_version"] = __version__
    blob = json.dumps(header, default=_json_default, sort_keys=True).encode()
    arrays[HEADER_KEY] = np.frombuffer(blob, dtype=np.uint8)
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


#: ``{old_version: function(header, arrays) -> (header, arrays)}`` lifting a file one
#: version up.  Version 1 is the first: nothing to migrate yet.
_MIGRATIONS: dict = {}


def read(path) -> Portable:
    import numpy as np

    with np.load(os.fspath(path), allow_pickle=False) as z:
        if HEADER_KEY not in z.files:
            raise CheckpointError(f"{path}: not an xpopt checkpoint (no {HEADER_KEY!r} entry); write one "
                                  "with xpopt.checkpoint.save")
        header = json.loads(bytes(z[HEADER_KEY]).decode())
        arrays = {k: z[k] for k in z.files if k != HEADER_KEY}
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {header.get('format')!r} is not {FORMAT!r}")
    v = header.get("version")
    if not isinstance(v, int):
        raise CheckpointError(f"{path}: the header has no integer 'version' ({v!r})")
    if v > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written in checkpoint format version {v} by xpopt {header.get('xpopt_version')}; this "
            f"xpopt reads versions up to {FORMAT_VERSION}: upgrade xpopt to load it")
    while v < FORMAT_VERSION:
        if v not in _MIGRATIONS:
            raise CheckpointError(
                f"{path}: checkpoint format version {v} cannot be migrated to version {FORMAT_VERSION} "
                f"(no migration is known from {v}); load it with the xpopt that wrote it "
                f"({header.get('xpopt_version')}) and continue the run there")
        header, arrays = _MIGRATIONS[v](header, arrays)
        v = header["version"]
    bf16 = {k for k, d in header["arrays"].items() if d == "bfloat16"}
    return Portable(optimizer=header["optimizer"], params=header["params"], arrays=arrays, bf16=bf16,
                    hyperparameters=header.get("hyperparameters", {}), step=header.get("step"),
                    kron_root_key=header.get("kron_root_key"), nonfinite_steps=header.get("nonfinite_steps", 0),
                    source=header.get("source", ""))


# --------------------------------------------------------------------------- matching (shared by the importers)


def match(port: Portable, targets: list, names: Optional[dict] = None) -> list:
    """For each target parameter ``(name, shape)``: the index of its saved entry (or None).

    By order unless ``names`` (``{target_name: saved_name}``) is given; the
    counts must agree, and every matched pair must have the same shape.
    """
    saved = port.params
    if names:
        by_name = {p["name"]: i for i, p in enumerate(saved)}
        idx = []
        for tname, _ in targets:
            sname = names.get(tname, tname)
            if sname not in by_name:
                raise CheckpointError(f"parameter {tname!r}: no saved parameter named {sname!r} "
                                      f"(saved: {sorted(by_name)})")
            idx.append(by_name[sname])
    else:
        if len(saved) != len(targets):
            raise CheckpointError(
                f"the checkpoint holds {len(saved)} parameters, the target {len(targets)}; they are matched by "
                "order: build the target over the same parameters, or pass names={target: saved}")
        idx = list(range(len(targets)))
    for (tname, tshape), i in zip(targets, idx):
        s = saved[i]
        if s.get("shape") is not None and tshape is not None and tuple(s["shape"]) != tuple(tshape):
            raise CheckpointError(
                f"parameter {tname!r} has shape {tuple(tshape)} but the saved parameter {i} ({s['name']!r}) has "
                f"shape {tuple(s['shape'])}: the checkpoint comes from another model, or the parameters are in "
                "another order or layout (flax (in, out) vs torch (out, in): keep the JAX params in torch's "
                "layout with dimension_numbers=xo.TORCH); pass names={target: saved} to match by name")
    return idx


def check_route(port: Portable, i: int, tname: str, want: str) -> None:
    got = port.params[i]["route"]
    if port.params[i].get("step") is not None and got != want:
        raise CheckpointError(
            f"parameter {tname!r} is routed to {want} here but its saved state is {got} state "
            f"(saved parameter {i}, {port.params[i]['name']!r}); build the target with the same routing "
            "(labels / fallback_filter / use_fallback / min_dim_size / max_aspect_ratio)")


def check_optimizer(port: Portable, want: str) -> None:
    if port.optimizer != want:
        raise CheckpointError(f"the checkpoint holds {port.optimizer} state; the target is a {want} optimizer")


def uniform_step(port: Portable, what: str) -> int:
    """The one step count a single-counter target (optax, arrays) takes."""
    steps = {}
    for p in port.params:
        if p.get("step") is not None:
            steps.setdefault(int(p["step"]), p["name"])
    if len(steps) > 1:
        detail = ", ".join(f"{n!r}: {s}" for s, n in sorted(steps.items()))
        raise CheckpointError(
            f"{what} keeps one step count for every parameter, but the saved parameters have different "
            f"counts ({detail}; some had no gradient on some steps in torch); such a state can be resumed "
            "in torch only")
    if not steps:
        return int(port.step or 0)
    return next(iter(steps))


def json_value(v):
    """A hyperparameter as JSON: numbers, strings, bools, None, lists; anything else by repr."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    try:
        if getattr(v, "ndim", None) == 0 or getattr(v, "numel", lambda: 2)() == 1:
            return float(v)
    except (TypeError, ValueError):
        pass
    return repr(v)
