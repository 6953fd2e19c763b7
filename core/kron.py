"""PSGD Kron: a Kronecker-factored preconditioner ``P = Ql^T Ql (x) Qr^T Qr`` fitted online.

Update rule, per parameter (``g`` its gradient, ``t`` the 1-based step)::

    mu   = b1 * mu + (1 - b1) * g ;  m = mu / (1 - b1^t)     # b1 = 0: m = g
    m    = m / (||m|| + 1e-6)                     if normalize_grads
    per block G of m (core.blocking: merged to 2-D, tiled, zero padded):
        if the preconditioner updates this step (probability p(t), drawn from the key):
            Pg   = Ql^T Ql (G + noise) Qr^T Qr     # noise: noise_scale * N(0, 1) entries (make_noise)
            Ql  <- step(Ql, Pg Pg^T,  n),  Qr <- step(Qr, Pg^T Pg, m)   # dense side
                   (diagonal side: the same on the diagonal: sum(Pg^2) along the other axis)
        D    = Ql^T Ql G Qr^T Qr                   # the new factors
    D    = D * 1.1 / max(rms(D), 1.1)              # RMS clip, per parameter
    D    = D / 5                                   if lr_style == "adam"
    W    = W - lr * (D + wd * W)                   # the adapters

``step(Q, term1, term2)``, with the Lipschitz estimate ``L`` of the
preconditioner loss and its LR ``plr(t) = max(preconditioner_lr /
sqrt(1 + t/10000), min(0.4, preconditioner_lr))``::

    ell = ||term1||_lb + term2 ;  L = max(0.95 L + 0.05 ell, ell)
    QUAD:  z = plr / (2L);  Q <- (I - z (term1 - term2 I)) Q (I - z (term1 - term2 I)), symmetrised
           diagonal: Q <- Q * (1 - z (term1 - term2))^2
    skew:  z = plr / L;     Q <- procrustes(Q - z (term1 - term2 I) Q)       (Q0.5EQ1.5)
           diagonal: Q <- Q * (1 - z (term1 - term2))

``||.||_lb`` is a power-iteration lower bound of the spectral norm started
from the rows' energies (deterministic, smooth in its input; ``<=`` the
true norm).
Every 100 steps the two factors of each block are balanced (scaled to the
same max-abs; their Kronecker product is unchanged).

Guards (per block, no data-dependent Python branches): a block whose gradient
is all zero or not finite, or whose fit would give a non-finite factor or
``L``, leaves its factors and ``L`` untouched; a block
whose largest entry lies outside ``[2^-40, 2^40]`` is divided by a power of
two (exact) before the factors see it, since ``Pg Pg^T`` would leave
float32's range, and the power of two goes to the RMS clip instead of the
gradient (``D * min(s, 1.1 / rms(D))``), so every finite gradient, 3e38
included, gives a finite update.  Factors are stored
in ``dtype`` (bf16 or float32); every computation is in float32 (float64 for
float64 gradients).
"""

from __future__ import annotations

import math
import numbers
import struct
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Union

from . import blocking
from .adam import _bias_correction
from ._xp import device, is_number, namespace

__all__ = ["KronOptions", "Factors", "Plan", "UPDATE_STYLES", "init_factors", "precondition", "precond_lr",
           "update_probability", "kron_updates", "kron_step", "momentum", "BETA_L", "RMS_CLIP", "ADAM_DIVISOR",
           "FACTOR_DTYPES", "PROB_SCHEDULES", "BALANCE_EVERY", "PROCRUSTES_MAX_STEP", "rms_clip", "param_key",
           "step_keys", "draw_update", "make_noise", "plan_row"]

UPDATE_STYLES = ("QUAD", "skew")
FACTOR_DTYPES = ("bfloat16", "float32")
BETA_L = 0.95          # Lipschitz estimate EMA
RMS_CLIP = 1.1
ADAM_DIVISOR = 5.0     # lr_style="adam": Adam-like update size
BALANCE_EVERY = 100
PROCRUSTES_MAX_STEP = 0.125
_SAFE_LO, _SAFE_HI = 2.0 ** -40, 2.0 ** 40
#: ``preconditioner_update_probability`` by name: heavyball's schedule (every step for 1000
#: steps, then decaying by 0.999 a step to a floor of 0.03).
PROB_SCHEDULES = ("heavyball",)


def _heavyball_prob(step):
    if is_number(step):
        return max(0.03, 0.999 ** max(step - 1000, 0))
    xp, _ = namespace(step, names=("step",))
    t = xp.astype(step, xp.float32)
    return xp.maximum(xp.asarray(0.03, dtype=xp.float32), 0.999 ** xp.maximum(t - 1000.0, 0.0 * t))


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass(frozen=True)
class KronOptions:
    """Kron's one definition: every option, its one default, its validation.

    Every adapter (``xpopt.adapters.torch.Kron``, optax ``quad`` / ``skew`` /
    ``scale_by_kron``, ``arrays.kron``) takes these names with these defaults;
    the few framework differences are listed in ``adapters._signatures.SIGNATURES``
    and checked by ``tests/test_definitions.py``.

    Two defaults were decided here for every framework at once:

    - ``weight_decay=0.0``: decay is a property of the model, not of the
      preconditioner; 0 is what torch.optim's Adam, kron-torch and psgd_torch
      default to (the optax functions used eformer's 0.1 until they were unified).
    - ``dtype="float32"``: the factors' storage.  It is the one dtype every
      backend stores (CuPy has no bfloat16, NumPy only through ml_dtypes), and
      xpopt's point is the same numbers on every framework: a bf16 rounding of
      the factors turns a one-ulp float32 difference between two BLAS into a
      2^-8 one.  ``dtype="bfloat16"`` halves the state (0.75x AdamW's instead
      of 1.5x, README's state table) at one rounding per fit: the memory choice.
    """

    b1: Any = 0.95
    normalize_grads: bool = False
    max_size_dense: int = 16384
    preconditioner_lr: Any = 0.7
    preconditioner_init_scale: Any = 1.0
    preconditioner_update_style: str = "skew"
    dtype: str = "float32"
    block_size: int = 256
    noise_scale: Any = 1e-9
    lr_style: Optional[str] = "adam"
    preconditioner_update_probability: Union[float, str, Callable] = 1.0
    mu_dtype: Optional[str] = None   # None: the state-dtype rule, see momentum_dtype
    lr: Any = 1e-3
    weight_decay: Any = 0.0
    seed: Optional[int] = 0          # None only where it is traced (optax.inject_hyperparams under jit)
    nonfinite: Optional[str] = None

    def __post_init__(self):
        from . import _check as V
        from .fault import check_policy

        V.host_numbers(self)   # NumPy 0-d values -> numbers (np.asarray(0.7) works as 0.7 does)
        object.__setattr__(self, "lr", V.check_lr(self.lr, "lr"))
        object.__setattr__(self, "weight_decay", V.check_hyper(self.weight_decay, "weight_decay"))
        if self.seed is not None:
            seed = V.static_number(self.seed, "seed", integer=True)
            _check(isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed < 2 ** 64,
                   f"seed={self.seed!r} must be an integer in [0, 2**64)")
            object.__setattr__(self, "seed", int(seed))
        object.__setattr__(self, "nonfinite", check_policy(self.nonfinite))
        style = self.preconditioner_update_style
        # either case ("quad", "QUAD", "Skew"): stored as the canonical UPDATE_STYLES spelling
        canon = {s.lower(): s for s in UPDATE_STYLES}.get(style.lower()) if isinstance(style, str) else None
        _check(canon is not None,
               f"preconditioner_update_style={style!r} is not valid; use 'skew' "
               "(Q0.5EQ1.5 with a Procrustes step) or 'QUAD' (either case)")
        object.__setattr__(self, "preconditioner_update_style", canon)
        _check(self.dtype in FACTOR_DTYPES,
               f"dtype={self.dtype!r} is not valid: factors are stored in 'bfloat16' or 'float32'")
        _check(self.mu_dtype is None or self.mu_dtype in FACTOR_DTYPES,
               f"mu_dtype={self.mu_dtype!r} is not valid: use None (float32 for bf16/f16 params, else the "
               "param's dtype), 'bfloat16' or 'float32'")
        for name in ("block_size", "max_size_dense"):
            v = getattr(self, name)
            _check(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1,
                   f"{name}={v!r} is not valid: it must be an integer >= 1")
        if is_number(self.b1):
            _check(0.0 <= self.b1 < 1.0, f"b1={self.b1!r} is not valid: it must be in [0, 1) (0 disables momentum)")
        _check(not isinstance(self.preconditioner_init_scale, str) or self.preconditioner_init_scale == "auto",
               f"preconditioner_init_scale={self.preconditioner_init_scale!r} is not valid: a number > 0 or 'auto'")
        for name in ("preconditioner_lr", "preconditioner_init_scale"):
            v = getattr(self, name)
            if is_number(v):
                _check(v > 0, f"{name}={v!r} is not valid: it must be > 0")
        if is_number(self.noise_scale):
            _check(self.noise_scale >= 0, f"noise_scale={self.noise_scale!r} is not valid: it must be >= 0")
        _check(self.lr_style in (None, "adam"), f"lr_style={self.lr_style!r} is not valid; use 'adam' or None")
        _check(isinstance(self.normalize_grads, bool), f"normalize_grads={self.normalize_grads!r} must be True or False")
        p = self.preconditioner_update_probability
        if isinstance(p, str):
            _check(p in PROB_SCHEDULES, f"preconditioner_update_probability={p!r} is not a known schedule; use one of "
                   f"{list(PROB_SCHEDULES)}, a number in (0, 1] or a callable step -> probability")
        elif is_number(p):
            _check(0.0 < p <= 1.0, f"preconditioner_update_probability={p!r} is not valid: it must be in (0, 1]")
        elif not callable(p) and getattr(p, "shape", None) != ():
            raise ValueError(f"preconditioner_update_probability={p!r} is not valid: a number in (0, 1], "
                             f"a schedule name {list(PROB_SCHEDULES)} or a callable step -> probability")

    def momentum_dtype(self, param_bits: int) -> Optional[str]:
        """The momentum's storage dtype for a parameter whose dtype has ``param_bits`` bits.

        The state-dtype rule, the same as Muon's (and its AdamW fallback's):
        ``mu_dtype`` when given; otherwise float32 for 16-bit parameters
        (bfloat16 / float16) and None -- the parameter's own dtype -- for
        float32 and float64 ones.  ``dtype`` stores the factors only.
        """
        if self.mu_dtype is not None:
            return self.mu_dtype
        return "float32" if param_bits < 32 else None


class Factors(NamedTuple):
    """One parameter's preconditioner: per block factors and Lipschitz estimates.

    ``Ql``: ``(S, tr, tr)`` dense, ``(S, m)`` diagonal, or None (vectors);
    ``Qr``: ``(S, tc, tc)`` or ``(S, n)``; ``Ll``, ``Lr``: ``(S,)`` float32.
    """

    Ql: Any
    Qr: Any
    Ll: Any
    Lr: Any


# ------------------------------------------------------------------ schedules

def precond_lr(step, preconditioner_lr=0.7):
    """``max(lr / sqrt(1 + t/10000), min(0.4, lr))``.

    The seed floors at 0.4 whatever ``preconditioner_lr`` is, which would
    *raise* a smaller one to 0.4; the floor here is ``min(0.4, lr)``, the
    same for the default 0.7.
    """
    if is_number(step) and is_number(preconditioner_lr):
        return max(preconditioner_lr / math.sqrt(1.0 + step / 10000.0), min(0.4, preconditioner_lr))
    arrays = [v for v in (step, preconditioner_lr) if not is_number(v)]
    xp, _ = namespace(*arrays[:1], names=("step",))
    t = step if is_number(step) else xp.astype(step, xp.float32)
    lr = preconditioner_lr
    floor = min(0.4, lr) if is_number(lr) else xp.minimum(xp.asarray(0.4, dtype=lr.dtype), lr)
    decay = math.sqrt(1.0 + t / 10000.0) if is_number(t) else xp.sqrt(1.0 + t / 10000.0)
    return xp.maximum(lr / decay, floor)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def update_probability(spec, step):
    """``preconditioner_update_probability`` at ``step``: a number, a schedule name or a callable."""
    if isinstance(spec, str):
        p = _heavyball_prob(step)
    elif callable(spec):
        p = spec(step)
    else:
        p = spec
    # float32 on every path, so the draw u < p decides the same everywhere
    return _f32(float(p)) if is_number(p) else p


# ------------------------------------------------------------------ factors

def init_factors(like, lay: blocking.Layout, *, dtype, init_scale=1.0) -> Factors:
    """Identity factors (times ``init_scale``) on each block's valid part, zero on padding.

    ``like``: an array of the target namespace/device; ``dtype``: the storage dtype.
    """
    xp, _ = namespace(like, names=("like",))
    dev = device(like)
    if isinstance(init_scale, str):      # "auto": identity now, scaled by the first fit (_auto_scale)
        init_scale = 1.0
    vr, vc = blocking.valid_sizes(lay)
    L = xp.zeros((lay.blocks,), dtype=xp.float32, device=dev)

    def dense(t, valid):
        mask = xp.arange(t, device=dev)[None, :] < xp.asarray(valid, device=dev)[:, None]
        eye = xp.eye(t, dtype=dtype, device=dev)
        return eye[None, :, :] * xp.astype(mask, dtype)[:, :, None] * init_scale

    def diag(t):
        return xp.ones((lay.blocks, t), dtype=dtype, device=dev) * init_scale

    Ql = None if lay.left is None else (dense(lay.tr, vr) if lay.left == "dense" else diag(lay.tr))
    Qr = dense(lay.tc, vc) if lay.right == "dense" else diag(lay.tc)
    return Factors(Ql, Qr, L, xp.zeros((lay.blocks,), dtype=xp.float32, device=dev))


def _mT(xp, x):
    return xp.matrix_transpose(x)


def _apply(xp, f: Factors, lay, X):
    """``Ql^T Ql X Qr^T Qr`` per block (diagonal factors multiply rows / columns)."""
    if lay.left == "dense":
        X = _mT(xp, f.Ql) @ (f.Ql @ X)
    elif lay.left == "diag":
        X = (f.Ql * f.Ql)[:, :, None] * X
    if lay.right == "dense":
        X = (X @ _mT(xp, f.Qr)) @ f.Qr
    else:
        X = X * (f.Qr * f.Qr)[:, None, :]
    return X


def _amax(xp, X, axes):
    return xp.max(xp.abs(X), axis=axes)


def _norm_lower_bound(xp, A, iters: int = 4):
    """A lower bound of ``||A||_2`` per matrix of the stack ``(S, t, t)``.

    Power iteration (``||x A|| / ||x|| <= ||A||`` for any ``x``) started from
    the rows' energies ``x_i = ||A_i||^2``: a start that depends smoothly on
    ``A``.  (Starting from the row of largest energy, as the seed does, jumps
    when two rows' energies cross, and two backends rounding differently
    then take different steps: a trajectory test would measure that kink.)
    """
    scale = _amax(xp, A, (-2, -1))
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))
    A = A / scale[:, None, None]
    x = xp.sum(A * A, axis=-1)[:, None, :]                            # (S, 1, t)
    for _ in range(iters):
        s = _amax(xp, x, (-2, -1))
        x = (x / xp.where(s > 0, s, xp.ones_like(s))[:, None, None]) @ A
    n = xp.linalg.vector_norm(x, axis=(-2, -1))
    n = xp.where(n > 0, n, xp.ones_like(n))
    return xp.linalg.vector_norm((x / n[:, None, None]) @ A, axis=(-2, -1)) * scale


def _trace_of_product(xp, A, B):
    """``trace(A @ B)`` per matrix without forming the product."""
    return xp.sum(A * _mT(xp, B), axis=(-2, -1))


def _procrustes(xp, Q):
    """One step of ``Q`` towards the closest orthogonal-times-SPD form: rotate by
    ``exp(a R)`` (second order), ``R = Q^T - Q`` normalised, when that raises
    ``trace(Q)``; the step ``a <= 1/8 / ||R||`` and stops at the trace's maximum."""
    R = _mT(xp, Q) - Q
    mx = _amax(xp, R, (-2, -1))
    ok = mx > 1e-30
    R = R / xp.where(ok, mx, xp.ones_like(mx))[:, None, None]
    RQ = R @ Q
    tr_RQ = _trace_of_product(xp, R, Q)
    nlb = _norm_lower_bound(xp, R)
    a = PROCRUSTES_MAX_STEP / xp.where(nlb > 0, nlb, xp.ones_like(nlb))
    RRQ = R @ RQ
    tr_RRQ = _trace_of_product(xp, R, RQ)
    neg = tr_RRQ < 0
    a = xp.where(neg, xp.minimum(a, -tr_RQ / xp.where(neg, tr_RRQ, -xp.ones_like(tr_RRQ))), a)
    a = a[:, None, None]
    rotated = Q + a * (RQ + 0.5 * a * RRQ)
    return xp.where((ok & (tr_RQ > 0))[:, None, None], rotated, Q)


def _lipschitz(xp, L, ell):
    return xp.maximum(BETA_L * L + (1.0 - BETA_L) * ell, ell)


def _dense_step(xp, Q, term1, term2, L, plr, style):
    ell = _norm_lower_bound(xp, term1) + term2
    L = _lipschitz(xp, L, ell)
    t2 = term2[:, None, None]
    if style == "QUAD":
        z = (plr / (2.0 * L))[:, None, None]
        P = Q - z * (term1 @ Q - t2 * Q)
        P = P - z * (P @ term1 - P * t2)
        return (P + _mT(xp, P)) / 2.0, L
    z = (plr / L)[:, None, None]
    return _procrustes(xp, Q - z * (term1 @ Q - t2 * Q)), L


def _diag_step(xp, Q, term1, term2, L, plr, style):
    ell = xp.max(term1, axis=-1) + term2
    L = _lipschitz(xp, L, ell)
    z = (plr / (2.0 * L) if style == "QUAD" else plr / L)[:, None]
    gain = 1.0 - z * (term1 - term2[:, None])
    return (Q * gain * gain if style == "QUAD" else Q * gain), L


def _balance(xp, f: Factors) -> Factors:
    """Scale both factors of each block to the same max-abs (their product is unchanged)."""
    if f.Ql is None:
        return f
    axes_l = (-2, -1) if f.Ql.ndim == 3 else (-1,)
    axes_r = (-2, -1) if f.Qr.ndim == 3 else (-1,)
    nl, nr = _amax(xp, f.Ql, axes_l), _amax(xp, f.Qr, axes_r)
    ok = (nl > 0) & (nr > 0)
    nl, nr = xp.where(ok, nl, xp.ones_like(nl)), xp.where(ok, nr, xp.ones_like(nr))
    gm = xp.sqrt(nl * nr)
    shape_l = (-1,) + (1,) * (f.Ql.ndim - 1)
    shape_r = (-1,) + (1,) * (f.Qr.ndim - 1)
    return f._replace(Ql=f.Ql * xp.reshape(gm / nl, shape_l), Qr=f.Qr * xp.reshape(gm / nr, shape_r))


def _valid(xp, lay, like):
    vr, vc = blocking.valid_sizes(lay)
    dev = device(like)
    return (xp.asarray(vr, dtype=like.dtype, device=dev), xp.asarray(vc, dtype=like.dtype, device=dev))


def _noise_mask(xp, lay, like):
    vr, vc = blocking.valid_sizes(lay)
    dev = device(like)
    rows = xp.arange(lay.tr, device=dev)[None, :] < xp.asarray(vr, device=dev)[:, None]
    cols = xp.arange(lay.tc, device=dev)[None, :] < xp.asarray(vc, device=dev)[:, None]
    return xp.astype(rows[:, :, None] & cols[:, None, :], like.dtype)


def _block_scales(xp, G):
    """``(ok, s)`` per block: a usable gradient (finite, not all zero) and its power-of-two unit.

    ``s`` is 1 while the block's largest entry lies in ``[2^-40, 2^40]`` (so
    the usual case is computed exactly as written), else the power of two at
    or below it: ``Pg Pg^T`` of a 1e30 gradient would overflow float32 and of
    a 1e-30 one underflow.  Dividing by ``s`` is exact.
    """
    amax = _amax(xp, G, (-2, -1))
    ok = (amax > 0) & (amax < math.inf)           # False for NaN too
    safe = (amax >= _SAFE_LO) & (amax <= _SAFE_HI)
    p2 = 2.0 ** xp.floor(xp.log2(xp.where(ok, amax, xp.ones_like(amax))))
    return ok, xp.where(ok & ~safe, p2, xp.ones_like(p2))


def _auto_scale(xp, Gs, ok, f: Factors, lay) -> Factors:
    """``preconditioner_init_scale="auto"``: at a block's first fit (``L == 0``) with a usable
    gradient, scale its identity factors so that ``P = rms(G)^-1``: the first preconditioned
    gradient has unit RMS, as Adam's does, instead of the gradient's own size.  A block whose
    gradient is zero or not finite waits for a usable one (no division by zero)."""
    vr, vc = _valid(xp, lay, Gs)
    rms = xp.sqrt(xp.sum(Gs * Gs, axis=(-2, -1)) / (vr * vc))
    first = ok & (f.Lr == 0.0)                 # ok: finite and not all zero, so rms > 0
    c = xp.where(first, rms, xp.ones_like(rms)) ** (-0.25 if f.Ql is not None else -0.5)

    def scale(q):
        return None if q is None else q * xp.reshape(c, (-1,) + (1,) * (q.ndim - 1))

    return f._replace(Ql=scale(f.Ql), Qr=scale(f.Qr))


def _fit(xp, Gs, ok, f: Factors, lay, *, noise, plr, style, auto_scale=False) -> Factors:
    """The factors after one fit to the (rescaled) blocks ``Gs``; unusable blocks keep theirs."""
    Gs = xp.where(ok[:, None, None], Gs, xp.zeros_like(Gs))
    if auto_scale:
        f = _auto_scale(xp, Gs, ok, f, lay)
    if noise is not None:
        Gs = Gs + noise
    Pg = _apply(xp, f, lay, Gs)
    vr, vc = _valid(xp, lay, Gs)
    Ql, Ll = f.Ql, f.Ll
    if lay.left == "dense":
        Ql, Ll = _dense_step(xp, f.Ql, Pg @ _mT(xp, Pg), vc, f.Ll, plr, style)
    elif lay.left == "diag":
        Ql, Ll = _diag_step(xp, f.Ql, xp.sum(Pg * Pg, axis=-1), vc, f.Ll, plr, style)
    if lay.right == "dense":
        Qr, Lr = _dense_step(xp, f.Qr, _mT(xp, Pg) @ Pg, vr, f.Lr, plr, style)
    else:
        Qr, Lr = _diag_step(xp, f.Qr, xp.sum(Pg * Pg, axis=-2), vr, f.Lr, plr, style)

    # A fit whose result is not finite (an overflow inside it) is rejected per block, like an
    # unusable gradient: the factors never hold a NaN/Inf, whatever the input.
    def finite(q):
        if q is None:
            return ok
        return xp.all(xp.reshape(xp.isfinite(q), (q.shape[0], -1)), axis=1) if q.ndim > 1 else xp.isfinite(q)

    good = ok & finite(Ql) & finite(Qr) & finite(Ll) & finite(Lr)

    def keep(new, old):
        if old is None:
            return None
        return xp.where(xp.reshape(good, (-1,) + (1,) * (old.ndim - 1)), new, old)

    return Factors(keep(Ql, f.Ql), keep(Qr, f.Qr), keep(Ll, f.Ll), keep(Lr, f.Lr))


def precondition(m, f: Factors, lay: blocking.Layout, *, update, balance: bool = False, plr=0.7,
                 style: str = "skew", noise=None, cond=None, auto_scale: bool = False):
    """``(D, scale, new_factors)`` for one parameter's (momentum) gradient ``m``, in float32.

    The preconditioned gradient is ``D * scale`` (``scale`` a 0-d power of
    two, 1 unless some block was outside float32's safe range; kept apart so
    that ``Q^T Q G`` of a 3e38 gradient does not overflow: :func:`rms_clip`
    takes it).  ``f`` holds float32 factors.  ``update``: fit the factors
    first (a bool, or a 0-d bool array with ``cond``, the backend's branch,
    under jit).  ``noise``: ``(S, tr, tc)`` already scaled and masked, or None.
    ``auto_scale``: ``preconditioner_init_scale="auto"`` (:func:`_auto_scale`).
    """
    xp, backend = namespace(m, names=("m",))
    cond = cond or backend.cond
    G = blocking.to_blocks(m, lay)
    ok, s = _block_scales(xp, G)
    Gs = G / s[:, None, None]
    if balance:
        f = _balance(xp, f)
    kw = dict(noise=noise, plr=plr, style=style, auto_scale=auto_scale)
    if update is True:
        f = _fit(xp, Gs, ok, f, lay, **kw)
    elif update is not False:
        f = cond(update, lambda f: _fit(xp, Gs, ok, f, lay, **kw), lambda f: f, f)
    S = xp.max(s)
    D = _apply(xp, f, lay, Gs) * (s / S)[:, None, None]      # one unit for the parameter, exact
    return blocking.from_blocks(D, lay), S, f


def rms_clip(xp, D, scale=1.0, limit: float = RMS_CLIP):
    """``(D * scale) * limit / max(rms(D * scale), limit)`` = ``D * min(scale, limit / rms(D))``.

    Overflow-safe: the RMS is taken of ``D / max|D|``, and ``scale`` (a power
    of two from :func:`precondition`) never multiplies ``D`` before the clip.
    """
    amax = _amax(xp, xp.reshape(D, (-1,)), (-1,)) if D.ndim else xp.abs(D)
    amax = xp.where(amax > 0, amax, xp.ones_like(amax))
    rms = amax * xp.sqrt(xp.mean((D / amax) ** 2)) if D.size else amax
    rms = xp.where(rms > 0, rms, xp.ones_like(rms))
    return D * xp.minimum(scale * xp.ones_like(rms), limit / rms)


# ------------------------------------------------------------------ one step

def kron_updates(grads, mus, factors, layouts, *, step, opts: KronOptions, update=True, noise=None,
                 cond=None, compute_dtype=None):
    """One Kron step over a list of parameters: ``(directions, new_mus, new_factors)``.

    ``step``: the 1-based step (int or 0-d integer array); ``mus`` the momentum
    buffers (None entries when ``b1 == 0``); ``factors`` in storage dtype;
    ``update``: whether the preconditioners are fitted this step (see
    :func:`precondition`); ``noise``: per parameter ``(S, tr, tc)`` arrays or
    None.  Directions are float32 (float64 for float64 gradients); the
    adapter applies them by ``core._apply``'s contract.  One parameter's
    whole step (keys, draw, noise, momentum) is :func:`kron_step`.
    """
    if not grads:
        return [], [], []
    xp, backend = namespace(*grads, names=tuple(f"grads[{i}]" for i in range(len(grads))))
    cond = cond or backend.cond
    plr = precond_lr(step, opts.preconditioner_lr)
    balance = is_number(step) and step % BALANCE_EVERY == 0
    dirs, new_mus, new_f = [], [], []
    b1 = opts.b1
    use_mu = not (is_number(b1) and b1 == 0)
    for i, (g, mu, f, lay) in enumerate(zip(grads, mus, factors, layouts)):
        cdt = compute_dtype or (xp.float64 if g.dtype == xp.float64 else xp.float32)
        if 0 in tuple(g.shape):  # an empty parameter: nothing to precondition (and no max to take)
            dirs.append(xp.zeros(g.shape, dtype=cdt, device=device(g)))
            new_mus.append(mu)
            new_f.append(f)
            continue
        m, new_mu = momentum(g, mu if use_mu else None, step=step, b1=b1, dtype=cdt)
        new_mus.append(new_mu if use_mu else mu)
        if opts.normalize_grads:
            m = m / (xp.linalg.vector_norm(xp.reshape(m, (-1,))) + 1e-6)
        f32 = Factors(*(None if q is None else xp.astype(q, cdt) for q in f[:2]),
                      xp.astype(f.Ll, cdt), xp.astype(f.Lr, cdt))
        bal = balance if is_number(step) else False
        if not is_number(step):
            f32 = cond(step % BALANCE_EVERY == 0, lambda f: _balance(xp, f), lambda f: f, f32)
        D, scale, f32 = precondition(m, f32, lay, update=update, balance=bal, plr=plr,
                                     style=opts.preconditioner_update_style,
                                     noise=None if noise is None else noise[i], cond=cond,
                                     auto_scale=isinstance(opts.preconditioner_init_scale, str))
        new_f.append(Factors(*(None if q is None else xp.astype(q, o.dtype) for q, o in zip(f32[:2], f[:2])),
                             xp.astype(f32.Ll, f.Ll.dtype), xp.astype(f32.Lr, f.Lr.dtype)))
        D = rms_clip(xp, D, scale)
        if opts.lr_style == "adam":
            D = D / ADAM_DIVISOR
        dirs.append(D)
    return dirs, new_mus, new_f


def kron_step(g, mu, factors: Factors, lay: blocking.Layout, *, key, step, opts: KronOptions,
              noise_like=None, gather=None, host_decision: bool = False, cond=None):
    """One parameter's whole Kron step: ``(direction, new_mu, new_factors)``; every adapter calls this.

    In order: the parameter's keys at ``step`` (``key``: its own key, state),
    the fit probability and the draw (``host_decision``: a Python bool, for
    callers that decide on the host; else an array under jit, for ``cond``),
    :func:`momentum` (elementwise: ``gather``, if given, takes the
    bias-corrected ``m`` from a shard to the whole matrix), noise when the
    preconditioner may be fitted and ``noise_scale`` is not zero (allocated
    beside ``noise_like``, default beside ``m``; ``key`` is moved there), then
    :func:`kron_updates` with ``m`` as the gradient.  ``mu=None``: ``g`` is
    already the momentum (``b1 == 0``, or a sharded caller that ran
    :func:`momentum` on its shards and gathered ``m`` itself).  The caller
    applies ``direction`` (``core._apply``) and stores the state in its form.
    """
    from . import random as R

    noise_key, decision_key = step_keys(key, step)
    prob = update_probability(opts.preconditioner_update_probability, step)
    if is_number(prob) and prob >= 1.0:
        update = True
    else:
        update = draw_update(decision_key, prob)
        update = bool(update) if host_decision else update
    m, new_mu = momentum(g, mu, step=step, b1=opts.b1)
    if gather is not None:
        m = gather(m)
    noise = None
    if update is not False and not (is_number(opts.noise_scale) and opts.noise_scale == 0):
        if noise_like is None:
            xp, _ = namespace(m, names=("g",))
            noise_like = xp.zeros((0,), dtype=m.dtype, device=device(m))
        noise = [make_noise(R.key_like(noise_key, noise_like), lay, noise_like, opts.noise_scale)]
    (d,), _, (nf,) = kron_updates([m], [None], [factors], [lay], step=step, opts=opts, update=update,
                                  noise=noise, cond=cond)
    return d, new_mu, nf


def momentum(g, mu, *, step, b1, dtype=None):
    """Kron's momentum alone: ``(m, new_mu)``, which :func:`kron_updates` starts with.

    Elementwise, so a sharded adapter runs it on each rank's shard and sends
    only ``m`` to the rank that fits the preconditioner, which then calls
    :func:`kron_step` with ``mu=None`` (there ``m = g``): both paths run these
    same operations, so they give the same bits.  ``dtype``: the computation
    dtype (default float32, float64 for float64 ``g``).  ``mu=None`` (``b1 ==
    0``): ``m`` is ``g`` in the computation dtype.
    """
    xp, _ = namespace(g, names=("g",))
    cdt = dtype or (xp.float64 if g.dtype == xp.float64 else xp.float32)
    g = xp.astype(g, cdt)
    if mu is None or (is_number(b1) and b1 == 0):
        return g, mu
    mu32 = b1 * xp.astype(mu, cdt) + (1.0 - b1) * g          # a convex mix: never overflows
    return mu32 / _bias_correction(xp, b1, step, cdt), xp.astype(mu32, mu.dtype)


# ------------------------------------------------------------------ randomness

def param_key(key, index: int):
    """The key of parameter ``index`` (its position in the flattened parameter list)."""
    from . import random as R

    return R.fold_in(key, index)


def step_keys(key, step):
    """``(noise_key, decision_key)`` of one parameter at ``step``: Threefry, so the
    same on every backend and rank (``core.random``)."""
    from . import random as R

    ks = R.split(R.fold_in(key, step), 2)
    return ks[0, :], ks[1, :]


def draw_update(decision_key, p):
    """Whether the preconditioner is fitted: ``uniform(decision_key) < p`` (exact
    uniform bits, so only a ``p`` within one float32 ulp of the draw can differ)."""
    from . import random as R

    xp, _ = namespace(decision_key, names=("decision_key",))
    return R.uniform(decision_key, (), xp.float32) < p


def make_noise(noise_key, lay: blocking.Layout, like, scale):
    """``scale`` times a random Toeplitz matrix per block, zero on padding.

    ``T[i, j] = v[i - j + tc - 1]`` with ``v`` of ``tr + tc - 1`` standard
    normals (``core.random.normal``): every entry is N(0, 1) and ``T`` has
    full rank almost surely, which is what the noise is for (``Pg Pg^T``
    never singular), from ``tr + tc - 1`` draws instead of ``tr * tc``.
    Counter-based draws cost ~100 integer passes each, so i.i.d. noise of
    the gradient's size would cost more than the preconditioner fit on a CPU.
    """
    from . import random as R

    xp, _ = namespace(like, names=("like",))
    tr, tc = lay.tr, lay.tc
    v = R.normal(noise_key, (lay.blocks, tr + tc - 1), like.dtype) * scale
    i = xp.arange(tr, device=device(like))[:, None]
    j = xp.arange(tc, device=device(like))[None, :]
    idx = xp.reshape(i - j + (tc - 1), (-1,))
    z = xp.reshape(xp.take(v, idx, axis=1), (lay.blocks, tr, tc))
    if lay.padded:
        z = z * _noise_mask(xp, lay, like)
    return z




# ------------------------------------------------------------------ planning

_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


class Plan(list):
    """What ``plan()`` returns: a list of :func:`plan_row` dicts, one per parameter,
    that prints as a table with totals (``print(opt.plan())``).

    Columns: the parameter's name, shape, layout, Kron's state in MB (momentum
    plus factors, as stored) beside AdamW's (float32 ``exp_avg`` + ``exp_avg_sq``),
    and GFLOP of one step with a preconditioner fit and without one.  The last
    lines are the totals and Kron's state as a multiple of AdamW's.
    """

    _TOTALS = ("state_bytes", "momentum_bytes", "factor_bytes", "adamw_bytes", "flops_fit", "flops_apply")

    def totals(self) -> dict:
        """Sums over the parameters of the byte and FLOP columns, and ``params`` (their count)."""
        out = {k: sum(r[k] for r in self) for k in self._TOTALS}
        out["params"] = len(self)
        return out

    def table(self) -> str:
        head = ("parameter", "shape", "layout", "state MB", "AdamW MB", "GFLOP fit", "GFLOP no fit")
        rows = [(str(r["name"]), str(tuple(r["shape"])), str(r["layout"]), f"{r['state_bytes'] / 1e6:.3f}",
                 f"{r['adamw_bytes'] / 1e6:.3f}", f"{r['flops_fit'] / 1e9:.4f}", f"{r['flops_apply'] / 1e9:.4f}")
                for r in self]
        t = self.totals()
        total = (f"total ({t['params']} params)", "", "", f"{t['state_bytes'] / 1e6:.3f}",
                 f"{t['adamw_bytes'] / 1e6:.3f}", f"{t['flops_fit'] / 1e9:.4f}", f"{t['flops_apply'] / 1e9:.4f}")
        widths = [max(len(c[i]) for c in [head, total, *rows]) for i in range(len(head))]

        def line(cells):
            return "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        rule = "  ".join("-" * w for w in widths)
        ratio = t["state_bytes"] / t["adamw_bytes"] if t["adamw_bytes"] else float("nan")
        return "\n".join([line(head), rule, *map(line, rows), rule, line(total),
                          f"Kron state / AdamW state = {ratio:.2f} (momentum {t['momentum_bytes'] / 1e6:.3f} MB, "
                          f"factors {t['factor_bytes'] / 1e6:.3f} MB)"])

    def __str__(self) -> str:
        return self.table()


def _side_flops(kind, t, other, style):
    """(apply, fit) FLOPs of one side of one block: ``t`` its size, ``other`` the other side's."""
    if kind is None:
        return 0, 0
    if kind == "diag":
        return 2 * t * other, 4 * t * other
    step = (4 if style == "QUAD" else 6) * t ** 3
    return 4 * t * t * other, 2 * t * t * other + step


def plan_row(lay: blocking.Layout, opts: KronOptions, *, name: str, adamw_state_bytes: int = 8,
             param_bytes: int = 4) -> dict:
    """One parameter of a memory / compute plan: layout, state bytes, FLOPs per step.

    ``param_bytes``: bytes per entry of the parameter's dtype (the momentum's
    dtype follows it, :meth:`KronOptions.momentum_dtype`); ``adamw_state_bytes``:
    AdamW's per entry (float32 ``exp_avg`` + ``exp_avg_sq``).
    """
    import math as _m

    numel = _m.prod(lay.shape)
    fb = _BYTES[opts.dtype]
    mdt = opts.momentum_dtype(8 * param_bytes)

    def side_bytes(kind, t):
        if kind is None:
            return 0
        return lay.blocks * (t * t if kind == "dense" else t) * fb

    mu = 0 if (is_number(opts.b1) and opts.b1 == 0) else numel * (param_bytes if mdt is None else _BYTES[mdt])
    factors = side_bytes(lay.left, lay.tr) + side_bytes(lay.right, lay.tc) + 2 * 4 * lay.blocks
    al, fl = _side_flops(lay.left, lay.tr, lay.tc, opts.preconditioner_update_style)
    ar, fr = _side_flops(lay.right, lay.tc, lay.tr, opts.preconditioner_update_style)
    apply = lay.blocks * (al + ar)
    return dict(name=name, shape=lay.shape, layout=lay.describe(), state_bytes=mu + factors,
                momentum_bytes=mu, factor_bytes=factors, adamw_bytes=numel * adamw_state_bytes,
                flops_apply=apply, flops_fit=2 * apply + lay.blocks * (fl + fr))
