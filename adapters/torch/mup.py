"""muP / spectral scaling for torch models (``xpopt.adapters.torch``).

::

    base = make_model(width=128)                  # or a base-shapes JSON / {name: shape}
    model = make_model(width=1024)
    mup_init_(model, base, rule="mup")            # rescale init, attach output multipliers
    groups = mup_param_groups(model, base, lr=3e-3, optimizer="adam", rule="mup", weight_decay=0.1)
    opt = torch.optim.AdamW(groups)               # any torch.optim optimizer; ours take them too

Roles come from module types (``Embedding`` -> input, ``Linear`` / ``Conv`` ->
hidden unless its fans say input or output, the last ``Linear`` -> output
at the base width, 1-D -> vector), overridable by name patterns
(``roles={"lm_head.weight": "output", "*.pos_emb": "input"}``; fnmatch, and
a leading ``*.`` also matches at the top level: ``"*.pos_emb"`` names
``pos_emb`` and ``blocks.0.pos_emb``).  Nothing
is stored on the tensors: the groups carry plain numbers, and the output
multipliers are forward pre-hooks on the readout modules.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ...core import mup as M
from ...core import mup_plan as P

__all__ = ["mup_param_groups", "mup_init_", "print_effective_hparams", "save_base_shapes", "base_shapes",
           "mup_plan"]

_LINEAR = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def base_shapes(model: torch.nn.Module) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def save_base_shapes(model_or_shapes, path) -> None:
    """Save a base model's parameter shapes as JSON (load them back by passing the path as ``base``)."""
    shapes = base_shapes(model_or_shapes) if isinstance(model_or_shapes, torch.nn.Module) else model_or_shapes
    P.save_base_shapes(shapes, path)


def _entries(model: torch.nn.Module):
    """Entries in module order, tied tensors once (under their first name), plus the tied readouts."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    last = linears[-1] if linears else None
    embeddings = {id(m.weight): m for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen, entries, tied = {}, [], []
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{pname}" if mod_name else pname
            if id(p) in seen:
                if isinstance(mod, torch.nn.Linear) and id(p) in embeddings:
                    tied.append((mod, seen[id(p)]))
                continue
            seen[id(p)] = name
            if p.ndim <= 1:
                kind = "vector"
            elif isinstance(mod, torch.nn.Embedding):
                kind = "embedding"
            elif isinstance(mod, _LINEAR) and pname == "weight":
                kind = "linear"
            else:
                kind = None
            entries.append((P.Entry(name, tuple(p.shape), kind, last=mod is last and kind == "linear"), p, mod))
    # a readout tied to an embedding: its (tied) weight is the embedding's; the readout is the last Linear
    return entries, tied


def mup_plan(model: torch.nn.Module, base, *, rule: str = "mup", optimizer: str = "adam",
             roles: Optional[Mapping[str, str]] = None, wd_scaling: str = "independent",
             muon_adjust_lr_fn: str = "match_rms_adamw", muon_rms: float = 0.2,
             fan_mapping: Optional[Mapping] = None, delta=None) -> list[dict]:
    """Per parameter (tied tensors once): name, role, fans, base fans and multipliers.

    ``base`` (and ``delta``): a model, ``{name: shape}`` or a base-shapes JSON path;
    ``delta`` is the same architecture at another width, which fixes the roles at
    the base width itself (see ``core.mup_plan.plan``)."""
    entries, _ = _entries(model)
    shapes = P.as_base_shapes(base, base_shapes)
    # a base dict may also list a tied tensor's second name: drop such aliases
    first = {id(p): e.name for e, p, _ in entries}
    aliases = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False)
               if id(p) in first and n != first[id(p)]}
    shapes = {k: v for k, v in shapes.items() if k not in aliases}
    rows = P.plan([e for e, _, _ in entries], shapes, rule=rule, optimizer=optimizer, roles=roles, aliases=aliases,
                  layout="torch", wd_scaling=wd_scaling, muon_adjust_lr_fn=muon_adjust_lr_fn, muon_rms=muon_rms,
                  fan_mapping=fan_mapping,
                  delta_shapes=None if delta is None else P.as_base_shapes(delta, base_shapes))
    for row, (_, p, mod) in zip(rows, entries):
        row["param"], row["module"] = p, mod
        row["route"] = optimizer
        if optimizer == "muon" and not (row["role"] == "hidden" and p.ndim >= 2):
            # Muon's fallback (AdamW) takes it: the Adam column applies
            row["route"] = "fallback"
            row["mult"] = M.multipliers(row["role"], rule, "adam", fan_in=row["fan_in"], fan_out=row["fan_out"],
                                        base_fan_in=row["base_fan_in"], base_fan_out=row["base_fan_out"],
                                        wd_scaling=wd_scaling, name=repr(row["name"]))
    return rows


def mup_param_groups(model: torch.nn.Module, base, *, lr: float, optimizer: str = "adam", rule: str = "mup",
                     roles: Optional[Mapping[str, str]] = None, weight_decay: float = 0.0,
                     wd_scaling: str = "independent", eps: Optional[float] = None, scale_eps: bool = False,
                     fallback_lr: Optional[float] = None, muon_adjust_lr_fn: str = "match_rms_adamw",
                     muon_rms: float = 0.2, fan_mapping: Optional[Mapping] = None, delta=None) -> list[dict]:
    """Param groups (one per parameter) with every scaled hyperparameter, for any torch optimizer.

    ``optimizer``: the table column (``sgd``, ``adam``, ``muon``, ``kron``).
    For ``"muon"``, hidden matrices get ``use_muon=True`` groups whose ``lr``
    replaces (never stacks on) Muon's ``adjust_lr_fn`` shape factor (pass the
    same ``muon_adjust_lr_fn`` as to ``Muon``); every other parameter gets a
    ``use_fallback=True`` group with the Adam column's ``lr`` (from
    ``fallback_lr`` if given).  ``eps`` with ``scale_eps=True`` adds a scaled
    ``eps`` per group (Adam); otherwise groups have no ``eps`` key and the
    optimizer's default stands.  Each group also has ``name`` and ``role``
    (extra keys torch.optim keeps and ignores).
    """
    rows = mup_plan(model, base, rule=rule, optimizer=optimizer, roles=roles, wd_scaling=wd_scaling,
                    muon_adjust_lr_fn=muon_adjust_lr_fn, muon_rms=muon_rms, fan_mapping=fan_mapping, delta=delta)
    groups = []
    for r in rows:
        m: M.Multipliers = r["mult"]
        g: dict[str, Any] = dict(params=[r["param"]], name=r["name"], role=r["role"])
        if r["route"] == "fallback":
            g.update(lr=(fallback_lr if fallback_lr is not None else lr) * m.lr, use_fallback=True)
        elif optimizer == "muon":
            g.update(lr=lr * m.lr, use_muon=True)
        else:
            g["lr"] = lr * m.lr
        g["weight_decay"] = weight_decay * m.wd
        if scale_eps and eps is not None:
            g["eps"] = eps * m.eps
        groups.append(g)
    return groups


def mup_init_(model: torch.nn.Module, base, *, rule: str = "mup", optimizer: str = "adam",
              roles: Optional[Mapping[str, str]] = None, fan_mapping: Optional[Mapping] = None, delta=None) -> list:
    """Rescale the model's (standard) init in place and attach its output multipliers.

    Each parameter is multiplied by its ``init`` multiplier (the model's own
    init is taken as standard parametrisation: torch's defaults are); each
    output-role module (and a readout tied to an embedding) gets a forward
    pre-hook multiplying its input by the ``output`` multiplier, which is
    the same as multiplying its weight in the forward pass only.  Returns the
    hook handles (``handle.remove()`` detaches them).  ``optimizer`` is
    accepted for symmetry: init and output multipliers depend on the rule
    only.  Calling it twice on one model is an error (it would rescale twice).
    """
    if getattr(model, "_xpopt_mup", None) is not None:
        raise RuntimeError("mup_init_ was already applied to this model; build a fresh model to re-initialise")
    rows = mup_plan(model, base, rule=rule, optimizer=optimizer, roles=roles, fan_mapping=fan_mapping, delta=delta)
    handles = []
    with torch.no_grad():
        for r in rows:
            m = r["mult"]
            if m.init != 1.0:
                r["param"].mul_(m.init)
            if m.output != 1.0 and r["param"].ndim >= 2:
                handles.append(_scale_input(r["module"], m.output))
    _, tied = _entries(model)
    by_name = {r["name"]: r for r in rows}
    for readout, emb_name in tied:
        r = by_name[emb_name]
        mult = M.tied_output_multiplier(rule, width=r["fan_out"], base_width=r["base_fan_out"])
        if mult != 1.0:
            handles.append(_scale_input(readout, mult))
    model._xpopt_mup = dict(rule=rule, outputs=len(handles))
    return handles


def _scale_input(module, mult: float):
    def pre_hook(mod, args):
        return (args[0] * mult,) + tuple(args[1:])

    return module.register_forward_pre_hook(pre_hook)


def print_effective_hparams(model: torch.nn.Module, base, *, lr: Optional[float] = None,
                            weight_decay: Optional[float] = None, rule: str = "mup", optimizer: str = "adam",
                            roles: Optional[Mapping[str, str]] = None, file=None, **kw) -> str:
    """Print (and return) every parameter's role, init multiplier, LR, weight decay and output multiplier."""
    rows = mup_plan(model, base, rule=rule, optimizer=optimizer, roles=roles, **kw)
    text = f"rule={rule} optimizer={optimizer}\n" + P.format_table(rows, lr=lr, weight_decay=weight_decay)
    print(text, file=file)
    return text
