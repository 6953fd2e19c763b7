"""The JAX runner of the muP tools: the same 4-layer tanh MLP and data as ``torch_run``.

Plain ``jnp`` pytrees in flax layout (``{"input": {"kernel": (d_in, w),
"bias": (w,)}, ...}``), torch-Linear-like init (uniform ``+-1/sqrt(fan_in)``
for weights and biases, from ``jax.random`` with the seed), the rule applied
by ``adapters.optax.mup`` (``mup_init``, ``output_multipliers``,
``mup_lr_multipliers`` / ``scale_by_mup``, ``mup_labels`` for Muon's routing),
optimizers from optax and ``xpopt.adapters.optax``, a jitted train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _mup_models as MM
from ._mup_models import KRON_INIT_SCALE, MUON_FALLBACK_RATIO, activation_stats

#: Explicit roles: at the base width nothing grows, so role inference cannot tell
#: the first layer (``input``) from a hidden one; with Muon that would route the
#: input layer to Muon at the base width and to the fallback at every other width.
ROLES = {"input/kernel": "input", "output/kernel": "output"}


def _dims(width: int):
    return {"input": (MM.D_IN, width), "hidden1": (width, width), "hidden2": (width, width),
            "output": (width, MM.D_OUT)}


def init_params(width: int, seed: int = 0) -> dict:
    """Standard (torch ``nn.Linear``-like) init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, flax layout."""
    key = jax.random.PRNGKey(seed)
    params = {}
    for name, (fan_in, fan_out) in _dims(width).items():
        key, kw, kb = jax.random.split(key, 3)
        bound = 1.0 / np.sqrt(fan_in)
        params[name] = {"kernel": jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound),
                        "bias": jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)}
    return params


def base_params(width: int):
    """The base model's shapes (``jax.eval_shape``: nothing allocated)."""
    return jax.eval_shape(lambda: init_params(width, 0))


def forward(params, x, out_mult: float = 1.0, record: bool = False):
    """``(prediction, {layer: pre-activation})`` (the dict is empty unless ``record``)."""
    h, stats = x, {}
    for name in MM.LAYERS:
        inp = h * out_mult if name == "output" else h
        h = inp @ params[name]["kernel"] + params[name]["bias"]
        if record:
            stats[name] = h
        if name != "output":
            h = jnp.tanh(h)
    return h, stats


def make_optimizer(optimizer: str, lr: float, params, base, rule: str, roles=ROLES):
    """The optax transform of ``optimizer`` (``torch_run``'s choices) with the rule's LR multipliers."""
    from ..adapters import optax as xo
    from ..adapters.optax.mup import mup_labels, mup_lr_multipliers, scale_by_mup

    mults = mup_lr_multipliers(params, base, rule=rule, optimizer=optimizer, roles=roles,
                               muon_adjust_lr_fn="match_rms_adamw")
    if optimizer == "sgd":
        return optax.chain(optax.sgd(lr), scale_by_mup(mults))
    if optimizer == "adam":
        return optax.chain(optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8), scale_by_mup(mults))
    if optimizer == "muon":
        # Muon for the hidden matrices, its AdamW fallback (torch Muon's defaults) for the rest;
        # the multipliers scale both (fallback leaves carry the Adam column).
        labels = mup_labels(params, base, rule=rule, optimizer="muon", roles=roles)
        return optax.chain(xo.muon(lr, labels=labels, adjust_lr_fn="match_rms_adamw",
                                   fallback_learning_rate=lr * MUON_FALLBACK_RATIO), scale_by_mup(mults))
    if optimizer == "kron":
        return optax.chain(xo.scale_by_kron(preconditioner_update_probability=1.0, dtype="float32", b1=0.9,
                                                preconditioner_init_scale=KRON_INIT_SCALE),
                           scale_by_mup(mults), optax.scale_by_learning_rate(lr))
    raise ValueError(f"optimizer={optimizer!r} is not valid; use one of ['sgd', 'adam', 'muon', 'kron']")


def jax_run(width: int, *, optimizer: str, rule: str, lr: float, steps: int, base_width: int, seed: int = 0):
    """Train one width; returns ``(per-step losses, last activation stats)`` like ``torch_run``."""
    from ..adapters.optax.mup import mup_init, output_multipliers

    base = base_params(base_width)
    params = mup_init(init_params(width, seed), base, rule=rule, roles=ROLES)
    out_mult = output_multipliers(params, base, rule=rule, roles=ROLES).get("output/kernel", 1.0)
    tx = make_optimizer(optimizer, lr, params, base, rule)
    state = tx.init(params)
    x, y = (jnp.asarray(a) for a in MM.data(seed))
    record = jax.jit(lambda p: forward(p, x, out_mult, record=True))
    _, h0 = record(params)

    def loss_fn(p):
        return jnp.mean((forward(p, x, out_mult)[0] - y) ** 2)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    pred, h = record(params)
    losses.append(float(jnp.mean((pred - y) ** 2)))
    return losses, activation_stats(h0, h, lambda t: float(jnp.mean(jnp.abs(t))))
