"""JAX backend: single-rounding low-precision ``addmm``; tracing awareness."""

import jax
import jax.numpy as jnp
from array_api_compat import device as array_api_compat_device

from .generic import addmm as _generic_addmm
from .generic import MUTABLE, div_, frobenius_norm, lerp, lerp_  # noqa: F401  (immutable: XLA fuses these)

NAME = "jax"

_LOW = (jnp.bfloat16, jnp.float16)


def addmm(C, A, B, *, beta: float, alpha: float):
    # For bf16/f16, accumulate the product and the scaled sum in float32 and
    # round once, as torch's addmm and a GPU GEMM epilogue do; rounding after
    # each of matmul, scale and add costs ~4x the bf16 error (measured: the
    # quintic band overshot by 0.023 instead of 0.004).  Under jit XLA fuses
    # the scale-and-add into the dot, so float32 inputs pay nothing extra.
    if A.dtype in _LOW:
        out = jnp.matmul(A, B, preferred_element_type=jnp.float32)
        if alpha != 1.0:
            out = alpha * out
        if beta != 0.0:
            out = beta * C.astype(jnp.float32) + out
        return out.astype(A.dtype)
    return _generic_addmm(C, A, B, beta=beta, alpha=alpha)


def batch_limit(x) -> float:
    # Under jit on CPU, XLA's batched dot loses to separate dots already at
    # 48^3 (1.08x; 0.56x at 32^3); accelerators always batch.
    if has_native_bf16(x):  # i.e. not on the CPU
        return float("inf")
    return 2.0 ** 15


def bfloat16(xp):
    return jnp.bfloat16


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def placement(x):
    """Where core puts new arrays made beside ``x`` (``device=``).

    ``x.sharding`` itself for a single device; replicated on ``x``'s mesh when
    ``x`` is spread over several devices, since a sharded spec such as
    ``P(None,)`` (how JAX writes a replicated rank-1 key under Explicit axes)
    is invalid for the scalars and other ranks core creates.
    """
    sh = x.sharding
    if len(sh.device_set) > 1 and isinstance(sh, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
    return array_api_compat_device(x)


def has_native_bf16(x) -> bool:
    # A tracer has no devices: ask where jit will run.  XLA's CPU backend has
    # no native bf16 dot (it converts), so only accelerators count.
    if is_traced(x):
        return jax.default_backend() != "cpu"
    try:
        platforms = {d.platform for d in x.devices()}
    except Exception:
        return False
    return bool(platforms - {"cpu"})


def cond(pred, true_fn, false_fn, operand):
    """``lax.cond``: ``pred`` may be traced."""
    if isinstance(pred, bool):
        return true_fn(operand) if pred else false_fn(operand)
    return jax.lax.cond(pred, true_fn, false_fn, operand)
