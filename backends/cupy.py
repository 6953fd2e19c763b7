"""CuPy backend (GPU): same in-place addmm as NumPy, cuBLAS underneath."""

from ._inplace import addmm  # noqa: F401

NAME = "cupy"


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
