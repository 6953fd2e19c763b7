"""``xpopt.adapters.torch.Kron``: PSGD Kron (QUAD / skew) as a ``torch.optim.Optimizer``.

Update rule: ``xpopt.core.kron`` (its module docstring), then per parameter
``W <- W - lr * (D + weight_decay * W)`` (the seed's ``chain(scale_by_kron,
add_decayed_weights, scale_by_learning_rate)``); bf16/f16 params are updated
in float32 and rounded once.

State per parameter: ``step`` (int), ``key`` (the parameter's Threefry key,
2 x uint32 as an int64 CPU tensor: ``fold_in(PRNGKey(seed), index)``, index =
the parameter's position over all groups), ``mu`` (in ``mu_dtype``; by default
float32 for bf16/f16 params and the param's dtype otherwise, the state-dtype
rule Muon keeps too; absent when ``b1 == 0``), ``Ql``/``Qr`` (in ``dtype``; ``Ql`` absent
for vectors), ``Ll``/``Lr`` (float32).  ``state_dict()`` holds all of it, so a
load continues bit-exactly.  The noise and the "fit the preconditioner this
step?" draw come from ``key`` and ``step``: the same on every backend (the
optax and arrays adapters draw the same numbers for the same seed and
parameter order).  The draw is made on the host (NumPy, no device sync).

Structural options (``block_size``, ``max_size_dense``, ``scanned``) are read
when a parameter is added; the layout (``Kron.plan()``) is fixed from then on.
Non-finite gradients: a block whose gradient is not finite leaves its factors
untouched.  With ``nonfinite=None`` (default) its update (and so the
parameter) becomes non-finite, as in torch.optim; ``nonfinite="skip"`` /
``"zero"`` / ``"raise"`` apply ``xpopt.core.fault``'s policy (as ``Muon``;
``state["nonfinite_steps"]`` counts).
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from ...core import blocking
from ...core import kron as K
from ...core import random as R
from ...core._check import check_nonnegative
from .. import _signatures as S
from . import distributed as _dist
from ._base import added_group, apply_update, nonfinite_policy, run_closure, torch_nonfinite_gate
from .groups import setstate_keeping_defaults, warn_unknown_keys

__all__ = ["Kron"]

_logger = logging.getLogger("xpopt")


class _hybrid:
    """``Kron.plan(params, **options)`` on the class, ``opt.plan()`` on an instance."""

    def __init__(self, fn):
        self.fn = fn

    def __get__(self, obj, cls):
        if obj is not None:
            return self.fn.__get__(obj, cls)
        return lambda params, **kw: self.fn(cls(params, **kw))

_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32", "bfloat16": "bfloat16", "float32": "float32"}
#: The options a group holds that the step's KronOptions take (lr, weight_decay: read per step;
#: seed, nonfinite: the optimizer's own).
_STRUCTURAL = tuple(f for f in K.KronOptions.__dataclass_fields__ if f not in ("lr", "weight_decay", "seed", "nonfinite"))


def _dtype_name(v, argname):
    try:
        return None if v is None and argname == "mu_dtype" else _DTYPES[v]
    except (KeyError, TypeError):
        raise ValueError(f"Kron: {argname}={v!r} is not valid: factors are stored in torch.bfloat16 or "
                         "torch.float32 ('bfloat16' / 'float32')") from None


#: The group values ``_options`` reads, but ``lr``: a group's validated options are reused while
#: these are unchanged (``Kron._group_options``).  ``lr`` is read from the group at every step
#: (a scheduler changes it each step) and validated when the group is added or loaded.
_SNAPSHOT = _STRUCTURAL + ("weight_decay", "scanned", "verbose")
_MISSING = object()


def _snapshot(group: dict) -> tuple:
    return tuple(group.get(k, _MISSING) for k in _SNAPSHOT)


def _unchanged(old: tuple, new: tuple) -> bool:
    """Values equal (tensors: the same object; no device sync) and of the same type."""
    return all(a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b)
               for a, b in zip(old, new))


def _options(group: dict, where: str) -> K.KronOptions:
    kw = {k: group[k] for k in _STRUCTURAL}
    kw["dtype"] = _dtype_name(kw["dtype"], "dtype")
    kw["mu_dtype"] = _dtype_name(kw["mu_dtype"], "mu_dtype")
    try:
        check_nonnegative(group["lr"], "lr") if not isinstance(group["lr"], torch.Tensor) else None
        check_nonnegative(group["weight_decay"], "weight_decay")
        for flag in ("scanned", "verbose"):
            if not isinstance(group[flag], bool):
                raise TypeError(f"{flag}={group[flag]!r} must be True or False")
        return K.KronOptions(**kw)
    except (TypeError, ValueError) as e:
        raise type(e)(f"Kron: {e} ({where})") from None


def _torch_dtype(name: str) -> torch.dtype:
    return torch.bfloat16 if name == "bfloat16" else torch.float32


class Kron(torch.optim.Optimizer):
    """PSGD Kron with the seed's option names; see the module docstring.

    Args (defaults as eformer's ``white_kron``, except ``weight_decay=0`` as torch.optim):
      lr: learning rate (a float or 1-element tensor; schedulers drive it).
      b1: momentum (EMA, bias corrected) of the gradient, in [0, 1).
      weight_decay: decoupled, ``W -= lr * wd * W``.
      preconditioner_update_style: ``"skew"`` (Q0.5EQ1.5 with a Procrustes step) or ``"QUAD"``.
      preconditioner_lr, preconditioner_init_scale: the factors' LR (decayed, see
        ``core.kron.precond_lr``) and initial scale (identity times it).
      preconditioner_update_probability: fit the preconditioner with this probability per step
        (a float in (0, 1], ``"heavyball"`` or a callable ``step -> p``).
      max_size_dense, block_size: layout (``core.blocking``).
      dtype: storage of the factors (bf16 or float32; maths is float32).
      mu_dtype: storage of the momentum (bf16 or float32); None: float32 for bf16/f16 params, the
        param's dtype otherwise (the state-dtype rule, as ``Muon``).
      A param-group key Kron does not use warns (``adapters/torch/groups.py``).
      normalize_grads, lr_style (``"adam"``: divide by 5, or None), noise_scale.
      scanned: the params of this group have a leading layer axis.
      seed: the Threefry seed of the noise and the update draws.
      verbose: log each parameter's layout (INFO, ``"xpopt"`` logger) when it is added.
      nonfinite: None (no check), ``"skip"``, ``"zero"`` or ``"raise"`` (``xpopt.core.fault``).
    """

    @S.takes("torch.Kron", method=True)
    def __init__(self, params, seed, nonfinite, **defaults):
        try:
            K.KronOptions(seed=seed)
        except (TypeError, ValueError) as e:
            raise type(e)(f"Kron: {e}") from None
        _options(defaults, "Kron(...) arguments")
        self._nonfinite = nonfinite_policy(nonfinite, "Kron")
        self._seed = seed
        self._layouts: dict = {}
        self._index: dict = {}
        self._names: dict = {}     # param -> its name, when given (named_parameters())
        self._opts: dict = {}      # group index -> (_snapshot(group), its validated KronOptions)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        with added_group(self, super().add_param_group, param_group) as (g, group):
            opts = _options(group, f"param group {g}")
            warn_unknown_keys(group, self.defaults, f"param group {g}", "Kron")
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if not p.is_floating_point():
                    label = repr(names[i]) if names is not None else f"{i} of group {g}"
                    raise TypeError(f"Kron: parameter {label} has dtype {p.dtype}; Kron needs a real "
                                    "floating dtype (float32, float64, bfloat16, float16)")
                lay = blocking.layout(p.shape, max_size_dense=group["max_size_dense"],
                                      block_size=group["block_size"], scanned=group["scanned"])
                self._layouts[p] = lay
                self._index.setdefault(p, len(self._index))
                if names is not None:
                    self._names[p] = names[i]
                if group["verbose"]:
                    _logger.info("xpopt Kron: %s shape=%s -> %s", self._name(p), tuple(p.shape), lay.describe())
            _dist.check_group(group["params"], lambda i: f"{self._index[group['params'][i]]} (group {g})", "Kron")
            self._opts[g] = (_snapshot(group), opts)

    def _group_options(self, g: int, group: dict) -> K.KronOptions:
        """Group ``g``'s options, validated when it was added or loaded; again only if changed since.

        Users and schedulers edit ``param_groups`` in place: a changed option
        (``b1``, ``weight_decay``, ...) is validated here, once, and used;
        ``lr`` is read from the group by the step itself and costs nothing.
        """
        snap = _snapshot(group)
        hit = self._opts.get(g)
        if hit is not None and _unchanged(hit[0], snap):
            return hit[1]
        opts = _options(group, f"param group {g}")
        self._opts[g] = (snap, opts)
        return opts

    def _name(self, p) -> str:
        """The parameter's name (``named_parameters()``), else ``param i`` (its index, which keys its noise)."""
        return self._names.get(p, f"param {self._index[p]}")

    @_hybrid
    def plan(self) -> K.Plan:
        """Per parameter: layout, state bytes (as stored), AdamW's bytes, FLOPs with / without a fit.

        A list of dicts (``name``, ``shape``, ``layout``, ``state_bytes``,
        ``momentum_bytes``, ``factor_bytes``, ``adamw_bytes``, ``flops_fit``,
        ``flops_apply``) that prints as a table with totals
        (``print(opt.plan())``; :class:`xpopt.core.kron.Plan`).  Names are the
        ones given with ``named_parameters()``, else ``param i``.  Nothing is
        allocated (state is created at the first step): call it on the
        optimizer, or on the class as ``Kron.plan(params, **options)``.
        """
        rows = K.Plan()
        for g, group in enumerate(self.param_groups):
            opts = self._group_options(g, group)
            for p in group["params"]:
                rows.append(K.plan_row(self._layouts[p], opts, name=self._name(p), param_bytes=p.element_size()))
        return rows

    # ----------------------------------------------------------------- step

    def _init_state(self, p, group, opts) -> dict:
        lay = self._layouts[p]
        st = self.state[p]
        st["step"] = 0
        key = K.param_key(np.asarray(_prng_key(self._seed)), self._index[p])
        st["key"] = torch.as_tensor(np.asarray(key, dtype=np.int64))
        if not (isinstance(opts.b1, (int, float)) and opts.b1 == 0):
            mdt = opts.momentum_dtype(torch.finfo(p.dtype).bits)
            st["mu"] = torch.zeros_like(p, dtype=p.dtype if mdt is None else _torch_dtype(mdt),
                                        memory_format=torch.preserve_format)
        like = torch.empty(0, dtype=torch.float32, device=p.device)
        f = K.init_factors(like, lay, dtype=_torch_dtype(opts.dtype), init_scale=opts.preconditioner_init_scale)
        if f.Ql is not None:
            st["Ql"] = f.Ql
        st["Qr"], st["Ll"], st["Lr"] = f.Qr, f.Ll, f.Lr
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        if self._nonfinite is not None and not self._nonfinite_gate():
            return loss
        # every group's options first: an invalid edit leaves all params as they were
        group_opts = [self._group_options(g, group) for g, group in enumerate(self.param_groups)]
        for g, (group, opts) in enumerate(zip(self.param_groups, group_opts)):
            if _dist.sharded(group["params"]):  # FSDP2 DTensors: factors on owner ranks
                _dist.kron_group(self, group, opts, g)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Kron: sparse gradients are not supported (use dense gradients)")
                st = self.state[p] if self.state[p] else self._init_state(p, group, opts)
                self._step_param(p, st, group, opts)
        return loss

    def _step_param(self, p, st, group, opts) -> None:
        st["step"] += 1
        self._apply(p, self._direction(p, st, p.grad, st.get("mu"), opts), group)

    def _direction(self, p, st, g, mu, opts):
        """``core.kron``'s step for ``p`` from ``g`` (its gradient, or under FSDP2 the full momentum with
        ``mu=None``): the new momentum and factors go into ``st``, the direction is returned."""
        D, new_mu, nf = K.kron_step(g, mu, _factors(st), self._layouts[p], key=_host_key(st),
                                    step=st["step"], opts=opts, host_decision=True)
        _store(st, new_mu, nf)
        return D

    @staticmethod
    def _apply(p, D, group) -> None:
        apply_update(p, D, group["lr"], group["weight_decay"], D.dtype)

    def _nonfinite_gate(self) -> bool:
        """The ``nonfinite=`` policy (``core.fault``), as ``Muon._nonfinite_gate``."""
        return torch_nonfinite_gate(self, self._name, "Kron")

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, then every state tensor re-copied from ``state_dict`` in its own dtype.

        torch casts all tensor state of a floating param to the param's dtype
        (the int64 key through float32 would lose bits; float32 ``L`` of a
        bf16 param would be rounded), so the saved tensors are taken as saved.
        Every parameter's state is checked against its layout, and every loaded
        group's options are validated, before anything is loaded: a state dict
        that does not fit leaves the optimizer as it was.  The checkpoint's
        options win (torch's rule); an option its group lacks keeps this
        optimizer's value for that group.
        """
        saved = state_dict.get("state", {})
        ids = [i for g in state_dict.get("param_groups", []) for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(ids) == len(params):  # else torch raises its own error below
            for i, p in zip(ids, params):
                if i in saved:
                    self._check_loaded(p, saved[i])
        loaded = self._loaded_options(state_dict)
        super().load_state_dict(state_dict)
        for g, (group, (full, cached)) in enumerate(zip(self.param_groups, loaded or ())):
            for k, v in full.items():
                group.setdefault(k, v)
            self._opts[g] = cached
        for i, p in zip(ids, params):
            if i not in saved:
                continue
            st = self.state[p]
            for k, v in saved[i].items():
                if torch.is_tensor(v):
                    st[k] = v.to(device="cpu" if k == "key" else p.device, copy=True)
            st["step"] = int(st["step"])

    def _loaded_options(self, state_dict: dict) -> Optional[list]:
        """Per saved group: its options (completed from the live group) and ``(snapshot, KronOptions)``."""
        saved = state_dict.get("param_groups")
        if not isinstance(saved, list) or len(saved) != len(self.param_groups):
            return None  # torch raises its own error for this
        out = []
        for g, (s, live) in enumerate(zip(saved, self.param_groups)):
            full = {k: s[k] if k in s else live[k] for k in ("lr",) + _SNAPSHOT}
            out.append((full, (_snapshot(full), _options(full, f"param group {g} of the loaded state_dict"))))
        return out

    # torch pickles only defaults/state/param_groups (copy.deepcopy too); keep the layout and keys.
    def __getstate__(self) -> dict:
        s = super().__getstate__()
        s.update(_seed=self._seed, _layouts=self._layouts, _index=self._index, _names=self._names,
                 _nonfinite=self._nonfinite)
        return s

    def __setstate__(self, state: dict) -> None:
        setstate_keeping_defaults(self, state, super().__setstate__)
        self.__dict__.setdefault("_opts", {})   # validated again at the first step

    def _check_loaded(self, p, st: dict) -> None:
        lay = self._layouts[p]
        name = self._index[p]
        for k, v in st.items():
            want = {"Ql": (lay.blocks,), "Qr": (lay.blocks,), "Ll": (lay.blocks,), "Lr": (lay.blocks,),
                    "mu": tuple(p.shape), "key": (2,)}.get(k)
            shape = tuple(getattr(v, "shape", ()))
            if want is not None and shape[:len(want)] != want:
                raise ValueError(f"Kron.load_state_dict: state {k!r} of parameter {name} has shape "
                                 f"{shape}, which does not fit its layout ({lay.describe()}); "
                                 "the state dict comes from a different model or block_size")
        # FSDP2: factors live on the matrix's owner rank only (distributed.py)
        if "step" not in st or ("Qr" not in st and not _dist.is_dtensor(p)):
            raise ValueError(f"Kron.load_state_dict: state of parameter {name} lacks 'step' or 'Qr' "
                             f"(has {sorted(st)}); it is not a Kron state")


def _prng_key(seed: int):
    return R.PRNGKey(seed, like=np.zeros(0, np.uint32))


def _host_key(st: dict) -> np.ndarray:
    """The parameter's key on the host (NumPy): the draw is made there, without a device sync."""
    return np.asarray(st["key"].tolist(), dtype=np.uint32)


def _factors(st: dict) -> K.Factors:
    return K.Factors(st.get("Ql"), st["Qr"], st["Ll"], st["Lr"])


def _store(st: dict, mu, factors) -> None:
    """Copy a step's new momentum (None: unchanged) and factors into the state, in place."""
    if mu is not None:
        st["mu"].copy_(mu)
    for k, v in zip(K.Factors._fields, factors):
        if v is not None:
            st[k].copy_(v)
