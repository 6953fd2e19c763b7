"""PSGD Kron as optax transforms: ``scale_by_kron`` / ``scale_by_quad`` / ``scale_by_skew``, ``quad`` / ``skew``.

Option names and defaults are the seed's (eformer ``white_kron``): ``quad(learning_rate=1e-3,
lr_style="adam", b1=0.95, weight_decay=0.1, weight_decay_mask=None, normalize_grads=False,
max_size_dense=16384, preconditioner_lr=0.7, preconditioner_init_scale=1.0, dtype=jnp.bfloat16,
scanned_layers=None, block_size=256, noise_scale=1e-9)``, plus ``preconditioner_update_probability``,
``mu_dtype`` and ``seed``.  ``max_size_dense``, ``block_size`` and ``seed`` default to None
(16384, 256, 0) so that ``optax.inject_hyperparams(xo.quad)(learning_rate=...)`` leaves
them static.  The update rule is ``xpopt.core.kron``; ``quad`` / ``skew``
are ``chain(scale_by_*, add_decayed_weights(weight_decay, mask), scale_by_learning_rate)``.

State: :class:`KronState` (``count``, ``key`` = ``PRNGKey(seed)`` as 2 x uint32, ``mu``
(a params-like tree, None leaves when ``b1 == 0``), ``factors``: one
``core.kron.Factors`` per leaf, ``param_keys``: a params-like tree of each leaf's own
key, 2 x uint32).  Leaf ``i`` (flattening order) starts with the key ``fold_in(key, i)``
and draws its noise and its "fit this step?" decision from its key and the step: the
same numbers as ``xpopt.adapters.torch.Kron`` for the same seed and parameter order.
The key is state, so a checkpoint carries it with the parameter into any order.  Under
``jax.jit`` the decision is a ``lax.cond``.  With ``optax.inject_hyperparams``
list :data:`KRON_STATIC_ARGS` (``scale_by_kron``: :data:`SCALE_BY_KRON_STATIC_ARGS`) in ``static_args``
(the layout options shape the state).
``nonfinite=``: None (no check), ``"skip"``, ``"zero"`` or ``"raise"`` around the
whole transform (``xpopt.core.fault``; state ``NonfiniteState(inner, nonfinite_steps)``).
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ... import _checkpoint_format as CK
from ...core import blocking
from ...core import kron as K
from ...core import random as R
from ...core._xp import is_number
from ...core._check import check_hyper, check_lr, is_array_scalar, is_traced, static_number
from .. import _signatures as S
from . import sharding as _dist
from .fault import described, with_nonfinite
from .states import KronState, named_leaves

__all__ = ["scale_by_kron", "scale_by_quad", "scale_by_skew", "quad", "skew", "kron_plan",
           "KRON_INJECTABLE", "KRON_STATIC_ARGS", "SCALE_BY_KRON_STATIC_ARGS"]

def _dtype_name(v, argname):
    if v is None and argname == "mu_dtype":
        return None
    if is_array_scalar(v):
        raise TypeError(f"{argname} is an array: optax.inject_hyperparams calls dtype classes as schedules; "
                        f"give it by name ({argname}='bfloat16') or list it in static_args (xo.KRON_STATIC_ARGS)")
    name = v if isinstance(v, str) else getattr(jnp.dtype(v), "name", str(v))
    if name not in K.FACTOR_DTYPES:
        raise ValueError(f"{argname}={v!r} is not valid: factors are stored in bfloat16 or float32")
    return name


def _options(name: str, args: dict, **overrides) -> K.KronOptions:
    """``KronOptions`` from adapter ``name``'s arguments: dtypes by name, static None = the default."""
    args = dict(args)
    for k in ("dtype", "mu_dtype"):
        if k in args:
            args[k] = _dtype_name(args[k], k)
    for k in ("max_size_dense", "block_size"):
        if k in args:
            args[k] = static_number(args[k], k, integer=True)
    return S.options(name, args, **overrides)


def _momentum_dtype(opts, x):
    """The state-dtype rule (``KronOptions.momentum_dtype``): float32 for bf16/f16 leaves unless ``mu_dtype``."""
    bits = jnp.finfo(x.dtype).bits if jnp.issubdtype(x.dtype, jnp.floating) else 32
    mdt = opts.momentum_dtype(bits)
    return x.dtype if mdt is None else jnp.dtype(mdt)


def _layouts(tree, leaves, treedef, scanned_layers, opts):
    """Each leaf's ``core.blocking`` layout (``scanned_layers``: None, or a pytree of bools or a callable)."""
    if scanned_layers is None:
        scanned = [False] * len(leaves)
    else:
        scanned = treedef.flatten_up_to(scanned_layers(tree) if callable(scanned_layers) else scanned_layers)
    return [blocking.layout(x.shape, max_size_dense=opts.max_size_dense, block_size=opts.block_size,
                            scanned=bool(s)) for x, s in zip(leaves, scanned)]


def _step(leaves, state, treedef, lays, names, opts, use_mu):
    """One update of every leaf (``update_fn``'s body, eager or traced)."""
    count = optax.safe_increment(state.count)
    mus = treedef.flatten_up_to(state.mu) if use_mu else [None] * len(leaves)
    keys = treedef.flatten_up_to(state.param_keys)
    out, new_mu, new_f = [], [], []
    for i, (g, mu, f, lay) in enumerate(zip(leaves, mus, state.factors, lays)):
        _dist.check_not_manual(g, names[i], "Kron")
        cdt = jnp.float64 if g.dtype == jnp.float64 else jnp.float32
        like = _dist.replicate_on_mesh(jnp.zeros((0,), cdt), [g])  # eager: the noise beside the key
        # Momentum stays on the shards; only its bias-corrected result is gathered, once per
        # step, so the fit and the application run on the whole matrix (core.kron.kron_step).
        d, nm, nf = K.kron_step(g, mu, f, lay, key=keys[i], step=count, opts=opts, noise_like=like,
                                gather=_dist.gather)
        out.append(_dist.restore(d.astype(g.dtype), g))
        new_mu.append(nm)
        new_f.append(nf)
    mu_tree = treedef.unflatten(new_mu) if use_mu else state.mu
    return treedef.unflatten(out), KronState(count, state.key, mu_tree, tuple(new_f), state.param_keys)


# An update called eagerly (outside jax.jit) would dispatch the step op by op, and each op
# compiles on first use (the lax.cond of the fit, the Newton iterations, the noise): ~6x the
# time of compiling the whole step once.  So an eager call on concrete arrays that all sit on
# one device runs the step through this one module-level jit instead.  Its static argument is
# the configuration (every option that is a Python value, the tree, the layouts), so equal
# options share one compile across transform instances (optax.inject_hyperparams builds a new
# one every step); options that are 0-d arrays (inject_hyperparams' values) are traced
# arguments, so a new value does not recompile.  The maths is the traced path's (as under the
# caller's own jit), so results equal a jitted update's.  Traced inputs (the caller's jit,
# vmap, grad), arrays spread over several devices (sharding.py's eager paths) and non-JAX
# inputs keep the eager path, as does a configuration that cannot be traced (a
# preconditioner_update_probability callable that branches in Python on the step).
def _jitted(leaves, state, dyn, static):
    fields, treedef, lays, use_mu = static
    opts = K.KronOptions(**{name: v for name, _, v in fields}, **dyn)
    return _step(leaves, state, treedef, lays, ("",) * len(leaves), opts, use_mu)


_jitted_step = jax.jit(_jitted, static_argnums=3)
_UNTRACEABLE: set = set()  # static keys whose trace failed: those run eagerly


def _one_device(arrays):
    """The one device all ``arrays`` (concrete JAX arrays) are on, else None."""
    devices = set()
    for x in arrays:
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            return None
        devices |= x.sharding.device_set
        if len(devices) > 1:
            return None
    return next(iter(devices), None)


def _committed(tree, device):
    """``tree`` with every array committed to ``device`` (no copy: it is already there).  A jit's
    cache key includes whether each input is committed, and its outputs are committed while
    ``init``'s zeros are not: without this the second step would compile again."""
    return jax.tree.map(lambda x: x if x.committed else jax.device_put(x, device), tree)


def _compiled_step(opts, use_mu, treedef, lays, leaves, state):
    """The update run through :data:`_jitted_step`, or None where it takes the eager path."""
    dyn, fields = {}, []
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        if is_array_scalar(v):
            if not isinstance(v, jax.Array):
                return None
            dyn[f.name] = v
        else:
            fields.append((f.name, type(v), v))  # the type too: 1 and 1.0 trace alike, but say which
    device = _one_device([*leaves, *jax.tree.leaves(state), *dyn.values()])
    if device is None:
        return None
    static = (tuple(fields), treedef, lays, use_mu)
    try:
        if static in _UNTRACEABLE:
            return None
    except TypeError:  # an unhashable option (a callable object without __hash__)
        return None
    try:
        return _jitted_step(*_committed((leaves, state, dyn), device), static)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
            jax.errors.TracerIntegerConversionError):
        _UNTRACEABLE.add(static)
        return None


@S.takes("optax.scale_by_kron")
def scale_by_kron(**args) -> optax.GradientTransformation:
    """Kron preconditioning of the gradients (no LR, no weight decay): see the module docstring."""
    record = CK.record_options("kron", args)
    seed, scanned_layers, b1 = args.pop("seed"), args["scanned_layers"], args["b1"]
    opts = _options("optax.scale_by_kron", args)
    # seed is read by init only; under inject_hyperparams it arrives as an array
    # (traced inside a jitted update, where it is not needed).
    seed = None if is_array_scalar(seed) and is_traced(seed) else \
        K.KronOptions(seed=0 if seed is None else seed).seed
    fdt = jnp.dtype(opts.dtype)
    use_mu = not (is_number(b1) and b1 == 0)

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        lays = _layouts(params, leaves, treedef, scanned_layers, opts)
        like = jnp.zeros((0,), jnp.float32)
        factors = tuple(K.init_factors(like, lay, dtype=fdt, init_scale=opts.preconditioner_init_scale)
                        for lay in lays)
        # zeros_like: momentum lives where its param lives (sharded like it).
        mu = treedef.unflatten([jnp.zeros_like(x, dtype=_momentum_dtype(opts, x)) if use_mu else None
                                for x in leaves])
        if seed is None:
            raise TypeError("seed is traced: call init outside jax.jit, or list 'seed' in static_args")
        key = R.PRNGKey(seed, like=jnp.zeros((0,), jnp.uint32))
        root = R.PRNGKey(seed, like=np.zeros((0,), np.uint32))  # the same bits, on the host
        keys = treedef.unflatten([jnp.asarray(K.param_key(root, i), jnp.uint32) for i in range(len(leaves))])
        factors, key, keys = _dist.replicate_on_mesh((factors, key, keys), leaves)
        return KronState(jnp.zeros([], jnp.int32), key, mu, factors, keys)

    def update_fn(updates, state, params=None):
        leaves, treedef, names = named_leaves(updates)
        if not leaves:
            return updates, state
        lays = tuple(_layouts(updates, leaves, treedef, scanned_layers, opts))
        out = _compiled_step(opts, use_mu, treedef, lays, leaves, state)
        return out if out is not None else _step(leaves, state, treedef, lays, names, opts, use_mu)

    return described(with_nonfinite(optax.GradientTransformation(init_fn, update_fn), opts.nonfinite), record)


def scale_by_quad(**kw) -> optax.GradientTransformation:
    """:func:`scale_by_kron` with ``preconditioner_update_style="QUAD"``."""
    return scale_by_kron(preconditioner_update_style="QUAD", **kw)


def scale_by_skew(**kw) -> optax.GradientTransformation:
    """:func:`scale_by_kron` with ``preconditioner_update_style="skew"`` (Q0.5EQ1.5 + Procrustes)."""
    return scale_by_kron(preconditioner_update_style="skew", **kw)


def _full(style, args: dict):
    """``chain(scale_by_kron, add_decayed_weights, scale_by_learning_rate)`` from quad's / skew's arguments."""
    args = dict(args)
    record = CK.record_options("kron", dict(args, preconditioner_update_style=style))
    learning_rate, weight_decay = args.pop("learning_rate"), args.pop("weight_decay")
    mask = args.pop("weight_decay_mask")
    nonfinite = args.pop("nonfinite")  # around the whole chain: a skipped step decays nothing either
    tx = [scale_by_kron(preconditioner_update_style=style, **args)]
    if not (is_number(weight_decay) and weight_decay == 0):
        check_hyper(weight_decay, "weight_decay")
        tx.append(optax.add_decayed_weights(weight_decay, mask))
    tx.append(optax.scale_by_learning_rate(check_lr(learning_rate, "learning_rate")))
    return described(with_nonfinite(optax.chain(*tx), nonfinite), record)


@S.takes("optax.quad")
def quad(**args) -> optax.GradientTransformation:
    """PSGD Kron with QUAD preconditioner updates, weight decay and LR (the seed's ``quad``)."""
    return _full("QUAD", args)


@S.takes("optax.skew")
def skew(**args) -> optax.GradientTransformation:
    """PSGD Kron with skew (Q0.5EQ1.5 + Procrustes) updates, weight decay and LR (the seed's ``skew``)."""
    return _full("skew", args)


@S.takes("optax.kron_plan")
def kron_plan(params, scanned_layers, **args) -> list[dict]:
    """Per leaf (by pytree path): layout, state bytes and FLOPs, before allocating anything.

    A list of dicts that prints as a table with totals (``print(xo.kron_plan(params))``,
    :class:`xpopt.core.kron.Plan`); ``params`` may be ``jax.eval_shape`` output."""
    opts = _options("optax.kron_plan", args)  # the options it does not take: KronOptions' defaults
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [x for _, x in paths]
    lays = _layouts(params, leaves, treedef, scanned_layers, opts)
    return K.Plan(K.plan_row(lay, opts, name=jax.tree_util.keystr(path) or "params",
                             param_bytes=jnp.dtype(x.dtype).itemsize)
                  for (path, x), lay in zip(paths, lays))


#: The continuous hyperparameters: 0-d arrays (traced under ``jax.jit``) work for these.
KRON_INJECTABLE = ("learning_rate", "b1", "weight_decay", "preconditioner_lr", "preconditioner_init_scale",
                   "noise_scale")
#: ``static_args`` for ``optax.inject_hyperparams(quad / skew)``: every other argument (they shape
#: the state or the computation).
KRON_STATIC_ARGS = tuple(n for n in inspect.signature(quad).parameters if n not in KRON_INJECTABLE)
#: The same for ``scale_by_kron``.
SCALE_BY_KRON_STATIC_ARGS = tuple(n for n in inspect.signature(scale_by_kron).parameters if n not in KRON_INJECTABLE)
