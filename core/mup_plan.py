"""muP planning, framework-free: which role and multipliers each parameter gets.

Shared by the torch and optax helpers (``adapters/torch/mup.py``,
``adapters/optax/mup.py``), which only name parameters and turn the rows
into param groups or pytrees; the rule table itself is :mod:`.mup`.

Roles and base shapes live *outside* the parameters (a name -> role map and a
name -> shape dict, saved as a small JSON), so nothing is lost under FSDP,
``torch.compile``, ``torch.save`` or a pytree transformation.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from . import mup as M

BASE_SHAPES_FORMAT = "xpopt-base-shapes"
BASE_SHAPES_VERSION = 1


@dataclass(frozen=True)
class Entry:
    """One parameter as the helpers see it: ``kind`` is ``embedding``, ``linear``, ``vector`` or None
    (unknown: needs a role from ``roles=``); ``last`` marks the model's last linear layer."""

    name: str
    shape: tuple
    kind: Optional[str]
    last: bool = False


def save_base_shapes(shapes: Mapping[str, Sequence[int]], path) -> None:
    """Write ``{name: shape}`` as the base-shapes JSON (``format``, ``version``, ``shapes``)."""
    doc = {"format": BASE_SHAPES_FORMAT, "version": BASE_SHAPES_VERSION,
           "shapes": {str(k): [int(d) for d in v] for k, v in shapes.items()}}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)


def load_base_shapes(path) -> dict:
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("format") != BASE_SHAPES_FORMAT:
        raise ValueError(f"{path} is not an xpopt base-shapes file (no format={BASE_SHAPES_FORMAT!r}); "
                         "write one with save_base_shapes(base_model, path)")
    if doc.get("version") != BASE_SHAPES_VERSION:
        raise ValueError(f"{path} has base-shapes version {doc.get('version')!r}; this xpopt reads version "
                         f"{BASE_SHAPES_VERSION}")
    return {k: tuple(v) for k, v in doc["shapes"].items()}


def as_base_shapes(base, shapes_of) -> dict:
    """``base`` as ``{name: shape}``: a dict, a JSON path, or a model / pytree (``shapes_of`` reads it)."""
    if isinstance(base, (str, os.PathLike)):
        return load_base_shapes(base)
    if isinstance(base, Mapping) and all(isinstance(v, (tuple, list)) for v in base.values()):
        return {k: tuple(int(d) for d in v) for k, v in base.items()}
    return shapes_of(base)


def name_matches(name: str, pattern: str) -> bool:
    """Whether a ``roles=`` pattern names parameter ``name``.

    ``fnmatch`` (case-sensitive; ``*`` crosses ``.`` and ``/``), plus one rule: a
    leading ``*.`` (torch names) or ``*/`` (pytree paths) also matches at the top
    level, so ``"*.pos_emb"`` names ``pos_emb`` as well as ``blocks.0.pos_emb``
    (the "at any depth" reading, as ``**/`` in a ``.gitignore``).
    """
    if name == pattern or fnmatch.fnmatchcase(name, pattern):
        return True
    return pattern[:2] in ("*.", "*/") and fnmatch.fnmatchcase(name, pattern[2:])


#: How torch parameter names read, for :func:`check_roles`' message.
TORCH_NAMES = "exact names or fnmatch patterns like 'blocks.*.weight'"


def check_roles(roles: Optional[Mapping[str, str]], names: Sequence[str],
                aliases: Optional[Mapping[str, str]] = None, *, hint: str = TORCH_NAMES) -> None:
    """Every ``roles`` pattern names a valid role and matches at least one parameter.

    A pattern that matches nothing would be ignored silently (a typo, or a name
    from another framework's naming): it is an error naming the pattern, with
    some of the names it could have matched and ``hint``, how the caller's
    names read.  ``aliases``: ``{second name: name}`` of tied parameters,
    which the helpers see under their first name.
    """
    if not roles:
        return
    if not isinstance(roles, Mapping):
        raise ValueError(f"roles must be a dict {{name or pattern: role}}, not {type(roles).__name__}")
    for pattern, role in roles.items():
        M.check_choice(role, M.ROLES, "role", f"pattern {pattern!r}")
        if any(name_matches(n, pattern) for n in names):
            continue
        tied = sorted({aliases[a] for a in (aliases or {}) if name_matches(a, pattern)})
        if tied:
            raise ValueError(f"roles pattern {pattern!r} matches only the second name of tied parameter(s) "
                             f"{tied}; give the role under that name")
        raise ValueError(f"roles pattern {pattern!r} matches no parameter; parameter names are such as "
                         f"{list(names)[:4]} ({hint})")


def _override(name: str, roles: Optional[Mapping[str, str]]):
    if not roles:
        return None
    for pattern, role in roles.items():
        if name_matches(name, pattern):
            M.check_choice(role, M.ROLES, "role", f"pattern {pattern!r}")
            return role
    return None


def infer_role(e: Entry, fan_in: int, fan_out: int, base_fan_in: int, base_fan_out: int) -> Optional[str]:
    """The role of a parameter from its kind and which of its fans grow with width.

    Vectors -> ``vector``; embeddings -> ``input``; a linear weight whose fan-in
    is fixed and fan-out grows -> ``input``, fan-in grows and fan-out fixed ->
    ``output``, both grow -> ``hidden``; at the base width (nothing grows) the
    model's last linear layer is ``output`` and the others ``hidden``.
    """
    if e.kind == "vector":
        return "vector"
    if e.kind == "embedding":
        return "input"
    if e.kind != "linear":
        return None
    grows_in, grows_out = fan_in != base_fan_in, fan_out != base_fan_out
    if grows_out and not grows_in:
        return "input"
    if grows_in and not grows_out:
        return "output"
    if grows_in and grows_out:
        return "hidden"
    return "output" if e.last else "hidden"


def plan(entries: Sequence[Entry], base_shapes: Mapping[str, tuple], *, rule: str, optimizer: str,
         roles: Optional[Mapping[str, str]] = None, layout: str = "torch", wd_scaling: str = "independent",
         muon_adjust_lr_fn: str = "match_rms_adamw", muon_rms: float = 0.2,
         fan_mapping: Optional[Mapping[str, Sequence[int]]] = None,
         delta_shapes: Optional[Mapping[str, tuple]] = None,
         aliases: Optional[Mapping[str, str]] = None) -> list[dict]:
    """One row per parameter: name, shape, role, fans, base fans and :class:`core.mup.Multipliers`.

    ``delta_shapes``: the same architecture at another width (microsoft/mup's
    ``delta``): which fans grow is read from base vs delta instead of base vs
    the model, so roles are the same at every width, the base width included
    (where nothing grows and roles would otherwise fall back to position).

    ``fan_mapping``: ``{name: (fan_in, fan_out)}`` (seed 002's form) overriding the
    fans read from the shapes; its base values scale by the same ratio as the shape.

    ``roles``: ``{name or fnmatch pattern: role}``; a pattern that matches no
    parameter is an error (:func:`check_roles`; ``aliases`` as there).
    """
    M.check_choice(rule, M.RULES, "rule")
    M.check_choice(optimizer, M.OPTIMIZERS, "optimizer")
    check_roles(roles, [e.name for e in entries], aliases)
    names = {e.name for e in entries}
    extra = sorted(set(base_shapes) - names)
    missing = [e.name for e in entries if e.name not in base_shapes]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"parameters missing from the base shapes: {missing[:5]}")
        if extra:
            parts.append(f"base shapes with no parameter: {extra[:5]}")
        raise ValueError("the base shapes do not match the model (" + "; ".join(parts) + "); save them from the "
                         "same architecture at the base width")
    rows = []
    for e in entries:
        base = tuple(base_shapes[e.name])
        if len(base) != len(e.shape):
            raise ValueError(f"parameter {e.name!r} has shape {e.shape} but its base shape is {base}: "
                             "the base must be the same architecture at a smaller width")
        kind = e.kind or ("vector" if len(e.shape) <= 1 else "linear")
        fan_in, fan_out = M.fans(e.shape, kind, layout)
        bfan_in, bfan_out = M.fans(base, kind, layout)
        if fan_mapping and e.name in fan_mapping:
            fi, fo = (int(v) for v in fan_mapping[e.name])
            bfan_in, bfan_out = max(1, round(fi * bfan_in / fan_in)), max(1, round(fo * bfan_out / fan_out))
            fan_in, fan_out = fi, fo
        if delta_shapes is not None and e.name in delta_shapes:
            dfan_in, dfan_out = M.fans(tuple(delta_shapes[e.name]), kind, layout)
            inferred = infer_role(e, dfan_in, dfan_out, bfan_in, bfan_out)
        else:
            inferred = infer_role(e, fan_in, fan_out, bfan_in, bfan_out)
        role = _override(e.name, roles) or inferred
        if role is None:
            raise ValueError(f"parameter {e.name!r} (shape {e.shape}) has no role: it is not an embedding, "
                             "linear/conv weight or vector; give one with roles={" + repr(e.name) + ": 'hidden'} "
                             f"(roles: {list(M.ROLES)})")
        mult = M.multipliers(role, rule, optimizer, fan_in=fan_in, fan_out=fan_out, base_fan_in=bfan_in,
                             base_fan_out=bfan_out, wd_scaling=wd_scaling, muon_adjust_lr_fn=muon_adjust_lr_fn,
                             muon_rms=muon_rms, name=repr(e.name))
        rows.append(dict(name=e.name, shape=tuple(e.shape), role=role, fan_in=fan_in, fan_out=fan_out,
                         base_fan_in=bfan_in, base_fan_out=bfan_out, mult=mult))
    return rows


def format_table(rows: Sequence[dict], *, lr: Any = None, weight_decay: Any = None, init_std=None) -> str:
    """The effective hyperparameters as a fixed-width table (``print_effective_hparams``)."""
    head = f"{'parameter':<34} {'shape':<16} {'role':<7} {'init x':>8} {'lr':>10} {'wd':>9} {'out x':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["mult"]
        lr_s = f"{lr * m.lr:.3e}" if isinstance(lr, (int, float)) else f"x{m.lr:.4g}"
        wd_s = f"{weight_decay * m.wd:.2e}" if isinstance(weight_decay, (int, float)) else f"x{m.wd:.3g}"
        init = init_std.get(r["name"]) if isinstance(init_std, Mapping) else None
        init_s = f"{init:.3e}" if init is not None else f"x{m.init:.4g}"
        lines.append(f"{r['name'][:34]:<34} {str(tuple(r['shape']))[:16]:<16} {r['role']:<7} {init_s:>8} "
                     f"{lr_s:>10} {wd_s:>9} {m.output:>8.4g}")
    return "\n".join(lines)
