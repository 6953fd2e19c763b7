"""Generic array-API path (array_api_strict and anything standard-only).

It uses nothing outside the standard, which is why array_api_strict running
through it is the guard that core/ stays inside the standard.
"""

NAME = "generic"


def addmm(C, A, B, *, beta: float, alpha: float):
    out = A @ B
    if alpha != 1.0:
        out = alpha * out
    if beta != 0.0:
        out = beta * C + out
    return out


def bfloat16(xp):
    raise TypeError(f"{getattr(xp, '__name__', xp)} has no bfloat16 dtype; use float32")


def is_traced(x) -> bool:
    return False


def has_native_bf16(x) -> bool:
    return False
