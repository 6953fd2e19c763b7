"""addmm for frameworks with NumPy-style ``out=`` ufuncs (NumPy, CuPy)."""


def addmm(C, A, B, *, beta: float, alpha: float):
    # A@B is a fresh array, so scaling and accumulating into it in place is safe
    # and saves the two temporaries of ``beta*C + alpha*(A@B)``.
    out = A @ B
    if alpha != 1.0:
        out *= alpha
    if beta != 0.0:
        out += beta * C
    return out


def lerp(start, end, weight):
    # One temporary instead of three; same formula as the generic backend.
    out = end - start
    out *= weight
    out += start
    return out


def lerp_(start, end, weight):
    """``start += weight * (end - start)`` in place (one temporary); returns ``start``."""
    d = end - start
    d *= weight
    start += d
    return start


def div_(x, y):
    x /= y
    return x
