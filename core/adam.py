"""AdamW / NAdamW for the parameters Muon should not touch.

Decoupled weight decay (Loshchilov & Hutter) and bias correction, with the
step count ``t`` starting at 1::

    m  = b1 * m + (1 - b1) * g
    v  = b2 * v + ((1 - b2) * |g|) * |g|
    m' = b1 * m + (1 - b1) * g       if nesterov (NAdamW), else m
    W  = W * (1 - lr * wd) - lr * (m' / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

The NAdamW look-ahead is the one in timm's ``nadamw`` (from MLCommons
AlgoPerf), not torch.optim.NAdam's momentum-decay schedule.

Overflow: ``(1 - b2) g^2`` overflows float32 for ``|g|`` above about
``1.8e19 / sqrt(1 - b2)``; an infinite ``v`` would freeze that entry for good
(``sqrt(inf)`` makes every later update 0 and ``b2 * inf`` never decays), as
it does in ``torch.optim.AdamW``.  ``v`` therefore saturates at its dtype's
largest finite value: the update of such an entry is ``m / 1.8e19``-sized,
and ``v`` decays again once the gradient shrinks (the hypothesis suite found
this with a 1e20 gradient).  Below the overflow nothing changes.
``((1 - b2) |g|) |g|`` (torch's ``addcmul`` order) and ``sqrt(v) / sqrt(1 -
b2^t)`` keep every finite ``v`` finite.  Complex gradients use ``|g|^2`` (one
second moment per complex entry, optax's convention; torch.optim views a
complex tensor as pairs of reals instead).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from ._xp import is_complex, is_number, namespace

__all__ = ["check_betas", "adam_update", "adamw_step", "AdamOptions", "FALLBACKS"]


def check_betas(betas) -> tuple:
    """``(b1, b2)``: Python numbers in [0, 1) (returned as floats) or 0-d arrays (unchecked)."""
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    out = []
    for name, b in (("betas[0]", b1), ("betas[1]", b2)):
        if is_number(b) and 0.0 <= b < 1.0:
            out.append(float(b))
        elif not isinstance(b, (numbers.Number, bool)) and getattr(b, "shape", None) == ():
            out.append(b)
        else:
            raise ValueError(f"{name} must be in [0, 1), got {b!r}")
    return tuple(out)


def _sqrt(x):
    return math.sqrt(x) if is_number(x) else x ** 0.5


def _bias_correction(xp, beta, step, dtype=None):
    """``1 - beta**step``.

    A Python ``step`` is computed in float64.  An array ``step`` (a 0-d
    float32 tensor on the device, optax's int32 count under jit) would give
    ``1 - beta**step`` in float32, which cancels: ``beta = 0.999`` is stored
    with a 6e-8 error, so ``1 - beta`` is off by 1e-5 relative at step 1
    (0.9999: 1e-4).  ``-expm1(step * log(beta))`` takes ``log(beta)`` in
    float64 and keeps the float32 result within a few ulp at every step.
    """
    if not is_number(step) and xp.isdtype(step.dtype, "integral"):
        # the computation's dtype (float32 unless told): a weak int would become float64 under
        # jax_enable_x64 and promote a float32 step
        step = xp.astype(step, dtype if dtype is not None else xp.float32)
    if is_number(step) or not is_number(beta) or not 0.0 < beta < 1.0:
        return 1.0 - beta ** step
    return -xp.expm1(step * math.log(beta))


def adam_update(grad, m, v, step, *, beta1, beta2, eps, nesterov: bool = False):
    """Return ``(direction, new_m, new_v)``; the step is ``-lr * direction``.

    ``step`` is the 1-based count after this update, a Python int or a 0-d
    array (optax state under jit).  ``v`` is real also for complex ``grad``.
    """
    xp, _ = namespace(grad, names=("grad",))
    mag = xp.abs(grad) if is_complex(xp, grad) else grad
    m = m + (1.0 - beta1) * (grad - m)
    # saturate, never inf (clip: a Python bound in minimum() breaks torch.compile's graph)
    v = xp.clip(beta2 * v + ((1.0 - beta2) * mag) * mag, None, xp.finfo(v.dtype).max)
    real = xp.float64 if mag.dtype == xp.float64 else xp.float32
    bc1 = _bias_correction(xp, beta1, step, real)
    bc2_sqrt = _sqrt(_bias_correction(xp, beta2, step, real))
    m_used = m + (1.0 - beta1) * (grad - m) if nesterov else m
    direction = (m_used / bc1) / (v ** 0.5 / bc2_sqrt + eps)
    return direction, m, v


def adamw_step(param, grad, m, v, step, *, lr, betas=(0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, nesterov: bool = False):
    """One AdamW (NAdamW with ``nesterov=True``) step; returns ``(param, m, v)``."""
    b1, b2 = check_betas(betas)
    direction, m, v = adam_update(grad, m, v, step, beta1=b1, beta2=b2, eps=eps, nesterov=nesterov)
    if not is_number(weight_decay) or weight_decay:
        param = param * (1.0 - lr * weight_decay)
    return param - lr * direction, m, v


FALLBACKS = ("adamw", "nadamw")


@dataclass(frozen=True)
class AdamOptions:
    """The AdamW / NAdamW rule (module docstring), validated: Muon's fallback.

    ``betas`` entries are numbers in [0, 1) or 0-d arrays (checked when concrete).
    """

    fallback: str = "adamw"
    betas: tuple = (0.9, 0.95)
    eps: Any = 1e-8

    def __post_init__(self):
        from . import _check as V

        V.check_choice(self.fallback, FALLBACKS, "fallback")
        b1, b2 = (V.check_scalar_hyper(b, f"betas[{i}]", below=1.0) for i, b in enumerate(check_betas(self.betas)))
        object.__setattr__(self, "betas", (b1, b2))
        object.__setattr__(self, "eps", V.check_scalar_hyper(self.eps, "fallback_eps"))

    @property
    def beta1(self):
        return self.betas[0]

    @property
    def beta2(self):
        return self.betas[1]

    def direction(self, grad, m, v, step):
        """:func:`adam_update`: ``(direction, m, v)``; the step is ``-lr * direction``."""
        return adam_update(grad, m, v, step, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                           nesterov=self.fallback == "nadamw")
