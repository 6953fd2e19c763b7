"""muP / spectral scaling for JAX pytrees and optax (``xpopt.adapters.optax``).

The rule table is ``xpopt.core.mup`` and the planning (roles, base shapes,
``fan_mapping``) ``xpopt.core.mup_plan``, shared with the torch helpers; this
module only names pytree leaves and turns the rows into pytrees and optax
transforms.

::

    import jax, optax
    from xpopt.adapters import optax as xo

    params = model.init(key, x)["params"]               # width 1024, flax defaults (SP)
    base = jax.eval_shape(lambda: small_model.init(key, x)["params"])   # width 128 (or a JSON path)
    params = xo.mup_init(params, base, rule="mup")      # rescale the standard init
    mults = xo.mup_lr_multipliers(params, base, rule="mup", optimizer="adam")
    tx = optax.chain(optax.scale_by_adam(), xo.scale_by_mup(mults), optax.scale_by_learning_rate(3e-3))
    out = xo.output_multipliers(params, base, rule="mup")   # {"Dense_3/kernel": 0.125}: the forward
    # applies it to the readout's input: logits = nn.Dense(d_out)(h * out["Dense_3/kernel"])

Names.  Every leaf is named by its pytree path, ``"/"``-joined (dict keys,
sequence indices, attribute names): ``"Dense_0/kernel"``, or
``"params/Dense_0/kernel"`` if the tree has a ``"params"`` level.  ``roles=``
(``{name or fnmatch pattern: role}``), ``fan_mapping=`` and a base-shapes dict
use these names; a pattern starting ``*/`` also matches at the top level
(``"*/pos_emb"`` names ``pos_emb`` and ``Block_0/pos_emb``).

Kinds and roles.  A leaf named ``embedding`` is an embedding (role ``input``);
a leaf with ``ndim <= 1`` a vector (``vector``); any other leaf (``kernel``,
conv kernels, ...) a linear weight in ``layout`` (``"flax"``: ``(*taps, in,
out)``; ``"torch"``: ``(out, in, *taps)``) whose role follows from which of
its fans grow against the base (fan-out only: ``input``; fan-in only:
``output``; both: ``hidden``).  At the base width nothing grows, so the last
linear leaf in flatten order is taken as the readout (``output``) and the
others as ``hidden``.  Flatten order sorts dict keys as strings (``Dense_10``
before ``Dense_2``), so the guess can be wrong; at the base width every
multiplier is 1 whatever the role, but the role still decides Muon's routing
and :func:`mup_labels`, so pass ``roles={"Dense_0/kernel": "input",
"head/kernel": "output"}`` where it matters (and always for a model whose
input or readout fans also grow).

Muon.  With ``optimizer="muon"`` only ``hidden`` matrices are Muon's;
every other leaf is routed to the AdamW fallback and takes the Adam column
(row ``"route"``: ``"muon"`` / ``"fallback"``, as the torch helper).  The
Muon multiplier *replaces* the adapter's ``adjust_lr_fn`` shape factor: give
the same ``muon_adjust_lr_fn`` here as to ``xo.muon``::

    labels = xo.mup_labels(params, base, optimizer="muon")      # "muon" / "fallback"
    mults = xo.mup_lr_multipliers(params, base, optimizer="muon")
    tx = optax.chain(xo.muon(0.02, labels=labels, adjust_lr_fn="match_rms_adamw"), xo.scale_by_mup(mults))

or with ``optax.multi_transform`` (one optimizer per label; the multipliers'
tree is the full params tree, ``scale_by_mup`` skips the masked leaves)::

    tx = optax.multi_transform(
        {"muon": optax.chain(xo.scale_by_muon(), xo.scale_by_mup(mults), optax.scale_by_learning_rate(0.02)),
         "fallback": optax.chain(optax.scale_by_adam(), xo.scale_by_mup(mults), optax.scale_by_learning_rate(3e-3))},
        labels)

For the other optimizers :func:`mup_labels` gives the role (``"input"``,
``"hidden"``, ``"output"``, ``"vector"``), e.g. to mask weight decay or to
give each role its own transform.

Tied embeddings (``embed.attend(h)`` as the readout): the table has the
embedding's ``input`` row; the readout's multiplier is
``core.mup.tied_output_multiplier`` of the embedding width:
``output_multipliers(params, base, tied=["embed/embedding"])`` adds it under the
embedding's name (``base_width / width`` under ``mup``, else 1).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from ...core import mup as M
from ...core import mup_plan as P

__all__ = ["mup_plan", "mup_lr_multipliers", "mup_labels", "mup_init", "output_multipliers", "scale_by_mup",
           "print_effective_hparams", "base_shapes", "save_base_shapes", "leaf_names"]

LAYOUTS = ("flax", "torch")


# --------------------------------------------------------------------------- names


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):      # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_name(path) -> str:
    return "/".join(_key_str(k) for k in path) if path else "params"


def _flatten(tree):
    """``(names, leaves, paths, treedef)`` of a params pytree."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [_path_name(p) for p, _ in path_leaves]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"pytree paths {sorted(dup)[:5]} give the same '/'-joined name; rename the keys")
    return names, [x for _, x in path_leaves], [p for p, _ in path_leaves], treedef


def leaf_names(params) -> list:
    """The ``"/"``-joined path of every leaf, in flatten order (the names ``roles=`` etc. use)."""
    return _flatten(params)[0]


def _shape(x, name) -> tuple:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ValueError(f"leaf {name!r} ({type(x).__name__}) has no shape: params and base must be pytrees of "
                         "arrays or jax.ShapeDtypeStruct")
    return tuple(int(d) for d in shape)


def base_shapes(params) -> dict:
    """``{name: shape}`` of a params pytree (arrays or ``jax.eval_shape`` output)."""
    names, leaves, _, _ = _flatten(params)
    return {n: _shape(x, n) for n, x in zip(names, leaves)}


def save_base_shapes(params_or_shapes, path) -> None:
    """Save a base model's leaf shapes as the base-shapes JSON (pass ``path`` as ``base`` later)."""
    if isinstance(params_or_shapes, Mapping) and all(isinstance(v, (tuple, list))
                                                     for v in params_or_shapes.values()):
        shapes = params_or_shapes
    else:
        shapes = base_shapes(params_or_shapes)
    P.save_base_shapes(shapes, path)


def _kind(name: str, shape: tuple) -> str:
    if name.rsplit("/", 1)[-1] == "embedding" and len(shape) == 2:
        return "embedding"
    if len(shape) <= 1:
        return "vector"
    return "linear"


#: How leaf names read, for the roles check's message.
_NAMES = "'/'-joined pytree paths; fnmatch patterns like 'Block_*/kernel'"


# --------------------------------------------------------------------------- plan


def mup_plan(params, base, *, rule: str = "mup", optimizer: str = "adam", roles: Optional[Mapping[str, str]] = None,
             layout: str = "flax", wd_scaling: str = "independent", muon_adjust_lr_fn: str = "match_rms_adamw",
             muon_rms: float = 0.2, fan_mapping: Optional[Mapping] = None) -> list[dict]:
    """One row per leaf (flatten order): ``name``, ``shape``, ``role``, fans, base fans,
    ``mult`` (:class:`core.mup.Multipliers`), ``route`` and ``path``.

    ``params``: a pytree of arrays (or ``ShapeDtypeStruct``).  ``base``: the
    base-width model's params pytree (or ``jax.eval_shape`` output), a
    ``{name: shape}`` dict or a base-shapes JSON path.  ``route`` is
    ``optimizer``, except with ``optimizer="muon"`` where non-hidden leaves
    are ``"fallback"`` and take the Adam column.
    """
    M.check_choice(layout, LAYOUTS, "layout")
    M.check_choice(rule, M.RULES, "rule")
    M.check_choice(optimizer, M.OPTIMIZERS, "optimizer")
    names, leaves, paths, _ = _flatten(params)
    shapes = [_shape(x, n) for n, x in zip(names, leaves)]
    P.check_roles(roles, names, hint=_NAMES)
    if fan_mapping:
        unknown = sorted(set(fan_mapping) - set(names))
        if unknown:
            raise ValueError(f"fan_mapping names {unknown[:5]} are not parameters; names are '/'-joined pytree "
                             f"paths such as {names[:4]}")
    bshapes = P.as_base_shapes(base, base_shapes)
    kinds = [_kind(n, s) for n, s in zip(names, shapes)]
    linear = [i for i, k in enumerate(kinds) if k == "linear"]
    last = linear[-1] if linear else -1
    entries = [P.Entry(n, s, k, last=(i == last)) for i, (n, s, k) in enumerate(zip(names, shapes, kinds))]
    rows = P.plan(entries, bshapes, rule=rule, optimizer=optimizer, roles=roles, layout=layout,
                  wd_scaling=wd_scaling, muon_adjust_lr_fn=muon_adjust_lr_fn, muon_rms=muon_rms,
                  fan_mapping=fan_mapping)
    for row, path in zip(rows, paths):
        row["path"] = path
        row["route"] = optimizer
        if optimizer == "muon":
            if row["role"] == "hidden" and len(row["shape"]) >= 2:
                row["route"] = "muon"
            else:   # Muon's fallback (AdamW) takes it: the Adam column applies
                row["route"] = "fallback"
                row["mult"] = M.multipliers(row["role"], rule, "adam", fan_in=row["fan_in"], fan_out=row["fan_out"],
                                            base_fan_in=row["base_fan_in"], base_fan_out=row["base_fan_out"],
                                            wd_scaling=wd_scaling, name=repr(row["name"]))
    return rows


def _tree_of(params, values):
    return jax.tree_util.tree_structure(params).unflatten(values)


def mup_lr_multipliers(params, base, **kw) -> Any:
    """A pytree like ``params`` of Python floats: each leaf's LR multiplier (for :func:`scale_by_mup`).

    Keyword arguments as :func:`mup_plan` (``rule``, ``optimizer``, ``roles``, ...).
    """
    return _tree_of(params, [r["mult"].lr for r in mup_plan(params, base, **kw)])


def mup_labels(params, base, **kw) -> Any:
    """A pytree like ``params`` of string labels for ``optax.multi_transform`` / ``xo.muon(labels=)``.

    ``optimizer="muon"``: the route, ``"muon"`` (hidden matrices) or
    ``"fallback"``; otherwise the role (``"input"``, ``"hidden"``, ``"output"``,
    ``"vector"``).  Keyword arguments as :func:`mup_plan`.
    """
    rows = mup_plan(params, base, **kw)
    muon = kw.get("optimizer") == "muon"
    return _tree_of(params, [r["route"] if muon else r["role"] for r in rows])


def mup_init(params, base, *, rule: str = "mup", roles: Optional[Mapping[str, str]] = None, layout: str = "flax",
             fan_mapping: Optional[Mapping] = None, optimizer: str = "adam") -> Any:
    """``params`` with every leaf multiplied by its ``init`` multiplier (a new pytree).

    ``params`` are taken as initialised in standard parametrisation (std
    ``~ fan_in^-1/2``: flax's lecun-normal defaults, torch-like uniform).
    Leaves whose multiplier is 1 are returned as they are.  The forward pass
    must also apply :func:`output_multipliers`.  ``optimizer`` is accepted
    for symmetry: init multipliers depend on the rule only.
    """
    rows = mup_plan(params, base, rule=rule, optimizer=optimizer, roles=roles, layout=layout, fan_mapping=fan_mapping)
    leaves = jax.tree_util.tree_leaves(params)
    out = [x if r["mult"].init == 1.0 else x * jnp.asarray(r["mult"].init, dtype=x.dtype)
           for x, r in zip(leaves, rows)]
    return _tree_of(params, out)


def output_multipliers(params, base, *, rule: str = "mup", roles: Optional[Mapping[str, str]] = None,
                       layout: str = "flax", fan_mapping: Optional[Mapping] = None,
                       tied: Sequence[str] = (), optimizer: str = "adam") -> dict:
    """``{name: multiplier}`` for the leaves whose output multiplier is not 1 (the readout under ``mup``).

    The forward pass applies it to the layer's input (``head(h * mult)``),
    which is the same as multiplying the weight in the forward pass only.
    ``tied``: names of embedding tables also used as the readout
    (``embed.attend``): each gets the readout multiplier
    ``core.mup.tied_output_multiplier`` of its width, under its own name,
    when that is not 1.
    """
    rows = mup_plan(params, base, rule=rule, optimizer=optimizer, roles=roles, layout=layout, fan_mapping=fan_mapping)
    out = {r["name"]: r["mult"].output for r in rows if r["mult"].output != 1.0 and len(r["shape"]) >= 2}
    by_name = {r["name"]: r for r in rows}
    for name in ([tied] if isinstance(tied, str) else tied):
        if name not in by_name:
            raise ValueError(f"tied={name!r} is not a parameter; names are '/'-joined pytree paths such as "
                             f"{list(by_name)[:4]}")
        r = by_name[name]
        mult = M.tied_output_multiplier(rule, width=r["fan_out"], base_width=r["base_fan_out"])
        if mult != 1.0:
            out[name] = mult
    return out


def print_effective_hparams(params, base, *, lr: Optional[float] = None, weight_decay: Optional[float] = None,
                            rule: str = "mup", optimizer: str = "adam", roles: Optional[Mapping[str, str]] = None,
                            file=None, **kw) -> str:
    """Print (and return) every leaf's role, init multiplier, LR, weight decay and output multiplier."""
    rows = mup_plan(params, base, rule=rule, optimizer=optimizer, roles=roles, **kw)
    text = f"rule={rule} optimizer={optimizer}\n" + P.format_table(rows, lr=lr, weight_decay=weight_decay)
    print(text, file=file)
    return text


# --------------------------------------------------------------------------- transform


def _skip(x) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def scale_by_mup(multipliers) -> optax.GradientTransformation:
    """Multiply each update leaf by its (LR) multiplier: a pytree like the params (:func:`mup_lr_multipliers`).

    Put it anywhere after the optimizer's direction in a chain; scaling is
    linear, so ``chain(scale_by_adam(), scale_by_mup(m), scale_by_learning_rate(lr))``
    is Adam with learning rate ``lr * m`` per leaf.  Leaves masked out by
    ``optax.masked`` / ``optax.multi_transform`` (``MaskedNode``) and None
    updates pass through, so the full-tree multipliers work inside either.
    Stateless (``optax.EmptyState``); the multipliers are constants under ``jax.jit``.
    """
    mults = multipliers

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        try:
            new = jax.tree.map(lambda u, m: u if _skip(u) else u * jnp.asarray(m, dtype=u.dtype),
                               updates, mults, is_leaf=_skip)
        except (ValueError, TypeError) as e:
            raise ValueError("scale_by_mup: the multipliers tree does not match the updates tree (build it with "
                             f"mup_lr_multipliers(params, base) from the same params). Details: {e}") from None
        return new, state

    return optax.GradientTransformation(init_fn, update_fn)
