"""``xpopt.compat.torch_optim.Muon``: a drop-in for ``torch.optim.Muon`` (torch >= 2.9).

Change the import, keep the call::

    from xpopt.compat.torch_optim import Muon      # was: from torch.optim import Muon
    opt = Muon(matrices, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")

``Muon`` has ``torch.optim.Muon``'s exact signature (names, order, defaults,
kinds and annotations), its defaults, option meanings and routing rule (2-D
parameters only; anything else raises ``ValueError``, as torch does), and it
IS ``xpopt.adapters.torch.Muon`` with the options below: this module is a
mapping table and the forwarding around it, with no maths and no option
checks of its own beyond what torch's domain adds (the 2-D rule,
``adjust_lr_fn``'s three values).  Every value is validated by xpopt's one
definition (``core.muon.MuonOptions``); errors name the option.

The mapping (``docs/compat.md`` has the full table with the reasons):

* ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``ns_coefficients``,
  ``eps``, ``ns_steps``: the same names, the same meanings (one ``(a, b, c)``
  triple repeated ``ns_steps`` times; EMA momentum ``buf.lerp_(g, 1 - mu)``;
  ``p *= 1 - lr * wd``).
* ``adjust_lr_fn``: :data:`ADJUST_LR_FN` (torch's ``None`` is ``"original"``,
  and the group holds ``"original"``).
* what torch fixes without an argument: :data:`FIXED` (Newton-Schulz in
  bfloat16 on every device, as torch's ``grad.bfloat16()``).
* options with no effect here (every parameter is a Muon matrix, so nothing
  reaches the AdamW fallback): :data:`NOT_USED`, left at their defaults.

Param groups carry torch's keys with torch's values (``group["momentum"]``,
``group["lr"]``, ...), plus xpopt's own (``ns_dtype``, ``momentum_form``,
...); unlike ``xpopt.adapters.torch.Muon`` they have no ``betas``, so
``OneCycleLR`` / ``CyclicLR`` with ``cycle_momentum=True`` write
``group["momentum"]``, as they do for torch.optim.Muon.  A
``torch.optim.Muon`` state dict loads directly, and this optimizer's loads
into ``torch.optim.Muon``.
"""

import torch
from torch.optim.optimizer import ParamsT

from . import _torch_muon as _T

__all__ = ["Muon", "ADJUST_LR_FN", "FIXED", "NOT_USED", "PEER_ARGS"]

# torch.optim._muon's constants (Keller Jordan's Muon).
EPS = 1e-7
DEFAULT_A = 3.4445
DEFAULT_B = -4.7750
DEFAULT_C = 2.0315
DEFAULT_NS_STEPS = 5

#: torch.optim.Muon's arguments, each the ``MuonOptions`` field it sets (same name, same meaning).
PEER_ARGS = {"lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum", "nesterov": "nesterov",
             "ns_coefficients": "ns_coefficients", "eps": "eps", "ns_steps": "ns_steps",
             "adjust_lr_fn": "adjust_lr_fn"}

#: torch.optim.Muon's ``adjust_lr_fn`` values -> ours: ``None`` is Keller Jordan's
#: ``sqrt(max(1, A/B))`` (torch's ``_adjust_lr``); ``"match_rms_adamw"`` is ``0.2 * sqrt(max(A, B))``.
ADJUST_LR_FN = {None: "original", "original": "original", "match_rms_adamw": "match_rms_adamw"}

#: What torch.optim.Muon fixes, with no argument for it -> our option's value.  Given
#: explicitly (not left to our defaults), so a change of an xpopt default cannot leak in.
FIXED = {
    "momentum_form": "ema",          # buf.lerp_(grad, 1 - momentum); nesterov: grad.lerp(buf, momentum)
    "ns_dtype": torch.bfloat16,      # ortho_grad = grad.bfloat16(), on every device
    "ns_method": "standard",         # X = a X + (b A + c A A) X, A = X X^T
    "preconditioning": "frobenius",  # X / clamp(||X||_F, min=eps)
    "safety_factor": 1.0,            # (no safety factor)
    "adaptive": False,               # the step is lr * adjust * NS(u)
    "consistent_rms": None,          # match_rms_adamw's constant: 0.2
    "momentum_bias_correction": False,  # the buffer itself, no 1/(1-momentum^t)
    "eps_mode": "floor",             # clamp(||X||_F, min=eps): a floor, not ||X|| + eps
}

#: Options with no effect in this drop-in (defaults kept), and why.
NOT_USED = {
    "conv_mode": "2-D parameters only: no kernel to flatten or batch",
    "normalize_spatial": "2-D parameters only: no spatial taps",
    **_T.NOT_USED,
    "nonfinite": "None: no check, as torch.optim.Muon",
    **{k: "every parameter is a Muon matrix: nothing reaches the AdamW fallback"
       for k in ("fallback", "fallback_lr", "betas", "fallback_eps", "fallback_weight_decay", "min_dim_size",
                 "max_aspect_ratio")},
    "fallback_eps_root": "every parameter is a Muon matrix: nothing reaches the AdamW fallback",
}


def _adjust_lr_fn(value, where: str) -> str:
    return _T.lr_rule(ADJUST_LR_FN, value, where, "torch.optim.Muon",
                      "(None = 'original'). For 'rms_to_rms' or 'none' use xpopt.adapters.torch.Muon")


def _drop_betas(group: dict) -> None:
    # The AdamW fallback's betas (filled in from the adapter's defaults while __init__ runs, or
    # loaded from an xpopt checkpoint) mean nothing here, and with them a scheduler's
    # cycle_momentum marks would make the adapter read betas[0] instead of group["momentum"].
    group.pop("betas", None)


class Muon(_T.PeerMuon):
    """``torch.optim.Muon`` (torch 2.13) as xpopt's Muon: same signature, defaults, meanings and routing.

    Args (torch's): params (2-D tensors, ``(name, tensor)`` pairs or group
    dicts), lr (1e-3), weight_decay (0.1, decoupled ``p *= 1 - lr*wd``),
    momentum (0.95), nesterov (True), ns_coefficients (Keller Jordan's
    ``(3.4445, -4.775, 2.0315)``, repeated ``ns_steps`` times), eps (1e-7),
    ns_steps (5), adjust_lr_fn (None = ``"original"``, or
    ``"match_rms_adamw"``).

    Differences from torch.optim.Muon, all listed in ``docs/compat.md``:
    ``momentum`` must be < 1 (torch takes any value >= 0); ``eps`` floors the
    prescale relative to the matrix's scale, so updates stay orthogonal when
    ``||u||_F < eps`` (torch's absolute floor shrinks them there); complex
    parameters raise when added (torch raises at ``step``); bf16
    parameters keep float32 momentum; under FSDP2 Newton-Schulz sees each
    full matrix (torch.optim.Muon orthogonalises each shard on its own).
    Every group has ``use_muon=True`` (every 2-D parameter is orthogonalised,
    whatever its shape, as torch does); ``use_fallback`` is refused.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
        eps: float = EPS,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = None,
    ) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                         ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                         adjust_lr_fn=_adjust_lr_fn(adjust_lr_fn, "Muon(...) arguments"), **FIXED)
        # torch.optim.Muon's defaults have no "betas" (the fallback's, unused here): without
        # it LR schedulers with cycle_momentum=True cycle group["momentum"], as for torch's.
        self.defaults.pop("betas", None)

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group`` with torch.optim.Muon's rule: 2-D parameters only."""
        if not isinstance(param_group, dict):
            raise TypeError(f"Muon: param_group must be a dict, got {type(param_group).__name__}")
        g = len(self.param_groups)
        for name, _, t in _T.group_tensors(param_group):
            name = "" if name is None else f"{name} "
            if t.is_complex():  # torch raises this at step()
                raise RuntimeError(
                    f"Muon does not support complex parameters (parameter {name}in param group {g}): "
                    "its Newton-Schulz runs in bfloat16, which has no complex type; "
                    "xpopt.adapters.torch.Muon orthogonalises complex matrices")
            if t.ndim != 2:
                raise ValueError(
                    f"Muon only supports 2D parameters whereas we found a parameter {name}with size: "
                    f"{t.size()} (param group {g}); as torch.optim.Muon, give the rest to another "
                    "optimizer, or use xpopt.adapters.torch.Muon, which routes them to its AdamW fallback")
        if param_group.get("use_fallback") or param_group.get("use_muon", True) is not True:
            raise ValueError(
                f"Muon: param group {g} sets use_fallback / use_muon; torch.optim.Muon has no fallback and "
                "orthogonalises every parameter it is given. Use xpopt.adapters.torch.Muon for routing")
        if "adjust_lr_fn" in param_group:
            param_group["adjust_lr_fn"] = _adjust_lr_fn(param_group["adjust_lr_fn"], f"param group {g}")
        # Every 2-D parameter is orthogonalised, as torch does: also the shapes our
        # routing would send to the fallback ((1, n), (n, 1), aspect > 128, sides < 4).
        param_group["use_muon"] = True
        super().add_param_group(param_group)
        _drop_betas(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """The adapter's load (a torch.optim.Muon state dict loads directly), groups kept without ``betas``."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            _drop_betas(group)
