"""``xpopt.compat.timm.Muon``: a drop-in for timm's ``timm.optim.Muon`` (timm 1.0.31).

Change the import, keep the call::

    from xpopt.compat.timm import Muon             # was: from timm.optim import Muon
    opt = Muon(model.parameters(), lr=0.02, weight_decay=0.05, nesterov=True)

``Muon`` has timm's exact signature (names, order, defaults, kinds and
annotations), its defaults, option meanings and routing (Muon for matrices
and conv kernels by timm's shape rules, its AdamW -- NAdamW with
``nesterov`` -- fallback for the rest, ``use_fallback`` / ``use_muon``
group flags), and it IS ``xpopt.adapters.torch.Muon`` with the options
below.  This module is a mapping table and the forwarding around it: no
maths, and no option checks beyond refusing what we cannot honour
(``algo="adamuon"``, ``scale_eps=True``, a forced Muon kernel with a
leading unit dim).  timm itself is never imported.

The mapping (``docs/compat.md`` has the full table with the reasons):

* ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``ns_steps``,
  ``ns_coefficients`` (timm's preset names are ours, with the same numbers),
  ``eps``, ``safety_factor``, ``conv_mode``, ``normalize_spatial``,
  ``betas``, ``verbose``: the same names, the same meanings.
* ``adjust_lr_fn``: :data:`ADJUST_LR_FN` (timm's ``None`` is no scaling:
  our ``"none"``; the group holds ``"none"``, ``state_dict()`` writes
  ``None`` back for timm).
* the fallback, derived from timm's keys of the group at every step (so
  schedulers and edits of the group act as in timm): NAdamW if the group's
  ``nesterov`` else AdamW, LR ``lr * fallback_lr_scale``, epsilon the
  group's ``eps``, the group's ``weight_decay`` and ``betas``.
* ``adamw_lr`` (deprecated in timm): ``fallback_lr_scale = adamw_lr / lr``
  with timm's ``FutureWarning``.
* timm-only group keys ``fallback_lr_scale``, ``algo``, ``scale_eps``,
  ``capturable`` are kept in every group as timm keeps them.
* what timm fixes: :data:`FIXED` (Newton-Schulz in bfloat16, as timm's
  ``zeropower_via_newtonschulz`` default, which its Muon never overrides).
"""

import warnings
from typing import List, Optional, Tuple, Union

import torch
from torch.optim.optimizer import ParamsT

from . import _torch_muon as _T
from ..core._check import check_bool, check_hyper

__all__ = ["Muon", "ADJUST_LR_FN", "DERIVED", "FIXED", "NOT_USED", "PEER_ARGS", "PEER_ONLY"]

# timm/optim/muon.py's constants and types.
MUON_EPS = 1e-7
DEFAULT_NS_STEPS = 5
NSCoeff = Union[str, Tuple[float, float, float], List[Tuple[float, float, float]]]

#: timm's arguments that are ``MuonOptions`` fields of the same name and meaning.
PEER_ARGS = {k: k for k in ("lr", "weight_decay", "momentum", "nesterov", "ns_steps", "ns_coefficients", "eps",
                            "safety_factor", "adjust_lr_fn", "conv_mode", "normalize_spatial", "betas")}

#: timm's ``adjust_lr_fn`` values -> ours (timm's ``get_lr_scale``; a falsy value is no scaling).
ADJUST_LR_FN = {None: "none", "original": "original", "match_rms_adamw": "match_rms_adamw",
                "rms_to_rms": "rms_to_rms"}

#: timm's group keys with no ``MuonOptions`` field: kept in the groups, and their defaults.
PEER_ONLY = {"fallback_lr_scale": 1.0, "algo": "muon", "scale_eps": False, "capturable": False}

#: What timm fixes, with no argument for it -> our option's value (given explicitly, so a
#: change of an xpopt default cannot leak in).
FIXED = {
    "momentum_form": "ema",          # momentum_buf.lerp_(grad, 1 - momentum)
    "ns_dtype": torch.bfloat16,      # zeropower_via_newtonschulz(..., dtype=torch.bfloat16)
    "ns_method": "standard",         # A = X X^T; B = b A + c A A; X = a X + B X
    "preconditioning": "frobenius",  # X / clamp(||X||_F * safety_factor, min=eps)
    "adaptive": False,               # the step is lr * lr_scale * NS(u)
    "consistent_rms": None,          # match_rms_adamw's constant: 0.2
    "min_dim_size": 4,               # _is_suitable_for_muon's defaults (Muon never passes others)
    "max_aspect_ratio": 128.0,
    "fallback_weight_decay": None,   # the group's weight_decay
    "momentum_bias_correction": False,  # the buffer itself, no 1/(1-momentum^t)
    "eps_mode": "floor",             # clamp(||X||_F * safety_factor, min=eps): a floor, not + eps
    "fallback_eps_root": 0.0,        # timm's adamw/nadamw: eps outside the square root
}

#: The fallback's options, derived from timm's keys of each group at every step (timm's
#: ``Muon.step``), so that schedulers and edits of the group act on them as in timm.
DERIVED = {
    "fallback": "'nadamw' if the group's nesterov else 'adamw'",
    "fallback_lr": "the group's lr * fallback_lr_scale",
    "fallback_eps": "the group's eps (Muon's, 1e-7 by default)",
}

#: Options with no effect here (defaults kept), and why.
NOT_USED = {
    **_T.NOT_USED,
    "nonfinite": "None: no check, as timm",
}


def _adjust_lr_fn(value, where: str) -> str:
    return _T.lr_rule(ADJUST_LR_FN, value, where, "timm's Muon", "(None = no scaling)")


def _check_peer_only(group: dict, where: str) -> None:
    """Refuse the timm options xpopt cannot honour (naming each and the fix); check the rest."""
    if group["algo"] != "muon":
        raise ValueError(f"Muon: algo={group['algo']!r} is not supported ({where}): xpopt implements "
                         "algo='muon' only; AdaMuon ('adamuon') needs timm's own Muon")
    if group["scale_eps"]:
        raise ValueError(f"Muon: scale_eps={group['scale_eps']!r} is not supported ({where}): xpopt floors "
                         "the Newton-Schulz prescale with eps instead of adding eps * sqrt(in/out) to "
                         "the norm; use scale_eps=False, or timm's own Muon")
    try:
        check_bool(group["capturable"], "capturable")
        check_hyper(group["fallback_lr_scale"], "fallback_lr_scale")
    except (TypeError, ValueError) as e:
        raise type(e)(f"Muon: {e} ({where})") from None


def _fallback_view(group: dict) -> dict:
    """The group as the adapter's fallback reads it: :data:`DERIVED` from timm's keys."""
    return {**group, "fallback": "nadamw" if group["nesterov"] else "adamw",
            "fallback_lr": group["lr"] * group["fallback_lr_scale"], "fallback_eps": group["eps"],
            "fallback_weight_decay": None}


class Muon(_T.PeerMuon):
    """timm's ``Muon`` (timm 1.0.31) as xpopt's Muon: same signature, defaults, meanings and routing.

    Differences from timm, all listed in ``docs/compat.md``: ``algo="adamuon"``
    and ``scale_eps=True`` raise (not implemented); ``eps`` floors the
    prescale relative to the matrix's scale, so updates stay orthogonal when
    ``||u||_F < eps`` (timm's absolute floor shrinks them there); routing is
    decided when parameters are added (timm: at their first step; same
    rules), logged by ``verbose`` on the ``"xpopt"`` logger and listed by
    :meth:`routes` (timm's per-parameter ``state["use_muon"]`` is not kept);
    a group forced to Muon (``use_muon=True``) may not hold a kernel with a
    leading unit dim (timm orthogonalises it as one row); complex parameters
    routed to Muon raise (timm drops their imaginary part); ``capturable`` is
    kept in the groups, the state is always on the parameter's device (what
    timm's ``capturable=True`` does); bf16 parameters keep float32 state.
    """

    def __init__(
            self,
            params: ParamsT,
            lr: float = 0.02,
            weight_decay: float = 0,
            momentum: float = 0.95,
            nesterov: bool = False,
            ns_steps: int = DEFAULT_NS_STEPS,
            ns_coefficients: NSCoeff = "quintic",
            eps: float = MUON_EPS,
            safety_factor: float = 1.0,
            adjust_lr_fn: Optional[str] = "match_rms_adamw",
            conv_mode: str = "flatten",
            normalize_spatial: bool = True,
            adamw_lr: Optional[float] = None,
            fallback_lr_scale: float = 1.0,
            betas: Tuple[float, float] = (0.9, 0.95),
            algo: str = "muon",
            scale_eps: bool = False,
            capturable: bool = False,
            verbose: bool = False,
    ):
        if adamw_lr is not None:  # timm's deprecation path, with its messages
            warnings.warn(
                "adamw_lr is deprecated, use fallback_lr_scale=adamw_lr/lr instead. "
                "adamw_lr will be removed in a future release.",
                FutureWarning,
                stacklevel=2,
            )
            if torch.is_tensor(lr):
                raise ValueError("adamw_lr is not supported with tensor lr; use fallback_lr_scale instead.")
            if lr == 0:
                raise ValueError("Cannot compute fallback_lr_scale from adamw_lr when lr=0")
            fallback_lr_scale = adamw_lr / lr
        peer = dict(fallback_lr_scale=fallback_lr_scale, algo=algo, scale_eps=scale_eps, capturable=capturable)
        _check_peer_only(peer, "Muon(...) arguments")
        # add_param_group reads the timm-only defaults from here until __init__ puts them in defaults.
        self._peer_defaults = peer
        super().__init__(
            params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
            ns_coefficients=ns_coefficients, eps=eps, safety_factor=safety_factor,
            adjust_lr_fn=_adjust_lr_fn(adjust_lr_fn, "Muon(...) arguments"), conv_mode=conv_mode,
            normalize_spatial=normalize_spatial, betas=betas, verbose=verbose,
            fallback="nadamw" if nesterov else "adamw", fallback_lr=None, fallback_eps=eps, **FIXED)
        self.defaults.update(peer)
        del self._peer_defaults

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group`` with timm's group keys (and its routing flags)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"Muon: param_group must be a dict, got {type(param_group).__name__}")
        g = len(self.param_groups)
        where = f"param group {g}"
        defaults = self.__dict__.get("_peer_defaults") or {k: self.defaults[k] for k in PEER_ONLY}
        peer = {k: param_group.get(k, d) for k, d in defaults.items()}
        _check_peer_only(peer, where)
        for k in peer:   # out of the adapter's sight (it would warn about keys it does not know)
            param_group.pop(k, None)
        if "adjust_lr_fn" in param_group:
            param_group["adjust_lr_fn"] = _adjust_lr_fn(param_group["adjust_lr_fn"], where)
        # The fallback's options as timm derives them (checked by the adapter like any option).
        if "nesterov" in param_group:
            param_group.setdefault("fallback", "nadamw" if param_group["nesterov"] else "adamw")
        if "eps" in param_group:
            param_group.setdefault("fallback_eps", param_group["eps"])
        if param_group.get("use_muon") and not param_group.get("use_fallback"):
            self._refuse_leading_unit_kernels(param_group, where)
        super().add_param_group(param_group)
        param_group.update(peer)
        complex_muon = [self._routes[p] for p in param_group["params"]
                        if p.is_complex() and self._routes[p].route == "muon"]
        if complex_muon:  # timm casts them to bfloat16, dropping the imaginary part (torch's warning)
            self.param_groups.pop()
            for p in param_group["params"]:
                self._routes.pop(p, None)
            r = complex_muon[0]
            raise ValueError(
                f"Muon: parameter {r.name} of shape {r.shape} is complex and routed to Muon ({where}): timm "
                "casts it to bfloat16, dropping its imaginary part, which xpopt will not do; route it to "
                "the fallback (use_fallback=True), or use xpopt.adapters.torch.Muon (complex Newton-Schulz)")

    @staticmethod
    def _refuse_leading_unit_kernels(param_group: dict, where: str) -> None:
        for name, i, t in _T.group_tensors(param_group):   # none where torch's add_param_group raises
            if t.ndim >= 3 and t.shape[0] == 1:
                name = f"{i}" if name is None else name
                raise ValueError(
                    f"Muon: parameter {name} of shape {tuple(t.shape)} is forced to Muon (use_muon=True, "
                    f"{where}), but its first dim is 1: timm orthogonalises it as one row "
                    f"(1, {t[0].numel()}), xpopt drops the unit dim and orthogonalises "
                    f"{tuple(t.shape[1:])}; route it to the fallback (timm's own rule does) or reshape it")

    def _fallback_group(self, group: dict, *lists) -> None:
        # timm: NAdamW if nesterov else AdamW, lr * fallback_lr_scale, Muon's eps, every step.
        super()._fallback_group(_fallback_view(group), *lists)

    # ------------------------------------------------------------ state_dict

    def state_dict(self) -> dict:
        """The adapter's state dict, ``adjust_lr_fn`` as timm writes it (``None``, not ``"none"``)."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            if group.get("adjust_lr_fn") == "none":
                group["adjust_lr_fn"] = None
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """The adapter's load of ours or timm's state dict (timm's ``None`` LR rule, its ``use_muon`` flags).

        timm-only keys of every loaded group are checked as arguments are
        (an ``algo="adamuon"`` checkpoint raises before anything loads);
        each parameter's ``state["use_muon"]`` (timm's cached route) is
        dropped: the adapter checks that the loaded state fits its own routing.
        """
        sd = dict(state_dict)
        groups = []
        for g, group in enumerate(sd.get("param_groups", [])):
            group = dict(group)
            if "adjust_lr_fn" in group:
                group["adjust_lr_fn"] = _adjust_lr_fn(group["adjust_lr_fn"], f"param group {g} of the state_dict")
            _check_peer_only({k: group.get(k, d) for k, d in PEER_ONLY.items()}, f"param group {g} of the state_dict")
            groups.append(group)
        sd["param_groups"] = groups
        sd["state"] = {i: {k: v for k, v in st.items() if k != "use_muon"} for i, st in sd.get("state", {}).items()}
        super().load_state_dict(sd)
