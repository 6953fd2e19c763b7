"""AdamW / NAdamW for the parameters Muon should not touch.

Decoupled weight decay (Loshchilov & Hutter) and bias correction, with the
step count ``t`` starting at 1::

    m  = b1 * m + (1 - b1) * g
    v  = b2 * v + (1 - b2) * g^2
    m' = b1 * m + (1 - b1) * g       if nesterov (NAdamW), else m
    W  = W * (1 - lr * wd) - lr * (m' / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

The NAdamW look-ahead is the one in timm's ``nadamw`` (from MLCommons
AlgoPerf), not torch.optim.NAdam's momentum-decay schedule.
"""

from __future__ import annotations

import numbers

__all__ = ["check_betas", "adam_update", "adamw_step"]


def check_betas(betas) -> tuple[float, float]:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    for name, b in (("betas[0]", b1), ("betas[1]", b2)):
        if not isinstance(b, numbers.Real) or not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b!r}")
    return float(b1), float(b2)


def adam_update(grad, m, v, step, *, beta1: float, beta2: float, eps: float, nesterov: bool = False):
    """Return ``(direction, new_m, new_v)``; the step is ``-lr * direction``.

    ``step`` is the 1-based count after this update, a Python int or a 0-d
    array (optax state under jit).
    """
    m = m + (1.0 - beta1) * (grad - m)
    v = beta2 * v + (1.0 - beta2) * (grad * grad)
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    m_used = m + (1.0 - beta1) * (grad - m) if nesterov else m
    direction = (m_used / bc1) / ((v / bc2) ** 0.5 + eps)
    return direction, m, v


def adamw_step(param, grad, m, v, step, *, lr, betas=(0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, nesterov: bool = False):
    """One AdamW (NAdamW with ``nesterov=True``) step; returns ``(param, m, v)``."""
    b1, b2 = check_betas(betas)
    direction, m, v = adam_update(grad, m, v, step, beta1=b1, beta2=b2, eps=eps, nesterov=nesterov)
    if weight_decay:
        param = param * (1.0 - lr * weight_decay)
    return param - lr * direction, m, v
