"""Every adapter's signature, generated from its optimizer's options dataclass.

An optimizer's options, defaults and validation live once, in core
(``core.muon.MuonOptions``, ``core.kron.KronOptions``).  An adapter's public
signature is that dataclass's fields, in field order, except for the framework
conventions listed here in :data:`SIGNATURES` (and nowhere else): ``renamed``
{option: the adapter's name}, ``defaults`` {option: the adapter's default}
(``REQUIRED``: none), ``omitted`` {option: why the adapter does not take it},
``only`` (the options it takes, when it takes a few), ``extra`` {the adapter's
own argument: its default} (containers, layout, logging) and ``positional``
(the leading arguments that may be given by position; every other one is
keyword-only).  :func:`takes` gives a function that signature
(``inspect.signature``, ``help()``, ``optax.inject_hyperparams`` see it) and
calls it with every argument by name, defaults filled in; :func:`options`
builds the dataclass from those arguments.  README's options table is rendered
from this table (``xpopt.commands.options_table``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

from ..core.kron import KronOptions
from ..core.muon import MuonOptions

__all__ = ["SIGNATURES", "REQUIRED", "definition", "signature", "takes", "options"]

REQUIRED = "<required>"
_OPTAX_LR = {"lr": "learning_rate", "fallback_lr": "fallback_learning_rate"}
#: optax.inject_hyperparams turns every numeric argument into an array; options that
#: shape the computation default to None (= the definition's default) so they stay static.
_OPTAX_STATIC_MUON = {"min_dim_size": None, "max_aspect_ratio": None}
_OPTAX_STATIC_KRON = {"max_size_dense": None, "block_size": None, "seed": None}
_SCALE_BY = "a scale_by_ transform: chain optax.add_decayed_weights / scale_by_learning_rate for it"
_MUON_PYTREES = {"weight_decay_mask": None, "labels": None, "dimension_numbers": None}


def _kron_optax(style: str) -> dict:
    return dict(positional=("learning_rate",), renamed={"lr": "learning_rate"}, defaults=_OPTAX_STATIC_KRON,
                omitted={"preconditioner_update_style": f"fixed by the function: {style.lower()} is {style!r}"},
                extra={"weight_decay_mask": None, "scanned_layers": None})


SIGNATURES = {
    "torch.Muon": dict(
        positional=("params", "lr"),
        omitted={"mu_dtype": "torch keeps Muon's momentum in float32 for bf16/f16 params and in the param dtype "
                             "otherwise (MuonOptions' mu_dtype=None rule), with no override yet",
                 "low_precision_dtype": "torch updates parameters in place (no update arrays are returned) and "
                                        "keeps float32 state for bf16/f16 params (the \"float32\" rule), with no "
                                        "override yet"},
        extra={"params": REQUIRED, "verbose": False, "fallback_filter": None}),
    "optax.muon": dict(positional=("learning_rate",), renamed=_OPTAX_LR,
                       defaults={"lr": REQUIRED, **_OPTAX_STATIC_MUON}, extra=_MUON_PYTREES),
    "optax.scale_by_muon": dict(
        omitted={k: _SCALE_BY for k in ("lr", "weight_decay", "fallback", "fallback_lr", "betas", "fallback_eps",
                                         "fallback_eps_root", "fallback_weight_decay", "min_dim_size",
                                         "max_aspect_ratio")},
        extra={"dimension_numbers": None}),
    "arrays.muon": dict(positional=("lr",), extra={**_MUON_PYTREES, "dimension_numbers": "torch"}),
    "torch.Kron": dict(positional=("params", "lr"), extra={"params": REQUIRED, "scanned": False, "verbose": False}),
    "optax.quad": _kron_optax("QUAD"),
    "optax.skew": _kron_optax("skew"),
    "optax.scale_by_kron": dict(defaults=_OPTAX_STATIC_KRON, omitted={"lr": _SCALE_BY, "weight_decay": _SCALE_BY},
                                extra={"scanned_layers": None}),
    "optax.kron_plan": dict(
        positional=("params",), defaults=_OPTAX_STATIC_KRON,
        only=("b1", "max_size_dense", "preconditioner_update_style", "dtype", "block_size", "mu_dtype"),
        extra={"params": REQUIRED, "scanned_layers": None}),
    "arrays.kron": dict(positional=("lr",), extra={"scanned": False}),
}


def definition(name: str):
    """The options dataclass behind adapter ``name``."""
    return MuonOptions if "muon" in name.lower() else KronOptions


def _fields(name: str) -> dict:
    """``{adapter's name: (option or None for an extra, default)}`` in signature order."""
    spec = SIGNATURES[name]
    renamed, defaults, omitted = spec.get("renamed", {}), spec.get("defaults", {}), spec.get("omitted", {})
    only = spec.get("only")
    out = {}
    for f in dataclasses.fields(definition(name)):
        if f.name in omitted or (only is not None and f.name not in only):
            continue
        out[renamed.get(f.name, f.name)] = (f.name, defaults.get(f.name, f.default))
    out.update({k: (None, d) for k, d in spec.get("extra", {}).items()})
    return out


def signature(name: str, *, method: bool = False) -> inspect.Signature:
    """Adapter ``name``'s signature (``method``: with a leading ``self``)."""
    P = inspect.Parameter
    fields, positional = _fields(name), SIGNATURES[name].get("positional", ())
    params = [P("self", P.POSITIONAL_OR_KEYWORD)] if method else []
    for arg in (*positional, *(k for k in fields if k not in positional)):
        default = fields[arg][1]
        params.append(P(arg, P.POSITIONAL_OR_KEYWORD if arg in positional else P.KEYWORD_ONLY,
                        default=P.empty if default == REQUIRED else default))
    return inspect.Signature(params)


def takes(name: str, *, method: bool = False):
    """Decorator: the function gets adapter ``name``'s :func:`signature` and is called with
    every argument by name (``self`` by position), defaults filled in."""
    sig = signature(name, method=method)

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{name}: {e} (its arguments: {', '.join(sig.parameters)})") from None
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            if method:
                return fn(arguments.pop("self"), **arguments)
            return fn(**arguments)

        call.__signature__ = sig
        return call

    return wrap


def options(name: str, arguments: dict, **overrides):
    """The options dataclass of adapter ``name`` from its ``arguments`` (extras ignored).

    A None given for an option whose adapter default is None where the
    definition's is not (optax's static options) means the definition's default.
    """
    fields = _fields(name)
    static = {k for k, d in SIGNATURES[name].get("defaults", {}).items() if d is None}
    kw = {}
    for arg, value in arguments.items():
        option = fields.get(arg, (None,))[0]
        if option is not None and not (option in static and value is None):
            kw[option] = value
    kw.update(overrides)
    return definition(name)(**kw)
