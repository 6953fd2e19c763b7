"""Muon as optax transforms: :func:`muon` (Muon + AdamW/NAdamW fallback) and :func:`scale_by_muon`.

The update rule, layouts, routing, precision and ``inject_hyperparams`` use are
described in the package docstring (``help(xpopt.adapters.optax)``); the maths
is ``xpopt.core``, this module only moves pytrees and layouts.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from ...backends import jax as _jax_backend
from ...core._apply import apply_update
from ... import _checkpoint_format as CK
from ...core._check import check_lr, is_array_scalar, is_low_precision, is_on
from ...core.layout import is_dim_numbers, resolve_dim_spec
from ...core.routing import check_decay_flag, check_label, muon_leaf_plan, plan_leaf
from .. import _signatures as S
from . import sharding as _dist
from .fault import described, with_nonfinite
from .states import MuonAdamWState, MuonState, named_leaves

__all__ = [
    "muon", "scale_by_muon", "MuonDimensionNumbers",
    "FLAX", "TORCH", "STATIC_ARGS", "SCALE_BY_MUON_STATIC_ARGS", "INJECTABLE",
]

#: ``MuonDimensionNumbers`` of flax's layout (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``).
FLAX = MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)
#: ``MuonDimensionNumbers`` of torch's layout (``(out, in, *spatial)``, core's own).
TORCH = MuonDimensionNumbers(reduction_axis=1, output_axis=0)

ScalarOrSchedule = optax.ScalarOrSchedule


# --------------------------------------------------------------------------- pytrees


def _is_spec_leaf(x) -> bool:
    return x is None or isinstance(x, (str, bool)) or is_dim_numbers(x)


def _per_leaf(spec, tree, treedef, argname: str) -> list:
    """One value of ``spec`` (a value, a pytree/prefix or a callable) per leaf of ``tree``."""
    if callable(spec):
        spec = spec(tree)
    try:
        full = jax.tree.broadcast(spec, tree, is_leaf=_is_spec_leaf)
        return treedef.flatten_up_to(full)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{argname} does not match the params tree: give one value per leaf (the same pytree "
            f"structure as params, or a prefix of it). Details: {e}"
        ) from None


def _fill_labels(spec, tree, path=""):
    """``labels`` with the keys a dict leaves out filled with None (automatic).

    Only plain dicts facing a dict of params are filled, at any depth; a key the
    params lack is a ValueError naming it (a typo would otherwise route nothing).
    Everything else is returned as given, for ``_per_leaf``'s prefix matching."""
    if not (type(spec) is dict and isinstance(tree, dict)):
        return spec
    unknown = [k for k in spec if k not in tree]
    if unknown:
        raise ValueError(f"labels{path} has keys that the params lack: {sorted(map(str, unknown))}; "
                         f"params{path} has {sorted(map(str, tree))}")
    return {k: _fill_labels(spec[k], tree[k], f"{path}[{k!r}]") if k in spec else None for k in tree}


def _flatten_up_to(treedef, tree, argname: str) -> list:
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{argname} does not match the structure of the updates tree: {e}") from None


def _compute_dtype(dtype):
    return jnp.dtype(jnp.float32) if is_low_precision(dtype) else jnp.dtype(dtype)


def _stored_dtype(dtype, opts):
    """What a leaf of ``dtype`` stores (state, updates) in: its compute dtype, or with
    ``low_precision_dtype="param"`` its own dtype (optax's convention)."""
    return jnp.dtype(dtype) if opts.low_precision_dtype == "param" else _compute_dtype(dtype)


def _real_dtype(dtype):
    """float32 for complex64 (Adam's second moment is real), else ``dtype``."""
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else jnp.dtype(dtype)


def _state_dtype(x, mu_dt, opts):
    """Momentum dtype of leaf ``x``: ``mu_dtype`` if given (complex for complex leaves)."""
    cdt = _stored_dtype(x.dtype, opts)
    if mu_dt is None:
        return cdt
    if jnp.issubdtype(cdt, jnp.complexfloating) and not jnp.issubdtype(mu_dt, jnp.complexfloating):
        return jnp.result_type(mu_dt, jnp.complex64)
    return mu_dt


def _not_injected(value, argname: str):
    """A dtype option that arrived as an array: inject_hyperparams called a dtype class."""
    if is_array_scalar(value):
        raise TypeError(
            f"{argname} is an array ({value!r}): optax.inject_hyperparams treats every callable, "
            f"dtype classes such as jnp.bfloat16 included, as a schedule and passes its value; give "
            f"the dtype by name ({argname}='bfloat16') or list {argname!r} in static_args "
            "(xo.STATIC_ARGS does)")
    return value


def _real_part(value):
    """A complex 0-d array hyperparameter's real part, else ``value``.

    ``inject_hyperparams`` stores numbers in the params' widest dtype, complex for
    complex params; hyperparameters are real, so the (zero) imaginary part is dropped.
    """
    if isinstance(value, jax.Array) and value.ndim == 0 and jnp.iscomplexobj(value):
        return jnp.real(value)
    return value


def _check_mu_dtype(mu_dtype):
    if mu_dtype is None:
        return None
    _not_injected(mu_dtype, "mu_dtype")
    try:
        dt = jnp.dtype(mu_dtype)
    except TypeError:
        raise TypeError(f"mu_dtype={mu_dtype!r} is not a dtype; use e.g. jnp.float32 or 'bfloat16'") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"mu_dtype={mu_dtype!r} is not a floating dtype")
    return dt


def _native_bf16(x) -> bool:
    if _jax_backend.is_traced(x):  # init under jit: ask where computations will run
        return jax.default_backend() != "cpu"
    return _jax_backend.has_native_bf16(x)


def _dims_per_leaf(dimension_numbers, tree, treedef, n):
    """(list of DimensionNumbers-or-None, given_by_user_as_tree)."""
    if dimension_numbers is None or isinstance(dimension_numbers, str) or is_dim_numbers(dimension_numbers):
        d = resolve_dim_spec("flax" if dimension_numbers is None else dimension_numbers)
        return [d] * n
    raw = _per_leaf(dimension_numbers, tree, treedef, "dimension_numbers")
    return [resolve_dim_spec(d) for d in raw]


def _check_dims_arg(dimension_numbers):
    if dimension_numbers is None or callable(dimension_numbers):
        return
    if isinstance(dimension_numbers, str) or is_dim_numbers(dimension_numbers):
        resolve_dim_spec(dimension_numbers)  # validate now


def _zeros_like(x, dtype):
    """Zeros of ``x``'s shape and sharding (state lives where its param lives)."""
    return jnp.zeros_like(x, dtype=dtype)


def _lr_value(lr, count):
    return lr(count) if callable(lr) else lr


def _split_beta_schedules(betas):
    """``(betas with each schedule replaced by 0.0 for validation, (sched1, sched2))``."""
    if isinstance(betas, (tuple, list)) and len(betas) == 2 and any(callable(b) for b in betas):
        return (tuple(0.0 if callable(b) else b for b in betas),
                tuple(b if callable(b) else None for b in betas))
    return betas, (None, None)


def _fallback_at(fb, scheds, count):
    """``fb`` with scheduled betas evaluated at ``count`` (0 at the first update)."""
    s1, s2 = scheds
    if s1 is None and s2 is None:
        return fb
    return dataclasses.replace(fb, betas=(fb.beta1 if s1 is None else s1(count),
                                          fb.beta2 if s2 is None else s2(count)))


def _muon_directions(opts, grads, bufs, layouts, names, count_inc, *, cast: bool):
    """Momentum and orthogonalised direction of every leaf with a layout (None: not Muon's).

    Returns ``(dirs, new_bufs, done)``: ``dirs`` has, per Muon leaf, its direction in the leaf's
    own layout and sharding (in the leaf's compute dtype if ``cast``) or zeros for an empty
    matrix, and None elsewhere; ``new_bufs`` is ``bufs`` with the Muon leaves' momentum
    stepped; ``done`` the indices of the directions that came from ``orthogonalize``.
    With ``cast`` the direction is in the leaf's stored dtype (``low_precision_dtype``).
    """
    dirs, new_bufs, done, mats = [None] * len(grads), list(bufs), [], []
    for i, (g, b, lay) in enumerate(zip(grads, bufs, layouts)):
        if lay is None:
            continue
        cdt = _compute_dtype(g.dtype)
        nb, u = opts.momentum_step(b.astype(cdt), g.astype(cdt), step=count_inc)
        new_bufs[i] = nb.astype(b.dtype)
        if g.size == 0:  # an empty matrix has nothing to orthogonalise (and no norm): its update is empty
            dirs[i] = jnp.zeros(g.shape, _stored_dtype(g.dtype, opts))
            continue
        done.append(i)
        _dist.check_not_manual(g, names[i], "Muon")
        mats.append(_dist.gather(lay.to_torch(u.astype(cdt))))  # once per matrix, not per NS step
    squeeze = [layouts[i].native for i in done]  # torch's (1, seq, d) convention for torch-layout leaves only
    for i, d in zip(done, opts.orthogonalize(mats, step=count_inc, squeeze_leading=squeeze)):  # ns_dtype='auto': per matrix
        d = layouts[i].from_torch(d)
        # The leaf's compute dtype, even if a hyperparameter array is wider.
        dirs[i] = _dist.restore(d.astype(_stored_dtype(grads[i].dtype, opts)) if cast else d, grads[i])
    return dirs, new_bufs, done


# --------------------------------------------------------------------------- scale_by_muon


@S.takes("optax.scale_by_muon")
def scale_by_muon(dimension_numbers, **args) -> optax.GradientTransformation:
    """Muon's direction ``lr_scale * orthogonalize(momentum_update(g))`` for every leaf.

    Every leaf is treated as a Muon matrix (a vector is an error: use
    :func:`muon`, or ``optax.partition``).  The updates are a *positive*
    direction: chain with ``optax.scale_by_learning_rate(lr)`` (which negates)
    and, for decoupled weight decay, ``optax.add_decayed_weights(wd)`` before it.
    Options and ``dimension_numbers`` as in :func:`muon`; ``momentum``, ``eps``,
    ``safety_factor`` and ``consistent_rms`` may be 0-d (traced) arrays, so
    ``optax.inject_hyperparams(xo.scale_by_muon)()`` works.  State: :class:`MuonState`.
    """
    record = CK.record_options("muon", args)
    args = {k: _real_part(v) for k, v in args.items()}
    mu_dt = _check_mu_dtype(args["mu_dtype"])
    opts = S.options("optax.scale_by_muon", args, ns_dtype=_not_injected(args["ns_dtype"], "ns_dtype"))
    _check_dims_arg(dimension_numbers)
    warned: list = []

    def layouts(tree):
        leaves, treedef, names = named_leaves(tree)
        dims = _dims_per_leaf(dimension_numbers, tree, treedef, len(leaves))
        return [muon_leaf_plan(x, n, d) for x, n, d in zip(leaves, names, dims)]

    def init_fn(params):
        leaves, treedef, _ = named_leaves(params)
        layouts(params)  # validate early
        if leaves:
            opts.warn_emulated_bf16(_native_bf16(leaves[0]), warned)
        mu = [_zeros_like(x, _state_dtype(x, mu_dt, opts)) for x in leaves]
        return MuonState(count=jnp.zeros([], jnp.int32), mu=treedef.unflatten(mu))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # optax convention: accept and ignore what other transforms need
        leaves, treedef, names = named_leaves(updates)
        lays = layouts(params if params is not None else updates)
        if len(lays) != len(leaves):
            raise ValueError("params and updates have different tree structures")
        bufs = _flatten_up_to(treedef, state.mu, "state.mu")
        count_inc = optax.safe_increment(state.count)
        out, new_bufs, _ = _muon_directions(opts, leaves, bufs, lays, names, count_inc, cast=True)
        return treedef.unflatten(out), MuonState(count=count_inc, mu=treedef.unflatten(new_bufs))

    return described(with_nonfinite(optax.GradientTransformationExtraArgs(init_fn, update_fn), opts.nonfinite),
                     record)


# --------------------------------------------------------------------------- muon


@S.takes("optax.muon")
def muon(weight_decay_mask, labels, dimension_numbers, **args) -> optax.GradientTransformation:
    """Muon for matrix leaves, AdamW/NAdamW for the rest, as one optax transform.

    Args:
      learning_rate: Muon learning rate, a float >= 0 or an optax schedule
        (called with the step count, 0 at the first update).
      momentum, nesterov, momentum_form: Muon momentum (``"ema"`` or ``"classic"``).
      momentum_bias_correction: orthogonalise the bias-corrected momentum
        (optax.contrib.muon's rule, ``core.muon``): with nesterov a different
        mix, ``mu*B/(1-mu^(t+1)) + (1-mu)*g/(1-mu^t)``; default False.
      weight_decay: decoupled, ``W -= lr * weight_decay * W`` (Muon and fallback,
        unless ``fallback_weight_decay`` is set).
      weight_decay_mask: None (decay every leaf), or a pytree/prefix of bools,
        or a callable ``params -> such a pytree`` (True = decay), as in optax.
      eps_mode: ``"floor"`` (default: eps floors the scale-invariant prescale,
        acting on a zero matrix only) or ``"add"`` (optax's ``G / (||G|| + eps)``).
      ns_coefficients, ns_steps, eps, safety_factor: Newton-Schulz (core presets
        ``"quintic"``, ``"original"``, ``"polar_express"``, ``"polar_express_safer"``
        or ``(a, b, c)`` triples; ``ns_steps=None``: the preset's own count, 8
        for Polar Express, else 5).
      preconditioning: Newton-Schulz prescale, optax's names: ``"frobenius"``
        (default), ``"spectral"`` (exact top singular value: an SVD),
        ``"aol"`` (row scaling, often saves one step), ``"schatten"``.
      adaptive: scale each Muon update by ``<g_hat, O>`` (the bias-corrected
        momentum's inner product with its orthogonalisation: a nuclear-norm
        estimate, Bernstein & Newhouse), as optax's ``adaptive``.
      consistent_rms: RMS constant of ``adjust_lr_fn="match_rms_adamw"``
        (None = 0.2), optax's name.
      adjust_lr_fn: ``"match_rms_adamw"``, ``"original"``, ``"rms_to_rms"`` or ``"none"``.
      conv_mode, normalize_spatial: conv kernels, ``"flatten"`` (one matrix
        ``(out, in*kh*kw)``) or ``"batched"`` (one per tap).
      ns_dtype: Newton-Schulz compute dtype; None = float32 for bf16/f16 leaves,
        else the leaf dtype; ``"auto"`` = bfloat16 where the backend multiplies
        it natively (GPU/TPU), else as None.
      ns_method: ``"standard"`` or ``"gram"`` (Gram Newton-Schulz: the same
        polynomials iterated on the small Gram matrix, with restarts, where
        the long side exceeds 1.5 times the short one; ~0.6x the time at
        aspect 4 in float32; ``core.newton_schulz``).
      batched: stack same-shape matrices into one Newton-Schulz call:
        ``"auto"`` (default) where measured faster (accelerators always, small
        matrices on CPUs), or True / False.
      mu_dtype: dtype of Muon's momentum and the fallback's first moment
        (None: float32 for bf16/f16 leaves, else the leaf dtype).
      low_precision_dtype: bf16/f16 leaves' updates and state: ``"float32"``
        (default: ``apply_updates`` rounds into the param once) or ``"param"``
        (each leaf's own dtype, optax's convention: half the state memory,
        ``lax.cond`` branches agree); the arithmetic is float32 either way.
      fallback: ``"adamw"``, ``"nadamw"`` (timm's look-ahead) or
        ``"nadamw_dozat"`` (Dozat's, ``optax.nadamw``'s).
      fallback_learning_rate: float or schedule; None = ``learning_rate``.
      betas: the fallback's ``(beta1, beta2)``; each a float, a 0-d array or a
        schedule (called with the step count, like ``learning_rate``).
      fallback_eps, fallback_eps_root, fallback_weight_decay: the fallback's other
        hyperparameters (``fallback_eps_root``: optax's ``eps_root``, inside the sqrt).
      min_dim_size, max_aspect_ratio: thresholds of automatic routing; None =
        4 and 128.0 (core ``suitability``'s).  They shape the computation:
        Python numbers (or concrete arrays), never traced ones.
      labels: None (automatic), or a pytree/prefix of ``"muon"``/``"fallback"``/None,
        or a callable ``params -> such a pytree``; a dict may leave out keys
        (automatic).
      dimension_numbers: None/``"flax"`` (default), ``"torch"``, a
        ``MuonDimensionNumbers``, a pytree of them (None leaf = fallback) or a
        callable ``params -> such a pytree``.
      nonfinite: None (no check), ``"skip"``, ``"zero"`` or ``"raise"``
        (``xpopt.core.fault``; the state becomes :class:`NonfiniteState`).

    Continuous hyperparameters (learning rates, ``momentum``, weight decays,
    ``eps``, ``safety_factor``, ``fallback_eps``, ``consistent_rms``, betas) may
    be 0-d arrays, traced under ``jax.jit``: ``optax.inject_hyperparams(xo.muon)``
    works (see the module docstring).

    Returns an ``optax.GradientTransformationExtraArgs`` with state
    :class:`MuonAdamWState`; ``update`` needs ``params`` when weight decay is on.
    """
    record = CK.record_options("muon", args)
    args = {k: _real_part(v) for k, v in args.items()}
    mu_dt = _check_mu_dtype(args["mu_dtype"])
    betas, beta_scheds = _split_beta_schedules(args["betas"])
    # optax's names first (learning_rate, fallback_learning_rate), then the one definition.
    check_lr(args["learning_rate"], "learning_rate")
    if args["fallback_learning_rate"] is not None:
        check_lr(args["fallback_learning_rate"], "fallback_learning_rate")
    opts = S.options("optax.muon", args, betas=betas, ns_dtype=_not_injected(args["ns_dtype"], "ns_dtype"))
    fb = opts.fallback_options
    lr, flr = opts.lr, opts.fallback_lr_value
    wd, fwd = opts.weight_decay, opts.fallback_weight_decay_value
    min_dim, max_ratio = opts.min_dim_size, opts.max_aspect_ratio
    _check_dims_arg(dimension_numbers)
    if isinstance(labels, str):
        check_label(labels, "every leaf")
    warned: list = []

    def plan(tree):
        leaves, treedef, names = named_leaves(tree)
        n = len(leaves)
        labs = [None] * n if labels is None else _per_leaf(
            lambda t: _fill_labels(labels(t) if callable(labels) else labels, t), tree, treedef, "labels")
        dims = _dims_per_leaf(dimension_numbers, tree, treedef, n)
        if weight_decay_mask is None:
            decay = [True] * n
        else:
            decay = [check_decay_flag(f, nm) for f, nm in
                     zip(_per_leaf(weight_decay_mask, tree, treedef, "weight_decay_mask"), names)]
        return [
            plan_leaf(x, nm, label=lab, dims=d, decay=dc, min_dim_size=min_dim,
                        max_aspect_ratio=max_ratio)
            for x, nm, lab, d, dc in zip(leaves, names, labs, dims, decay)
        ]

    def init_fn(params):
        leaves, treedef, _ = named_leaves(params)
        plans = plan(params)
        muon_leaves = [x for x, p in zip(leaves, plans) if p.layout is not None]
        if muon_leaves:
            opts.warn_emulated_bf16(_native_bf16(muon_leaves[0]), warned)
        masked = optax.MaskedNode()
        mu, m, v = [], [], []
        for x, p in zip(leaves, plans):
            if p.layout is not None:
                mu.append(_zeros_like(x, _state_dtype(x, mu_dt, opts)))
                m.append(masked)
                v.append(masked)
            else:
                mu.append(masked)
                m.append(_zeros_like(x, _state_dtype(x, mu_dt, opts)))
                v.append(_zeros_like(x, _real_dtype(_stored_dtype(x.dtype, opts))))
        return MuonAdamWState(count=jnp.zeros([], jnp.int32), mu=treedef.unflatten(mu),
                              exp_avg=treedef.unflatten(m), exp_avg_sq=treedef.unflatten(v))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # optax convention: accept and ignore what other transforms need
        grads, treedef, names = named_leaves(updates)
        if params is not None:
            p_leaves = _flatten_up_to(treedef, params, "params")
            plans = plan(params)
        else:
            p_leaves = [None] * len(grads)
            plans = plan(updates)
        needs_params = any(p.decay and is_on(wd if p.layout is not None else fwd) for p in plans)
        if needs_params and params is None:
            raise ValueError(
                "weight decay needs the current parameters: call update(grads, state, params) "
                "(a weight decay given as an array, as optax.inject_hyperparams does, counts as on "
                "even when it is 0)")
        bufs = _flatten_up_to(treedef, state.mu, "state.mu")
        ms = _flatten_up_to(treedef, state.exp_avg, "state.exp_avg")
        vs = _flatten_up_to(treedef, state.exp_avg_sq, "state.exp_avg_sq")
        for nm, p, b, m, g in zip(names, plans, bufs, ms, grads):
            if isinstance(b if p.layout is not None else m, optax.MaskedNode):
                _dist.check_not_manual(g, nm, "Muon")  # a shard's shape routes differently: say why
                raise ValueError(
                    f"{nm} is routed to {'Muon' if p.layout is not None else 'the fallback'} now but "
                    "was not at init: labels/dimension_numbers must route the same way on every call")

        count = state.count
        count_inc = optax.safe_increment(count)
        lr_t = _lr_value(lr, count)
        flr_t = _lr_value(flr, count)
        fb_t = _fallback_at(fb, beta_scheds, count)
        new_m, new_v = list(ms), list(vs)

        # Muon leaves: momentum (elementwise, own layout), then one core call.
        # Deltas keep the leaf's compute dtype even if a hyperparameter array is wider.
        out, new_mu, done = _muon_directions(opts, grads, bufs, [p.layout for p in plans], names, count_inc,
                                             cast=False)
        for i in done:
            out[i] = apply_update(p_leaves[i], out[i], lr_t, wd if plans[i].decay else 0).astype(
                _stored_dtype(grads[i].dtype, opts))

        # Fallback leaves: core AdamW/NAdamW direction, 1-based step.
        for i, (g, p, m, v) in enumerate(zip(grads, plans, ms, vs)):
            if p.layout is not None:
                continue
            cdt = _compute_dtype(g.dtype)
            direction, m2, v2 = fb_t.direction(g.astype(cdt), m.astype(cdt), v.astype(_real_dtype(cdt)), count_inc)
            new_m[i], new_v[i] = m2.astype(m.dtype), v2.astype(v.dtype)
            out[i] = apply_update(p_leaves[i], direction, flr_t, fwd if p.decay else 0).astype(
                _stored_dtype(g.dtype, opts))

        new_state = MuonAdamWState(count=count_inc, mu=treedef.unflatten(new_mu),
                                   exp_avg=treedef.unflatten(new_m), exp_avg_sq=treedef.unflatten(new_v))
        return treedef.unflatten(out), new_state

    return described(with_nonfinite(optax.GradientTransformationExtraArgs(init_fn, update_fn), opts.nonfinite),
                     record)


#: The continuous hyperparameters: 0-d arrays (traced under ``jax.jit``) work for these.
INJECTABLE = ("learning_rate", "fallback_learning_rate", "momentum", "weight_decay",
              "fallback_weight_decay", "eps", "safety_factor", "fallback_eps", "fallback_eps_root",
              "consistent_rms")

#: Every :func:`muon` argument except the continuous hyperparameters
#: (:data:`INJECTABLE`), for ``optax.inject_hyperparams(xo.muon,
#: static_args=xo.STATIC_ARGS)``: the structural options (``ns_steps``,
#: ``min_dim_size``, ``max_aspect_ratio``) stay Python numbers, and callables that
#: are not schedules (``labels``, ``weight_decay_mask``, ``dimension_numbers``
#: functions, dtype classes) are not called with the step count.  Strings,
#: bools, None and tuples (``betas``) pass through either way.
STATIC_ARGS = tuple(n for n in inspect.signature(muon).parameters if n not in INJECTABLE)

#: The same for :func:`scale_by_muon` (``static_args`` must name its own arguments).
SCALE_BY_MUON_STATIC_ARGS = tuple(n for n in inspect.signature(scale_by_muon).parameters if n not in INJECTABLE)

