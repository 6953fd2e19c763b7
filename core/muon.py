"""Muon: momentum, then Newton-Schulz orthogonalisation, then a shape-aware LR.

Update rule for one matrix parameter ``W`` of shape ``(out, in, *spatial)``::

    buf    = mu * buf + (1 - mu) * g            # form="ema"   (torch.optim, timm)
    buf    = mu * buf + g                       # form="classic" (SGD momentum)
    u      = g + mu * (buf - g)  if nesterov  (ema)   |  g + mu * buf (classic)
    u      = buf                 otherwise
    O      = orthogonalize(matrix(u))           # see to_matrix for N-D / conv
    O      = <u_hat, O> * O        if adaptive   # u_hat = debias * u (dual-norm scale)
    W      = W * (1 - lr * wd) - lr * lr_scale(out, in) * O

With ``momentum_bias_correction=True`` (optax.contrib.muon's rule; ``t`` the
1-based step, ``B`` the EMA buffer: ``buf``, or ``(1 - mu) * buf`` for the
classic form)::

    u      = B / (1 - mu^t)                                         no nesterov
    u      = mu * B / (1 - mu^(t+1)) + (1 - mu) * g / (1 - mu^t)    nesterov

Newton-Schulz removes the positive scalar of the first, not the reweighting
of the second (t=2, mu=0.95: the buffer's weight relative to ``g`` is 0.68 of
the uncorrected mix's); the scale of ``u`` matters for ``adaptive`` and for
``eps_mode="add"`` (optax's ``||X|| + eps`` prescale).

Parameters are in torch layout ``(out, in, *spatial)``; adapters move other
layouts (flax's ``(in, out)``) into it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

from ._xp import is_complex, is_number, namespace
from .adam import _bias_correction, dozat_momentum
from .newton_schulz import orthogonalize

__all__ = [
    "MOMENTUM_FORMS", "ADJUST_LR_FNS", "CONV_MODES", "LOW_PRECISION_DTYPES",
    "DEFAULT_RMS", "momentum_update", "debias_factor", "lr_scale", "suitability", "matrix_shape", "to_matrix",
    "from_matrix", "batch_groups", "orthogonalized_updates", "muon_step", "MuonOptions", "check_momentum",
]

MOMENTUM_FORMS = ("ema", "classic")
#: RMS constant of ``match_rms_adamw`` (Moonshot); optax calls it ``consistent_rms``.
DEFAULT_RMS = 0.2
ADJUST_LR_FNS = ("original", "match_rms_adamw", "rms_to_rms", "none")
CONV_MODES = ("flatten", "batched")
#: ``MuonOptions.low_precision_dtype``: what bf16/f16 parameters' updates and state are stored in.
LOW_PRECISION_DTYPES = ("float32", "param")


def _check_choice(value, choices, argname: str) -> None:
    if value not in choices:
        raise ValueError(f"{argname}={value!r} is not valid; use one of {list(choices)}")


def check_momentum(momentum) -> None:
    """Python numbers must lie in [0, 1); 0-d arrays (schedules, maybe traced) pass."""
    if is_number(momentum) and 0.0 <= momentum < 1.0:
        return
    if not isinstance(momentum, (numbers.Number, bool)) and getattr(momentum, "shape", None) == ():
        return
    raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")


def momentum_update(buf, grad, *, momentum: float, nesterov: bool = False, form: str = "ema",
                    inplace: bool = False, bias_correction: bool = False, step=None):
    """Return ``(new_buf, update)``; see the module docstring for both forms.

    ``bias_correction=True`` returns the bias-corrected update of the module
    docstring (optax.contrib.muon's), for which ``step`` (1-based, this
    update included; a Python int or a 0-d array) is needed; the buffer is the
    same either way.

    ``inplace=True`` writes the new buffer into ``buf`` where the framework's
    arrays are mutable (torch, NumPy, CuPy: what ``torch.optim`` does, and
    it saves an allocation per step); under JAX it is ignored.

    The EMA form keeps the buffer on the gradient's scale (its fixed point is
    ``g``); the classic form's is ``g / (1 - mu)``.  By induction the EMA buffer
    is exactly ``(1 - mu)`` times the classic one, and so is the update, with or
    without nesterov.  Newton-Schulz removes that scale, so for Muon the two
    forms give the same step (to rounding: the prescale is scale-invariant); they differ in what the
    stored state means, which matters when exchanging state with a peer that
    keeps the classic buffer.
    """
    _check_choice(form, MOMENTUM_FORMS, "momentum_form")
    xp, backend = namespace(buf, grad, names=("buf", "grad"))
    if bias_correction and step is None:
        raise ValueError("bias_correction=True needs step= (1-based count of updates, this one included)")
    if form == "ema":
        buf = (backend.lerp_ if inplace else backend.lerp)(buf, grad, 1.0 - momentum)
        update = backend.lerp(grad, buf, momentum) if nesterov else buf
    else:
        new = momentum * buf + grad
        if inplace and backend.MUTABLE:
            buf[...] = new
            new = buf
        buf = new
        update = grad + momentum * buf if nesterov else buf
    if bias_correction:
        update = _bias_corrected(xp, buf, grad, momentum, step, nesterov, form)
    return buf, update


def _bias_corrected(xp, buf, grad, momentum, step, nesterov, form):
    """The bias-corrected update of the module docstring (the EMA buffer ``B`` for either form)."""
    real = xp.float64 if grad.dtype in (xp.float64, xp.complex128) else xp.float32
    ema = buf if form == "ema" else buf * (1.0 - momentum)
    if not nesterov:
        return ema / _bias_correction(xp, momentum, step, real)
    return dozat_momentum(xp, ema, grad, momentum, step, real)


def debias_factor(momentum, step, *, nesterov: bool = False, form: str = "ema", bias_corrected: bool = False):
    """``c`` with ``c * update`` an unbiased estimate of the gradient's scale.

    ``step`` is the 1-based count of momentum updates including this one (a
    Python int or a 0-d array).  For a constant gradient ``g`` the EMA buffer
    is ``(1 - mu^t) g`` and the nesterov mix ``(1 - mu^(t+1)) g``; the classic
    form is ``1 / (1 - mu)`` times the EMA one.  Only ``adaptive`` Muon needs it
    (Newton-Schulz itself is scale-free).  optax bias-corrects the two terms of
    its nesterov mix separately, which overshoots (1.49 g at t=1, mu=0.95):
    ``bias_corrected=True`` (an update from ``momentum_update(...,
    bias_correction=True)``, optax's rule) is already corrected, so 1.
    """
    _check_choice(form, MOMENTUM_FORMS, "momentum_form")
    if bias_corrected:
        return 1.0
    c = 1.0 / (1.0 - momentum ** (step + 1 if nesterov else step))
    return c * (1.0 - momentum) if form == "classic" else c


def lr_scale(fan_out: int, fan_in: int, adjust_lr_fn: str = "match_rms_adamw", rms=DEFAULT_RMS):
    """Multiplier on ``lr`` for an orthogonalised ``(fan_out, fan_in)`` update.

    ``original`` (Keller Jordan): ``sqrt(max(1, out/in))``.
    ``match_rms_adamw`` (Moonshot/Kimi): ``rms * sqrt(max(out, in))``, ``rms``
    = 0.2 by default (optax's ``consistent_rms``), so the update's RMS matches
    AdamW's (~0.2) and one LR serves both.
    ``rms_to_rms`` (Scion, Bernstein): ``sqrt(out/in)``, the spectral-norm
    steepest-descent scale.  ``none``: 1.
    """
    _check_choice(adjust_lr_fn, ADJUST_LR_FNS, "adjust_lr_fn")
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if adjust_lr_fn == "match_rms_adamw":
        return rms * math.sqrt(max(fan_out, fan_in))
    if adjust_lr_fn == "rms_to_rms":
        return math.sqrt(fan_out / fan_in)
    return 1.0


def suitability(shape, *, min_dim_size: int = 4, max_aspect_ratio: float = 128.0) -> tuple[bool, str]:
    """``(ok, reason)``: should a parameter of ``shape`` be orthogonalised?

    Rules (timm's, which cover the common vision and language models):
    fewer than two non-unit dims -> ``insufficient_dims`` (biases, norms,
    scalars); a unit first or second dim -> ``leading_unit_dims`` (position
    embeddings ``(1, seq, d)``, depthwise convs ``(c, 1, kh, kw)``); after
    flattening to ``(out, prod(rest))`` a side below ``min_dim_size`` ->
    ``min_dim_too_small:N``; a ratio above ``max_aspect_ratio`` ->
    ``extreme_aspect_ratio:R`` (e.g. a 4x2048 head).
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or sum(1 for d in shape if d > 1) < 2:
        return False, "insufficient_dims"
    if shape[0] == 1 or shape[1] == 1:
        return False, "leading_unit_dims"
    dims = (shape[0], math.prod(shape[1:]))
    lo, hi = min(dims), max(dims)
    if lo < min_dim_size:
        return False, f"min_dim_too_small:{lo}"
    if hi / lo > max_aspect_ratio:
        return False, f"extreme_aspect_ratio:{hi / lo:.1f}"
    return True, "ok"


def _squeeze_leading(shape, squeeze: bool = True) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    while squeeze and len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    return shape


def matrix_shape(shape, conv_mode: str = "flatten", squeeze: bool = True) -> tuple[int, ...]:
    """Shape that Newton-Schulz sees for a parameter of ``shape``.

    Leading unit dims are dropped (torch's convention: a ``(1, seq, d)``
    parameter is a ``(seq, d)`` matrix); ``squeeze=False`` keeps them, for a
    parameter whose fan-out axis was given explicitly (dimension numbers), so
    that a unit fan-out stays the fan-out.  ``flatten``: ``(out, in*kh*kw...)``, one
    orthogonalisation of the whole kernel.  ``batched``: ``(kh*kw..., out, in)``,
    one orthogonalisation per spatial tap.
    """
    _check_choice(conv_mode, CONV_MODES, "conv_mode")
    s = _squeeze_leading(shape, squeeze)
    if len(s) < 2:
        raise ValueError(f"a Muon parameter needs at least 2 dimensions, got shape {tuple(shape)}")
    if len(s) == 2:
        return s
    if conv_mode == "flatten":
        return (s[0], math.prod(s[1:]))
    return (math.prod(s[2:]), s[0], s[1])


def to_matrix(x, conv_mode: str = "flatten", squeeze: bool = True):
    xp, _ = namespace(x, names=("x",))
    s = _squeeze_leading(x.shape, squeeze)
    m = xp.reshape(x, s)
    if len(s) <= 2:
        return m
    if conv_mode == "flatten":
        return xp.reshape(m, matrix_shape(s, conv_mode))
    m = xp.reshape(m, (s[0], s[1], math.prod(s[2:])))
    return xp.permute_dims(m, (2, 0, 1))


def from_matrix(m, shape, conv_mode: str = "flatten", squeeze: bool = True):
    """Inverse of ``to_matrix`` for a parameter of ``shape``."""
    xp, _ = namespace(m, names=("m",))
    shape = tuple(int(d) for d in shape)
    s = _squeeze_leading(shape, squeeze)
    if len(s) > 2 and conv_mode == "batched":
        m = xp.permute_dims(m, (1, 2, 0))
    return xp.reshape(m, shape)


def orthogonalized_updates(
    updates,
    *,
    conv_mode: str = "flatten",
    normalize_spatial: bool = True,
    adjust_lr_fn: str = "match_rms_adamw",
    rms=DEFAULT_RMS,
    batch="auto",
    adaptive: bool = False,
    debias=1.0,
    squeeze_leading=True,
    **ns_kwargs,
):
    """``lr_scale * orthogonalize(matrix(u))`` for each ``u``, in ``u``'s shape.

    With ``batch=True`` the updates whose matrix shape and dtype agree are
    stacked and orthogonalised in one batched call (one GEMM chain instead of
    many small ones); ``"auto"`` does so only where the backend measured it to
    pay (``backend.batch_limit``: always on GPUs, small matrices on CPUs);
    results agree with the loop to rounding.  ``adaptive`` (Bernstein & Newhouse's dual-norm step,
    optax's ``adaptive``) multiplies each result by ``<debias * u, O>``, the
    real Frobenius inner product over the whole parameter, which estimates
    the gradient's nuclear norm; ``debias`` comes from :func:`debias_factor`.
    ``rms`` is ``match_rms_adamw``'s constant.  ``squeeze_leading`` (a bool,
    or one per update): drop leading unit dims (:func:`matrix_shape`).
    ``ns_kwargs`` go to :func:`orthogonalize`.
    """
    _check_choice(adjust_lr_fn, ADJUST_LR_FNS, "adjust_lr_fn")
    updates = list(updates)
    if not updates:
        return []
    xp, _ = namespace(*updates, names=tuple(f"updates[{i}]" for i in range(len(updates))))
    squeeze = list(squeeze_leading) if isinstance(squeeze_leading, (list, tuple)) else \
        [squeeze_leading] * len(updates)
    mats = [to_matrix(u, conv_mode, q) for u, q in zip(updates, squeeze)]
    out = [None] * len(updates)
    for idx in batch_groups(updates, conv_mode=conv_mode, batch=batch, squeeze=squeeze):
        shape = mats[idx[0]].shape
        scale = lr_scale(shape[-2], shape[-1], adjust_lr_fn, rms)
        if len(shape) == 3 and normalize_spatial:
            # Batched taps: each tap's update has unit spectral norm, so the
            # kernel's grows with sqrt(taps); normalise it back.
            scale = scale / math.sqrt(shape[0])
        # The shape's LR scale rides on Newton-Schulz's last GEMM (no extra pass).
        if len(idx) == 1:
            orth = [orthogonalize(mats[idx[0]], scale=scale, **ns_kwargs)]
        else:
            stacked = orthogonalize(xp.stack([mats[i] for i in idx]), scale=scale, **ns_kwargs)
            orth = [stacked[j, ...] for j in range(len(idx))]
        for i, o in zip(idx, orth):
            if adaptive:  # <u, scale*O> / scale = <u, O>
                o = o * ((debias / scale) * _inner(xp, mats[i], o))
            out[i] = from_matrix(o, updates[i].shape, conv_mode, squeeze[i])
    return out


def batch_groups(arrays, *, conv_mode: str = "flatten", batch="auto", squeeze=True) -> list[list[int]]:
    """Indices of ``arrays`` orthogonalised together, in first-seen order.

    Same matrix shape and dtype, and (``batch="auto"``) a size for which the
    backend measured one batched call to beat a loop (``backend.batch_limit``).
    Only shapes and dtypes are read, so an adapter can plan with its momentum
    buffers and then run momentum, Newton-Schulz and the update group by group
    while the data is still in cache.  ``squeeze``: :func:`matrix_shape`'s, a bool or one per array.
    """
    if batch not in (True, False, "auto"):
        raise ValueError(f"batch={batch!r} is not valid; use True, False or 'auto'")
    if not arrays:
        return []
    _, backend = namespace(*arrays, names=tuple(f"arrays[{i}]" for i in range(len(arrays))))
    limit = backend.batch_limit(arrays[0]) if batch == "auto" else float("inf")
    groups: dict[tuple, list[int]] = {}
    squeeze = list(squeeze) if isinstance(squeeze, (list, tuple)) else [squeeze] * len(arrays)
    for i, x in enumerate(arrays):
        shape = matrix_shape(x.shape, conv_mode, squeeze[i])
        a, b = shape[-2:]
        lo, hi = (a, b) if a <= b else (b, a)   # not sorted(): torch.compile cannot sort SymInts
        together = batch is True or (batch == "auto" and lo * lo * hi * math.prod(shape[:-2]) <= limit)
        groups.setdefault((shape, x.dtype) if together else (i,), []).append(i)
    return list(groups.values())


def _inner(xp, u, o):
    """Real part of ``sum(conj(u) * o)`` as a 0-d array of ``o``'s real dtype."""
    if is_complex(xp, u):
        return xp.sum(xp.real(xp.conj(u) * o))
    return xp.sum(u * o)


def muon_step(
    params,
    grads,
    bufs,
    *,
    lr,
    momentum: float = 0.95,
    nesterov: bool = True,
    momentum_form: str = "ema",
    momentum_bias_correction: bool = False,
    weight_decay: float = 0.0,
    adaptive: bool = False,
    step=None,
    **orthogonalize_kwargs,
):
    """One Muon step over lists; returns ``(new_params, new_bufs)`` (pure).

    ``lr`` may be a float or a 0-d array (a schedule value under jit), and so
    may ``momentum``, ``weight_decay`` and ``rms``.  ``step`` (1-based, this
    update included) is needed with ``adaptive=True`` or ``momentum_bias_correction=True``
    for the bias correction.
    ``orthogonalize_kwargs`` go to :func:`orthogonalized_updates`, with its
    defaults: ``conv_mode``, ``normalize_spatial``, ``adjust_lr_fn``, ``rms``,
    ``batch`` and :func:`orthogonalize`'s own (``coefficients``, ``steps``, ...).
    """
    check_momentum(momentum)
    if (adaptive or momentum_bias_correction) and step is None:
        which = "adaptive=True" if adaptive else "momentum_bias_correction=True"
        raise ValueError(f"{which} needs step= (1-based count of updates, this one included)")
    new_bufs, updates = [], []
    for b, g in zip(bufs, grads):
        b, u = momentum_update(b, g, momentum=momentum, nesterov=nesterov, form=momentum_form,
                               bias_correction=momentum_bias_correction, step=step)
        new_bufs.append(b)
        updates.append(u)
    debias = debias_factor(momentum, step, nesterov=nesterov, form=momentum_form,
                           bias_corrected=momentum_bias_correction) if adaptive else 1.0
    dirs = orthogonalized_updates(updates, adaptive=adaptive, debias=debias, **orthogonalize_kwargs)
    new_params = [
        (p * (1.0 - lr * weight_decay) if _is_on(weight_decay) else p) - lr * d
        for p, d in zip(params, dirs)
    ]
    return new_params, new_bufs


def _is_on(v) -> bool:
    """False only for a Python zero: a 0-d array (maybe traced) counts as on."""
    return bool(v) if is_number(v) else True


# ------------------------------------------------------------------ the definition

BATCHED = (True, False, "auto")


@dataclass(frozen=True)
class MuonOptions:
    """Muon's one definition: every option, its one default, its validation.

    Every adapter (``xpopt.adapters.torch.Muon``, ``optax.muon`` /
    ``scale_by_muon``, ``arrays.muon``) takes these names with these defaults;
    the few framework differences are listed in ``adapters._signatures.SIGNATURES``
    and checked by ``tests/test_definitions.py``.  Values are validated and
    normalised on construction (``ns_coefficients`` -> a tuple of ``(a, b, c)``
    triples and ``ns_steps`` its length; dtypes -> names); errors name the
    option and what is allowed.  Continuous hyperparameters may be 0-d arrays
    (checked when concrete); ``lr``/``fallback_lr`` may also be schedules
    (callables) where the adapter supports them (optax).

    The fallback (AdamW / NAdamW, :class:`xpopt.core.adam.AdamOptions`) runs
    with ``fallback_lr`` (None: ``lr``) and ``fallback_weight_decay`` (None:
    ``weight_decay``).  ``mu_dtype`` None keeps the momentum in float32 for
    bf16/f16 parameters and in the parameter's dtype otherwise.

    Options that reproduce optax.contrib.muon (``xpopt.compat.optax_contrib``
    sets them; each is documented where its maths lives):

    ``momentum_bias_correction`` (default False): orthogonalise the
      bias-corrected momentum, ``B / (1 - mu^t)``, or with nesterov
      ``mu * B / (1 - mu^(t+1)) + (1 - mu) * g / (1 - mu^t)`` (``B`` the EMA
      buffer; module docstring).  Without nesterov only a scalar that
      Newton-Schulz removes (it shows with ``adaptive`` or ``eps_mode="add"``);
      with nesterov a different mix from the second step on.  ``adaptive``
      then scales by ``<u, O>`` with no further correction, as optax does.
    ``eps_mode`` (default ``"floor"``): where ``eps`` enters the Newton-Schulz
      prescale.  ``"floor"``: ``G / max(||G|| * safety_factor, eps * p2)``
      (``p2`` the power of two at or below ``max|G|``), invariant to the
      scale of ``G``, eps acts on a zero matrix only.  ``"add"``: optax's ``G /
      (||G|| * safety_factor + eps)``; ``aol`` / ``schatten`` floor their
      unscaled row sums / norm at eps (``core.newton_schulz``).
    ``fallback="nadamw_dozat"``: Dozat's NAdam look-ahead, ``b1 m / (1 -
      b1^(t+1)) + (1 - b1) g / (1 - b1^t)`` (optax's ``nesterov=True``),
      against ``"nadamw"``'s ``(b1 m + (1 - b1) g) / (1 - b1^t)`` (timm,
      AlgoPerf); :mod:`xpopt.core.adam`.
    ``fallback_eps_root`` (default 0): optax's ``eps_root``, ``m_hat /
      (sqrt(v_hat + eps_root) + fallback_eps)``.
    ``low_precision_dtype`` (default ``"float32"``): what bf16/f16
      parameters' updates and optimizer state are stored in, where an
      adapter returns updates (optax, arrays).  ``"float32"``: updates in
      float32, which ``apply_updates`` adds to the parameter and rounds once,
      and state in float32 (unless ``mu_dtype``); the default because a bf16
      update is rounded twice (to bf16, then ``p + u`` in bf16: at bf16's
      8 bits the second rounding loses updates below half an ulp of ``p``)
      and a bf16 momentum drops the gradient's low bits.  ``"param"``:
      updates and state in each parameter's dtype, optax's convention
      (``optax.contrib.muon``, ``optax.adamw``): half the state memory, and
      every array keeps its parameter's dtype (``lax.cond`` branches, state
      carried through ``lax.scan``, agree).  Arithmetic is float32 either way.
    """

    lr: Any = 0.02
    momentum: Any = 0.95
    nesterov: bool = True
    momentum_form: str = "ema"
    momentum_bias_correction: bool = False
    weight_decay: Any = 0.0
    ns_coefficients: Any = "quintic"
    ns_steps: Optional[int] = None
    eps: Any = 1e-7
    eps_mode: str = "floor"
    safety_factor: Any = 1.0
    adjust_lr_fn: str = "match_rms_adamw"
    conv_mode: str = "flatten"
    normalize_spatial: bool = True
    ns_dtype: Any = None
    ns_method: str = "standard"
    batched: Any = "auto"
    mu_dtype: Any = None
    low_precision_dtype: str = "float32"
    fallback: str = "adamw"
    fallback_lr: Any = None
    betas: tuple = (0.9, 0.95)
    fallback_eps: Any = 1e-8
    fallback_eps_root: Any = 0.0
    fallback_weight_decay: Any = None
    min_dim_size: int = 4
    max_aspect_ratio: float = 128.0
    preconditioning: str = "frobenius"
    adaptive: bool = False
    consistent_rms: Any = None
    nonfinite: Optional[str] = None

    def __post_init__(self):
        from . import _check as V
        from .adam import AdamOptions
        from .fault import check_policy
        from .newton_schulz import EPS_MODES, GRAM_EPS, METHODS, PRECONDITIONINGS, gram_restarts, resolve_coefficients

        def put(name, value):
            object.__setattr__(self, name, value)

        put("lr", V.check_lr(self.lr, "lr"))
        if self.fallback_lr is not None:
            put("fallback_lr", V.check_lr(self.fallback_lr, "fallback_lr"))
        put("weight_decay", V.check_hyper(self.weight_decay, "weight_decay"))
        if self.fallback_weight_decay is not None:
            put("fallback_weight_decay", V.check_hyper(self.fallback_weight_decay, "fallback_weight_decay"))
        if isinstance(self.momentum, bool):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        check_momentum(self.momentum)
        put("momentum", V.check_scalar_hyper(self.momentum, "momentum", below=1.0))
        put("nesterov", V.check_bool(self.nesterov, "nesterov"))
        V.check_choice(self.momentum_form, MOMENTUM_FORMS, "momentum_form")
        put("momentum_bias_correction", V.check_bool(self.momentum_bias_correction, "momentum_bias_correction"))
        ns_steps = V.static_number(self.ns_steps, "ns_steps", integer=True)
        if ns_steps is not None and (
                isinstance(ns_steps, bool) or not isinstance(ns_steps, numbers.Integral) or ns_steps < 1):
            raise ValueError(f"ns_steps must be an integer >= 1 or None (the preset's own count), got {ns_steps!r}")
        try:
            coeffs = resolve_coefficients(self.ns_coefficients, None if ns_steps is None else int(ns_steps))
        except ValueError as e:
            raise ValueError(f"ns_coefficients={self.ns_coefficients!r} is not valid: {e}") from None
        put("ns_coefficients", coeffs)
        put("ns_steps", len(coeffs))
        put("eps", V.check_scalar_hyper(self.eps, "eps"))
        V.check_choice(self.eps_mode, EPS_MODES, "eps_mode")
        put("safety_factor", V.check_scalar_hyper(self.safety_factor, "safety_factor", minimum=0.0, strict=True))
        V.check_choice(self.adjust_lr_fn, ADJUST_LR_FNS, "adjust_lr_fn")
        V.check_choice(self.conv_mode, CONV_MODES, "conv_mode")
        put("normalize_spatial", V.check_bool(self.normalize_spatial, "normalize_spatial"))
        put("ns_dtype", V.check_dtype_spec(self.ns_dtype, "ns_dtype", auto=True))
        V.check_choice(self.ns_method, METHODS, "ns_method")
        if self.ns_method == "gram":  # the restart plans, computed here and not under torch.compile
            for eps in GRAM_EPS:
                gram_restarts(coeffs, eps=eps)
        if not (isinstance(self.batched, bool) or self.batched == "auto"):
            raise ValueError(f"batched={self.batched!r} is not valid; use 'auto' (batch where measured faster), "
                             "True or False")
        put("mu_dtype", V.check_dtype_spec(self.mu_dtype, "mu_dtype"))
        V.check_choice(self.low_precision_dtype, LOW_PRECISION_DTYPES, "low_precision_dtype")
        put("_fallback", AdamOptions(self.fallback, self.betas, self.fallback_eps, self.fallback_eps_root))
        put("betas", self._fallback.betas)
        put("fallback_eps", self._fallback.eps)
        put("fallback_eps_root", self._fallback.eps_root)
        put("min_dim_size", V.check_int(self.min_dim_size, "min_dim_size"))
        max_ratio = V.static_number(self.max_aspect_ratio, "max_aspect_ratio", integer=False)
        put("max_aspect_ratio", V.check_real(max_ratio, "max_aspect_ratio", minimum=1.0))
        V.check_choice(self.preconditioning, PRECONDITIONINGS, "preconditioning")
        put("adaptive", V.check_bool(self.adaptive, "adaptive"))
        if self.consistent_rms is not None:
            if self.adjust_lr_fn != "match_rms_adamw":
                raise ValueError(
                    f"consistent_rms={self.consistent_rms!r} sets the RMS constant of adjust_lr_fn="
                    f"'match_rms_adamw' (update RMS = consistent_rms), but adjust_lr_fn={self.adjust_lr_fn!r}; "
                    "drop one of the two")
            put("consistent_rms", V.check_scalar_hyper(self.consistent_rms, "consistent_rms", minimum=0.0,
                                                       strict=True))
        put("nonfinite", check_policy(self.nonfinite))

    # -------------------------------------------------------------- derived values

    @property
    def fallback_options(self):
        """The fallback's :class:`~xpopt.core.adam.AdamOptions`."""
        return self._fallback

    @property
    def fallback_lr_value(self):
        return self.lr if self.fallback_lr is None else self.fallback_lr

    @property
    def fallback_weight_decay_value(self):
        return self.weight_decay if self.fallback_weight_decay is None else self.fallback_weight_decay

    @property
    def rms(self):
        """The RMS constant of ``match_rms_adamw`` (``consistent_rms``, default 0.2)."""
        return DEFAULT_RMS if self.consistent_rms is None else self.consistent_rms

    @property
    def ns_is_bf16(self) -> bool:
        from ._check import dtype_name

        return self.ns_dtype is not None and dtype_name(self.ns_dtype) == "bfloat16"

    def warn_emulated_bf16(self, native: bool, flag: list) -> None:
        """One ``UserWarning`` per optimizer (``flag``: its own empty list) when bf16
        Newton-Schulz would be emulated (``native``: the device multiplies bf16 natively)."""
        if self.ns_is_bf16 and not native and not flag:
            import warnings

            flag.append(True)
            warnings.warn(
                "ns_dtype=bfloat16 on a device without native bf16 matmuls (CPU without AMX/"
                "AVX512-BF16): Newton-Schulz will be emulated, ~100x slower than float32; "
                "use ns_dtype=None (float32) here and keep bfloat16 for GPUs/TPUs",
                UserWarning, stacklevel=3,
            )

    def suitable(self, shape) -> tuple[bool, str]:
        """:func:`suitability` with this definition's thresholds."""
        return suitability(shape, min_dim_size=self.min_dim_size, max_aspect_ratio=self.max_aspect_ratio)

    # -------------------------------------------------------------- the step, in pieces

    def debias(self, step):
        """Bias correction of the momentum for ``adaptive`` (1.0 when off); ``step`` 1-based."""
        if not self.adaptive:
            return 1.0
        return debias_factor(self.momentum, step, nesterov=self.nesterov, form=self.momentum_form,
                             bias_corrected=self.momentum_bias_correction)

    def momentum_step(self, buf, grad, *, momentum=None, inplace: bool = False, step=None):
        """:func:`momentum_update`: ``(new_buf, update)`` (``momentum`` overrides, e.g. scheduled).

        ``step`` (1-based, this update included) is needed with ``momentum_bias_correction``.
        """
        return momentum_update(buf, grad, momentum=self.momentum if momentum is None else momentum,
                               nesterov=self.nesterov, form=self.momentum_form, inplace=inplace,
                               bias_correction=self.momentum_bias_correction, step=step)

    def orthogonalize(self, updates: list, step=None, *, compute_dtype=None, debias=None,
                      squeeze_leading=True) -> list:
        """:func:`orthogonalized_updates` on torch-layout arrays (``lr_scale`` included).

        ``step`` (1-based, this update included) is needed with ``adaptive``;
        ``squeeze_leading`` (one per update, or one for all): :func:`matrix_shape`'s ``squeeze``.
        """
        return orthogonalized_updates(
            updates, conv_mode=self.conv_mode, normalize_spatial=self.normalize_spatial,
            adjust_lr_fn=self.adjust_lr_fn, rms=self.rms, batch=self.batched,
            adaptive=self.adaptive, debias=self.debias(step) if debias is None else debias,
            coefficients=self.ns_coefficients, steps=self.ns_steps, eps=self.eps,
            safety_factor=self.safety_factor, preconditioning=self.preconditioning,
            compute_dtype=self.ns_dtype if compute_dtype is None else compute_dtype, method=self.ns_method,
            eps_mode=self.eps_mode, squeeze_leading=squeeze_leading,
        )
