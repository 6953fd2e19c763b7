"""Portable optimizer state: one file format for torch, optax and the arrays adapter.

::

    import xpopt.checkpoint as ckpt

    ckpt.save("run.xpopt.npz", opt)                 # torch Muon / Kron (or its state_dict())
    ckpt.save("run.xpopt.npz", state, params=params, optimizer=tx)  # optax state of xo.muon / xo.skew ...
                                                    # (or an arrays state, optimizer=arrays_opt)

    ckpt.load("run.xpopt.npz", like=opt)            # fills a torch optimizer in place (returns it)
    state = ckpt.load("run.xpopt.npz", like=tx.init(params), params=params, optimizer=tx)  # an optax state
    state = ckpt.load("run.xpopt.npz", like=arrays_opt.init(params), optimizer=arrays_opt)  # an arrays state

The file is a NumPy ``.npz`` (no pickle: ``np.load(..., allow_pickle=False)``
reads it) holding one array per piece of state and a JSON header in the
``__header__`` entry; the format, the array names and the version policy are
in ``docs/checkpoints.md``.  Parameters are paired by name when both sides
have names and they correspond (:func:`canonical_name`: torch's
``layers.0.w``, JAX's ``['layers'][0]['w']`` and ``layers/0/w`` are one
name), by order when a side has none (positional names) or ``match="order"``
is passed, and refused when names exist but disagree; ``names={target_name:
saved_name}`` pairs explicitly.  Shapes are checked.  A torch parameter and a
JAX leaf must have the same shape: for flax's ``(in, out)`` kernels either
keep the JAX params in torch's layout (``dimension_numbers=xo.TORCH``) or
transpose them and the state yourself.  The saved hyperparameters are
compared with the target's (:func:`check_hyperparameters`): a warning names
each that differs, an error each that changes what the state means.

Importing this module imports no framework (NumPy included): each side is
imported when it is used.
"""

from __future__ import annotations

from ._checkpoint_format import (COMPARED, FIELDS, FORMAT, FORMAT_VERSION, HEADER_KEY, MATCH,  # noqa: F401
                                 _MIGRATIONS, CheckpointError, Portable, canonical_name, check_hyperparameters,
                                 pair, read, record_options, write)

__all__ = ["save", "load", "export_state", "import_state", "read", "write", "canonical_name", "Portable", "FORMAT",
           "FORMAT_VERSION", "CheckpointError", "COMPARED"]


def _kind(obj) -> str:
    mod = type(obj).__module__ or ""
    if mod.startswith("torch") or "adapters.torch" in mod:
        return "torch"
    if "adapters.arrays" in mod:
        return "arrays"
    if isinstance(obj, dict) and "state" in obj and "param_groups" in obj:
        return "torch"  # a torch state_dict()
    try:
        import torch

        if isinstance(obj, torch.optim.Optimizer):
            return "torch"
    except ImportError:
        pass
    return "optax"


def export_state(source, *, params=None, names=None, hyperparameters=None, optimizer=None) -> Portable:
    """The :class:`Portable` state of ``source`` (see :func:`save` for what it may be)."""
    kind = _kind(source)
    if kind == "torch":
        from .adapters.torch.checkpoint import export_torch as f
    elif kind == "arrays":
        from .adapters.arrays.checkpoint import export_arrays as f
    else:
        from .adapters.optax.checkpoint import export_optax as f
    port = f(source, params=params, names=names)
    if optimizer is not None:
        port.hyperparameters = _options_of(optimizer, kind)
    if hyperparameters:
        port.hyperparameters.update(hyperparameters)
    return port


def import_state(port: Portable, like, *, params=None, names=None, match="auto", optimizer=None):
    """``like`` filled from ``port``: a torch optimizer in place (returned), else a new state."""
    kind = _kind(like)
    if kind == "torch":
        from .adapters.torch.checkpoint import import_torch as f
    elif kind == "arrays":
        from .adapters.arrays.checkpoint import import_arrays as f
    else:
        from .adapters.optax.checkpoint import import_optax as f
    if match not in MATCH:
        raise ValueError(f"match={match!r} is not one of {MATCH}")
    target = _options_of(optimizer, kind) if optimizer is not None else None
    return f(port, like, params=params, names=names, match=match, hyperparameters=target)


def _options_of(optimizer, kind) -> dict:
    if kind == "torch":
        raise TypeError("xpopt.checkpoint: optimizer= is for optax transforms and arrays optimizers; a torch "
                        "optimizer is the source / like itself")
    rec = getattr(optimizer, "hyperparameters", None)
    if not isinstance(rec, dict):
        raise TypeError(
            f"xpopt.checkpoint: optimizer={type(optimizer).__name__} carries no hyperparameters record; pass "
            "the transform returned by xo.muon / xo.scale_by_muon / xo.quad / xo.skew / xo.scale_by_kron (not a "
            "chain or inject_hyperparams around it), or arrays.muon / arrays.kron")
    return rec


def save(path, source, *, params=None, names=None, hyperparameters=None, optimizer=None) -> Portable:
    """Write ``source``'s optimizer state to ``path`` (an ``.npz``); returns what was written.

    ``source``: a torch ``Muon`` / ``Kron`` (preferred: it knows parameter
    names, routes and Kron's seed) or its ``state_dict()``; the state of
    ``xo.muon`` / ``xo.scale_by_muon`` / ``xo.quad`` / ``xo.skew`` /
    ``xo.scale_by_kron`` (alone or inside ``optax.chain`` / ``inject_hyperparams``;
    ``params`` gives the leaf names and dtypes); or the state of
    ``arrays.muon`` / ``arrays.kron``.  ``names``: torch only, a list of
    parameter names in param-group order (default: the names the optimizer
    was built with, else ``"group g, param i"``).  ``optimizer``: optax /
    arrays, the transform or optimizer the state belongs to: its
    hyperparameters are recorded in the header, so that a load can compare
    them (torch optimizers record their param groups themselves).
    ``hyperparameters``: extra JSON-able entries for the header.
    The write is atomic (a temporary file renamed over ``path``).
    """
    port = export_state(source, params=params, names=names, hyperparameters=hyperparameters, optimizer=optimizer)
    write(path, port)
    return port


def load(path, like, *, params=None, names=None, match="auto", optimizer=None):
    """Read ``path`` into ``like``: see :func:`import_state`.

    ``like``: a torch ``Muon`` / ``Kron`` (filled in place through its
    ``load_state_dict``, all or nothing), an optax state to take the shape of
    (``tx.init(params)``), or an arrays state (``opt.init(params)``).
    Parameters are paired by name where both sides have names that
    correspond (see :func:`pair`), else by order; ``match="order"`` pairs by
    order whatever the names, ``match="name"`` insists on names, and
    ``names={target_name: saved_name}`` pairs explicitly.  Shapes are checked.
    ``optimizer``: optax / arrays, the transform or optimizer ``like``
    belongs to (``tx``, ``opt``), whose hyperparameters are compared with the
    saved ones (torch: ``like``'s param groups are).  A difference is a
    ``UserWarning`` naming each option (the target's values are used), or a
    :class:`CheckpointError` for options that change what the state means or
    how it is laid out (:data:`COMPARED`).
    """
    return import_state(read(path), like, params=params, names=names, match=match, optimizer=optimizer)
