"""Muon: momentum, then Newton-Schulz orthogonalisation, then a shape-aware LR.

Update rule for one matrix parameter ``W`` of shape ``(out, in, *spatial)``::

    buf    = mu * buf + (1 - mu) * g            # form="ema"   (torch.optim, timm)
    buf    = mu * buf + g                       # form="classic" (SGD momentum)
    u      = g + mu * (buf - g)  if nesterov  (ema)   |  g + mu * buf (classic)
    u      = buf                 otherwise
    O      = orthogonalize(matrix(u))           # see to_matrix for N-D / conv
    O      = <u_hat, O> * O        if adaptive   # u_hat = debias * u (dual-norm scale)
    W      = W * (1 - lr * wd) - lr * lr_scale(out, in) * O

Parameters are in torch layout ``(out, in, *spatial)``; adapters move other
layouts (flax's ``(in, out)``) into it.
"""

from __future__ import annotations

import math
import numbers

from ._xp import is_complex, is_number, namespace
from .newton_schulz import orthogonalize

__all__ = [
    "MOMENTUM_FORMS", "ADJUST_LR_FNS", "CONV_MODES",
    "DEFAULT_RMS", "momentum_update", "debias_factor", "lr_scale", "suitability", "matrix_shape", "to_matrix",
    "from_matrix", "batch_groups", "orthogonalized_updates", "muon_step",
]

MOMENTUM_FORMS = ("ema", "classic")
#: RMS constant of ``match_rms_adamw`` (Moonshot); optax calls it ``consistent_rms``.
DEFAULT_RMS = 0.2
ADJUST_LR_FNS = ("original", "match_rms_adamw", "rms_to_rms", "none")
CONV_MODES = ("flatten", "batched")


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
                    inplace: bool = False):
    """Return ``(new_buf, update)``; see the module docstring for both forms.

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
    _, backend = namespace(buf, grad, names=("buf", "grad"))
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
    return buf, update


def debias_factor(momentum, step, *, nesterov: bool = False, form: str = "ema"):
    """``c`` with ``c * update`` an unbiased estimate of the gradient's scale.

    ``step`` is the 1-based count of momentum updates including this one (a
    Python int or a 0-d array).  For a constant gradient ``g`` the EMA buffer
    is ``(1 - mu^t) g`` and the nesterov mix ``(1 - mu^(t+1)) g``; the classic
    form is ``1 / (1 - mu)`` times the EMA one.  Only ``adaptive`` Muon needs it
    (Newton-Schulz itself is scale-free).  optax bias-corrects the two terms of
    its nesterov mix separately, which overshoots (1.49 g at t=1, mu=0.95).
    """
    _check_choice(form, MOMENTUM_FORMS, "momentum_form")
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


def _squeeze_leading(shape) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    return shape


def matrix_shape(shape, conv_mode: str = "flatten") -> tuple[int, ...]:
    """Shape that Newton-Schulz sees for a parameter of ``shape``.

    Leading unit dims are dropped.  ``flatten``: ``(out, in*kh*kw...)``, one
    orthogonalisation of the whole kernel.  ``batched``: ``(kh*kw..., out, in)``,
    one orthogonalisation per spatial tap.
    """
    _check_choice(conv_mode, CONV_MODES, "conv_mode")
    s = _squeeze_leading(shape)
    if len(s) < 2:
        raise ValueError(f"a Muon parameter needs at least 2 dimensions, got shape {tuple(shape)}")
    if len(s) == 2:
        return s
    if conv_mode == "flatten":
        return (s[0], math.prod(s[1:]))
    return (math.prod(s[2:]), s[0], s[1])


def to_matrix(x, conv_mode: str = "flatten"):
    xp, _ = namespace(x, names=("x",))
    s = _squeeze_leading(x.shape)
    m = xp.reshape(x, s)
    if len(s) <= 2:
        return m
    if conv_mode == "flatten":
        return xp.reshape(m, matrix_shape(s, conv_mode))
    m = xp.reshape(m, (s[0], s[1], math.prod(s[2:])))
    return xp.permute_dims(m, (2, 0, 1))


def from_matrix(m, shape, conv_mode: str = "flatten"):
    """Inverse of ``to_matrix`` for a parameter of ``shape``."""
    xp, _ = namespace(m, names=("m",))
    shape = tuple(int(d) for d in shape)
    s = _squeeze_leading(shape)
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
    ``rms`` is ``match_rms_adamw``'s constant.  ``ns_kwargs`` go to
    :func:`orthogonalize`.
    """
    _check_choice(adjust_lr_fn, ADJUST_LR_FNS, "adjust_lr_fn")
    updates = list(updates)
    if not updates:
        return []
    xp, _ = namespace(*updates, names=tuple(f"updates[{i}]" for i in range(len(updates))))
    mats = [to_matrix(u, conv_mode) for u in updates]
    out = [None] * len(updates)
    for idx in batch_groups(updates, conv_mode=conv_mode, batch=batch):
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
            out[i] = from_matrix(o, updates[i].shape, conv_mode)
    return out


def batch_groups(arrays, *, conv_mode: str = "flatten", batch="auto") -> list[list[int]]:
    """Indices of ``arrays`` orthogonalised together, in first-seen order.

    Same matrix shape and dtype, and (``batch="auto"``) a size for which the
    backend measured one batched call to beat a loop (``backend.batch_limit``).
    Only shapes and dtypes are read, so an adapter can plan with its momentum
    buffers and then run momentum, Newton-Schulz and the update group by group
    while the data is still in cache.
    """
    if batch not in (True, False, "auto"):
        raise ValueError(f"batch={batch!r} is not valid; use True, False or 'auto'")
    if not arrays:
        return []
    _, backend = namespace(*arrays, names=tuple(f"arrays[{i}]" for i in range(len(arrays))))
    limit = backend.batch_limit(arrays[0]) if batch == "auto" else float("inf")
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(arrays):
        shape = matrix_shape(x.shape, conv_mode)
        lo, hi = sorted(shape[-2:])
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
    weight_decay: float = 0.0,
    conv_mode: str = "flatten",
    normalize_spatial: bool = True,
    adjust_lr_fn: str = "match_rms_adamw",
    rms=DEFAULT_RMS,
    batch="auto",
    adaptive: bool = False,
    step=None,
    **ns_kwargs,
):
    """One Muon step over lists; returns ``(new_params, new_bufs)`` (pure).

    ``lr`` may be a float or a 0-d array (a schedule value under jit), and so
    may ``momentum``, ``weight_decay`` and ``rms``.  ``step`` (1-based, this
    update included) is needed with ``adaptive=True`` for the bias correction.
    """
    check_momentum(momentum)
    if adaptive and step is None:
        raise ValueError("adaptive=True needs step= (1-based count of updates, this one included)")
    new_bufs, updates = [], []
    for b, g in zip(bufs, grads):
        b, u = momentum_update(b, g, momentum=momentum, nesterov=nesterov, form=momentum_form)
        new_bufs.append(b)
        updates.append(u)
    debias = debias_factor(momentum, step, nesterov=nesterov, form=momentum_form) if adaptive else 1.0
    dirs = orthogonalized_updates(
        updates, conv_mode=conv_mode, normalize_spatial=normalize_spatial,
        adjust_lr_fn=adjust_lr_fn, rms=rms, batch=batch, adaptive=adaptive, debias=debias, **ns_kwargs,
    )
    new_params = [
        (p * (1.0 - lr * weight_decay) if _is_on(weight_decay) else p) - lr * d
        for p, d in zip(params, dirs)
    ]
    return new_params, new_bufs


def _is_on(v) -> bool:
    """False only for a Python zero: a 0-d array (maybe traced) counts as on."""
    return bool(v) if is_number(v) else True
