"""muP and spectral scaling: one table of per-parameter multipliers, relative to a base shape.

A parameter has a **role** (``input``: embedding / first layer, fan-in fixed;
``hidden``; ``output``: readout, fan-out fixed; ``vector``: biases, norm
gains), a shape ``(fan_in, fan_out)`` and a base shape ``(base_fan_in,
base_fan_out)``.  Width multipliers ``m_in = fan_in / base_fan_in`` and
``m_out = fan_out / base_fan_out``.  Every entry is a ratio against standard
parametrisation (SP: init std ``~ fan_in^-1/2``, one LR, no output
multiplier) and equals 1 when the shape is the base shape, so every rule *is*
SP at the base width: tune there, transfer by the table.

``mup`` (Tensor Programs V, Table 3 in its relative form: microsoft/mup)::

                     init std    output mult   SGD LR    Adam/Kron LR   Muon LR
    input, vector    1           1             m_out     1              sqrt(m_out / m_in) / a
    hidden           1           1             1         1/m_in         sqrt(m_out / m_in) / a
    output           sqrt(m_in)  1/m_in        m_in      1              m_in sqrt(m_out / m_in) / a

``spectral`` (Yang, Simon & Bernstein 2023; seed 002: ``||W|| ~ ||dW|| ~
sqrt(fan_out / fan_in)``, no multipliers; an embedding's fan-in is 1, its
input being one-hot)::

    init std  min(1, sqrt(fan_out / fan_in)), relative to the base's
    SGD LR    fan_out / fan_in
    Adam/Kron 1 / fan_in                  (entries ~ lr, rank ~ 1: ||dW|| ~ lr sqrt(fan_in fan_out))
    Muon      sqrt(fan_out / fan_in) / a  (||O|| = 1)

all relative to the base shape's value.  ``a`` is the Muon adapter's own
shape factor (``core.muon.lr_scale`` of its ``adjust_lr_fn``, relative to the
base's): the table *replaces* it instead of stacking on it, so with
``adjust_lr_fn="rms_to_rms"`` (already ``sqrt(fan_out/fan_in)``) the Muon
multiplier is 1, and with ``match_rms_adamw`` it cancels that rule's
``sqrt(max(fan_out, fan_in))``.

**Kron** (no published rule; derived here, tested by the coordinate check
and LR transfer in tests/test_mup_*.py): the Kron update is RMS-clipped
(``rms(D) <= 1.1``, ``/5`` with ``lr_style="adam"``), so its entries are
``O(1)`` like Adam's.  What sets the LR rule is the update's spectral norm,
``||D|| = rms(D) sqrt(fan_in fan_out / r)`` with ``r`` its stable rank.  A
whitened update has a flat spectrum over the gradient's rank, and with the
batch fixed and width growing (muP's limit) the gradient's rank is at most
the number of tokens, independent of width: ``r = O(1)``.  Then ``||D|| ~
sqrt(fan_in fan_out)``, exactly Adam's case, and the spectral condition gives
LR ``~ 1/fan_in``: Kron takes Adam's column.  (Were ``r ~ min(fan_in,
fan_out)``, as for a full-batch, fully whitened update, the rule would be
Muon-like, ``1/sqrt(fan_in)`` for square matrices; the LR-transfer test tells
which regime a workload is in.)

Weight decay (``wd``): ``"independent"`` keeps ``weight_decay`` as given, so
the decoupled decay per step ``lr * wd`` follows each layer's scaled LR
(microsoft/mup's ``decoupled_wd=True``); ``"lr_wd_constant"`` divides it by
the LR multiplier, so ``lr * wd`` is the base's (microsoft/mup's default
``decoupled_wd=False``); ``"none"`` turns weight decay off.
Adam ``eps`` (``eps`` multiplier, used when asked): under muP every gradient
entry except the readout bias scales as ``1/width``, so an unscaled ``eps``
grows relative to them; the multiplier is ``1/m`` (the role's width
multiplier) for ``mup`` and ``spectral``, 1 for ``standard``.

Tied input/output embeddings (one tensor used as embedding and readout): the
tensor takes the ``input`` role (init and LR of an embedding) and the
readout applies the ``output`` multiplier ``1/m`` of the model width (haliax's
``EmbeddingMup``, Cerebras's guide); :func:`tied_output_multiplier`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ROLES", "RULES", "OPTIMIZERS", "WD_SCALINGS", "Multipliers", "multipliers", "fans",
           "tied_output_multiplier", "check_choice"]

ROLES = ("input", "hidden", "output", "vector")
RULES = ("standard", "mup", "spectral")
OPTIMIZERS = ("sgd", "adam", "muon", "kron")
WD_SCALINGS = ("independent", "lr_wd_constant", "none")
SOURCES = {
    "standard": "standard parametrisation: every multiplier 1",
    "mup": "Tensor Programs V (Yang et al. 2022), Table 3, relative form as microsoft/mup",
    "spectral": "Yang, Simon & Bernstein 2023, 'A spectral condition for feature learning'; seed 002",
}


def check_choice(value, choices, argname: str, where: str = "") -> None:
    if value not in choices:
        at = f" for {where}" if where else ""
        raise ValueError(f"{argname}={value!r}{at} is not valid; use one of {list(choices)}")


@dataclass(frozen=True)
class Multipliers:
    """Per-parameter ratios against standard parametrisation (all 1 at the base shape).

    ``init``: on the SP init std; ``lr``: on the optimizer's LR; ``output``:
    on the parameter's contribution to its layer's output (applied in the
    forward pass); ``wd``: on ``weight_decay``; ``eps``: on Adam's ``eps``.
    """

    init: float
    lr: float
    output: float
    wd: float
    eps: float
    role: str
    rule: str
    optimizer: str
    width_mult: float

    def as_dict(self) -> dict:
        return dict(init=self.init, lr=self.lr, output=self.output, wd=self.wd, eps=self.eps, role=self.role,
                    rule=self.rule, optimizer=self.optimizer, width_mult=self.width_mult)


def fans(shape, kind: str = "linear", layout: str = "torch") -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a parameter of ``shape``.

    ``kind``: ``"linear"`` (also convolutions), ``"embedding"`` (its input is
    one-hot: fan-in 1, fan-out the embedding width) or ``"vector"`` (fan-in
    1).  ``layout``: ``"torch"`` (``(out, in, *kernel)``) or ``"flax"``
    (``(*kernel, in, out)``; an embedding table is ``(vocab, dim)`` in both).
    """
    shape = tuple(int(d) for d in shape)
    if kind == "vector" or len(shape) <= 1:
        return 1, (shape[0] if shape else 1)
    if kind == "embedding":
        return 1, shape[-1]
    if layout == "flax":
        return math.prod(shape[:-1]), shape[-1]
    return math.prod(shape[1:]), shape[0]


def _width(role: str, m_in: float, m_out: float) -> float:
    return m_out if role in ("input", "vector") else m_in


def _muon_shape(fan_in, fan_out, adjust_lr_fn, rms):
    from .muon import lr_scale

    return lr_scale(fan_out, fan_in, adjust_lr_fn, rms)


def _spectral_std(fan_in, fan_out):
    return min(1.0, math.sqrt(fan_out / fan_in))


def multipliers(role: str, rule: str, optimizer: str, *, fan_in: int, fan_out: int, base_fan_in: int,
                base_fan_out: int, wd_scaling: str = "independent", muon_adjust_lr_fn: str = "rms_to_rms",
                muon_rms: float = 0.2, name: str = "") -> Multipliers:
    """The :class:`Multipliers` of one parameter (see the module docstring for the table).

    ``muon_adjust_lr_fn``: the Muon adapter's ``adjust_lr_fn`` for this
    parameter (its shape factor is divided out, never stacked).
    """
    where = name or "this parameter"
    check_choice(role, ROLES, "role", where)
    check_choice(rule, RULES, "rule", where)
    check_choice(optimizer, OPTIMIZERS, "optimizer", where)
    check_choice(wd_scaling, WD_SCALINGS, "wd_scaling", where)
    for k, v in dict(fan_in=fan_in, fan_out=fan_out, base_fan_in=base_fan_in, base_fan_out=base_fan_out).items():
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{k}={v!r} for {where} must be an integer >= 1")
    m_in, m_out = fan_in / base_fan_in, fan_out / base_fan_out
    if m_in < 1 or m_out < 1:
        raise ValueError(f"{where} has shape (fan_in={fan_in}, fan_out={fan_out}) narrower than its base "
                         f"(fan_in={base_fan_in}, fan_out={base_fan_out}); the base must be the smaller model "
                         "(pass the base shapes of the narrow model you tuned)")
    m = _width(role, m_in, m_out)
    muon_a = (_muon_shape(fan_in, fan_out, muon_adjust_lr_fn, muon_rms)
              / _muon_shape(base_fan_in, base_fan_out, muon_adjust_lr_fn, muon_rms)) if optimizer == "muon" else 1.0
    muon_target = math.sqrt(m_out / m_in)
    init = output = lr = 1.0
    if rule == "mup":
        if role == "output":
            init, output = math.sqrt(m_in), 1.0 / m_in
        if optimizer == "sgd":
            lr = {"input": m_out, "vector": m_out, "hidden": 1.0, "output": m_in}[role]
        elif optimizer in ("adam", "kron"):
            lr = 1.0 / m_in if role == "hidden" else 1.0
        else:
            lr = muon_target / muon_a * (m_in if role == "output" else 1.0)
    elif rule == "spectral":
        init = _spectral_std(fan_in, fan_out) / _spectral_std(base_fan_in, base_fan_out)
        if optimizer == "sgd":
            lr = m_out / m_in
        elif optimizer in ("adam", "kron"):
            lr = 1.0 / m_in
        else:
            lr = muon_target / muon_a
    eps = 1.0 if rule == "standard" else 1.0 / m
    wd = {"independent": 1.0, "lr_wd_constant": 1.0 / lr, "none": 0.0}[wd_scaling]
    return Multipliers(init=init, lr=lr, output=output, wd=wd, eps=eps, role=role, rule=rule,
                       optimizer=optimizer, width_mult=m)


def tied_output_multiplier(rule: str, *, width: int, base_width: int) -> float:
    """The readout multiplier of a tied embedding: ``base_width / width`` under muP, else 1."""
    check_choice(rule, RULES, "rule")
    if width < base_width:
        raise ValueError(f"width={width} is narrower than base_width={base_width}")
    return base_width / width if rule == "mup" else 1.0
