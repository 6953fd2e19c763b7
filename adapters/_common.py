"""Framework-free helpers shared by ``adapters/optax.py`` and ``adapters/arrays.py``.

Option validation (one set of names, defaults and messages, see
``docs/adapters.md``), parameter layout ("dimension numbers": which axes are
fan-in and fan-out) and routing (Muon or the AdamW fallback).  Nothing here
imports an array framework: arrays are handled through
``array_api_compat.array_namespace`` and their ``shape``/``dtype``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Any, NamedTuple, Optional, Sequence, Union

import array_api_compat

from ..backends import get_backend
from ..core.adam import adam_update, check_betas
from ..core.muon import (
    ADJUST_LR_FNS,
    CONV_MODES,
    DEFAULT_RMS,
    MOMENTUM_FORMS,
    check_momentum,
    debias_factor,
    momentum_update,
    orthogonalized_updates,
    suitability,
)
from ..core.newton_schulz import PRECONDITIONINGS, resolve_coefficients

__all__ = [
    "DimensionNumbers", "FLAX", "TORCH", "FALLBACKS", "LABELS",
    "MuonOptions", "FallbackOptions", "Layout", "LeafPlan",
    "muon_options", "fallback_options", "check_routing_options", "check_lr", "check_hyper",
    "check_nonnegative", "is_array_scalar", "is_on", "dtype_name", "is_low_precision",
    "resolve_dim_spec", "is_dim_numbers", "layout_for", "plan_leaf", "muon_leaf_plan",
    "check_label", "check_leaf_dtype", "check_decay_flag", "warn_bf16_once",
    "check_consistent_rms", "check_batched",
]

FALLBACKS = ("adamw", "nadamw")
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


def _check_real(value, argname: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argname} must be a real number, got {value!r}")
    bad = value <= minimum if strict else value < minimum
    if bad or math.isnan(value):
        op = ">" if strict else ">="
        raise ValueError(f"{argname} must be {op} {minimum}, got {value!r}")
    return float(value)


def check_nonnegative(value, argname: str) -> float:
    return _check_real(value, argname, minimum=0.0)


def _check_bool(value, argname: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{argname} must be True or False, got {value!r}")
    return value


def _check_choice(value, choices, argname: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{argname}={value!r} is not valid; use one of {list(choices)}")
    return value


def is_array_scalar(x) -> bool:
    """A 0-d array (e.g. a value injected by ``optax.inject_hyperparams``, maybe traced)."""
    return not isinstance(x, numbers.Number) and getattr(x, "shape", None) == () and hasattr(x, "dtype")


def is_traced(x) -> bool:
    """True for an abstract array (inside ``jax.jit``): its value is unknown until run time."""
    return get_backend(x).is_traced(x)


def check_array_hyper(value, argname: str, *, minimum: float = 0.0, strict: bool = False,
                      below: Optional[float] = None):
    """Range-check a 0-d array hyperparameter when it is concrete; returns ``value`` unchanged.

    A traced one (``optax.inject_hyperparams`` under ``jax.jit``) is left unchecked:
    reading it is impossible there, and checking on device would cost a sync per step.
    """
    if is_traced(value):
        return value
    v = float(value)
    ok = (v > minimum if strict else v >= minimum) and (below is None or v < below)
    if not ok:  # NaN fails every comparison
        rng = f"in [{minimum:g}, {below:g})" if below is not None else f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{argname} must be {rng}, got {value!r}")
    return value


def check_scalar_hyper(value, argname: str, *, minimum: float = 0.0, strict: bool = False,
                       below: Optional[float] = None):
    """A continuous hyperparameter: a real number or a 0-d array.

    Numbers and concrete 0-d arrays are range-checked and returned as float;
    a traced 0-d array is returned unchanged (see :func:`check_array_hyper`).
    """
    if is_array_scalar(value):
        check_array_hyper(value, argname, minimum=minimum, strict=strict, below=below)
        return value if is_traced(value) else float(value)
    if below is not None and isinstance(value, numbers.Real) and not isinstance(value, bool) \
            and not value < below:
        raise ValueError(f"{argname} must be in [{minimum:g}, {below:g}), got {value!r}")
    return _check_real(value, argname, minimum=minimum, strict=strict)


def static_number(value, argname: str, *, integer: bool):
    """A Python int/float for an option that shapes the computation (None stays None).

    A concrete 0-d array is converted; a traced one cannot be, so the error says
    how to keep the option static under ``optax.inject_hyperparams``.
    """
    if not is_array_scalar(value):
        return value
    if is_traced(value):
        raise TypeError(
            f"{argname} is a traced array: optax.inject_hyperparams turns numeric arguments into "
            f"arrays, traced under jax.jit, but {argname} sets the shape of the computation and "
            f"must be a Python number. List it in static_args, e.g. optax.inject_hyperparams(xo.muon, "
            f"static_args=xo.STATIC_ARGS) (xo = xpopt.adapters.optax), or leave it at its default")
    xp = array_api_compat.array_namespace(value)
    if integer:
        if not xp.isdtype(value.dtype, "integral"):
            raise ValueError(f"{argname} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def check_lr(value, argname: str):
    """A float >= 0, a 0-d array (checked when concrete), or a schedule (callable step -> float).

    Arrays and schedules are returned unchanged.
    """
    if callable(value):
        return value
    if is_array_scalar(value):
        return check_array_hyper(value, argname)
    return check_nonnegative(value, argname)


def check_hyper(value, argname: str):
    """A float >= 0 or a 0-d array (weight decays, checked when concrete); float or unchanged."""
    if is_array_scalar(value):
        return check_array_hyper(value, argname)
    return check_nonnegative(value, argname)


def is_on(value) -> bool:
    """False only for a Python/NumPy zero; an array (maybe traced) counts as on."""
    return True if is_array_scalar(value) else bool(value)


def _check_dtype_spec(spec, argname: str, *, auto: bool = False):
    if spec is None:
        return None
    if auto and isinstance(spec, str) and spec == "auto":
        return spec
    if isinstance(spec, str):
        if spec not in _FLOAT_NAMES:
            raise ValueError(f"{argname}={spec!r} is not a floating dtype name; use one of {list(_FLOAT_NAMES)}")
        return spec
    name = dtype_name(spec)
    if name not in _FLOAT_NAMES:
        raise TypeError(f"{argname}={spec!r} is not a floating dtype; use float32, float64 or bfloat16")
    # Hand core the name: it resolves names for every backend, while dtype *classes*
    # such as jnp.bfloat16 / np.float32 are not understood by backends.resolve_dtype.
    return name


def dtype_name(dtype) -> str:
    """``"bfloat16"``, ``"float32"``, ... for a dtype object, dtype class or name."""
    if isinstance(dtype, str):
        return dtype
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        name = getattr(dtype, "__name__", None) or str(dtype)
    return name.rsplit(".", 1)[-1]


def is_low_precision(dtype) -> bool:
    return dtype_name(dtype) in ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class MuonOptions:
    momentum: float
    nesterov: bool
    momentum_form: str
    ns_coefficients: Any
    ns_steps: int
    eps: float
    safety_factor: float
    adjust_lr_fn: str
    conv_mode: str
    normalize_spatial: bool
    ns_dtype: Any
    batched: Any  # True, False or "auto"
    preconditioning: str = "frobenius"
    adaptive: bool = False
    consistent_rms: Any = None

    @property
    def ns_is_bf16(self) -> bool:
        return self.ns_dtype is not None and dtype_name(self.ns_dtype) == "bfloat16"

    @property
    def rms(self):
        return DEFAULT_RMS if self.consistent_rms is None else self.consistent_rms

    def debias(self, step):
        """Bias correction of the momentum for ``adaptive`` (1.0 when off); ``step`` 1-based."""
        if not self.adaptive:
            return 1.0
        return debias_factor(self.momentum, step, nesterov=self.nesterov, form=self.momentum_form)

    def momentum_step(self, buf, grad):
        """Core ``momentum_update``: ``(new_buf, update)``."""
        return momentum_update(buf, grad, momentum=self.momentum, nesterov=self.nesterov,
                               form=self.momentum_form)

    def orthogonalize(self, updates: list, step=None) -> list:
        """Core ``orthogonalized_updates`` on torch-layout arrays (lr_scale included).

        ``step`` (1-based, this update included) is needed with ``adaptive``.
        """
        return orthogonalized_updates(
            updates, conv_mode=self.conv_mode, normalize_spatial=self.normalize_spatial,
            adjust_lr_fn=self.adjust_lr_fn, rms=self.rms, batch=self.batched,
            adaptive=self.adaptive, debias=self.debias(step), coefficients=self.ns_coefficients,
            steps=self.ns_steps, eps=self.eps, safety_factor=self.safety_factor,
            compute_dtype=self.ns_dtype, preconditioning=self.preconditioning,
        )


def check_consistent_rms(consistent_rms, adjust_lr_fn):
    """None, a float > 0 or a 0-d array; only meaningful with ``match_rms_adamw``."""
    if consistent_rms is None:
        return None
    if adjust_lr_fn != "match_rms_adamw":
        raise ValueError(
            f"consistent_rms={consistent_rms!r} sets the RMS constant of adjust_lr_fn='match_rms_adamw' "
            f"(update RMS = consistent_rms), but adjust_lr_fn={adjust_lr_fn!r}; drop one of the two")
    return check_scalar_hyper(consistent_rms, "consistent_rms", minimum=0.0, strict=True)


def check_batched(batched):
    if batched in (True, False) and isinstance(batched, bool) or batched == "auto":
        return batched
    raise ValueError(f"batched={batched!r} is not valid; use 'auto' (batch where measured faster), True or False")


def muon_options(*, momentum, nesterov, momentum_form, ns_coefficients, ns_steps, eps,
                 safety_factor, adjust_lr_fn, conv_mode, normalize_spatial, ns_dtype,
                 batched, preconditioning="frobenius", adaptive=False,
                 consistent_rms=None) -> MuonOptions:
    """Validate the Muon options (docs/adapters.md); errors name the argument."""
    if isinstance(momentum, bool):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    check_momentum(momentum)
    ns_steps = static_number(ns_steps, "ns_steps", integer=True)
    if ns_steps is not None and (
            isinstance(ns_steps, bool) or not isinstance(ns_steps, numbers.Integral) or ns_steps < 1):
        raise ValueError(f"ns_steps must be an integer >= 1 or None (the preset's own count), got {ns_steps!r}")
    try:
        coeffs = resolve_coefficients(ns_coefficients, None if ns_steps is None else int(ns_steps))
    except ValueError as e:
        raise ValueError(f"ns_coefficients={ns_coefficients!r} is not valid: {e}") from None
    adjust_lr_fn = _check_choice(adjust_lr_fn, ADJUST_LR_FNS, "adjust_lr_fn")
    return MuonOptions(
        momentum=check_scalar_hyper(momentum, "momentum", below=1.0),
        nesterov=_check_bool(nesterov, "nesterov"),
        momentum_form=_check_choice(momentum_form, MOMENTUM_FORMS, "momentum_form"),
        ns_coefficients=coeffs,
        ns_steps=len(coeffs),
        eps=check_scalar_hyper(eps, "eps"),
        safety_factor=check_scalar_hyper(safety_factor, "safety_factor", minimum=0.0, strict=True),
        adjust_lr_fn=adjust_lr_fn,
        conv_mode=_check_choice(conv_mode, CONV_MODES, "conv_mode"),
        normalize_spatial=_check_bool(normalize_spatial, "normalize_spatial"),
        ns_dtype=_check_dtype_spec(ns_dtype, "ns_dtype", auto=True),
        batched=check_batched(batched),
        preconditioning=_check_choice(preconditioning, PRECONDITIONINGS, "preconditioning"),
        adaptive=_check_bool(adaptive, "adaptive"),
        consistent_rms=check_consistent_rms(consistent_rms, adjust_lr_fn),
    )


@dataclasses.dataclass(frozen=True)
class FallbackOptions:
    fallback: str
    beta1: float
    beta2: float
    eps: float

    def direction(self, grad, m, v, step):
        """Core ``adam_update``: ``(direction, m, v)``; the step is ``-lr * direction``."""
        return adam_update(grad, m, v, step, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                           nesterov=self.fallback == "nadamw")


def fallback_options(*, fallback, betas, fallback_eps) -> FallbackOptions:
    _check_choice(fallback, FALLBACKS, "fallback")
    b1, b2 = (check_scalar_hyper(b, f"betas[{i}]", below=1.0) for i, b in enumerate(check_betas(betas)))
    return FallbackOptions(fallback, b1, b2, check_scalar_hyper(fallback_eps, "fallback_eps"))


def check_routing_options(min_dim_size=None, max_aspect_ratio=None) -> tuple[int, float]:
    """``(min_dim_size, max_aspect_ratio)``; None = core ``suitability``'s 4 and 128."""
    min_dim_size = static_number(min_dim_size, "min_dim_size", integer=True)
    max_aspect_ratio = static_number(max_aspect_ratio, "max_aspect_ratio", integer=False)
    min_dim_size = 4 if min_dim_size is None else min_dim_size
    max_aspect_ratio = 128.0 if max_aspect_ratio is None else max_aspect_ratio
    if isinstance(min_dim_size, bool) or not isinstance(min_dim_size, numbers.Integral) or min_dim_size < 1:
        raise ValueError(f"min_dim_size must be an integer >= 1, got {min_dim_size!r}")
    ratio = _check_real(max_aspect_ratio, "max_aspect_ratio", minimum=1.0)
    return int(min_dim_size), ratio


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
# Added for adapters/torch.py (issue 11, item 6).  torch keeps an optimizer's
# options in param-group dicts, so it validates one whole mapping at a time
# (the constructor's defaults, each added group, each loaded group) through
# the shared validators above.  This block is kept at the end of the file so
# that edits above it and here merge independently.


class GroupOptions(NamedTuple):
    """The validated options of one param group (or of an optimizer's defaults)."""

    muon: MuonOptions
    fallback: FallbackOptions
    lr: Any
    fallback_lr: Any
    weight_decay: Any
    fallback_weight_decay: Any
    min_dim_size: int
    max_aspect_ratio: float


def _check_value(value, argname: str, *, optional: bool = False):
    """A number >= 0 or a 0-d array (None too if ``optional``); schedules are not values."""
    if optional and value is None:
        return None
    if callable(value) and not is_array_scalar(value):
        raise TypeError(f"{argname}={value!r} is a callable; a param group holds a value "
                        "(a number or a 0-d array): schedule it with a scheduler instead")
    return check_hyper(value, argname)


def group_options(o, where: str, *, owner: str = "Muon", flags: Sequence[str] = (),
                  optional_flags: Sequence[str] = (), callables=()) -> GroupOptions:
    """Validate a mapping holding every shared option (names as in ``docs/adapters.md``).

    ``lr`` and ``weight_decay`` are numbers >= 0 or 0-d arrays, and so are
    ``fallback_lr`` / ``fallback_weight_decay`` (or None); the Muon, fallback
    and routing options go through :func:`muon_options`,
    :func:`fallback_options` and :func:`check_routing_options`.  An adapter's
    own keys can be checked too: ``flags`` (True/False), ``optional_flags``
    (True/False or absent/None) and ``callables`` (None or a callable; a
    mapping ``{key: "its signature"}`` puts the signature in the message).

    Every error keeps its type (``TypeError`` / ``ValueError``) and reads
    ``"{owner}: {shared message} ({where})"``: the shared message names the
    option, its value and what is allowed, ``where`` names the group.
    """
    try:
        lr = _check_value(o["lr"], "lr")
        fallback_lr = _check_value(o["fallback_lr"], "fallback_lr", optional=True)
        weight_decay = _check_value(o["weight_decay"], "weight_decay")
        fallback_weight_decay = _check_value(o["fallback_weight_decay"], "fallback_weight_decay", optional=True)
        muon = muon_options(
            momentum=o["momentum"], nesterov=o["nesterov"], momentum_form=o["momentum_form"],
            ns_coefficients=o["ns_coefficients"], ns_steps=o["ns_steps"], eps=o["eps"],
            safety_factor=o["safety_factor"], adjust_lr_fn=o["adjust_lr_fn"], conv_mode=o["conv_mode"],
            normalize_spatial=o["normalize_spatial"], ns_dtype=o["ns_dtype"], batched=o["batched"],
            preconditioning=o["preconditioning"], adaptive=o["adaptive"],
            consistent_rms=o["consistent_rms"])
        fallback = fallback_options(fallback=o["fallback"], betas=o["betas"], fallback_eps=o["fallback_eps"])
        min_dim_size, max_aspect_ratio = check_routing_options(o["min_dim_size"], o["max_aspect_ratio"])
        for key in flags:
            _check_bool(o[key], key)
        for key in optional_flags:
            if o.get(key) is not None:
                _check_bool(o[key], key)
        for key in callables:
            if o.get(key) is not None and not callable(o[key]):
                sig = f" {callables[key]}" if isinstance(callables, dict) else ""
                raise TypeError(f"{key}={o[key]!r} must be None or a callable{sig}")
    except (TypeError, ValueError) as e:
        raise type(e)(f"{owner}: {e} ({where})") from None
    return GroupOptions(muon, fallback, lr, fallback_lr, weight_decay, fallback_weight_decay,
                        min_dim_size, max_aspect_ratio)


__all__ += ["GroupOptions", "group_options"]
