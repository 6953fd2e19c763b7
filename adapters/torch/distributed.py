"""Multi-process steps for the torch adapters: FSDP2 (``fully_shard``) parameters.

Muon's orthogonalisation and Kron's preconditioner need each *full* matrix,
but under FSDP2 a parameter, its gradient and its optimizer state are
``DTensor`` s sharded on dim 0 over a 1-D device mesh; orthogonalising each
rank's shard on its own is a silent wrong answer (``torch.optim.Muon`` does
that).  Here every matrix gets one *owner* rank (size-balanced, the same
choice on every rank, from shapes only) and each step runs:

1. the elementwise part (Muon momentum, Kron momentum and bias correction) on
   the local shard, in place on the sharded state;
2. one ``all_to_all_single``: every rank sends each of its shards to that
   matrix's owner, which concatenates the rows into the full matrix;
3. the owner runs the unchanged ``core`` code on the matrices it owns (Muon:
   batched Newton-Schulz; Kron: factor fit and application, with its factors);
4. one ``all_to_all_single`` back: the owner sends each rank its rows of the
   update, which every rank applies to its shard.

Per step all ranks together send ``2 (W - 1) / W`` of those parameters' bytes
(each rank ``1/W`` of that: ``1/W`` of what FSDP's own ring all-gather plus
reduce-scatter send per rank for them), counted in :func:`bytes_sent`.

Kron's factors (``Ql``, ``Qr``, ``Ll``, ``Lr``) are per matrix: they live on
the owner rank only; the other ranks keep ``step``, ``key`` and the sharded
``mu``.  A checkpoint therefore reloads at the same world size (the owner
assignment depends on it); a rank that owns a matrix but has no factors for
it raises.

DDP needs nothing from here: its parameters are plain, replicated tensors with
all-reduced gradients, so every rank's optimizer computes the single-process
step.  Only ``torch.distributed`` collectives are used; ``core`` never sees
them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ...core import kron as K
from ...core.muon import batch_groups

__all__ = ["is_dtensor", "check_group", "sharded", "bytes_sent", "reset_bytes", "owners", "muon_group",
           "kron_group", "all_agree", "local", "gather_to_owners", "scatter_from_owners"]

_SENT = [0]  # bytes this process put on the wire (self-sends excluded)


def bytes_sent() -> int:
    """Bytes this process sent in optimizer collectives since :func:`reset_bytes`."""
    return _SENT[0]


def reset_bytes() -> None:
    _SENT[0] = 0


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch built without distributed
        return None, None
    return DTensor, Shard


def is_dtensor(x) -> bool:
    DTensor, _ = _dtensor_types()
    return DTensor is not None and isinstance(x, DTensor)


def sharded(params) -> bool:
    """True when the params are DTensors (``check_group`` made sure that means all of them)."""
    return bool(params) and is_dtensor(params[0])


def check_group(params, label: Callable[[int], str], who: str) -> None:
    """Reject what the owner-compute step cannot handle, naming the parameter and the fix.

    Called when a group is added, so a bad layout fails at construction, not
    several collectives into a step.
    """
    kinds = [is_dtensor(p) for p in params]
    if not any(kinds):
        return
    if not all(kinds):
        plain, dt = kinds.index(False), kinds.index(True)
        raise TypeError(
            f"{who}: parameter {label(plain)} is a plain tensor but parameter {label(dt)} of the same param "
            "group is a DTensor; shard the whole model with fully_shard before building the optimizer, or "
            "put the unsharded parameters in a param group of their own")
    _, Shard = _dtensor_types()
    mesh0 = params[0].device_mesh
    for i, p in enumerate(params):
        mesh, pl = p.device_mesh, tuple(p.placements)
        if mesh.ndim != 1 or len(pl) != 1:
            raise ValueError(
                f"{who}: parameter {label(i)} is a DTensor on a {mesh.ndim}-D device mesh with placements "
                f"{pl}; xpopt shards over a 1-D mesh only (fully_shard(model, mesh=init_device_mesh(..., "
                "(world_size,))), FSDP2's default). HSDP / tensor-parallel meshes are not supported")
        if not (isinstance(pl[0], Shard) and pl[0].dim == 0):
            raise ValueError(
                f"{who}: parameter {label(i)} has placement {pl[0]!r}; xpopt needs Shard(0), FSDP2's default "
                "(drop the shard_placement_fn that chose it, or return Shard(0) for this parameter)")
        if mesh != mesh0:
            raise ValueError(
                f"{who}: parameter {label(i)} is on device mesh {mesh}, parameter {label(0)} on {mesh0}; "
                "put parameters of different meshes in different param groups")


# ------------------------------------------------------------------ placement

def _rows(n: int, world: int) -> list[int]:
    """Rows of each rank under ``Shard(0)``: torch.chunk's split (ceil-sized, the tail short or empty)."""
    c = -(-n // world) if n else 0
    return [max(0, min(c, n - r * c)) for r in range(world)]


def owners(shapes, world: int) -> list[int]:
    """The owner rank of each matrix: greedy size balance, largest first, ties to the lowest rank.

    Cost is Newton-Schulz's ``min(m, n)^2 * max(m, n)`` (also the order of
    Kron's factor products); the order is by cost then index, so every rank
    gets the same answer from the same shapes.
    """
    def cost(s):
        m = s[0] if s else 1
        n = math.prod(s[1:]) if len(s) > 1 else 1
        return min(m, n) ** 2 * max(m, n)

    load = [0] * world
    out = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-cost(shapes[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += cost(shapes[i])
    return out


class _Comm:
    """The process group, rank and world size of a group of DTensor params."""

    def __init__(self, params):
        mesh = params[0].device_mesh
        self.pg = mesh.get_group()
        self.rank = dist.get_rank(self.pg)
        self.world = dist.get_world_size(self.pg)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # One uint8 buffer carries every dtype (bf16, complex) through gloo and NCCL alike.
    return t.reshape(-1).contiguous().view(torch.uint8)


def _from_bytes(b: torch.Tensor, dtype, shape) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    if b.storage_offset() % size:
        b = b.clone()  # view(dtype) needs an aligned offset
    return b.view(dtype).reshape(shape)


def _alltoall(chunks: list[list[torch.Tensor]], recv: list[int], comm: _Comm, device) -> list[torch.Tensor]:
    """``chunks[d]``: byte tensors for rank ``d``; ``recv[s]``: bytes coming from rank ``s``.

    Every rank derives ``recv`` from the shapes and dtypes (the same on all
    ranks), so one collective suffices, with no size exchange and no host sync.
    """
    send = [sum(c.numel() for c in cs) for cs in chunks]
    flat = [c for cs in chunks for c in cs]
    inp = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8, device=device)
    out = torch.empty(sum(recv), dtype=torch.uint8, device=device)
    dist.all_to_all_single(out, inp, output_split_sizes=recv, input_split_sizes=send, group=comm.pg)
    _SENT[0] += sum(s for d, s in enumerate(send) if d != comm.rank)
    return list(torch.split(out, recv))


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def gather_to_owners(local: list[torch.Tensor], shapes, own: list[int], comm: _Comm) -> dict:
    """Full matrices of the params this rank owns, from every rank's dim-0 shard.

    ``local[i]`` is this rank's shard of param ``i`` (any dtype, the same on
    every rank for a given ``i``); returns ``{i: full tensor}`` for the
    ``i`` with ``own[i] == rank``, in shard order (rank 0's rows first).
    """
    device = local[0].device if local else torch.device("cpu")
    chunks: list[list[torch.Tensor]] = [[] for _ in range(comm.world)]
    for i, t in enumerate(local):
        chunks[own[i]].append(_bytes(t))
    mine = [i for i in range(len(local)) if own[i] == comm.rank]
    rows = {i: _rows(shapes[i][0], comm.world) for i in mine}
    piece = {(i, s): (rows[i][s],) + tuple(shapes[i][1:]) for i in mine for s in range(comm.world)}
    recv = [sum(_nbytes(piece[i, s], local[i].dtype) for i in mine) for s in range(comm.world)]
    got = _alltoall(chunks, recv, comm, device)
    parts: dict = {i: [] for i in mine}
    for s in range(comm.world):
        off = 0
        for i in mine:
            n = _nbytes(piece[i, s], local[i].dtype)
            parts[i].append(_from_bytes(got[s][off:off + n], local[i].dtype, piece[i, s]))
            off += n
    return {i: torch.cat(parts[i]) for i in mine}


def scatter_from_owners(full: dict, like: list[torch.Tensor], shapes, own: list[int], comm: _Comm,
                        dtypes: Optional[list] = None) -> list[torch.Tensor]:
    """Each rank's dim-0 shard of every ``full[i]`` (computed on ``own[i]``); inverse of :func:`gather_to_owners`.

    ``dtypes[i]`` is the dtype the owner sends for param ``i`` (every rank
    must know it to cut its buffer); by default ``like[i]``'s.
    """
    dtypes = dtypes or [t.dtype for t in like]
    device = like[0].device if like else torch.device("cpu")
    chunks: list[list[torch.Tensor]] = [[] for _ in range(comm.world)]
    for i in sorted(full):
        rows = _rows(shapes[i][0], comm.world)
        f = full[i].to(dtypes[i])
        start = 0
        for d in range(comm.world):
            chunks[d].append(_bytes(f[start:start + rows[d]]))
            start += rows[d]
    mine = [(_rows(shapes[i][0], comm.world)[comm.rank],) + tuple(shapes[i][1:]) for i in range(len(like))]
    recv = [sum(_nbytes(mine[i], dtypes[i]) for i in range(len(like)) if own[i] == s) for s in range(comm.world)]
    got = _alltoall(chunks, recv, comm, device)
    out: list = [None] * len(like)
    offsets = [0] * comm.world
    for i in range(len(like)):
        s = own[i]
        n = _nbytes(mine[i], dtypes[i])
        out[i] = _from_bytes(got[s][offsets[s]:offsets[s] + n], dtypes[i], mine[i])
        offsets[s] += n
    return out


def _check_local_rows(params, labels, comm: _Comm, who: str) -> None:
    for i, p in enumerate(params):
        want = _rows(p.shape[0], comm.world)[comm.rank]
        if p.to_local().shape[0] != want:
            raise ValueError(
                f"{who}: parameter {labels(i)} has {p.to_local().shape[0]} local rows on rank {comm.rank}, "
                f"expected {want} (torch.chunk's even split of {p.shape[0]} rows over {comm.world} ranks, "
                "as fully_shard makes); shard it with fully_shard / distribute_tensor(..., [Shard(0)])")


# ------------------------------------------------------------------ Muon

def muon_group(opt, group: dict, params: list, grads: list, bufs: list, steps: list) -> None:
    """``Muon._muon_group`` for DTensor params: momentum on shards, NS on owners."""
    comm = _Comm(params)
    labels = lambda i: repr(opt._routes[params[i]].name)  # noqa: E731
    _check_local_rows(params, labels, comm, "Muon")
    momentum, directions, apply = opt._muon_parts(group, steps)
    updates = [momentum(b.to_local(), g.to_local(), t) for b, g, t in zip(bufs, grads, steps)]
    shapes = [tuple(p.shape) for p in params]
    own = owners(shapes, comm.world)
    full = gather_to_owners(updates, shapes, own, comm)
    mine = sorted(full)
    dirs = {}
    for idx in batch_groups([full[i] for i in mine], conv_mode=group["conv_mode"], batch=group["batched"]):
        ids = [mine[j] for j in idx]
        dirs.update(zip(ids, directions([full[i] for i in ids], [steps[i] for i in ids])))
    # Directions travel in the update's dtype (the state dtype): a bf16
    # Newton-Schulz result widens exactly, and every rank knows that dtype.
    local_d = scatter_from_owners(dirs, updates, shapes, own, comm)
    for p, d in zip(params, local_d):
        apply(p.to_local(), d)


def all_agree(ok: bool, device=None) -> bool:
    """True on every rank iff ``ok`` is True on every rank (one all-reduce of one byte)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.uint8, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def local(ts: list) -> list:
    """Local shards (views: in-place updates reach the DTensor) of DTensors; plain tensors as they are."""
    return [t.to_local() if is_dtensor(t) else t for t in ts]


# ------------------------------------------------------------------ Kron

def kron_group(opt, group: dict, opts, g_index: int) -> None:
    """``Kron.step`` for one group of DTensor params: momentum on shards, factors on owners."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    labels = lambda i: f"{opt._index[params[i]]} (group {g_index})"  # noqa: E731
    comm = _Comm(params)
    _check_local_rows(params, labels, comm, "Kron")
    shapes = [tuple(p.shape) for p in params]
    own = owners(shapes, comm.world)
    states, ms = [], []
    for i, p in enumerate(params):
        if p.grad.is_sparse:
            raise RuntimeError("Kron: sparse gradients are not supported (use dense gradients)")
        if opt.state[p]:
            st = opt.state[p]
        else:
            st = opt._init_state(p, group, opts)
            if own[i] != comm.rank:
                for k in K.Factors._fields:  # factors live on the owner only (module docstring)
                    st.pop(k, None)
        if own[i] == comm.rank and "Qr" not in st:
            raise RuntimeError(
                f"Kron: rank {comm.rank} owns parameter {labels(i)} but holds no preconditioner factors for "
                f"it: the state was saved at another world size than {comm.world} (factors live on the "
                "owner rank); load it with the world size that saved it")
        st["step"] += 1
        mu = st.get("mu")
        m, new_mu = K.momentum(p.grad.to_local(), None if mu is None else mu.to_local(), step=st["step"],
                               b1=opts.b1)
        if mu is not None:
            mu.to_local().copy_(new_mu)
        states.append(st)
        ms.append(m)
    full = gather_to_owners(ms, shapes, own, comm)
    dirs = {}
    for i in sorted(full):  # the owner: m is the whole matrix's momentum, so no mu here
        dirs[i] = opt._direction(params[i], states[i], full[i], None, opts)
    # D is float32 (float64 for float64 params) on every rank: the dtype of m.
    local_d = scatter_from_owners(dirs, ms, shapes, own, comm)
    for p, D in zip(params, local_d):
        opt._apply(p.to_local(), D, group)
