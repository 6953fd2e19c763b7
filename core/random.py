"""Threefry-2x32, JAX's counter-based generator, in array-API integer ops.

The same key gives the same bits on NumPy, torch, JAX (eager and jitted),
CuPy and array_api_strict, and they are ``jax.random``'s bits
(``jax_threefry_partitionable``, JAX's default since 0.5): ``bits``,
``uniform``, ``fold_in``, ``split`` and ``PRNGKey`` match ``jax.random``
exactly (tested).  A key is a ``(2,)`` array of 32-bit words.

Words are uint32 (wrapping arithmetic) on every backend except torch,
whose CPU uint32 tensors lack arithmetic: there they are int64 holding
``[0, 2^32)``, masked after each add and shift (``backend.rng_words``).

Floats: ``uniform`` is ``(bits >> 9) * 2^-23`` (exactly JAX's
``bitcast(bits >> 9 | 0x3f800000) - 1``): integer ops and one exact
conversion, so 0 ulp between backends.  ``normal`` is JAX's
``sqrt(2) * erfinv(u)``, ``u`` uniform on ``(-1, 1)``, with Giles'
single-precision ``erfinv`` polynomial (XLA's); it goes through ``log``
and ``sqrt``, whose last bit is the library's, so backends may differ by a
few float32 ulp (measured: tests/test_random.py).
"""

from __future__ import annotations

from ._xp import device, namespace

__all__ = ["PRNGKey", "threefry2x32", "fold_in", "split", "bits", "uniform", "normal", "as_key", "key_like"]

_MASK = 0xFFFFFFFF
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def _words(xp, backend):
    return backend.rng_words(xp) if hasattr(backend, "rng_words") else xp.uint32


def _c(xp, v, like):
    return xp.asarray(v, dtype=like.dtype, device=device(like))


def _wrap(x, masked: bool):
    return x & _MASK if masked else x


def _add(a, b, masked: bool):
    return _wrap(a + b, masked)


def _rotl(x, r: int, masked: bool):
    return _wrap((x << r) | (x >> (32 - r)), masked)


def threefry2x32(key, x0, x1):
    """The 20-round Threefry-2x32 block function of ``(x0, x1)`` (word arrays) under ``key``."""
    xp, _ = namespace(key, names=("key",))
    mk = key.dtype != xp.uint32             # int64 words (torch) wrap by masking
    k0, k1 = key[0:1], key[1:2]             # (1,), not 0-d: NumPy scalars would warn on wrap-around
    ks = (k0, k1, k0 ^ k1 ^ _c(xp, _PARITY, key))
    x0, x1 = _add(x0, ks[0], mk), _add(x1, ks[1], mk)
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = _add(x0, x1, mk)
            x1 = _rotl(x1, r, mk) ^ x0
        x0 = _add(x0, ks[(i + 1) % 3], mk)
        x1 = _add(_add(x1, ks[(i + 2) % 3], mk), _c(xp, i + 1, key), mk)
    return x0, x1


def as_key(key):
    """``key`` as this backend's word dtype (e.g. a stored int64 key for uint32 backends)."""
    xp, backend = namespace(key, names=("key",))
    w = _words(xp, backend)
    return key if key.dtype == w else xp.astype(key, w)


def key_like(key, like):
    """``key``'s words as a key of ``like``'s backend and device: a host key (NumPy) taken to
    the device that draws with it; a key of ``like``'s own type as it is."""
    if type(key) is type(like):
        return key
    xp, backend = namespace(like, names=("like",))
    return xp.asarray([int(key[0]), int(key[1])], dtype=_words(xp, backend), device=device(like))


def PRNGKey(seed: int, *, like):
    """``[seed >> 32, seed & 0xFFFFFFFF]`` like ``like``: ``jax.random.PRNGKey(seed)``'s data
    (JAX without ``jax_enable_x64`` drops the high word of seeds >= 2^32)."""
    xp, backend = namespace(like, names=("like",))
    seed = int(seed) % 2 ** 64
    return xp.asarray([seed >> 32, seed & _MASK], dtype=_words(xp, backend), device=device(like))


def _counter(xp, key, n: int):
    """Flat indices ``0..n-1`` as (hi, lo) words (hi is 0 below 2^32)."""
    lo = xp.arange(n, dtype=xp.int64 if n > 2 ** 31 - 1 else xp.int32, device=device(key))
    return xp.zeros((n,), dtype=key.dtype, device=device(key)), xp.astype(lo, key.dtype)


def fold_in(key, data):
    """``jax.random.fold_in(key, data)``'s data; ``data`` an int or 0-d integer array (may be traced)."""
    xp, _ = namespace(key, names=("key",))
    if isinstance(data, int):
        d = _c(xp, data & _MASK, key)
    else:
        d = _wrap(xp.astype(data, key.dtype), key.dtype != xp.uint32)
    y0, y1 = threefry2x32(key, xp.zeros((1,), dtype=key.dtype, device=device(key)), xp.reshape(d, (1,)))
    return xp.concat([y0, y1])


def split(key, num: int = 2):
    """``jax.random.split(key, num)``'s data: ``(num, 2)``."""
    xp, _ = namespace(key, names=("key",))
    hi, lo = _counter(xp, key, num)
    y0, y1 = threefry2x32(key, hi, lo)
    return xp.stack([y0, y1], axis=1)


def bits(key, shape):
    """``jax.random.bits(key, shape, uint32)``: words of ``shape``."""
    xp, _ = namespace(key, names=("key",))
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    hi, lo = _counter(xp, key, n)
    y0, y1 = threefry2x32(key, hi, lo)
    return xp.reshape(y0 ^ y1, shape)


def uniform(key, shape, dtype):
    """``jax.random.uniform(key, shape, float32)`` on ``[0, 1)``, bit-exact (float32 only)."""
    xp, _ = namespace(key, names=("key",))
    b = bits(key, shape) >> 9
    return xp.astype(b, dtype) * (2.0 ** -23)


# Giles (2010), "Approximating the erfinv function", single precision: XLA's ErfInv.
_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
            -0.00125372503, -0.00417768164, 0.246640727, 1.50140941)
_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
         -0.0076224613, 0.00943887047, 1.00167406, 2.83297682)


def _erfinv(xp, x):
    w = -xp.log1p(-x * x)
    small = w < 5.0
    wc = w - 2.5
    wt = xp.sqrt(xp.where(small, xp.full_like(w, 5.0), w)) - 3.0
    pc = xp.full_like(x, _CENTRAL[0])
    pt = xp.full_like(x, _TAIL[0])
    for a, b in zip(_CENTRAL[1:], _TAIL[1:]):
        pc = a + pc * wc
        pt = b + pt * wt
    return xp.where(small, pc, pt) * x


def normal(key, shape, dtype):
    """Standard normals: ``sqrt(2) * erfinv(u)``, ``u`` uniform on ``(-1, 1)`` as ``jax.random.normal``."""
    xp, _ = namespace(key, names=("key",))
    lo = -1.0 + 2.0 ** -24             # nextafter(-1, 0) in float32
    u = uniform(key, shape, xp.float32) * (1.0 - lo) + lo
    u = xp.maximum(u, xp.full_like(u, lo))
    return xp.astype(1.4142135 * _erfinv(xp, u), dtype)
