"""The portable optimizer-state format: the file, its header, parameter pairing, option records.

A leaf module: :mod:`xpopt.checkpoint` (the public ``save`` / ``load``) and each
framework's exporter / importer (``adapters/*/checkpoint``) import it, and it
imports neither (only ``core.kron`` for a Kron key, when asked).  The format,
the array names and the version policy are in ``docs/checkpoints.md``.
Importing it imports no framework (NumPy included).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Portable", "CheckpointError", "FORMAT", "FORMAT_VERSION", "HEADER_KEY", "FIELDS", "MATCH", "COMPARED",
           "read", "write", "canonical_name", "pair", "kron_key", "check_state_dtype", "check_route",
           "check_optimizer", "uniform_step", "json_value", "record_options", "check_hyperparameters"]

FORMAT = "xpopt-optimizer-state"
#: Bumped when the meaning of a header field or array changes; see ``_MIGRATIONS``.
FORMAT_VERSION = 1
HEADER_KEY = "__header__"

#: The state fields a parameter may carry, per route.  Kron's ``key`` is the
#: parameter's own Threefry key (``fold_in(root_key, index)`` with the index it
#: had in the run that created it; it travels with the parameter), ``mu`` its momentum.
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


# --------------------------------------------------------------------------- file


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

#: ``match=`` values of :func:`load`.
MATCH = ("auto", "name", "order")

_PLACEHOLDER = re.compile(r"group \d+, param \d+|leaf \d+")
_TOKEN = re.compile(r"""\[\s*'((?:[^'\\]|\\.)*)'\s*\]|\[\s*"((?:[^"\\]|\\.)*)"\s*\]|\[([^\]]*)\]|([^.\[\]/]+)""")
#: Path components that wrappers insert (torch.compile, FSDP1, activation checkpointing).
_WRAPPERS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
#: A leading component every name of one side may carry: flax's ``params`` collection, DDP's ``module``.
_ROOTS = ("params", "module")


def canonical_name(name) -> Optional[str]:
    """A parameter name in one spelling for every framework, or None when it only tells a position.

    torch's dotted names (``0.weight``, ``layers.1.w``), JAX key paths
    (``['w_in']``, ``['params']['Dense_0']['kernel']``, ``.attr``, ``[0]``),
    ``/``-joined paths and the arrays adapter's dict keys become ``/``-joined
    components (``w_in``, ``params/Dense_0/kernel``, ``layers/1/w``); the
    components that torch.compile / FSDP wrappers insert are dropped.
    Positions are not names: ``"group g, param i"`` (torch without names),
    ``"leaf i"`` and paths made of indices only (``[0]``, ``1``: lists) give None.
    """
    if name is None:
        return None
    name = str(name).strip()
    if not name or _PLACEHOLDER.fullmatch(name):
        return None
    parts = []
    for m in _TOKEN.finditer(name):
        tok = next(g for g in m.groups() if g is not None)
        parts += [p.strip() for p in re.split(r"[./]", tok) if p.strip() and p.strip() not in _WRAPPERS]
    if not parts or all(p.isdigit() for p in parts):
        return None
    return "/".join(parts)


def _strip_root(names: list) -> list:
    for root in _ROOTS:
        pre = root + "/"
        if names and all(n.startswith(pre) for n in names):
            names = [n[len(pre):] for n in names]
    return names


def _listing(names) -> str:
    return ", ".join(repr(n) for n in names)


def pair(port: Portable, targets: list, names: Optional[dict] = None, match: str = "auto") -> list:
    """For each target parameter ``(name, shape)``: the index of its saved entry.

    ``names`` (``{target_name: saved_name}``) pairs explicitly (target names
    it leaves out pair with the saved parameter of the same name).  Else, with
    ``match="auto"``: by name when every parameter on both sides has a name
    (:func:`canonical_name`) and the two sets of names are equal; by order
    when a side has no names; a :class:`CheckpointError` listing both sides'
    names when they disagree.  ``match="order"``: by order; ``match="name"``:
    by name, an error without names.  Every pair must have the same shape.
    """
    saved = port.params
    if match not in MATCH:
        raise ValueError(f"match={match!r} is not one of {MATCH}")
    snames = [p["name"] for p in saved]
    tnames = [t for t, _ in targets]
    fix = ("pass names={target_name: saved_name} to pair them yourself, or match='order' to pair them by "
           "position (the saved order against the target's)")
    if names:
        by_raw = {n: i for i, n in enumerate(snames)}
        by_can = {canonical_name(n): i for i, n in enumerate(snames) if canonical_name(n) is not None}
        given = {canonical_name(k) or k: v for k, v in names.items()}
        idx = []
        for tname in tnames:
            sname = names.get(tname, given.get(canonical_name(tname) or tname, tname))
            i = by_raw.get(sname, by_can.get(canonical_name(sname)))
            if i is None:
                raise CheckpointError(f"parameter {tname!r}: no saved parameter named {sname!r} (saved, in "
                                      f"order: {_listing(snames)})")
            idx.append(i)
        dup = {i for i in idx if idx.count(i) > 1}
        if dup:
            raise CheckpointError(f"saved parameter(s) {_listing(snames[i] for i in sorted(dup))} are paired with "
                                  "more than one target parameter by names=")
    else:
        scan = [canonical_name(n) for n in snames]
        tcan = [canonical_name(n) for n in tnames]
        named = None not in scan and None not in tcan
        if match == "name" and not named:
            side = "checkpoint's" if None in scan else "target's"
            raise CheckpointError(f"match='name', but the {side} parameters have no names (saved: "
                                  f"{_listing(snames)}; target: {_listing(tnames)}); {fix}")
        if match == "order" or not named:
            if len(saved) != len(targets):
                raise CheckpointError(
                    f"the checkpoint holds {len(saved)} parameters, the target {len(targets)}; they are paired by "
                    "order: build the target over the same parameters, or pass names={target: saved}")
            idx = list(range(len(targets)))
        else:
            scan, tcan = _strip_root(scan), _strip_root(tcan)
            if len(set(scan)) == len(scan) == len(tcan) and set(scan) == set(tcan):
                where = {c: i for i, c in enumerate(scan)}
                idx = [where[c] for c in tcan]
            else:
                only_s = [n for n, c in zip(snames, scan) if c not in set(tcan)]
                only_t = [n for n, c in zip(tnames, tcan) if c not in set(scan)]
                raise CheckpointError(
                    f"the checkpoint's parameter names do not correspond to the target's, so they cannot be "
                    f"paired by name.\n  saved ({len(snames)}, in order): {_listing(snames)}\n  target "
                    f"({len(tnames)}, in order): {_listing(tnames)}\n  only saved: {_listing(only_s) or '-'}; only "
                    f"in the target: {_listing(only_t) or '-'}\n{fix}")
    for (tname, tshape), i in zip(targets, idx):
        s = saved[i]
        if s.get("shape") is not None and tshape is not None and tuple(s["shape"]) != tuple(tshape):
            raise CheckpointError(
                f"parameter {tname!r} has shape {tuple(tshape)} but the saved parameter {i} ({s['name']!r}) has "
                f"shape {tuple(s['shape'])}: the checkpoint comes from another model, or the parameters are in "
                "another order or layout (flax (in, out) vs torch (out, in): keep the JAX params in torch's "
                "layout with dimension_numbers=xo.TORCH); pass names={target: saved} to pair them by name")
    return idx


def kron_key(port: Portable, j: int, tname: str):
    """Saved parameter ``j``'s own Kron key (uint32[2], NumPy): it goes with the parameter wherever it is
    loaded.  A file that holds only the root key (no per-parameter ``key``) gives ``fold_in(root, j)``, the
    key its saved position had."""
    import numpy as np

    key, _ = port.get(j, "key")
    if key is not None:
        return np.asarray(key, dtype=np.int64).astype(np.uint32)
    if port.kron_root_key is not None:
        from .core import kron as K

        return np.asarray(K.param_key(np.asarray(port.kron_root_key, dtype=np.uint32), j), dtype=np.uint32)
    raise CheckpointError(f"parameter {tname!r}: the checkpoint holds neither its Kron key nor the root key")


def check_state_dtype(port: Portable, j: int, fields, want: Optional[str], tname: str, option: str) -> None:
    """A CheckpointError when saved parameter ``j``'s ``fields`` are not stored in ``want`` (the
    dtype the target keeps them in, set by its option ``option``): a cast would change the state."""
    for f in fields:
        a, dt = port.get(j, f)
        if a is not None and want is not None and dt != want:
            raise CheckpointError(
                f"parameter {tname!r}: the saved {f!r} is {dt}, the target stores it in {want} ({option}); build "
                f"the target with {option}={dt!r} to resume this state")


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


# --------------------------------------------------------------------------- hyperparameters

#: The options a load compares, per optimizer, by their torch / arrays names
#: (optax's ``learning_rate`` / ``fallback_learning_rate`` are ``lr`` /
#: ``fallback_lr``).  True: a different value changes how the state is laid
#: out or what it means (factor / momentum dtype, update style, blocking,
#: momentum form): the saved state cannot continue under it, a
#: :class:`CheckpointError`.  False: the run continues under the target's
#: value, a ``UserWarning`` names it.  Options that only route parameters
#: (checked per parameter), pick kernels (``batched``) or name things are not
#: compared, nor the seed (each Kron parameter's key travels with its state).
COMPARED = {
    "muon": {"lr": False, "momentum": False, "nesterov": False, "momentum_form": True,
             "momentum_bias_correction": False, "weight_decay": False,
             "ns_coefficients": False, "ns_steps": False, "eps": False, "eps_mode": False, "safety_factor": False,
             "adjust_lr_fn": False, "conv_mode": False, "normalize_spatial": False, "ns_dtype": False,
             "ns_method": False, "mu_dtype": True, "low_precision_dtype": True, "fallback": False,
             "fallback_lr": False, "betas": False, "fallback_eps": False, "fallback_eps_root": False,
             "fallback_weight_decay": False, "min_dim_size": False, "max_aspect_ratio": False,
             "preconditioning": False, "adaptive": False, "consistent_rms": False},
    "kron": {"lr": False, "b1": False, "weight_decay": False, "preconditioner_update_style": True,
             "preconditioner_lr": False, "preconditioner_init_scale": False,
             "preconditioner_update_probability": False, "max_size_dense": True, "block_size": True,
             "dtype": True, "mu_dtype": True, "normalize_grads": False, "lr_style": False, "noise_scale": False},
}
_RENAMED = {"learning_rate": "lr", "fallback_learning_rate": "fallback_lr"}
#: What None stands for (the same default in every adapter): another option's value, or a number.
_NONE_IS = {"fallback_lr": "lr", "fallback_weight_decay": "weight_decay", "max_size_dense": 16384,
            "block_size": 256, "min_dim_size": 4, "max_aspect_ratio": 128.0, "consistent_rms": 0.2}
_DTYPES = ("dtype", "mu_dtype", "ns_dtype")
_SKIP = object()


def record_options(optimizer: str, options: dict) -> dict:
    """The header's ``hyperparameters`` for an optax transform / arrays optimizer built with ``options``
    (its arguments by name): ``{"param_groups": [{option: JSON value}]}``, as torch's."""
    out = {}
    for k, v in options.items():
        k = _RENAMED.get(k, k)
        if k in COMPARED[optimizer]:
            if k in _DTYPES:
                out[k] = _dtype_name(v)
                continue
            j = json_value(v)
            if isinstance(j, str) and not isinstance(v, str) and not j.startswith("<"):
                j = f"<{j}>"  # a repr (a traced value, an object): recorded, not compared
            out[k] = j
    return {"param_groups": [out]}


def _dtype_name(v):
    if v is None:
        return None
    if not isinstance(v, str):
        for get in (lambda x: x.name, lambda x: x.dtype.name):
            try:
                n = get(v)
            except AttributeError:
                continue
            if isinstance(n, str):
                return n
        v = str(v)
    return v.replace("torch.", "")


def _norm(optimizer, k, group):
    v = group.get(k)
    if k == "lr" and group.get("initial_lr") is not None:  # a torch LR scheduler moves lr; compare its start
        v = group["initial_lr"]
    if v is None:
        ref = "dtype" if (optimizer, k) == ("kron", "mu_dtype") else _NONE_IS.get(k)
        if k == "ns_steps":
            v = 8 if str(group.get("ns_coefficients", "")).startswith("polar_express") else 5
        elif isinstance(ref, str):
            return _norm(optimizer, ref, group)
        elif ref is not None:
            v = ref
    if k in _DTYPES:
        return _dtype_name(v)
    v = json_value(v)
    if isinstance(v, str):
        return _SKIP if v.startswith("<") else v.lower()  # a callable (schedule, filter) is not compared
    if isinstance(v, list) and any(isinstance(x, str) and x.startswith("<") for x in v):
        return _SKIP
    return v


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)  # 0-d float32 arrays (inject_hyperparams)


def check_hyperparameters(port: Portable, target: Optional[dict], pairs: list, *, stacklevel: int = 4) -> None:
    """Compare the saved hyperparameters with the target's, option by option (:data:`COMPARED`).

    ``target``: ``{"param_groups": [...]}`` (None: unknown, a warning says
    they were not compared); ``pairs``: ``(saved_index, target_group)`` per
    paired parameter.  Raises :class:`CheckpointError` for layout / meaning
    options, warns (one ``UserWarning``, each option ``saved X, target Y``)
    for the others.
    """
    saved_groups = (port.hyperparameters or {}).get("param_groups") or []
    if not saved_groups:
        return  # saved without a record (optax / arrays without optimizer=): nothing to compare with
    if target is None:
        opt_, g0 = port.optimizer, saved_groups[0]
        vals = ((k, _norm(opt_, k, g0)) for k in COMPARED[opt_] if k in g0)
        shown = ", ".join(f"{k}={v!r}" for k, v in vals if v is not _SKIP)
        warnings.warn(
            f"xpopt.checkpoint.load: the target's hyperparameters are unknown, so they were not compared with the "
            f"saved run's ({shown}); pass optimizer=<the transform or optimizer> to compare them",
            UserWarning, stacklevel=stacklevel)
        return
    target_groups = target.get("param_groups") or []
    if not target_groups:
        return
    todo = set()
    for j, tg in pairs:
        sg = port.params[j].get("group", 0 if len(saved_groups) == 1 else None)
        if sg is not None and sg < len(saved_groups) and tg < len(target_groups):
            todo.add((sg, tg))
    if len(target_groups) == 1 and len(saved_groups) == 1:
        todo.add((0, 0))
    several = len(saved_groups) > 1 or len(target_groups) > 1
    fatal, soft = [], []
    for sg, tg in sorted(todo):
        s, t = saved_groups[sg], target_groups[tg]
        where = f"param group {tg} (saved group {sg}): " if several else ""
        for k, hard in COMPARED[port.optimizer].items():
            if k not in s or k not in t:
                continue
            a, b = _norm(port.optimizer, k, s), _norm(port.optimizer, k, t)
            if a is _SKIP or b is _SKIP or _same(a, b):
                continue
            (fatal if hard else soft).append(f"{where}{k}: saved {a!r}, target {b!r}")
    if fatal:
        raise CheckpointError(
            "the checkpoint's state was made under options that set how the state is stored or what it means, "
            f"and the target's differ: {'; '.join(fatal)}. Build the target with the saved values to resume "
            "this state")
    if soft:
        warnings.warn(f"xpopt.checkpoint.load: the target's hyperparameters differ from the saved run's (the "
                      f"target's are used from here on): {'; '.join(soft)}", UserWarning, stacklevel=stacklevel)
