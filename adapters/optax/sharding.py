"""Sharded params for the optax adapters: gather each matrix once, compute replicated, hand back sharded.

Newton-Schulz (Muon) and the Kron preconditioner contract whole matrices many
times per step.  Left to XLA's sharding propagation, a param sharded
``P('data', None)`` makes every one of those matmuls a collective (optax.contrib.muon
0.2.8, two 32x32 matrices on 8 CPU devices with Auto axes: 30 all-gathers at
``ns_steps=5``, 60 at 10; ``ShardingTypeError`` with Explicit axes).  Here each matrix that enters the
core maths is constrained to *replicated* once (one all-gather per sharded axis),
the core runs on every device without communication, and its result is pinned
replicated too (otherwise propagation pulls the output's sharding back into the
loop) and then resharded to the param's own sharding, a local slice.  The number of
collectives per step is therefore a function of the number of sharded leaves, not
of ``ns_steps``.

Both axis types work: the mesh is read from the traced value's type
(``jax.typeof(x).sharding.mesh``, which carries the abstract mesh under Auto axes
too), so no ``jax.set_mesh`` is needed.  With Explicit axes the param's spec is in
its type and the result is ``reshard``-ed back to it; with Auto axes the spec is not
known at trace time, and an exact elementwise identity on the gradient
(:func:`_follow`) lets XLA's propagation give the result the gradient's sharding.

No maths lives here; ``core`` stays free of sharding and collectives.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from .states import named_leaves

__all__ = ["gather", "restore", "check_not_manual", "param_spec", "validate_specs", "leaf_specs",
           "replicate_on_mesh"]


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _mesh_of(x):
    """The (abstract) mesh ``x`` is laid out on, or None for single-device / non-JAX values."""
    try:
        sh = jax.typeof(x).sharding
    except TypeError:  # numpy arrays, Python scalars
        return None
    mesh = getattr(sh, "mesh", None)
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    return mesh


def check_not_manual(x, name: str, what: str) -> None:
    """Refuse a per-device shard (inside ``shard_map``): the maths needs whole matrices."""
    try:
        aval = jax.typeof(x)
    except TypeError:
        return
    # Varying over a manual axis = each device holds different values (its shard).
    # A value replicated inside shard_map (psum-ed grads) is whole and fine.
    # (JAX 0.10 keeps it in ``aval.mat.varying``; earlier releases in ``aval.vma``.)
    mat = getattr(aval, "mat", None)
    manual = set(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())
    if manual:
        raise ValueError(
            f"{name} is a per-device shard over manual mesh axes {sorted(manual)} (inside shard_map): "
            f"{what} needs the whole parameter, and orthogonalising or preconditioning a shard is not a shard "
            "of the result. Call the optimizer outside shard_map, on params sharded with NamedSharding "
            "(jax.jit gathers each matrix once).")


def _replicated(x, mesh, concrete=None):
    """``x`` replicated over ``mesh`` (``concrete``: the concrete mesh, for eager values)."""
    if not _is_tracer(x):
        return jax.device_put(x, NamedSharding(concrete, P()))
    rep = NamedSharding(mesh, P())
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        x = jax.sharding.reshard(x, rep)
    if any(t == AxisType.Auto for t in mesh.axis_types):
        # A constraint, not a type: applied to both the input and the output of
        # the core maths, it keeps propagation out of the loop.
        x = jax.lax.with_sharding_constraint(x, rep)
    return x


def _concrete_mesh(x):
    if _is_tracer(x):
        return None
    sh = getattr(x, "sharding", None)
    return sh.mesh if isinstance(sh, NamedSharding) else None


def gather(x):
    """``x`` replicated over its mesh (one all-gather if it was sharded); unchanged off-mesh."""
    mesh = _mesh_of(x)
    if mesh is None or (not _is_tracer(x) and _concrete_mesh(x) is None):
        return x
    return _replicated(x, mesh, _concrete_mesh(x))


def restore(y, like):
    """``y`` (computed replicated from ``like``-shaped inputs) back on ``like``'s sharding.

    The replicated pin comes first so that, under Auto axes, the sharding of
    whatever consumes ``y`` is not propagated backwards into the computation of
    ``y``; the reshard after it is a local slice, no communication.
    """
    mesh = _mesh_of(like)
    if mesh is None:
        return y
    if not _is_tracer(y) and not _is_tracer(like):
        sh = getattr(like, "sharding", None)
        return jax.device_put(y, sh) if isinstance(sh, NamedSharding) else y
    y = _replicated(y, mesh)
    target = jax.typeof(like).sharding
    if any(t == AxisType.Explicit for t in mesh.axis_types) and target.spec != P():
        y = jax.sharding.reshard(y, target)
    if any(t == AxisType.Auto for t in mesh.axis_types) and y.shape == like.shape:
        y = _follow(y, like)
    return y


def _follow(y, like):
    """``y``, bit for bit, computed elementwise from ``like`` so that XLA gives it ``like``'s sharding.

    Under Auto axes ``like``'s spec is not known at trace time, and after the
    replicated pin nothing ties ``y`` to it: a jit returning ``y`` (an update
    without weight decay, which would add ``wd * param``) handed it back
    replicated.  ``select(p, y, 0)`` with ``p = (like == like) | (like != like)``,
    true for every value (NaN included) and not folded away before propagation
    (tests/test_dist_jax.py checks the shardings), is an
    elementwise op on ``like``, so propagation shards it like ``like``: a local
    slice of the replicated ``y``, no collective, and the pin keeps that
    sharding out of the computation of ``y``.  (``shard_alike`` would say this
    directly, but JAX 0.10 caches its lowering per shape, so every same-shape
    leaf of a jit lands in one sharding group.)
    """
    always = (like == like) | (like != like)
    return jax.lax.select(always, y, jax.numpy.zeros_like(y))


def replicate_on_mesh(tree, like_leaves):
    """``tree`` replicated on the mesh of the first concrete mesh-sharded leaf of ``like_leaves``.

    State made at init from nothing (Kron's factors and key) is otherwise committed to
    one device, and ``jax.jit`` refuses to mix it with params spread over a mesh.
    """
    mesh = next((m for m in (_concrete_mesh(x) for x in like_leaves) if m is not None and m.size > 1), None)
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))


# --------------------------------------------------------------------------- specs


def param_spec(x) -> P:
    """``x``'s PartitionSpec: concrete arrays and ShapeDtypeStructs by their sharding, Explicit
    tracers by their type, anything else (Auto tracers, numpy, single device) replicated."""
    sh = getattr(x, "sharding", None)
    if not isinstance(sh, NamedSharding):
        try:
            sh = jax.typeof(x).sharding
        except TypeError:
            sh = None
    spec = getattr(sh, "spec", None)
    return spec if isinstance(spec, P) else P()


def _spec_axes(spec: P):
    for entry in spec:
        if entry is None or entry is P.UNCONSTRAINED:
            continue
        yield from (entry if isinstance(entry, tuple) else (entry,))


def validate_specs(specs, shapes, names, mesh=None) -> None:
    """Every spec fits its param: rank, and (with a mesh) axes that exist and divide the dims."""
    axis_sizes = None if mesh is None else dict(mesh.shape)  # Mesh and AbstractMesh alike
    for spec, shape, name in zip(specs, shapes, names):
        if not isinstance(spec, P):
            raise TypeError(f"param_specs for {name} is {spec!r}, not a jax.sharding.PartitionSpec")
        if len(spec) > len(shape):
            raise ValueError(f"param_specs for {name}: {spec} has {len(spec)} entries but the param has "
                             f"shape {tuple(shape)} ({len(shape)} axes)")
        seen = set()
        for ax in _spec_axes(spec):
            if ax in seen:
                raise ValueError(f"param_specs for {name}: mesh axis {ax!r} is used twice in {spec}")
            seen.add(ax)
            if axis_sizes is not None and ax not in axis_sizes:
                raise ValueError(f"param_specs for {name}: mesh axis {ax!r} in {spec} does not exist; the "
                                 f"mesh has axes {tuple(axis_sizes)}")
        if axis_sizes is None:
            continue
        for dim, (entry, n) in enumerate(zip(spec, shape)):
            if entry is None or entry is P.UNCONSTRAINED:
                continue
            k = 1
            for ax in (entry if isinstance(entry, tuple) else (entry,)):
                k *= axis_sizes[ax]
            if n % k:
                raise ValueError(f"param_specs for {name}: axis {dim} of shape {tuple(shape)} has size {n}, "
                                 f"not divisible by the {k} devices of {entry!r}")


def leaf_specs(params, param_specs=None, mesh=None):
    """``(treedef, specs)``: one validated PartitionSpec per leaf of ``params`` (``param_specs``, else
    read from the params' shardings), checked against ``mesh`` (else the params' own mesh, if any)."""
    leaves, treedef, names = named_leaves(params)
    if param_specs is None:
        specs = [param_spec(x) for x in leaves]
    else:
        try:
            specs = treedef.flatten_up_to(param_specs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"param_specs does not match the params tree (one PartitionSpec per leaf): {e}") from None
    if mesh is None:  # validate against the params' own mesh where they have one
        mesh = next((m for m in (_concrete_mesh(x) for x in leaves) if m is not None), None)
    validate_specs(specs, [x.shape for x in leaves], names, mesh)
    return treedef, specs
