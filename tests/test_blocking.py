"""core.blocking: layouts from shapes, and exact round trips on every backend.

Blocking is reshapes, transposes, slices and zero padding only, so the
round trips are compared with ``==`` (no tolerance).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from xpopt.core import blocking as B

ROUND_TRIP_SHAPES = [
    (), (1,), (7,), (1, 1), (1, 13), (13, 1), (17, 19), (257, 513), (3, 3, 5, 7, 11),
    (64, 3, 3, 3), (1, 1, 31), (2, 1, 1), (10, 20),
]


@pytest.mark.parametrize("shape", ROUND_TRIP_SHAPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 4, 16, 256])
def test_round_trip_exact(xp, shape, block_size):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape)
    x = xp.asarray(a)
    lay = B.layout(shape, block_size=block_size, max_size_dense=300)
    blocks = B.to_blocks(x, lay)
    assert tuple(blocks.shape) == (lay.blocks, lay.tr, lay.tc)
    back = xp.to_numpy(B.from_blocks(blocks, lay))
    assert back.shape == tuple(shape)
    np.testing.assert_array_equal(back, a.astype(np.float32))
    # padding is zeros and everything valid appears exactly once
    bl = xp.to_numpy(blocks)
    assert np.count_nonzero(bl) == np.count_nonzero(a)
    assert math.isclose(float(np.sum(bl, dtype=np.float64)), float(np.sum(a.astype(np.float32), dtype=np.float64)))


@pytest.mark.parametrize("shape", [(4, 6, 10), (3, 2, 3, 3), (5, 300)], ids=str)
def test_scanned_round_trip(xp, shape):
    a = np.random.default_rng(1).standard_normal(shape)
    lay = B.layout(shape, block_size=4, scanned=True)
    assert lay.layers == shape[0]
    blocks = B.to_blocks(xp.asarray(a), lay)
    # each layer's blocks are the unscanned layout's blocks of that layer
    inner = B.layout(shape[1:], block_size=4)
    per = inner.blocks
    for k in range(shape[0]):
        np.testing.assert_array_equal(xp.to_numpy(blocks)[k * per:(k + 1) * per],
                                      xp.to_numpy(B.to_blocks(xp.asarray(a[k]), inner)))
    np.testing.assert_array_equal(xp.to_numpy(B.from_blocks(blocks, lay)), a.astype(np.float32))


def test_tile_placement():
    """Block (i, j) of a 2-D layout holds rows i*tr.., cols j*tc.. of the matrix."""
    a = np.arange(10 * 9, dtype=np.float64).reshape(10, 9)
    lay = B.layout(a.shape, block_size=4)
    assert (lay.nr, lay.tr, lay.nc, lay.tc) == (3, 4, 3, 3)
    bl = B.to_blocks(a, lay)
    for i in range(lay.nr):
        for j in range(lay.nc):
            want = a[i * 4:(i + 1) * 4, j * 3:(j + 1) * 3]
            got = bl[i * lay.nc + j][:want.shape[0], :want.shape[1]]
            np.testing.assert_array_equal(got, want)
            assert not bl[i * lay.nc + j][want.shape[0]:].any()


@pytest.mark.parametrize("n,bs", [(1, 1), (1, 256), (256, 256), (257, 256), (513, 256), (1000, 7), (97, 10)])
def test_tiles_fewest_equal(n, bs):
    count, t = B.tiles(n, bs)
    assert t <= bs and count * t >= n
    assert count == math.ceil(n / bs)            # the fewest tiles
    assert count * t - n < count                 # padding below one row per tile


@pytest.mark.parametrize("shape,want", [
    ((), (1,)), ((5,), (5,)), ((1, 1, 7), (7,)), ((3, 4), (3, 4)), ((1, 4), (4,)), ((4, 1), (4,)),
    ((64, 3, 3, 3), (64, 27)), ((2, 3, 4, 5), (6, 20)), ((8, 8, 2), (8, 16)),
])
def test_merge_dims(shape, want):
    assert B.merge_dims(shape) == want


def test_merge_dims_most_balanced():
    for shape in [(3, 5, 7, 11), (2, 2, 2, 2, 2), (100, 2, 50), (7, 1, 9, 1, 2)]:
        m, n = B.merge_dims(shape)
        assert m * n == math.prod(shape)
        best = min(max(math.prod(shape[:s]), math.prod(shape[s:])) / min(math.prod(shape[:s]), math.prod(shape[s:]))
                   for s in range(1, len(shape)))
        assert max(m, n) / min(m, n) == best


def test_layout_sides():
    lay = B.layout((100, 20000), max_size_dense=16384, block_size=256)
    assert (lay.left, lay.right, lay.nr, lay.nc, lay.tc) == ("dense", "diag", 1, 1, 20000)   # diag sides never tiled
    lay = B.layout((20000,))
    assert (lay.left, lay.right, lay.m, lay.n) == (None, "diag", 1, 20000)
    lay = B.layout((768, 3072))
    assert (lay.left, lay.right, lay.nr, lay.tr, lay.nc, lay.tc) == ("dense", "dense", 3, 256, 12, 256)
    assert "dense(256x256) x3" in lay.describe()
    with pytest.raises(ValueError, match="scanned"):
        B.layout((), scanned=True)


def test_valid_sizes():
    lay = B.layout((10, 9), block_size=4)
    vr, vc = B.valid_sizes(lay)
    assert vr == [4, 4, 4, 4, 4, 4, 2, 2, 2] and vc == [3, 3, 3] * 3
