"""Layouts for Kronecker-factored preconditioners: merge dims, tile, and back exactly.

Every parameter becomes a stack of 2-D blocks ``(S, tr, tc)`` that the Kron
update processes as one batch, each block with its own left and right
factor.  The layout is decided once, from the shape alone:

* 0-D / 1-D, and N-D shapes with a single non-unit dim: one row ``(1, k)``,
  right factor diagonal, no left factor (the seed's "one-D path").
* 2-D ``(m, n)`` (N-D: :func:`merge_dims` picks the most balanced 2-D view):
  a side longer than ``max_size_dense`` gets a diagonal factor and is never
  tiled; a dense side longer than ``block_size`` is cut into equal tiles of
  at most ``block_size`` (``ceil(n / ceil(n / block_size))``, so padding is
  below one row per tile, where the seed pads the last tile up to the full
  block and a 10x20 matrix to 256x256).  Padding is zeros; the factors are
  zero there too (identity on the valid part), so padded entries stay zero
  through every update and never reach the valid part.
* ``scanned=True``: the leading axis is a stack of layers, each laid out as
  above and stacked into the same batch.

:func:`to_blocks` and :func:`from_blocks` are exact inverses (reshapes,
transposes, slices and zero padding only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._xp import device, namespace

__all__ = ["Layout", "layout", "merge_dims", "tiles", "to_blocks", "from_blocks", "valid_sizes"]


def merge_dims(shape: tuple) -> tuple:
    """The 2-D view of ``shape`` with the smallest aspect ratio, or ``(k,)``.

    ``(k,)`` for 0-D and 1-D shapes and for shapes with at most one dim > 1
    (a ``(1, 1, k)`` kernel is a vector); 2-D shapes stay as they are; N-D
    shapes are split between two consecutive groups of dims, the first split
    with the smallest ``max/min`` winning ties.
    """
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    if len(shape) <= 1 or size == max(shape, default=1) or size == 0:  # empty: a (0,) vector
        return (size,)
    if len(shape) == 2:
        return shape
    best, split = math.inf, 1
    for s in range(1, len(shape)):
        left, right = math.prod(shape[:s]), math.prod(shape[s:])
        ratio = max(left, right) / min(left, right)
        if ratio < best:
            best, split = ratio, s
    return (math.prod(shape[:split]), math.prod(shape[split:]))


def tiles(n: int, block_size: int) -> tuple[int, int]:
    """``(count, tile)``: the fewest tiles of at most ``block_size`` covering ``n``, equal sized."""
    count = max(1, -(-n // block_size))
    return count, -(-n // count)


@dataclass(frozen=True)
class Layout:
    """How one parameter is preconditioned (static; decided at init from the shape).

    ``left`` / ``right``: ``"dense"``, ``"diag"`` or (left only) ``None``.
    The parameter (without its scanned axis) is viewed as ``(m, n)``, cut
    into ``nr x nc`` tiles of ``tr x tc``; blocks are ordered
    (layer, tile row, tile col), ``S = layers * nr * nc`` of them.
    """

    shape: tuple          # the parameter's shape
    scanned: bool
    layers: int           # leading scanned axis size (1 when not scanned)
    m: int
    n: int
    left: str | None
    right: str
    nr: int
    nc: int
    tr: int
    tc: int

    @property
    def blocks(self) -> int:
        return self.layers * self.nr * self.nc

    @property
    def padded(self) -> bool:
        return self.nr * self.tr != self.m or self.nc * self.tc != self.n

    def describe(self) -> str:
        def side(kind, count, t, full):
            if kind is None:
                return "none"
            if kind == "diag":
                return f"diag({full})"
            return f"dense({t}x{t})" + (f" x{count}" if count > 1 else "")

        view = f"{self.m}x{self.n}"
        stack = f"{self.layers} layers x " if self.scanned else ""
        return (f"{stack}{view}: left {side(self.left, self.nr, self.tr, self.m)}, "
                f"right {side(self.right, self.nc, self.tc, self.n)}, {self.blocks} block(s)")


def layout(shape, *, max_size_dense: int = 16384, block_size: int = 256, scanned: bool = False) -> Layout:
    """The :class:`Layout` of a parameter of ``shape`` (see the module docstring)."""
    shape = tuple(int(d) for d in shape)
    if scanned and not shape:
        raise ValueError("scanned=True needs a leading layer axis, got a 0-d parameter")
    layers, inner = (shape[0], shape[1:]) if scanned else (1, shape)
    merged = merge_dims(inner)
    if len(merged) == 1:
        k = merged[0]
        return Layout(shape, scanned, layers, 1, k, None, "diag", 1, 1, 1, k)
    m, n = merged

    def side(d):
        if d > max_size_dense:
            return "diag", 1, d
        count, t = tiles(d, block_size)
        return ("dense",) + (count, t)

    left, nr, tr = side(m)
    right, nc, tc = side(n)
    return Layout(shape, scanned, layers, m, n, left, right, nr, nc, tr, tc)


def _pad_axis(xp, x, axis: int, extra: int):
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[axis] = extra
    return xp.concat([x, xp.zeros(tuple(shape), dtype=x.dtype, device=device(x))], axis=axis)


def to_blocks(x, lay: Layout):
    """``x`` of ``lay.shape`` -> ``(S, tr, tc)`` blocks (zero padded)."""
    xp, _ = namespace(x, names=("x",))
    x = xp.reshape(x, (lay.layers, lay.m, lay.n))
    x = _pad_axis(xp, x, 1, lay.nr * lay.tr - lay.m)
    x = _pad_axis(xp, x, 2, lay.nc * lay.tc - lay.n)
    if lay.nr == 1 and lay.nc == 1:
        return x
    x = xp.reshape(x, (lay.layers, lay.nr, lay.tr, lay.nc, lay.tc))
    x = xp.permute_dims(x, (0, 1, 3, 2, 4))
    return xp.reshape(x, (lay.blocks, lay.tr, lay.tc))


def from_blocks(blocks, lay: Layout):
    """Inverse of :func:`to_blocks`: ``(S, tr, tc)`` -> an array of ``lay.shape``."""
    xp, _ = namespace(blocks, names=("blocks",))
    x = blocks
    if not (lay.nr == 1 and lay.nc == 1):
        x = xp.reshape(x, (lay.layers, lay.nr, lay.nc, lay.tr, lay.tc))
        x = xp.permute_dims(x, (0, 1, 3, 2, 4))
        x = xp.reshape(x, (lay.layers, lay.nr * lay.tr, lay.nc * lay.tc))
    if lay.padded:
        x = x[:, :lay.m, :lay.n]
    return xp.reshape(x, lay.shape)


def valid_sizes(lay: Layout) -> tuple[list[int], list[int]]:
    """Per block, the number of valid (unpadded) rows and columns."""
    rows = [min(lay.tr, lay.m - i * lay.tr) for i in range(lay.nr)]
    cols = [min(lay.tc, lay.n - j * lay.tc) for j in range(lay.nc)]
    vr = [r for _ in range(lay.layers) for r in rows for _ in cols]
    vc = [c for _ in range(lay.layers) for _ in rows for c in cols]
    return vr, vc
