"""Newton-Schulz orthogonalisation: ``G = U S V^T  ->  ~ U V^T``.

Each step applies the odd polynomial ``p(x) = a x + b x^3 + c x^5`` to the
singular values of ``X`` without an SVD::

    A = X X^T
    B = b A + c A A
    X = a X + B X

after a Frobenius prescale ``X = G / max(||G||_F * safety_factor, eps)`` that
puts every singular value in [0, 1].  Because the iteration acts on singular
values only, the output's singular values are exactly ``p_k(...p_1(s))`` of
the prescaled ones; the presets trade exactness for speed, so they land in a
band around 1 rather than on it.
"""

from __future__ import annotations

import numbers
from typing import Sequence, Union

from ..backends import resolve_dtype
from ._xp import check_floating, namespace

__all__ = ["COEFFICIENTS", "resolve_coefficients", "orthogonalize", "scalar_iteration"]

Triple = tuple[float, float, float]
CoefficientSpec = Union[str, Sequence[float], Sequence[Sequence[float]]]

COEFFICIENTS: dict[str, tuple[Triple, ...]] = {
    # Keller Jordan's Muon: one cubic-ish quintic reused every step.
    "original": ((3.4445, -4.7750, 2.0315),),
    # Per-step tuned quintics (You Jiacheng / modded-nanogpt).
    "quintic": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
    # Polar Express (Amsel et al. 2025, arXiv:2505.16932), minimax-optimal per
    # step, derived with a 1e-2 safety margin on the top singular value.
    "polar_express": (
        (8.237312490495555, -23.157747414558198, 16.680568411445915),
        (4.082441999064835, -2.893047735332586, 0.5252849256975648),
        (3.9263479922546582, -2.8547468034765298, 0.5318022422894988),
        (3.2982187133085143, -2.424541981026706, 0.48632008358844075),
        (2.2970369434552573, -1.63662558125903, 0.4002628455953627),
        (1.8763805351440397, -1.2347896577722228, 0.35891887501668385),
        (1.8564423485617974, -1.2132449880935525, 0.3568003487825883),
        (1.8749994008682747, -1.2499988017229169, 0.3749994008546422),
    ),
    # The same construction with a 2e-2 margin (modded-nanogpt), for bf16.
    "polar_express_safer": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.0429299351667245, -2.808917465908704, 0.5000178451051299),
        (3.8916678022926563, -2.7724841532176825, 0.5060648178503389),
        (3.285753657755658, -2.3681294933425394, 0.46449024233003117),
        (2.3005307116270983, -1.6111665557258408, 0.3833374427545273),
        (1.8631210546382593, -1.2042160621002727, 0.3421879560523383),
        (1.8382572152247512, -1.1779263289537742, 0.3396513038637379),
        (1.8749999923301852, -1.2499999836060613, 0.374999991275876),
    ),
}


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _triple(item, where: str) -> Triple:
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 3 \
            or not all(_is_real(v) for v in item):
        raise ValueError(f"coefficients{where} must be a 3-sequence (a, b, c) of real numbers, got {item!r}")
    return tuple(float(v) for v in item)  # type: ignore[return-value]


def resolve_coefficients(coefficients: CoefficientSpec, steps: int) -> tuple[Triple, ...]:
    """Exactly ``steps`` triples: a preset name, one ``(a, b, c)`` or a list of them.

    A list shorter than ``steps`` repeats its last triple (the converged
    polynomial); a longer one is truncated.
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENTS:
            raise ValueError(
                f"coefficients={coefficients!r} is not a preset; use one of {sorted(COEFFICIENTS)} "
                "or pass (a, b, c) triples"
            )
        seq = COEFFICIENTS[coefficients]
    elif isinstance(coefficients, Sequence) and len(coefficients) == 3 and all(_is_real(v) for v in coefficients):
        seq = (_triple(coefficients, ""),)
    elif isinstance(coefficients, Sequence) and len(coefficients) > 0:
        seq = tuple(_triple(c, f"[{i}]") for i, c in enumerate(coefficients))
    else:
        raise ValueError(
            f"coefficients must be a preset name, an (a, b, c) triple or a non-empty list of triples, "
            f"got {coefficients!r}"
        )
    steps = int(steps)
    return tuple(seq[:steps]) + (seq[-1],) * max(0, steps - len(seq))


def scalar_iteration(s, coefficients: CoefficientSpec = "quintic", steps: int = 5):
    """Apply the step polynomials to singular values ``s`` (any array or float).

    This is what ``orthogonalize`` does to each prescaled singular value; tests
    use it in float64 as the exact expectation.
    """
    for a, b, c in resolve_coefficients(coefficients, steps):
        s2 = s * s
        s = s * (a + s2 * (b + c * s2))
    return s


def orthogonalize(
    G,
    *,
    coefficients: CoefficientSpec = "quintic",
    steps: int = 5,
    eps: float = 1e-7,
    safety_factor: float = 1.0,
    compute_dtype=None,
):
    """Approximate ``U V^T`` of ``G`` (shape ``(..., m, n)``) by Newton-Schulz.

    Args:
      G: 2-D matrix or a batch ``(..., m, n)`` of same-shape matrices; each is
        orthogonalised on its own.  Tall matrices are transposed internally so
        the Gram matrix is the small side.
      coefficients: preset name (``original``, ``quintic``, ``polar_express``,
        ``polar_express_safer``), one ``(a, b, c)`` triple, or one per step.
      steps: number of iterations; a coefficient list is truncated or its last
        triple repeated to match.
      eps: floor on the prescale norm; a zero matrix maps to zero.
      safety_factor: prescale by ``||G||_F * safety_factor`` (>1 keeps the top
        singular value safely below 1, as Polar Express suggests: 1.01).
      compute_dtype: dtype for the iteration (``"bfloat16"``, ``"float32"``,
        a framework dtype, or None for ``G.dtype``); the result is returned in
        ``G.dtype``.

    Returns an array of ``G``'s shape and dtype.
    """
    xp, backend = namespace(G, names=("G",))
    check_floating(xp, G, "G")
    if G.ndim < 2:
        raise ValueError(f"G must have at least 2 dimensions (..., m, n), got shape {tuple(G.shape)}")
    if not (eps >= 0.0):
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not (safety_factor > 0.0):
        raise ValueError(f"safety_factor must be > 0, got {safety_factor!r}")
    coeffs = resolve_coefficients(coefficients, steps)
    cdtype = resolve_dtype(xp, backend, compute_dtype, argname="compute_dtype")

    in_dtype = G.dtype
    X = G if cdtype is None or cdtype == in_dtype else xp.astype(G, cdtype)
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = xp.matrix_transpose(X)

    X = X / _prescale(xp, X, eps, safety_factor)
    for a, b, c in coeffs:
        A = X @ xp.matrix_transpose(X)
        B = backend.addmm(A, A, A, beta=b, alpha=c)
        X = backend.addmm(X, B, X, beta=a, alpha=1.0)

    if transposed:
        X = xp.matrix_transpose(X)
    return X if X.dtype == in_dtype else xp.astype(X, in_dtype)


def _prescale(xp, X, eps: float, safety_factor: float):
    """``max(||X||_F * safety, eps)`` per matrix, safe from over/underflow.

    Squaring 1e30 overflows float32 and 1e-30 underflows it, so the norm is
    taken of ``X / max|X|`` and scaled back: two cheap passes next to the
    iteration's GEMMs, and the same value as the plain norm where that is finite.
    """
    amax = xp.max(xp.abs(X), axis=(-2, -1), keepdims=True)
    one = xp.ones_like(amax)
    amax = xp.where(amax > 0, amax, one)
    norm = amax * xp.linalg.vector_norm(X / amax, axis=(-2, -1), keepdims=True)
    floor = xp.full_like(norm, eps)
    return xp.maximum(norm * safety_factor, floor)
