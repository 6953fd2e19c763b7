"""Muon for JAX as optax transforms: ``from xpopt.adapters import optax as xo``.

Update rule (the maths is ``xpopt.core``; this module only moves pytrees and
layouts).  For a Muon leaf ``W`` with gradient ``g``, step ``t = 1, 2, ...``::

    buf = mu * buf + (1 - mu) * g                  # momentum_form="ema" (default)
    u   = g + mu * (buf - g)  if nesterov else buf # "classic": buf = mu*buf + g
    O   = lr_scale(out, in) * orthogonalize(matrix(u))   # Newton-Schulz, core
    W  <- W - lr * O - lr * weight_decay * W       # decoupled, like optax.adamw

and for every other leaf (vectors, unsuitable shapes, leaves labelled
``"fallback"``) AdamW, or NAdamW with ``fallback="nadamw"``, with
``fallback_learning_rate``, ``betas``, ``fallback_eps`` and
``fallback_weight_decay``.  ``lr_scale`` follows ``adjust_lr_fn``
(``"match_rms_adamw"``: ``0.2 * sqrt(max(out, in))``, so one learning rate
serves both halves).

Two transforms:

* :func:`muon` -- the whole optimiser (Muon + fallback, weight decay,
  learning rates or schedules); its updates are the deltas to add with
  ``optax.apply_updates``.
* :func:`scale_by_muon` -- only ``lr_scale * orthogonalize(momentum)`` (a
  positive direction) for a tree of matrices; chain it with
  ``optax.scale_by_learning_rate`` (and anything else) yourself.

Layout.  flax stores a Dense kernel as ``(in, out)`` and a Conv kernel as
``(kh, kw, in, out)``; core works in torch's ``(out, in, kh, kw)``.
``dimension_numbers`` says which axes are fan-in and fan-out, in optax's
``MuonDimensionNumbers(reduction_axis=..., output_axis=...)`` style (other
axes are conv taps, handled by ``conv_mode``): ``None``/``"flax"`` (default:
last axis = out, second-to-last = in, leading axes spatial), ``"torch"``,
one ``MuonDimensionNumbers``, a pytree of them matching the params (``None``
leaf = not a matrix: fallback) or a callable ``params -> such a pytree``.
Each leaf is moved into core's layout and back, so fan-in/fan-out, the LR
scale and conv handling agree with the torch adapter.  A 3-D kernel such as
flax's ``DenseGeneral`` ``(in, heads, head_dim)`` needs explicit dimension
numbers (``reduction_axis=0, output_axis=(1, 2)``).

Routing.  ``labels=None`` sends a leaf to Muon iff core ``suitability`` accepts
its torch-layout shape (at least two non-unit dims, no unit out/in dim,
sides >= ``min_dim_size``, aspect ratio <= ``max_aspect_ratio``).  Otherwise
``labels`` is a pytree (or prefix) of ``"muon"`` / ``"fallback"`` / ``None``
(automatic) or a callable ``params -> such a pytree``.  A dict in it may name
only some keys of the params dict at the same place (``labels={"embed":
"fallback"}``): the others are automatic; a key the params lack is a ValueError.
Embeddings and output heads are usually labelled ``"fallback"``.

Precision.  bf16/f16 leaves keep float32 state (``mu_dtype=None``) and get
float32 updates, which ``optax.apply_updates`` adds and rounds into the param
once (``low_precision_dtype="float32"``, the default).
``low_precision_dtype="param"`` stores both in each leaf's own dtype instead,
optax's convention (half the state memory; every array keeps its param's dtype,
so ``lax.cond`` branches and ``lax.scan`` carries agree), at the cost of a
second rounding; the arithmetic is float32 either way.  ``ns_dtype=None`` runs Newton-Schulz in float32 for them and in the leaf
dtype otherwise; ``ns_dtype="bfloat16"`` is the GPU/TPU speed choice and warns
once on a CPU, where bf16 matmuls are emulated (~100x slower).

NaN policy.  ``nonfinite=None`` (default): no check, a NaN/Inf in a gradient
propagates into that leaf's state and update, as in optax itself.
``nonfinite="skip"`` / ``"zero"`` / ``"raise"``: the policy of
``xpopt.core.fault`` (skip the whole step leaving state untouched, zero the
entries, or raise; traced under jit ``"raise"`` acts as ``"skip"``); the state
is then a :class:`NonfiniteState` ``(inner, nonfinite_steps)``.

Example (flax nnx; embeddings and the head go to AdamW)::

    import jax, optax
    from flax import nnx
    from xpopt.adapters import optax as xo

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(256, 64, rngs=rngs)
            self.hidden = nnx.Linear(64, 64, rngs=rngs)     # kernel (in, out): Muon
            self.head = nnx.Linear(64, 256, rngs=rngs)
        def __call__(self, tokens):
            return self.head(jax.nn.gelu(self.hidden(self.embed(tokens))))

    def labels(params):   # a pytree of "muon" / "fallback" / None (automatic)
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "fallback" if path[0].key in ("embed", "head") else None, params)

    model = MLP(nnx.Rngs(0))
    tx = xo.muon(optax.cosine_decay_schedule(0.02, 1000), weight_decay=0.01, labels=labels)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, tokens, targets):
        def loss_fn(model):
            logits = model(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

With plain pytrees (linen, equinox, hand-written): ``state = tx.init(params)``;
``updates, state = tx.update(grads, state, params)``;
``params = optax.apply_updates(params, updates)``, all inside ``jax.jit``.

Hyperparameters at run time.  ``optax.inject_hyperparams(xo.muon)(learning_rate=0.02)``
works as for any optax optimizer: every number it is given (learning rates,
``momentum``, weight decays, ``eps``, ``safety_factor``, ``fallback_eps``,
``consistent_rms``) becomes a 0-d array in ``state.hyperparams``, which may be
changed between steps or given as a schedule (``momentum=schedule``).  Concrete
arrays are range-checked like numbers; traced ones (inside ``jax.jit``) are not.
``betas`` is a tuple, which ``inject_hyperparams`` passes through untouched:
schedule beta1/beta2 by giving a schedule as the tuple element,
``betas=(optax.linear_schedule(0.85, 0.95, 1000), 0.95)`` (called with the
step count, like ``learning_rate``), with or without ``inject_hyperparams``.
Options that shape the computation (``ns_steps``, ``min_dim_size``,
``max_aspect_ratio``) must stay Python numbers: their defaults (None) pass
through; if you set them, list them in ``static_args``.  So must callables
that are not schedules (``labels``, ``weight_decay_mask`` and
``dimension_numbers`` functions, dtype classes such as ``jnp.bfloat16``; a
dtype *name* such as ``"bfloat16"`` is fine): ``static_args=xo.STATIC_ARGS``
(``xo.SCALE_BY_MUON_STATIC_ARGS`` for :func:`scale_by_muon`) lists every such
option.  ``inject_hyperparams`` stores the numbers in the params' widest dtype
(bfloat16 params: momentum 0.95 becomes 0.9492; float16: ``fallback_eps`` 1e-8
becomes 0, and an all-zero gradient entry then gives NaN); for low-precision
params pass ``hyperparam_dtype=jnp.float32``, as for any optax optimizer.
"""

# The facade.  The package's modules, from the bottom up (none of them imports this one):
# states (the state types), fault and sharding (the nonfinite wrapper, mesh helpers),
# _muon and _kron (the transforms; private names, so that ``xo.muon`` is only ever the
# function), state_specs (PartitionSpecs of their states), mup (muP pieces).  The checkpoint
# exporter (.checkpoint) is loaded by xpopt.checkpoint when it is needed.

from .fault import NonfiniteState
from ._kron import (
    KRON_INJECTABLE, KRON_STATIC_ARGS, SCALE_BY_KRON_STATIC_ARGS, kron_plan, quad, scale_by_kron, scale_by_quad, scale_by_skew, skew,
)
from ._muon import (
    FLAX, INJECTABLE, SCALE_BY_MUON_STATIC_ARGS, STATIC_ARGS, TORCH, MuonDimensionNumbers, muon, scale_by_muon,
)
from .mup import (
    base_shapes, leaf_names, mup_init, mup_labels, mup_lr_multipliers, mup_plan, output_multipliers,
    print_effective_hparams, save_base_shapes, scale_by_mup,
)
from .state_specs import partition_specs
from .states import KronState, MuonAdamWState, MuonState

__all__ = [
    "muon", "scale_by_muon", "MuonState", "MuonAdamWState", "MuonDimensionNumbers",
    "FLAX", "TORCH", "STATIC_ARGS", "SCALE_BY_MUON_STATIC_ARGS", "INJECTABLE", "NonfiniteState",
    "KRON_INJECTABLE", "KRON_STATIC_ARGS", "SCALE_BY_KRON_STATIC_ARGS", "KronState", "kron_plan", "quad", "scale_by_kron", "scale_by_quad",
    "scale_by_skew", "skew",
    "base_shapes", "leaf_names", "mup_init", "mup_labels", "mup_lr_multipliers", "mup_plan",
    "output_multipliers", "print_effective_hparams", "save_base_shapes", "scale_by_mup",
    "partition_specs",
]
