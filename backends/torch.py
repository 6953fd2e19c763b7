"""PyTorch backend: fused BLAS ``addmm``/``baddbmm`` and bf16 capability."""

import functools

import torch

from .generic import cond  # noqa: F401  (eager: a Python branch)

NAME = "torch"


def addmm(C, A, B, *, beta: float, alpha: float):
    # addmm/baddbmm pass beta and alpha straight to GEMM, so the scaled sum
    # costs no extra pass over memory (the reason this backend exists).
    if A.ndim == 2:
        return torch.addmm(C, A, B, beta=beta, alpha=alpha)
    batch = A.shape[:-2]
    if A.ndim == 3:
        return torch.baddbmm(C, A, B, beta=beta, alpha=alpha)
    A3 = A.reshape(-1, *A.shape[-2:])
    B3 = B.reshape(-1, *B.shape[-2:])
    C3 = C.reshape(-1, *C.shape[-2:])
    out = torch.baddbmm(C3, A3, B3, beta=beta, alpha=alpha)
    return out.reshape(*batch, *out.shape[-2:])


def lerp(start, end, weight):
    # One fused pass (torch.optim's own momentum kernel); a tensor weight must
    # match the dtype, a Python float is taken as is.
    if isinstance(weight, torch.Tensor) and weight.dtype != start.dtype:
        weight = weight.to(start.dtype)
    return torch.lerp(start, end, weight)


def lerp_(start, end, weight):
    if isinstance(weight, torch.Tensor) and weight.dtype != start.dtype:
        weight = weight.to(start.dtype)
    return start.lerp_(end, weight)


def div_(x, y):
    return x.div_(y)


MUTABLE = True

# Squares of |x| in [1e-15, 1e15]-normed matrices neither overflow nor lose
# the norm to underflow in float32/bf16 accumulation.
_SAFE_LO, _SAFE_HI = 1e-15, 1e15


def frobenius_norm(X):
    """One-pass ``||X||_F`` per matrix when it is safe, else None (core's path).

    CUDA: accumulate in float64 (no overflow or underflow for float32/bf16
    inputs, no host sync).  CPU: the plain float32 norm, checked on the host
    (a CPU sync is free) and refused when it left the safe range, e.g. 1e30
    or 1e-30 gradients, where torch's own norm returns inf or 0.  Under
    torch.compile core's path is used (no data-dependent branch).
    """
    if X.dtype == torch.float64 or X.is_complex() or torch.compiler.is_compiling():
        return None
    dims = (-2, -1)
    if X.device.type == "cpu":
        if X.ndim == 2:  # a Python float: core divides by a scalar, no small tensors
            n = float(torch.linalg.vector_norm(X))
            return n if _SAFE_LO <= n <= _SAFE_HI else None  # False for inf / nan too
        n = torch.linalg.vector_norm(X, dim=dims, keepdim=True)
        ok = bool(((n >= _SAFE_LO) & (n <= _SAFE_HI)).all())
        return n if ok else None
    return torch.linalg.vector_norm(X, dim=dims, keepdim=True, dtype=torch.float64).to(X.dtype)


def batch_limit(x) -> float:
    # CPU: baddbmm wins while dispatch overhead matters (bf16 0.29x of the loop
    # at 16 x 128^2, 0.70x at 256^2) and loses on GEMM-bound sizes (1.08x f32,
    # 1.20x bf16 at 512^2): up to 256^2*512.  CUDA/other devices: always.
    return 2.0 ** 25 if x.device.type == "cpu" else float("inf")


def bfloat16(xp):
    return torch.bfloat16


def is_traced(x) -> bool:
    return False


@functools.lru_cache(maxsize=None)
def _cpu_bf16_fast() -> bool:
    # AMX / AVX512-BF16 give x86 CPUs native bf16 GEMM; without them torch
    # emulates bf16 roughly 100x slower than float32 (measured on our CI CPUs).
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return False
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        pass
    return "amx_bf16" in flags or "avx512_bf16" in flags or cap.startswith("AMX")


def has_native_bf16(x) -> bool:
    if x.device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if x.device.type == "cpu":
        return _cpu_bf16_fast()
    return True


def rng_words(xp):
    """Threefry's 32-bit words: int64 holding [0, 2^32) (CPU uint32 tensors lack arithmetic)."""
    return torch.int64
