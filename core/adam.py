"""AdamW / NAdamW for the parameters Muon should not touch.

Decoupled weight decay (Loshchilov & Hutter) and bias correction, with the
step count ``t`` starting at 1::

    m     = b1 * m + (1 - b1) * g
    v     = b2 * v + ((1 - b2) * |g|) * |g|
    m_hat = m / (1 - b1^t)                                   fallback="adamw"
    m_hat = (b1 * m + (1 - b1) * g) / (1 - b1^t)             fallback="nadamw"
    m_hat = b1 * m / (1 - b1^(t+1)) + (1 - b1) * g / (1 - b1^t)   fallback="nadamw_dozat"
    W     = W * (1 - lr * wd) - lr * m_hat / (sqrt(v / (1 - b2^t) + eps_root) + eps)

The ``"nadamw"`` look-ahead is the one in timm's ``nadamw`` (from MLCommons
AlgoPerf): the whole mix shares one bias correction.  ``"nadamw_dozat"`` is
Dozat's NAdam (2016, without its momentum schedule), which corrects the two
terms of the mix separately: what ``optax.scale_by_adam(nesterov=True)``
(``optax.nadamw``) computes.  The two differ from the first step (at t=1,
b1=0.9: ``1.9 g`` vs ``1.47 g`` before the division).  Neither is
torch.optim.NAdam's momentum-decay schedule.  ``eps_root`` (optax's name;
default 0) is added inside the square root; with 0 the denominator is
computed as ``sqrt(v) / sqrt(1 - b2^t)``.

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

from ._check import is_on
from ._xp import is_complex, is_number, namespace

__all__ = ["check_betas", "dozat_momentum", "adam_update", "adamw_step", "AdamOptions", "FALLBACKS"]


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


def dozat_momentum(xp, m, grad, beta, step, real):
    """Dozat's bias-corrected Nesterov mix ``beta*m/(1-beta^(t+1)) + (1-beta)*g/(1-beta^t)`` of the
    EMA buffer ``m`` (this step's included) and ``grad``: optax's ``scale_by_adam(nesterov=True)``
    and ``contrib.muon``'s Nesterov momentum.  ``real``: the dtype of the bias corrections."""
    return (m * (beta / _bias_correction(xp, beta, step + 1, real))
            + grad * ((1.0 - beta) / _bias_correction(xp, beta, step, real)))


def adam_update(grad, m, v, step, *, beta1, beta2, eps, nesterov=False, eps_root=0.0):
    """Return ``(direction, new_m, new_v)``; the step is ``-lr * direction``.

    ``step`` is the 1-based count after this update, a Python int or a 0-d
    array (optax state under jit).  ``v`` is real also for complex ``grad``.
    ``nesterov``: False (AdamW), True or ``"nadamw"`` (timm's look-ahead) or
    ``"nadamw_dozat"`` (Dozat's, optax's); see the module docstring.
    ``eps_root`` (a number or a 0-d array) is added to ``v``'s bias-corrected
    value inside the square root.
    """
    if nesterov not in (False, True, "nadamw", "nadamw_dozat"):
        raise ValueError(f"nesterov={nesterov!r} is not valid; use False, True (= 'nadamw') or 'nadamw_dozat'")
    xp, _ = namespace(grad, names=("grad",))
    mag = xp.abs(grad) if is_complex(xp, grad) else grad
    m = m + (1.0 - beta1) * (grad - m)
    # saturate, never inf (clip: a Python bound in minimum() breaks torch.compile's graph)
    v = xp.clip(beta2 * v + ((1.0 - beta2) * mag) * mag, None, xp.finfo(v.dtype).max)
    real = xp.float64 if mag.dtype == xp.float64 else xp.float32
    bc2 = _bias_correction(xp, beta2, step, real)
    if nesterov == "nadamw_dozat":
        m_hat = dozat_momentum(xp, m, grad, beta1, step, real)
    else:
        m_hat = (m + (1.0 - beta1) * (grad - m) if nesterov else m) / _bias_correction(xp, beta1, step, real)
    if is_on(eps_root):
        # sqrt(v / bc2 + eps_root) as sqrt(v + eps_root * bc2) / sqrt(bc2): a saturated v stays finite
        denom = (v + eps_root * bc2) ** 0.5 / _sqrt(bc2)
    else:
        denom = v ** 0.5 / _sqrt(bc2)
    direction = m_hat / (denom + eps)
    return direction, m, v


def adamw_step(param, grad, m, v, step, *, lr, betas=(0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, nesterov=False, eps_root=0.0):
    """One AdamW (NAdamW with ``nesterov=True``, Dozat's with ``"nadamw_dozat"``) step; returns ``(param, m, v)``."""
    b1, b2 = check_betas(betas)
    direction, m, v = adam_update(grad, m, v, step, beta1=b1, beta2=b2, eps=eps, nesterov=nesterov,
                                  eps_root=eps_root)
    if not is_number(weight_decay) or weight_decay:
        param = param * (1.0 - lr * weight_decay)
    return param - lr * direction, m, v


#: ``"adamw"``; ``"nadamw"`` (timm / AlgoPerf look-ahead); ``"nadamw_dozat"`` (Dozat's NAdam, optax's
#: ``nesterov=True``): the module docstring's three rules.
FALLBACKS = ("adamw", "nadamw", "nadamw_dozat")


@dataclass(frozen=True)
class AdamOptions:
    """The AdamW / NAdamW rule (module docstring), validated: Muon's fallback.

    ``betas`` entries are numbers in [0, 1) or 0-d arrays (checked when concrete);
    ``eps_root`` (>= 0, default 0) is optax's ``eps_root``, inside the square root.
    """

    fallback: str = "adamw"
    betas: tuple = (0.9, 0.95)
    eps: Any = 1e-8
    eps_root: Any = 0.0

    def __post_init__(self):
        from . import _check as V

        V.check_choice(self.fallback, FALLBACKS, "fallback")
        b1, b2 = (V.check_scalar_hyper(b, f"betas[{i}]", below=1.0) for i, b in enumerate(check_betas(self.betas)))
        object.__setattr__(self, "betas", (b1, b2))
        object.__setattr__(self, "eps", V.check_scalar_hyper(self.eps, "fallback_eps"))
        object.__setattr__(self, "eps_root", V.check_scalar_hyper(self.eps_root, "fallback_eps_root"))

    @property
    def beta1(self):
        return self.betas[0]

    @property
    def beta2(self):
        return self.betas[1]

    def direction(self, grad, m, v, step):
        """:func:`adam_update`: ``(direction, m, v)``; the step is ``-lr * direction``."""
        return adam_update(grad, m, v, step, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                           nesterov=self.nesterov, eps_root=self.eps_root)

    @property
    def nesterov(self):
        """:func:`adam_update`'s ``nesterov`` for this rule: False, ``"nadamw"`` or ``"nadamw_dozat"``."""
        return False if self.fallback == "adamw" else self.fallback
