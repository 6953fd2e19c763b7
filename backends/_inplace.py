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
