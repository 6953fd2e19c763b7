"""CuPy backend (GPU): same in-place addmm as NumPy, cuBLAS underneath."""

from ._inplace import addmm, div_, lerp, lerp_
from .generic import cond, frobenius_norm  # noqa: F401  (no one-pass safe norm: core's path)  # noqa: F401

MUTABLE = True
NAME = "cupy"


def batch_limit(x) -> float:
    return float("inf")  # GPU: one batched kernel instead of many launches


def bfloat16(xp):
    raise TypeError("cupy has no bfloat16 dtype; use compute_dtype='float32' (or float16) with cupy")


def is_traced(x) -> bool:
    return False


def has_native_bf16(x) -> bool:
    return False


def cuda_available() -> bool:
    """True when cupy is installed and sees at least one CUDA device (imports cupy lazily)."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
