"""Framework-free helpers shared by the adapters (torch, optax, arrays; Muon and Kron).

The options themselves live in core: ``core.muon.MuonOptions`` (with
``core.adam.AdamOptions``) and ``core.kron.KronOptions`` hold every option, its
default and its validation.  Here: :data:`SIGNATURES`, the framework
conventions where an adapter's signature differs from those dataclasses
(checked by ``tests/test_definitions.py``, rendered into README's options table
by ``xpopt.commands.options_table``); the core validators, re-exported;
building ``MuonOptions`` with the adapter's name in its errors
(:func:`muon_definition`) and from a torch param group (:func:`group_options`);
parameter layout ("dimension numbers": which axes are fan-in and fan-out) and
Muon's routing (Muon or the AdamW fallback).  Nothing here imports an array
framework: arrays are handled through ``array_api_compat.array_namespace`` and
their ``shape``/``dtype``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import NamedTuple, Optional, Sequence, Union

import array_api_compat

from ..core._check import (  # noqa: F401  (the validators, re-exported for the adapters)
    check_array_hyper, check_bool, check_choice, check_dtype_spec, check_hyper, check_int, check_lr,
    check_nonnegative, check_real, check_scalar_hyper, dtype_name, is_array_scalar, is_low_precision, is_on,
    is_traced, static_number,
)
from ..core.adam import FALLBACKS, AdamOptions  # noqa: F401
from ..core.muon import MuonOptions, suitability

__all__ = [
    "DimensionNumbers", "FLAX", "TORCH", "FALLBACKS", "LABELS",
    "MuonOptions", "AdamOptions", "Layout", "LeafPlan", "check_lr", "check_hyper",
    "check_nonnegative", "is_array_scalar", "is_on", "dtype_name", "is_low_precision",
    "resolve_dim_spec", "is_dim_numbers", "layout_for", "plan_leaf", "muon_leaf_plan",
    "check_label", "check_leaf_dtype", "check_decay_flag", "warn_bf16_once",
]

LABELS = ("muon", "fallback")
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


class DimensionNumbers(NamedTuple):
    """Which axes of a weight are its fan-in and fan-out (optax's convention).

    Same fields and defaults as ``optax.contrib.MuonDimensionNumbers`` (and any
    NamedTuple with these two fields is accepted in its place):
    ``reduction_axis`` are the axes summed over in ``y = x @ W`` (fan-in),
    ``output_axis`` the axes of ``y`` (fan-out).  Each is an int or a sequence
    of ints (merged into one matrix dimension, in the order given).  All other
    axes are *spatial* axes (conv taps), handled by ``conv_mode`` exactly as the
    trailing axes of a torch ``(out, in, kh, kw)`` kernel: merged into fan-in
    with ``"flatten"``, orthogonalised per tap with ``"batched"``.  (optax's own
    Muon vmaps over them instead; use ``conv_mode="batched",
    normalize_spatial=False`` for that behaviour, e.g. scanned layer stacks.)
    """

    reduction_axis: Union[int, Sequence[int]] = 0
    output_axis: Union[int, Sequence[int]] = 1


#: flax layout: Dense ``(in, out)``, Conv ``(kh, kw, in, out)``.
FLAX = DimensionNumbers(reduction_axis=-2, output_axis=-1)
#: torch layout: Linear ``(out, in)``, Conv ``(out, in, kh, kw)`` (core's layout).
TORCH = DimensionNumbers(reduction_axis=1, output_axis=0)


def is_dim_numbers(x) -> bool:
    """True for ours, optax's ``MuonDimensionNumbers`` or any look-alike NamedTuple."""
    return isinstance(x, tuple) and getattr(x, "_fields", None) == ("reduction_axis", "output_axis")


def resolve_dim_spec(spec, argname: str = "dimension_numbers"):
    """``"flax"``/``"torch"``/dimension numbers -> :class:`DimensionNumbers`; None stays None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec in ("flax", "torch"):
            spec = FLAX if spec == "flax" else TORCH
        else:
            raise ValueError(
                f"{argname}={spec!r} is not valid; use 'flax', 'torch', a MuonDimensionNumbers"
                "(reduction_axis=..., output_axis=...), a pytree of those (None = fallback) or a callable"
            )
    if is_dim_numbers(spec):
        return DimensionNumbers(_axes(spec.reduction_axis, argname), _axes(spec.output_axis, argname))
    raise TypeError(
        f"{argname} leaf {spec!r} is not valid; use 'flax', 'torch', MuonDimensionNumbers(...) or None"
    )


def _axes(ax, argname) -> tuple[int, ...]:
    if isinstance(ax, numbers.Integral) and not isinstance(ax, bool):
        return (int(ax),)
    if isinstance(ax, Sequence) and not isinstance(ax, str) and len(ax) > 0 and all(
            isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in ax):
        return tuple(int(a) for a in ax)
    raise TypeError(f"{argname}: an axis spec must be an int or a non-empty sequence of ints, got {ax!r}")


# --------------------------------------------------------------------------- options
# Each optimizer's options, defaults and validation live in core (MuonOptions,
# AdamOptions, KronOptions); the adapters build them from their arguments.

MUON_FIELDS = tuple(f.name for f in dataclasses.fields(MuonOptions))


#: Where an adapter's signature differs from its optimizer's options dataclass
#: (``core.muon.MuonOptions``, ``core.kron.KronOptions``): the one list of
#: framework conventions, checked by ``tests/test_definitions.py``.  Per adapter:
#: ``renamed`` {option: the adapter's name}, ``defaults`` {option: the adapter's
#: default} (``REQUIRED``: no default), ``omitted`` {option: why the adapter does
#: not take it}, ``extra`` the adapter's own arguments (containers, layout, logging).
REQUIRED = "<required>"
_OPTAX_LR = {"lr": "learning_rate", "fallback_lr": "fallback_learning_rate"}
#: optax.inject_hyperparams turns every numeric argument into an array; options that
#: shape the computation default to None (= the definition's default) so they stay static.
_OPTAX_STATIC_MUON = {"min_dim_size": None, "max_aspect_ratio": None}
_OPTAX_STATIC_KRON = {"max_size_dense": None, "block_size": None, "seed": None}
_SCALE_BY = "a scale_by_ transform: chain optax.add_decayed_weights / scale_by_learning_rate for it"
SIGNATURES = {
    "torch.Muon": dict(
        omitted={"mu_dtype": "torch keeps Muon's momentum in float32 for bf16/f16 params and in the param dtype "
                             "otherwise (MuonOptions' mu_dtype=None rule), with no override yet"},
        extra=("params", "verbose", "fallback_filter")),
    "optax.muon": dict(renamed=_OPTAX_LR, defaults={"lr": REQUIRED, **_OPTAX_STATIC_MUON},
                       extra=("weight_decay_mask", "labels", "dimension_numbers")),
    "optax.scale_by_muon": dict(
        omitted={k: _SCALE_BY for k in ("lr", "weight_decay", "fallback", "fallback_lr", "betas", "fallback_eps",
                                         "fallback_weight_decay", "min_dim_size", "max_aspect_ratio")},
        extra=("dimension_numbers",)),
    "arrays.muon": dict(extra=("weight_decay_mask", "labels", "dimension_numbers")),
    "torch.Kron": dict(extra=("params", "scanned", "verbose")),
    "optax.quad": dict(renamed={"lr": "learning_rate"}, defaults=_OPTAX_STATIC_KRON,
                       omitted={"preconditioner_update_style": "fixed by the function: quad is 'QUAD'"},
                       extra=("weight_decay_mask", "scanned_layers")),
    "optax.skew": dict(renamed={"lr": "learning_rate"}, defaults=_OPTAX_STATIC_KRON,
                       omitted={"preconditioner_update_style": "fixed by the function: skew is 'skew'"},
                       extra=("weight_decay_mask", "scanned_layers")),
    "optax.scale_by_kron": dict(defaults=_OPTAX_STATIC_KRON, omitted={"lr": _SCALE_BY, "weight_decay": _SCALE_BY},
                                extra=("scanned_layers",)),
    "arrays.kron": dict(extra=("scanned",)),
}


def muon_definition(owner: str, **kw) -> MuonOptions:
    """``MuonOptions(**kw)``; errors keep their type and read ``"{owner}: {message}"``."""
    try:
        return MuonOptions(**kw)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{owner}: {e}") from None


def warn_bf16_once(opts: MuonOptions, native: bool, flag: list) -> None:
    """One ``UserWarning`` per optimizer when bf16 Newton-Schulz is emulated."""
    if opts.ns_is_bf16 and not native and not flag:
        flag.append(True)
        warnings.warn(
            "ns_dtype=bfloat16 on a device without native bf16 matmuls (CPU without AMX/"
            "AVX512-BF16): Newton-Schulz will be emulated, ~100x slower than float32; "
            "use ns_dtype=None (float32) here and keep bfloat16 for GPUs/TPUs",
            UserWarning, stacklevel=3,
        )


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Layout:
    """Moves one parameter between its own layout and core's ``(out, in, *spatial)``."""

    shape: tuple[int, ...]
    perm: Optional[tuple[int, ...]]         # None: already in torch order
    permuted_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]

    def to_torch(self, x):
        xp = array_api_compat.array_namespace(x)
        if self.perm is not None:
            x = xp.permute_dims(x, self.perm)
        if self.torch_shape != self.permuted_shape:
            x = xp.reshape(x, self.torch_shape)
        return x

    def from_torch(self, y):
        xp = array_api_compat.array_namespace(y)
        if self.torch_shape != self.permuted_shape:
            y = xp.reshape(y, self.permuted_shape)
        if self.perm is not None:
            inv = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))
            y = xp.permute_dims(y, inv)
        return y


def layout_for(shape, dims: DimensionNumbers, where: str) -> Layout:
    """Layout of a ``shape`` parameter whose fan-in/fan-out axes are ``dims``."""
    shape = tuple(int(d) for d in shape)
    nd = len(shape)
    norm = []
    for field in ("reduction_axis", "output_axis"):
        axes = getattr(dims, field)
        for a in axes:
            if not -nd <= a < nd:
                raise ValueError(
                    f"dimension_numbers for {where}: {field}={axes} is out of range for shape {shape}"
                )
        norm.append(tuple(a % nd for a in axes))
    red, out = norm
    if len(set(red)) != len(red) or len(set(out)) != len(out) or set(red) & set(out):
        raise ValueError(
            f"dimension_numbers for {where}: reduction_axis {red} and output_axis {out} must be "
            f"distinct axes of shape {shape}"
        )
    other = tuple(i for i in range(nd) if i not in red and i not in out)
    perm = out + red + other
    permuted = tuple(shape[i] for i in perm)
    torch_shape = (math.prod(shape[i] for i in out), math.prod(shape[i] for i in red)) + tuple(
        shape[i] for i in other)
    return Layout(shape, None if perm == tuple(range(nd)) else perm, permuted, torch_shape)


# --------------------------------------------------------------------------- routing


class LeafPlan(NamedTuple):
    """``layout`` is a :class:`Layout` for a Muon leaf, None for a fallback leaf."""

    layout: Optional[Layout]
    decay: bool


def check_label(label, where: str):
    if label is None or (isinstance(label, str) and label in LABELS):
        return label
    raise ValueError(f"labels for {where} is {label!r}; use 'muon', 'fallback' (or None: automatic)")


def check_leaf_dtype(x, where: str) -> None:
    """TypeError unless ``x`` has a floating dtype (float16/bfloat16/32/64, complex64/128)."""
    dtype = getattr(x, "dtype", None)
    ok = False
    if dtype is not None:
        if is_low_precision(dtype):
            ok = True
        else:
            try:
                ok = array_api_compat.array_namespace(x).isdtype(dtype, ("real floating", "complex floating"))
            except Exception:
                ok = dtype_name(dtype) in _FLOAT_NAMES + ("complex64", "complex128")
    if not ok:
        raise TypeError(
            f"{where} has dtype {dtype}; xpopt optimises floating parameters only "
            "(float16, bfloat16, float32, float64, complex64, complex128): cast it, or keep it "
            "out of the optimiser (integer counters are not trainable)"
        )


def plan_leaf(x, where: str, *, label, dims, decay, min_dim_size: int,
              max_aspect_ratio: float) -> LeafPlan:
    """Route one parameter: Muon (with its :class:`Layout`) or the fallback.

    ``label``: None (automatic), ``"muon"`` or ``"fallback"``.  ``dims``: the
    leaf's :class:`DimensionNumbers`, or None (from a user's dimension-numbers
    pytree) for "not a matrix": fallback.
    Automatic routing asks core ``suitability`` about the torch-layout shape.
    """
    check_leaf_dtype(x, where)
    label = check_label(label, where)
    shape = tuple(int(d) for d in x.shape)
    if label == "fallback":
        return LeafPlan(None, decay)
    if dims is None:
        if label == "muon":
            raise ValueError(
                f"labels marks {where} as 'muon' but dimension_numbers gives it None (not a matrix); "
                "give it MuonDimensionNumbers(...) or label it 'fallback'"
            )
        return LeafPlan(None, decay)
    if len(shape) < 2:
        if label == "muon":
            raise ValueError(
                f"labels marks {where} (shape {shape}) as 'muon', but Muon needs a parameter with "
                "at least 2 dimensions; label it 'fallback'"
            )
        return LeafPlan(None, decay)
    layout = layout_for(shape, dims, where)
    if label == "muon":
        return LeafPlan(layout, decay)
    ok, _ = suitability(layout.torch_shape, min_dim_size=min_dim_size, max_aspect_ratio=max_aspect_ratio)
    return LeafPlan(layout if ok else None, decay)


def muon_leaf_plan(x, where: str, dims) -> Layout:
    """For ``scale_by_muon``: every leaf is a Muon matrix (errors otherwise)."""
    check_leaf_dtype(x, where)
    if dims is None:
        raise ValueError(
            f"scale_by_muon orthogonalises every leaf it sees, but dimension_numbers gives {where} None; "
            "route non-matrix leaves elsewhere (optax.partition) or use muon(), which has a fallback"
        )
    shape = tuple(int(d) for d in x.shape)
    if len(shape) < 2:
        raise ValueError(
            f"scale_by_muon got {where} with shape {shape}; Muon needs at least 2 dimensions "
            "(use muon(), which sends vectors to its AdamW fallback, or optax.partition)"
        )
    return layout_for(shape, dims, where)


def check_decay_flag(flag, where: str) -> bool:
    if isinstance(flag, bool):
        return flag
    # numpy / jax boolean scalars (concrete: routing is decided outside jit's values)
    if getattr(flag, "shape", None) == () and dtype_name(getattr(flag, "dtype", "")) == "bool":
        return bool(flag)
    raise TypeError(f"weight_decay_mask for {where} is {flag!r}; use True or False")


# =========================================================================== options held in a mapping
# torch keeps an optimizer's options in param-group dicts, so it validates one
# whole mapping at a time (the constructor's defaults, each added group, each
# loaded group) through the same definition.


def _check_value(value, argname: str, *, optional: bool = False):
    """A number >= 0 or a 0-d array (None too if ``optional``); schedules are not values."""
    if optional and value is None:
        return None
    if callable(value) and not is_array_scalar(value):
        raise TypeError(f"{argname}={value!r} is a callable; a param group holds a value "
                        "(a number or a 0-d array): schedule it with a scheduler instead")
    return check_hyper(value, argname)


def group_options(o, where: str, *, owner: str = "Muon", flags: Sequence[str] = (),
                  optional_flags: Sequence[str] = (), callables=()) -> MuonOptions:
    """The :class:`MuonOptions` of a mapping holding every option (a torch param group).

    Learning rates and weight decays must be values (numbers or 0-d arrays),
    not schedules.  An adapter's own keys are checked too: ``flags``
    (True/False), ``optional_flags`` (True/False or absent/None) and
    ``callables`` (None or a callable; a mapping ``{key: "its signature"}``
    puts the signature in the message).  Every error keeps its type and reads
    ``"{owner}: {message} ({where})"``.
    """
    try:
        for key in ("lr", "weight_decay"):
            _check_value(o[key], key)
        for key in ("fallback_lr", "fallback_weight_decay"):
            _check_value(o[key], key, optional=True)
        opts = MuonOptions(**{k: o[k] for k in MUON_FIELDS if k in o})
        for key in flags:
            check_bool(o[key], key)
        for key in optional_flags:
            if o.get(key) is not None:
                check_bool(o[key], key)
        for key in callables:
            if o.get(key) is not None and not callable(o[key]):
                sig = f" {callables[key]}" if isinstance(callables, dict) else ""
                raise TypeError(f"{key}={o[key]!r} must be None or a callable{sig}")
    except (TypeError, ValueError) as e:
        raise type(e)(f"{owner}: {e} ({where})") from None
    return opts


__all__ += ["group_options", "muon_definition", "MUON_FIELDS", "SIGNATURES", "REQUIRED"]
