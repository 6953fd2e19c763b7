"""What the torch drop-ins (``torch_optim``, ``timm``) share: the adapter with the peers' bf16
Newton-Schulz and no emulation warning, the options neither peer has, the LR-rule lookup and the
walk over a param group's tensors."""

import torch

from ..adapters.torch.muon import Muon as _Muon

__all__ = ["PeerMuon", "NOT_USED", "lr_rule", "group_tensors"]

#: ``MuonOptions`` fields both peers lack, left at their defaults, and why.
NOT_USED = {
    "batched": "'auto' (same-shape matrices in one NS call where faster): speed only, same maths",
    "mu_dtype": "momentum in the param's dtype (float32 for bf16/f16 params), the torch adapter's rule",
    "low_precision_dtype": "the torch adapter updates each param in place, in its own dtype",
}


def lr_rule(table: dict, value, where: str, peer: str, hint: str) -> str:
    """``table[value]`` (a peer's ``adjust_lr_fn`` -> ours), else a ``ValueError`` naming it;
    ``hint`` follows the list of the peer's values."""
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"Muon: adjust_lr_fn={value!r} is not supported ({where}); {peer} takes "
                         f"{list(table)} {hint}") from None


def group_tensors(param_group: dict):
    """``(name, index, tensor)`` for each parameter of ``param_group`` (its ``params`` made a list in place,
    so the adapter sees the same parameters; ``name`` the repr of a named one's name, else None);
    nothing where torch's ``add_param_group`` will raise."""
    params = param_group.get("params")
    params = [params] if isinstance(params, torch.Tensor) else params
    if params is None or isinstance(params, (set, str)):
        return
    params = list(params)
    param_group["params"] = params
    for i, p in enumerate(params):
        named = isinstance(p, tuple) and len(p) == 2
        t = p[1] if named else p
        if isinstance(t, torch.Tensor):
            yield (repr(p[0]) if named else None), i, t


class PeerMuon(_Muon):
    """The torch adapter as a peer's drop-in: the peers run Newton-Schulz in bfloat16 on every device,
    emulated or not, without a warning (the adapter's warning advises an option their signatures lack)."""

    def _warn_emulated_bf16(self) -> None:
        return None
