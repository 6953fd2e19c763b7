"""``xpopt.adapters.torch.Muon``: Muon with an AdamW / NAdamW fallback as a ``torch.optim.Optimizer``.

This module only translates torch conventions (param groups, per-parameter
state, ``state_dict``, closures, in-place updates) into calls to
``xpopt.core``; every formula lives there.

Update rule, per parameter group (``lr``, ``wd`` = the group's values):

* Muon parameters (matrices and conv kernels in torch layout
  ``(out, in, *spatial)``)::

      buf, u = core.muon.momentum_update(buf, g, momentum, nesterov, form)
      #   ema:     buf = mu*buf + (1-mu)*g ;  u = g + mu*(buf - g) if nesterov else buf
      #   classic: buf = mu*buf + g        ;  u = g + mu*buf       if nesterov else buf
      D = core.muon.orthogonalized_updates([u, ...])   # lr_scale * NS(matrix(u)), one
                                                       # batched NS call per shape
      W = W * (1 - lr*wd) - lr * D

* Fallback parameters (biases, norms, scalars, and whatever the routing sends
  there) use ``core.adam.adam_update`` (AdamW; NAdamW look-ahead with
  ``fallback="nadamw"``) with the step count starting at 1::

      W = W * (1 - lr_f*wd_f) - lr_f * m_hat / (sqrt(v_hat) + fallback_eps)

  where ``lr_f = fallback_lr`` (default: the group's live ``lr``, so LR
  schedulers drive both) and ``wd_f = fallback_weight_decay`` (default
  ``weight_decay``).

Routing is decided once, when a parameter is added (construction or
``add_param_group``): group flag ``use_fallback=True`` -> fallback; group flag
``use_muon=True/False`` -> that; ``fallback_filter(name, param)`` returning
True -> fallback; otherwise ``core.muon.suitability(shape)`` decides.
``Muon.routes()`` lists every decision with its reason; ``verbose=True`` logs
each one at INFO on the ``"xpopt"`` logger.  A group key Muon does not use (a
typo such as ``"lrr"``) warns when the group is added (``groups.py``).

Precision: bf16 / f16 parameters keep float32 state, their update is computed
in float32 and rounded into the parameter once.  ``ns_dtype=None`` runs
Newton-Schulz in the state dtype (float32 for bf16/f16 parameters, else the
parameter's dtype).  ``state_dict()`` / ``load_state_dict()`` keep those
dtypes (torch's default load would cast float32 state down to bf16).

torch conventions:

* ``lr`` and ``fallback_lr`` may be 1-element float tensors (torch.optim's
  convention; a multi-element one is a ``ValueError``).  LR schedulers write
  them in place (``fill_``); the step never reads their value on the host.
* LR schedulers with ``cycle_momentum=True`` (``OneCycleLR``, ``CyclicLR``)
  cycle ``betas[0]``, because our defaults contain ``betas``, and mark the
  group with ``max_momentum`` / ``base_momentum``.  While those marks are
  present, Muon's momentum is ``betas[0]`` too (the scheduler's value, as
  ``torch.optim.Muon``'s ``momentum`` would be); ``group["momentum"]`` is
  then not read.  Without the marks ``momentum`` is Muon's and ``betas[0]``
  the fallback's, as set.
* ``torch.compile(opt.step, fullgraph=True)`` traces one graph: routing,
  state creation and checks live in ``_init_group``, which dynamo runs
  eagerly (as for torch.optim's optimizers); ``step`` counts are 0-d
  tensors on the param's device (an int would recompile every step and be
  baked into a CUDA graph); warnings are raised when params are added.  Use a
  tensor ``lr`` so that schedulers do not recompile.  Every torch LR
  scheduler wraps ``opt.step`` in a function dynamo will not trace: compile
  ``opt.step`` before building the scheduler for ``fullgraph=True``, or
  compile it after without ``fullgraph`` (the wrapper runs eagerly, the step
  is still one graph).
* ``load_state_dict``: the checkpoint's hyperparameters win (torch's rule);
  options a checkpoint's group lacks (an older xpopt, ``torch.optim.Muon``)
  keep this optimizer's values; every group is validated before anything
  loads.  A ``torch.optim.Muon`` checkpoint loads directly (its
  ``adjust_lr_fn=None`` is ``"original"``, its buffers are EMA momentum);
  :func:`torch_optim_state_dict` merges it with an AdamW checkpoint.

Non-finite gradients: ``nonfinite=None`` (default) adds no check (it would
force a device sync every step, which ``torch.optim`` avoids too): a NaN or
Inf in a gradient propagates into that parameter's state and value (for
Muon, into every entry of that matrix, since Newton-Schulz mixes them).
``nonfinite="skip"`` skips the whole step (params, state and step counts
untouched), ``"zero"`` zeroes the non-finite entries of ``.grad`` in place
and steps, ``"raise"`` raises ``FloatingPointError`` naming the parameters
before anything changes (``xpopt.core.fault``); each costs one host sync per
step, as ``GradScaler.step``.  ``state["nonfinite_steps"]`` counts the steps
that saw a non-finite gradient.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from itertools import chain, count
from typing import NamedTuple, Optional

import torch

from ...backends import torch as _torch_backend
from ...core._xp import namespace
from ...core.adam import adam_update
from ...core.muon import (
    DEFAULT_RMS,
    batch_groups,
    debias_factor,
    matrix_shape,
    momentum_update,
    orthogonalized_updates,
    MuonOptions,
    suitability,
)
from ...core._check import check_bool, check_hyper, is_array_scalar
from .. import _signatures as S
from . import distributed as _dist
from ._base import (added_group, apply_update, dtype_name, nonfinite_policy, run_closure, scalar,
                    torch_nonfinite_gate, user_stacklevel)
from .groups import setstate_keeping_defaults
from .groups import warn_unknown_keys as _warn_unknown_keys

__all__ = ["Muon", "Route", "torch_optim_state_dict"]

_logger = logging.getLogger("xpopt")

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Options used only when parameters are routed (construction / add_param_group).
# ``fallback_filter`` is usually a lambda, which cannot be pickled, so it is left
# out of ``state_dict()`` and kept from the live optimizer on ``load_state_dict()``.
_CONSTRUCTION_ONLY = ("fallback_filter",)


#: ``step`` given to a Muon momentum buffer loaded without one (an older xpopt,
#: torch.optim.Muon): its age is unknown, so ``adaptive``'s bias correction is 1.
_WARM_STEP = 10**6


def _ns_dtype_label(ns_dtype, p: torch.Tensor) -> str:
    if ns_dtype == "auto":  # as Muon._muon_group resolves it
        ns_dtype = "bfloat16" if not p.is_complex() and _torch_backend.has_native_bf16(p) else None
    return dtype_name(_state_dtype(p) if ns_dtype is None else ns_dtype)


class Route(NamedTuple):
    """One routing decision, as returned by :meth:`Muon.routes`.

    ``name`` is the parameter's name when the optimizer was given names
    (``model.named_parameters()``), else ``"group g, param i"``.
    ``route`` is ``"muon"`` or ``"fallback"``; ``reason`` is ``core``'s
    suitability reason (``"ok"``, ``"insufficient_dims"``,
    ``"leading_unit_dims"``, ``"min_dim_too_small:N"``,
    ``"extreme_aspect_ratio:R"``) or the override that decided it
    (``"use_fallback_flag"``, ``"use_muon_flag"``, ``"fallback_filter"``).
    """

    name: str
    shape: tuple
    route: str
    reason: str
    group: int
    index: int
    ns_dtype: Optional[str] = None  # Muon params: the dtype Newton-Schulz runs in


def _state_dtype(p: torch.Tensor, key: str = "") -> torch.dtype:
    dt = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
    if key == "exp_avg_sq" and dt.is_complex:  # |g|^2 is real
        return torch.float32 if dt == torch.complex64 else torch.float64
    return dt


def _is_bf16(ns_dtype) -> bool:
    return ns_dtype == "bfloat16" or ns_dtype is torch.bfloat16


#: Hyperparameters that may be tensors (torch.optim's convention for ``lr``;
#: a tensor keeps schedulers from recompiling a compiled step).
_TENSOR_HYPERS = ("lr", "fallback_lr")


_MUON_FIELDS = frozenset(MuonOptions.__dataclass_fields__)


def _check_options(o: dict, where: str) -> None:
    """Validate one set of options (the defaults, one added group, one loaded group).

    torch's own convention first (a 1-element floating tensor ``lr`` /
    ``fallback_lr``, checked for a value >= 0 here, once), then everything
    through the validators shared with the optax / arrays adapters
    (``core.muon.MuonOptions``): errors read ``"Muon: <the shared
    message naming the option and value> (<where>)"``.  ``step()`` validates
    nothing.
    """
    probe = o
    for key in _TENSOR_HYPERS:
        v = o.get(key)
        if not isinstance(v, torch.Tensor):
            continue
        if v.numel() != 1:
            raise ValueError(f"Muon: Tensor {key} must be 1-element (as in torch.optim), got shape "
                             f"{tuple(v.shape)} ({where})")
        if not v.is_floating_point():
            raise TypeError(f"Muon: {key}={v!r} must be a floating tensor, e.g. torch.tensor(0.02) ({where})")
        if not float(v) >= 0:  # concrete here; a value check inside step() would sync
            raise ValueError(f"Muon: {key} must be >= 0, got {float(v)!r} ({where})")
        if probe is o:
            probe = dict(o)
        probe[key] = v.reshape(())  # the shared check takes 0-d arrays
    try:
        for key in ("lr", "weight_decay", "fallback_lr", "fallback_weight_decay"):
            v = probe[key]
            if v is None and key.startswith("fallback"):
                continue
            if callable(v) and not is_array_scalar(v):
                raise TypeError(f"{key}={v!r} is a callable; a param group holds a value "
                                "(a number or a 0-d array): schedule it with a scheduler instead")
            check_hyper(v, key)
        MuonOptions(**{k: v for k, v in probe.items() if k in _MUON_FIELDS})
        for key in ("verbose", "use_fallback", "use_muon"):
            if key == "verbose" or o.get(key) is not None:
                check_bool(o[key], key)
        if o.get("fallback_filter") is not None and not callable(o["fallback_filter"]):
            raise TypeError(f"fallback_filter={o['fallback_filter']!r} must be None or a callable "
                            "(name, param) -> bool")
    except (TypeError, ValueError) as e:
        raise type(e)(f"Muon: {e} ({where})") from None


def _momentum_scheduled(group: dict) -> bool:
    """True while an LR scheduler with ``cycle_momentum=True`` drives the group.

    ``OneCycleLR`` / ``CyclicLR`` cycle ``betas[0]`` of an optimizer whose
    defaults contain ``betas`` (ours do, for the fallback) and mark the group
    with ``max_momentum`` / ``base_momentum``; Muon's momentum then follows
    ``betas[0]`` too, as ``torch.optim.Muon``'s ``momentum`` would.
    """
    return "max_momentum" in group and "base_momentum" in group


def _muon_momentum(group: dict):
    # A group without ``betas`` (``xpopt.compat.torch_optim.Muon``'s, as torch.optim.Muon's)
    # has its ``momentum`` cycled by the scheduler itself.
    return group["betas"][0] if _momentum_scheduled(group) and "betas" in group else group["momentum"]


def _step_dtype(p: torch.Tensor) -> torch.dtype:
    # float32 counts exactly to 2**24 (16.7M steps), as torch.optim's tensor steps.
    return torch.float64 if p.dtype in (torch.float64, torch.complex128) else torch.float32


def _step_tensor(p: torch.Tensor, value) -> torch.Tensor:
    """A step count as a 0-d tensor on ``p``'s device (compile- and CUDA-graph-friendly)."""
    if isinstance(value, torch.Tensor):
        value = float(value.item())
    return torch.tensor(float(value), dtype=_step_dtype(p), device=p.device)


class Muon(torch.optim.Optimizer):
    """Muon for matrices / conv kernels, AdamW or NAdamW for everything else.

    Args:
      params: an iterable of tensors, of ``(name, tensor)`` pairs
        (``model.named_parameters()``), or of group dicts. A group may set any
        option below, plus ``use_fallback=True`` (send the whole group to the
        fallback) or ``use_muon=True/False`` (force the route; timm-compatible).
      lr: Muon learning rate (also the fallback's unless ``fallback_lr``); a
        number or a 1-element float tensor (for ``torch.compile``).
      momentum, nesterov, momentum_form: momentum coefficient in [0, 1),
        Nesterov look-ahead, ``"ema"`` (torch.optim / timm lerp form) or
        ``"classic"`` (``buf = mu*buf + g``).
      weight_decay: decoupled, ``W *= 1 - lr*wd``.
      ns_coefficients, ns_steps, eps, safety_factor: Newton-Schulz preset name
        (``original``, ``quintic``, ``polar_express``, ``polar_express_safer``)
        or ``(a, b, c)`` triple(s); iterations (None: the preset's own count,
        8 for Polar Express, else 5); prescale floor (relative to max|G|: by
        default only a zero matrix meets it); prescale factor.
      preconditioning: Newton-Schulz prescale (optax's names): ``"frobenius"``,
        ``"spectral"`` (exact top singular value: an SVD), ``"aol"`` (row
        scaling, often saves one step) or ``"schatten"``.
      adaptive: scale each Muon update by ``<g_hat, O>``, the bias-corrected
        momentum's inner product with its orthogonalisation (optax's
        ``adaptive``, a nuclear-norm estimate).
      consistent_rms: the RMS constant of ``adjust_lr_fn="match_rms_adamw"``
        (None = 0.2), optax's name.
      adjust_lr_fn: ``original``, ``match_rms_adamw``, ``rms_to_rms``, ``none``.
      conv_mode, normalize_spatial: ``flatten`` (one NS per kernel) or
        ``batched`` (one per spatial tap, normalised by sqrt(taps)).
      ns_dtype: Newton-Schulz compute dtype; ``None`` = float32 for bf16/f16
        params, else the param dtype. ``"bfloat16"`` is a GPU speed choice; on
        a CPU without native bf16 it warns once (about 100x slower).
        ``"auto"``: bfloat16 where the device multiplies it natively (CUDA,
        AMX / AVX512-BF16 CPUs), else as None; ``routes()`` shows the choice.
      ns_method: ``"standard"`` or ``"gram"`` (Gram Newton-Schulz: the same
        polynomials iterated on the small Gram matrix, with restarts, where
        the long side exceeds 1.5 times the short one; ~0.6x the time at
        aspect 4 in float32; ``core.newton_schulz``).
      batched: orthogonalise same-shape matrices of a group in one call:
        ``"auto"`` (default) where that was measured faster (always on CUDA,
        matrices up to 256x512 on CPUs), or True / False.
      fallback, fallback_lr, betas, fallback_eps, fallback_weight_decay: the
        AdamW / NAdamW used for non-Muon params. ``fallback_lr`` is a fixed
        number or 1-element tensor: LR schedulers only change ``lr``; to
        schedule a separate fallback LR, put those params in their own group
        (``use_fallback=True``) with its own ``lr``.  A scheduler with
        ``cycle_momentum=True`` drives ``betas[0]`` and, through it, Muon's
        momentum (module docstring).
      min_dim_size, max_aspect_ratio: ``core.muon.suitability`` thresholds.
      verbose: log one INFO line per parameter (name, shape, route, reason) on
        the ``"xpopt"`` logger when it is routed.
      fallback_filter: ``(name, param) -> bool``; True sends the parameter to
        the fallback (embeddings, LM heads). ``name`` is None for unnamed params.
      nonfinite: None (no check, the default), ``"skip"``, ``"zero"`` or
        ``"raise"``: what a step with a NaN/Inf gradient does (module docstring).
    """

    @S.takes("torch.Muon", method=True)
    def __init__(self, params, nonfinite, **defaults):
        self._nonfinite = nonfinite_policy(nonfinite, "Muon")
        _check_options(defaults, "Muon(...) arguments")
        self._routes: dict[torch.Tensor, Route] = {}
        self._device: Optional[torch.device] = None
        self._device_owner: str = ""
        # Whether the params' device multiplies bf16 natively: decided once, with
        # the first parameter (all params share one device), so that step()
        # resolves ns_dtype="auto" without probing the device.
        self._native_bf16: Optional[bool] = None
        self._warned_bf16 = False
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ routing

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (torch semantics), validate its options and route its params."""
        with added_group(self, super().add_param_group, param_group) as (g, group):
            _check_options(group, f"param group {g}")
            _warn_unknown_keys(group, [*self.defaults, "use_fallback", "use_muon"], f"param group {g}", "Muon")
            names = group.get("param_names")
            device, owner = self._device, self._device_owner
            routes = []
            for i, p in enumerate(group["params"]):
                name = names[i] if names is not None else None
                label = repr(name) if name is not None else f"group {g}, param {i}"
                if not (p.is_complex() or p.is_floating_point()):
                    raise TypeError(
                        f"Muon: parameter {label} has dtype {p.dtype}; Muon and its AdamW fallback "
                        "need a floating dtype (float32, float64, bfloat16, float16, complex64, "
                        "complex128): cast it, or leave it out of the optimizer")
                if device is None:
                    device, owner = p.device, label
                elif p.device != device:
                    raise ValueError(
                        f"Muon: parameter {label} is on device {p.device} but parameter {owner} is on "
                        f"{device}; move the model to one device (model.to(device)) before "
                        "building the optimizer")
                routes.append(self._decide(group, g, i, p, name, label))
            _dist.check_group(group["params"], lambda i: repr(names[i]) if names is not None
                              else f"group {g}, param {i}", "Muon")
        self._device, self._device_owner = device, owner
        if self._native_bf16 is None and group["params"]:
            self._native_bf16 = bool(_torch_backend.has_native_bf16(group["params"][0]))
        for p, r in zip(group["params"], routes):
            self._routes[p] = r
            if group["verbose"]:
                _logger.info("xpopt Muon: %s shape=%s -> %s (%s)%s", r.name, r.shape, r.route, r.reason,
                             f" ns_dtype={r.ns_dtype}" if r.ns_dtype else "")
        self._warn_emulated_bf16()

    @staticmethod
    def _decide(group, g, i, p, name, label) -> Route:
        shape = tuple(p.shape)
        if group.get("use_fallback"):
            route, reason = "fallback", "use_fallback_flag"
        elif group.get("use_muon") is not None:
            route, reason = ("muon" if group["use_muon"] else "fallback"), "use_muon_flag"
        elif group["fallback_filter"] is not None and group["fallback_filter"](name, p):
            route, reason = "fallback", "fallback_filter"
        else:
            ok, reason = suitability(shape, min_dim_size=group["min_dim_size"],
                                     max_aspect_ratio=group["max_aspect_ratio"])
            route = "muon" if ok else "fallback"
        if route == "muon":
            try:
                matrix_shape(shape, group["conv_mode"])
            except ValueError as e:
                raise ValueError(
                    f"Muon: parameter {label} of shape {shape} was forced to Muon ({reason}) but "
                    f"cannot be orthogonalised: {e}; route it to the fallback instead") from None
        ns_dtype = _ns_dtype_label(group["ns_dtype"], p) if route == "muon" else None
        return Route(name if name is not None else f"group {g}, param {i}", shape, route, reason, g, i,
                     ns_dtype)

    def routes(self) -> list[Route]:
        """Every parameter's routing decision, in param-group order."""
        return [self._routes[p] for group in self.param_groups for p in group["params"]]

    def _warn_emulated_bf16(self) -> None:
        """One UserWarning per optimizer if Muon params run bf16 NS on a device that emulates it.

        Checked when params are added or state is loaded, never in step():
        ``warnings.warn`` inside a compiled step would break its graph.
        """
        if self._warned_bf16 or self._native_bf16 is not False:
            return
        for group in self.param_groups:
            if _is_bf16(group["ns_dtype"]) and any(self._routes[p].route == "muon" for p in group["params"]):
                self._warned_bf16 = True
                warnings.warn(
                    f"Muon: ns_dtype=bfloat16 on {self._device.type}, which has no native bf16 matmul "
                    "(no AMX / AVX512-BF16): Newton-Schulz will run about 100x slower than in float32. "
                    "Use ns_dtype=None (float32 here) on this device; keep bfloat16 for GPUs.",
                    UserWarning, stacklevel=user_stacklevel())
                return

    # ------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        """One optimisation step; returns the closure's loss (None without one).

        Compiles as one graph: ``torch.compile(opt.step, fullgraph=True)``.
        """
        loss = run_closure(closure)
        if self._nonfinite is not None and not self._nonfinite_gate():
            return loss
        # Collect (and check) every group before touching any parameter, so an
        # error leaves the model and the step counts as they were.
        work = []
        for group in self.param_groups:
            lists = ([], [], [], [], [], [], [], [], [])   # _init_group's nine, in its order
            self._init_group(group, *lists)
            work.append((group, *lists))
        for group, mp, mg, mb, ms, fp, fg, fm, fv, fs in work:
            if mp:
                if _dist.sharded(mp):  # FSDP2 DTensors: NS of full matrices on owner ranks
                    _dist.muon_group(self, group, mp, mg, mb, ms)
                else:
                    self._muon_group(group, mp, mg, mb, ms)
            if fp:
                # elementwise: each rank updates its own shards
                self._fallback_group(group, *map(_dist.local, (fp, fg, fm, fv)), fs)
        return loss

    def _init_group(self, group, muon_params, muon_grads, muon_bufs, muon_steps,
                    fb_params, fb_grads, fb_exp_avgs, fb_exp_avg_sqs, fb_steps) -> bool:
        """Fill the lists with the group's params that have gradients, and their state.

        Bookkeeping only, no maths: state is created here on first use, routes
        are looked up, gradients checked.  Under ``torch.compile`` dynamo runs
        an optimizer's ``_init_group`` eagerly and guards on what it returns
        (as for torch.optim's own optimizers), so the traced step holds only
        the arithmetic.  Raises before creating any state of the group.
        """
        with_grad = []
        for p in group["params"]:
            if p.grad is None:
                continue
            r = self._routes.get(p)
            if r is None:
                raise RuntimeError(
                    "Muon: a parameter in param_groups was never routed; add parameters with "
                    "add_param_group(), not by editing param_groups")
            if p.grad.layout != torch.strided:
                raise RuntimeError(
                    f"Muon: parameter {r.name!r} has a sparse gradient ({p.grad.layout}); Muon and "
                    "its AdamW fallback need dense gradients (e.g. nn.Embedding(sparse=False))")
            with_grad.append((p, r.route == "muon"))
        for p, is_muon in with_grad:
            state = self.state[p]
            keys = ("momentum_buffer",) if is_muon else ("exp_avg", "exp_avg_sq")
            fresh = keys[0] not in state
            for k in keys:
                if k not in state:
                    state[k] = torch.zeros_like(p, dtype=_state_dtype(p, k), memory_format=torch.preserve_format)
            step = state.get("step")
            if step is None:
                # A momentum buffer from torch.optim.Muon (or set by hand): its age is
                # unknown, so treat it as warmed up (adaptive's bias correction 1).
                state["step"] = _step_tensor(p, 0 if fresh else _WARM_STEP)
            elif not isinstance(step, torch.Tensor) or step.device != p.device or step.dtype != _step_dtype(p):
                state["step"] = _step_tensor(p, step)
            if is_muon:
                muon_params.append(p)
                muon_grads.append(p.grad)
                muon_bufs.append(state["momentum_buffer"])
                muon_steps.append(state["step"])
            else:
                fb_params.append(p)
                fb_grads.append(p.grad)
                fb_exp_avgs.append(state["exp_avg"])
                fb_exp_avg_sqs.append(state["exp_avg_sq"])
                fb_steps.append(state["step"])
            # core looks the array namespace up by type: fill that cache here,
            # eagerly (the first lookup imports a backend, which dynamo cannot trace).
            namespace(p.grad, names=("grad",))
        return False

    @staticmethod
    def _apply(p: torch.Tensor, direction: torch.Tensor, lr, wd) -> None:
        # The direction may be narrower (bf16 Newton-Schulz output): the update widens it exactly.
        apply_update(p, direction, lr, wd, _state_dtype(p))

    def _muon_parts(self, group: dict, steps: list):
        """``(momentum, directions, apply)`` of a group's Muon step, its steps counted: ``momentum(buf, grad,
        step)`` updates ``buf`` in place and returns the update to orthogonalise; ``directions(updates, steps)``
        orthogonalises one batch (with its adaptive bias correction); ``apply(p, d)`` updates ``p``
        with the group's ``lr`` and ``weight_decay``.  ``_muon_group`` and the sharded path
        (``distributed.muon_group``, which only adds the array movement) share them."""
        mu = _muon_momentum(group)
        lr, wd = scalar(group["lr"]), group["weight_decay"]
        nesterov, form = group["nesterov"], group["momentum_form"]
        corrected = group["momentum_bias_correction"]
        torch._foreach_add_(steps, 1.0)
        ns_dtype = group["ns_dtype"]
        # "auto" as core resolves it, from the device probe made once when the
        # params were added (a probe in step() would not trace); complex stays complex.
        auto = isinstance(ns_dtype, str) and ns_dtype == "auto"
        rms = DEFAULT_RMS if group["consistent_rms"] is None else group["consistent_rms"]
        common = dict(
            conv_mode=group["conv_mode"], normalize_spatial=group["normalize_spatial"],
            adjust_lr_fn=group["adjust_lr_fn"], rms=rms, adaptive=group["adaptive"], debias=1.0,
            coefficients=group["ns_coefficients"], steps=group["ns_steps"], eps=group["eps"],
            safety_factor=group["safety_factor"], preconditioning=group["preconditioning"],
            method=group["ns_method"], eps_mode=group["eps_mode"], cast_back=False)

        def momentum(buf, grad, step):
            return momentum_update(buf, grad.to(buf.dtype), momentum=mu, nesterov=nesterov, form=form,
                                   inplace=True, bias_correction=corrected, step=step)[1]

        def directions(updates, batch_steps):
            cdt = ("bfloat16" if self._native_bf16 and not updates[0].is_complex() else None) if auto else ns_dtype
            ds = orthogonalized_updates(updates, batch=True, compute_dtype=cdt, **common)
            if not group["adaptive"]:
                return ds
            # each param's own bias correction (params added or loaded at
            # different times have different step counts)
            return [d * debias_factor(mu, t, nesterov=nesterov, form=form, bias_corrected=corrected)
                    for d, t in zip(ds, batch_steps)]

        def apply(p, d):
            self._apply(p, d, lr, wd)

        return momentum, directions, apply

    def _muon_group(self, group: dict, params: list, grads: list, bufs: list, steps: list) -> None:
        momentum, directions, apply = self._muon_parts(group, steps)
        # Momentum, Newton-Schulz and the update run batch group by batch group
        # (one matrix unless batching pays), so each matrix is still in cache
        # for the next phase, as in torch.optim's per-parameter loop.
        for idx in batch_groups(bufs, conv_mode=group["conv_mode"], batch=group["batched"]):
            ds = directions([momentum(bufs[i], grads[i], steps[i]) for i in idx], [steps[i] for i in idx])
            for i, d in zip(idx, ds):
                apply(params[i], d)

    def _fallback_group(self, group: dict, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list,
                        steps: list) -> None:
        beta1, beta2 = group["betas"]
        lr = scalar(group["lr"] if group["fallback_lr"] is None else group["fallback_lr"])
        wd = group["weight_decay"] if group["fallback_weight_decay"] is None else group["fallback_weight_decay"]
        eps, eps_root = group["fallback_eps"], group["fallback_eps_root"]
        nesterov = False if group["fallback"] == "adamw" else group["fallback"]
        torch._foreach_add_(steps, 1.0)
        for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            direction, new_m, new_v = adam_update(g.to(m.dtype), m, v, t, beta1=beta1, beta2=beta2, eps=eps,
                                                  nesterov=nesterov, eps_root=eps_root)
            m.copy_(new_m)
            v.copy_(new_v)
            self._apply(p, direction, lr, wd)

    def _nonfinite_gate(self) -> bool:
        """The ``nonfinite=`` policy (``core.fault``): False = skip this step.

        One host sync per step (as ``GradScaler.step``); the count lives in
        ``self.state["nonfinite_steps"]`` (a number, saved by ``state_dict``).
        """
        return torch_nonfinite_gate(self, lambda p: self._routes[p].name, "Muon")

    # ------------------------------------------------------------ state_dict

    def state_dict(self) -> dict:
        """torch's state_dict, without the (usually unpicklable) ``fallback_filter``."""
        sd = super().state_dict()
        for g in sd["param_groups"]:
            for k in _CONSTRUCTION_ONLY:
                g.pop(k, None)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, completed and validated; state keeps its own dtype.

        Options: the checkpoint's values win (torch's rule: loading restores
        hyperparameters); an option the checkpoint's group lacks (saved by an
        older xpopt, or by ``torch.optim.Muon``) keeps this optimizer's value
        for that group.  ``adjust_lr_fn=None`` (torch.optim.Muon) means
        ``"original"``; a group without ``momentum_form`` holds EMA buffers
        (torch.optim.Muon's form, and every xpopt checkpoint has the key).
        Every completed group is validated like a new one before anything is
        loaded.  Routing is this optimizer's: state must fit it.

        State: torch's ``Optimizer._process_value_according_to_param_policy``
        casts floating state to the param dtype (it is called through the base
        class, so overriding it has no effect).  Instead a pre-hook, registered
        last for this call so that it sees the state dict every user pre-hook
        produced, completes and validates it; a post-hook, run first, re-copies
        its tensors in the right dtype (float32 for bf16/f16 params).  Loaded
        state is copied, never shared with ``state_dict``.  A ``step`` saved as
        an int (older xpopt) or a tensor (ours, torch, timm) becomes a 0-d tensor
        on the param's device; a momentum buffer without one gets a large count
        (warmed up).
        """
        box: dict = {}

        def pre(opt, sd):
            sd = opt._complete_loaded(sd)
            opt._validate_loaded(sd)
            box["sd"] = sd
            return sd

        def post(opt):
            opt._recast_loaded(box["sd"])
            opt._warn_emulated_bf16()

        h_pre = self.register_load_state_dict_pre_hook(pre)
        h_post = self.register_load_state_dict_post_hook(post, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            h_pre.remove()
            h_post.remove()

    def _complete_loaded(self, sd: dict) -> dict:
        saved = sd.get("param_groups")
        if not isinstance(saved, list) or len(saved) != len(self.param_groups):
            return sd  # torch raises its own error for this right after the pre-hooks
        groups = []
        for g, (s, live) in enumerate(zip(saved, self.param_groups)):
            s = dict(s)
            if "adjust_lr_fn" in s and s["adjust_lr_fn"] is None:
                s["adjust_lr_fn"] = "original"     # torch.optim.Muon: None means Keller Jordan's rule
            s.setdefault("momentum_form", "ema")   # torch.optim.Muon's buffers (xpopt always saves it)
            for k, v in live.items():
                if k in _CONSTRUCTION_ONLY:
                    s[k] = v                       # never saved (not picklable): the live one
                elif k not in ("params", "param_names"):
                    s.setdefault(k, v)
            _check_options(s, f"param group {g} of the loaded state_dict")
            groups.append(s)
        sd = dict(sd)
        sd["param_groups"] = groups
        return sd

    def _loaded_pairs(self, sd):
        saved_groups = sd["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            return None  # torch raises its own error for this right after the pre-hooks
        ids = chain.from_iterable(s["params"] for s in saved_groups)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        return [(i, p, sd["state"][i]) for i, p in zip(ids, params) if i in sd["state"]]

    def _validate_loaded(self, sd) -> None:
        for _, p, st in self._loaded_pairs(sd) or ():
            r = self._routes[p]
            want = ("step", "momentum_buffer") if r.route == "muon" else ("step", "exp_avg", "exp_avg_sq")
            if set(st) != set(want) and not (r.route == "muon" and set(st) == {"momentum_buffer"}):
                raise ValueError(
                    f"Muon.load_state_dict: state for parameter {r.name!r} has keys {sorted(st)}, but this "
                    f"optimizer routes it to {r.route} (needs {list(want)}); build the optimizer with "
                    "the same routing options (fallback_filter, use_fallback/use_muon, min_dim_size, "
                    "max_aspect_ratio) as the one that saved the state")
            for k, v in st.items():
                if k == "step":
                    if not (isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.numel() == 1)):
                        raise ValueError(
                            f"Muon.load_state_dict: state 'step' of parameter {r.name!r} is {v!r}; "
                            "expected a number or a 1-element tensor")
                elif not isinstance(v, torch.Tensor) or tuple(v.shape) != r.shape:
                    raise ValueError(
                        f"Muon.load_state_dict: state {k!r} of parameter {r.name!r} has shape "
                        f"{tuple(getattr(v, 'shape', ()))}, expected {r.shape}; the state dict comes "
                        "from a different model")

    def _recast_loaded(self, sd) -> None:
        for _, p, st in self._loaded_pairs(sd) or ():
            live = self.state[p]
            for k, v in st.items():
                if k == "step":
                    live[k] = _step_tensor(p, v)
                elif isinstance(v, torch.Tensor):
                    live[k] = v.to(device=p.device, dtype=_state_dtype(p, k), copy=True)
            if "step" not in live:
                live["step"] = _step_tensor(p, _WARM_STEP)

    def __setstate__(self, state: dict) -> None:
        setstate_keeping_defaults(self, state, super().__setstate__)
        self.__dict__.setdefault("_nonfinite", None)
        # Groups of an older pickle lack newer options: the defaults fill them
        # (what torch.optim.AdamW does for its own additions).
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        if getattr(self, "_native_bf16", None) is None:
            first = next((p for g in self.param_groups for p in g["params"]), None)
            self._native_bf16 = None if first is None else bool(_torch_backend.has_native_bf16(first))

    # torch pickles only defaults/state/param_groups; keep the routing too.
    def __getstate__(self) -> dict:
        s = super().__getstate__()
        s.update(_routes=self._routes, _device=self._device, _device_owner=self._device_owner,
                 _native_bf16=self._native_bf16, _warned_bf16=self._warned_bf16,
                 _nonfinite=getattr(self, "_nonfinite", None))
        return s


#: Keys of a torch.optim.Muon param group (torch >= 2.9).
_TORCH_MUON_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps",
                    "adjust_lr_fn")
#: torch.optim.AdamW group keys with no xpopt counterpart (their values must be the defaults).
_ADAMW_ONLY = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
               "decoupled_weight_decay")


def torch_optim_state_dict(muon: dict, adamw: Optional[dict] = None) -> dict:
    """One state dict for :class:`Muon` from ``torch.optim.Muon``'s (and ``torch.optim.AdamW``'s).

    torch.optim.Muon takes 2-D params only, so a torch run usually pairs it
    with an AdamW for the rest.  To continue such a run with xpopt, build
    ``Muon`` with the same param groups in the same order, torch.optim.Muon's
    first, then AdamW's with ``use_fallback=True``, and load the result::

        opt = Muon([{"params": matrices}, {"params": others, "use_fallback": True}],
                   ns_dtype=torch.bfloat16)     # torch.optim.Muon's NS dtype
        opt.load_state_dict(torch_optim_state_dict(ckpt["muon"], ckpt["adamw"]))

    With a torch.optim.Muon checkpoint alone (and a ``Muon`` over the same
    params) ``opt.load_state_dict(ckpt)`` is enough; this function adds the
    AdamW part.  Param ids are renumbered (Muon's first).  Muon groups are
    passed through (``load_state_dict`` reads their ``adjust_lr_fn=None`` as
    ``"original"`` and their buffers as EMA momentum); each AdamW group
    becomes a fallback group: ``eps`` -> ``fallback_eps``, ``lr`` and
    ``weight_decay`` used as they are (``fallback_lr`` / ``fallback_weight_decay``
    None), ``fallback="adamw"``, ``use_fallback=True``; its ``step`` /
    ``exp_avg`` / ``exp_avg_sq`` are the fallback's state.  AdamW options
    xpopt lacks (``amsgrad``, ``maximize``) must be off, and a
    ``torch.optim.Adam`` state (L2, not decoupled weight decay) needs
    ``weight_decay=0``.  As with any load, the checkpoint's hyperparameters
    win; options it lacks (``ns_dtype``, ``batched``, ...) keep the new
    optimizer's values.
    """
    groups: list = []
    state: dict = {}
    new_ids = count()

    def take(sd, what, translate):
        if not (isinstance(sd, dict) and isinstance(sd.get("param_groups"), list) and "state" in sd):
            raise TypeError(f"torch_optim_state_dict: {what} must be a state_dict() (a dict with 'state' "
                            f"and 'param_groups'), got {type(sd).__name__}")
        ids = {}
        for g, group in enumerate(sd["param_groups"]):
            new = translate(dict(group), f"{what} param group {g}")
            new["params"] = []
            for i in group["params"]:
                ids[i] = next(new_ids)
                new["params"].append(ids[i])
            groups.append(new)
        for i, st in sd["state"].items():
            if i not in ids:
                raise ValueError(f"torch_optim_state_dict: {what} has state for param id {i!r}, which no "
                                 "param group lists; pass the optimizer's state_dict() unchanged")
            state[ids[i]] = st

    def from_muon(g, where):
        missing = [k for k in _TORCH_MUON_KEYS if k not in g]
        if missing:
            raise ValueError(f"torch_optim_state_dict: {where} lacks {missing}; is it a torch.optim.Muon "
                             "state_dict()?")
        return g

    def from_adamw(g, where):
        for k in ("amsgrad", "maximize"):
            if g.get(k):
                raise ValueError(f"torch_optim_state_dict: {where} has {k}=True, which xpopt's AdamW "
                                 "fallback does not implement")
        if g.get("decoupled_weight_decay") is False and g.get("weight_decay", 0):
            raise ValueError(f"torch_optim_state_dict: {where} is torch.optim.Adam with weight_decay="
                             f"{g['weight_decay']} (L2 added to the gradient); xpopt's fallback decays "
                             "decoupled (AdamW): take it over only with weight_decay=0")
        missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in g]
        if missing:
            raise ValueError(f"torch_optim_state_dict: {where} lacks {missing}; is it a torch.optim.AdamW "
                             "state_dict()?")
        out = {k: v for k, v in g.items() if k not in _ADAMW_ONLY and k != "eps"}
        out.update(fallback_eps=g["eps"], fallback_lr=None, fallback_weight_decay=None, fallback="adamw",
                   use_fallback=True)
        return out

    take(muon, "muon", from_muon)
    if adamw is not None:
        take(adamw, "adamw", from_adamw)
    return {"state": state, "param_groups": groups}
