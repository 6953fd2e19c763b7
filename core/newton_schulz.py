"""Newton-Schulz orthogonalisation: ``G = U S V^T  ->  ~ U V^T``.

Each step applies the odd polynomial ``p(x) = a x + b x^3 + c x^5`` to the
singular values of ``X`` without an SVD::

    A = X X^H                      (X^T for real X)
    B = b A + c A A
    X = a X + B X

after a prescale (``preconditioning``) that puts every singular value in
[0, 1]:

``frobenius``  ``X = G / max(||G||_F * safety, eps * p2)`` (Keller Jordan's Muon).
``spectral``   ``X = G / max(||G||_2 * safety, eps * p2)``: the exact top singular
               value (an SVD: costly), so the largest one starts at 1.
``aol``        row scaling ``X = D^-1/2 G`` with ``D = diag(rowsum |G G^H|)``
               (Almost-Orthogonal-Layer, Boissin et al. 2025): ``||X||_2 <= 1``
               by Gershgorin, and the Gram matrix of the first step is reused.
``schatten``   ``X = G / ||G||_S4`` with ``||G||_S4^2 = ||G G^H||_F`` (Grishina
               et al. 2025): a tighter bound than Frobenius at no extra matmul.

``p2 = 2^floor(log2 max|G|)``: every mode first divides by this power of two
(exact) and floors what it measures on ``G / p2``, whose largest entry is in
[1, 2).  So the result is invariant to scaling ``G`` by any factor that keeps
its entries normal floats (float32: 1.2e-38 .. 3.4e38), and with the defaults
(``safety_factor >= eps``) the floor acts on a zero matrix only, which maps to
zero.  torch.optim.Muon and optax.contrib.muon floor or add eps to ``||G||``
itself, so they stop orthogonalising as ``||G||`` falls below eps.

``eps_mode="add"`` is optax.contrib.muon's placement instead: eps in ``G``'s
own units, ``X = G / (||G||_F * safety + eps)`` (``spectral``: ``||G||_2``),
and for ``aol`` / ``schatten``, which have no norm to add it to, the row sums
``rowsum |G G^H|`` / ``||G G^H||_F`` floored at eps unscaled (optax's clip).
The power-of-two division still runs first (``eps / p2`` is added to the
norm of ``G / p2``: the same quotient, no overflow); the result is no longer
scale-invariant: as ``||G||`` falls towards eps the input shrinks below the
unit ball and Newton-Schulz stops orthogonalising it.

``method="gram"`` (Gram Newton-Schulz, Zhang, Amsel, Chen & Dao 2026) runs
the same polynomials on a wide ``X`` (``m < n``) through ``m x m`` matrices
only.  Every iterate is ``X_k = Q_k X_0`` with ``Q_k`` a polynomial in
``R_0 = X_0 X_0^H``, so with ``P_k = a I + Z_k``, ``Z_k = b R_k + c R_k^2``::

    R = X X^H                      once
    Q = P_0 ;  Q = Q P_k           (k > 0)
    R = P_k R P_k                  the Gram matrix of the next iterate
    X = Q X                        once, at the end

``X`` is touched twice (``2 m^2 n``) instead of twice per step; the ``m x m``
work is ``(4 S - 3) m^3`` for ``S`` steps against ``S (2 m^2 n + m^3)``: less
whenever ``n > 1.5 m`` (0.56x the FLOPs at 1024 x 4096, 5 steps).  Narrower
matrices, square ones included, run the standard iteration.

Forming ``R`` squares the spectrum, so a rounding error ``d ~ u ||R||`` in an
eigenvalue of ``R`` (``u`` the compute dtype's unit roundoff) sits on
``sigma^2``, not ``sigma``; ``R = P R P`` then grows it by ``a^2`` per step in
the small directions, and an eigenvalue pushed below zero is not damped by
the polynomial but blown up.  So the iteration *restarts* (``X = Q X``,
``R = X X^H``, ``Q = I``) before the step where a scalar model of that error
says it would grow past its tolerance (:func:`gram_restarts`): in float32
``quintic`` never restarts and Polar Express once (before step 4); in bfloat16
``quintic`` restarts before steps 2 and 4 and Polar Express before 1, 2, 4
and 6.  A segment of one step is the standard step itself.

The row scaling of ``aol`` is not a scalar, so its output is the polar factor
of ``D^-1/2 G``, not of ``G``: close, and what optax computes.  For the other
modes the output's singular values are exactly ``p_k(...p_1(s))`` of the
prescaled ones; the presets trade exactness for speed, so they land in a band
around 1 rather than on it.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

from ..backends import resolve_dtype
from ._xp import check_floating, device, is_complex, is_number, namespace

__all__ = [
    "COEFFICIENTS", "PRECONDITIONINGS", "EPS_MODES", "DEFAULT_STEPS", "preset_steps", "resolve_coefficients",
    "orthogonalize", "scalar_iteration", "METHODS", "GRAM_TOLERANCE", "GRAM_RATIO", "GRAM_EPS", "gram_restarts",
    "gram_error",
]

PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")
#: Where ``eps`` enters the prescale (module docstring): a scale-invariant floor, or optax's ``||G|| + eps``.
EPS_MODES = ("floor", "add")
#: ``orthogonalize``'s iterations: the textbook one, and Gram Newton-Schulz (module docstring).
METHODS = ("standard", "gram")
#: The restart model (:func:`gram_restarts`) lets one Gram segment add to a
#: singular value up to GRAM_TOLERANCE, or GRAM_RATIO times the model's error
#: of the same steps run one at a time (the standard iteration), whichever is
#: larger.  2^-8 is one bfloat16 ulp at 1: below what a bf16 Newton-Schulz,
#: the usual one on GPUs, already errs by; it is what lets float32 run
#: ``quintic`` without a restart (model 2.2e-3; measured at most 8e-4, on
#: rank-deficient 24 x 64 matrices, and 3e-5 from 512 x 2048 on).  The ratio
#: sets the low-precision plans, where the model is pessimistic for both
#: iterations alike (bf16, ``quintic``: 0.42 for restarts before steps 2 and 4
#: against 0.14 one step at a time; measured 8e-3 against 3e-3).
GRAM_TOLERANCE = 2.0 ** -8
GRAM_RATIO = 4.0
#: Steps used with a single ``(a, b, c)`` triple when ``steps`` is None (Keller Jordan's 5).
DEFAULT_STEPS = 5

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


def _sequence(coefficients: CoefficientSpec) -> tuple[tuple[Triple, ...], bool]:
    """``(triples, is_single_triple)`` for a preset name, a triple or a list of triples."""
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENTS:
            raise ValueError(
                f"coefficients={coefficients!r} is not a preset; use one of {sorted(COEFFICIENTS)} "
                "or pass (a, b, c) triples"
            )
        seq = COEFFICIENTS[coefficients]
        return seq, len(seq) == 1
    if isinstance(coefficients, Sequence) and len(coefficients) == 3 and all(_is_real(v) for v in coefficients):
        return (_triple(coefficients, ""),), True
    if isinstance(coefficients, Sequence) and not isinstance(coefficients, (str, bytes)) and len(coefficients) > 0:
        return tuple(_triple(c, f"[{i}]") for i, c in enumerate(coefficients)), False
    raise ValueError(
        f"coefficients must be a preset name, an (a, b, c) triple or a non-empty list of triples, "
        f"got {coefficients!r}"
    )


def preset_steps(coefficients: CoefficientSpec) -> int:
    """Steps used when ``steps`` is None: one per listed triple, 5 for a single one.

    So ``"polar_express"`` runs its 8 tuned steps and ``"quintic"`` its 5,
    while Keller Jordan's single ``"original"`` triple is repeated 5 times.
    """
    seq, single = _sequence(coefficients)
    return DEFAULT_STEPS if single else len(seq)


def resolve_coefficients(coefficients: CoefficientSpec, steps: int | None = None) -> tuple[Triple, ...]:
    """Exactly ``steps`` triples: a preset name, one ``(a, b, c)`` or a list of them.

    ``steps=None`` takes :func:`preset_steps`.  A list shorter than ``steps``
    repeats its last triple (the converged polynomial); a longer one is
    truncated.
    """
    # Called once per matrix per step: remember hashable specs (names, tuples).
    # Only exact ints go through the cache: True == 1 would hit 1's entry.
    # A plain dict, not functools.lru_cache: torch.compile traces dict lookups
    # but warns on (and bypasses) lru_cache wrappers.
    if steps is None or type(steps) is int:
        try:
            hit = _RESOLVED.get((coefficients, steps))
        except TypeError:  # a list: unhashable
            return _resolve(coefficients, steps)
        if hit is None:
            hit = _resolve(coefficients, steps)
            if len(_RESOLVED) < 256:
                _RESOLVED[(coefficients, steps)] = hit
        return hit
    return _resolve(coefficients, steps)


_RESOLVED: dict = {}


def _resolve(coefficients, steps):
    seq, single = _sequence(coefficients)
    if steps is None:
        steps = DEFAULT_STEPS if single else len(seq)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (or None: the preset's own count), got {steps!r}")
    steps = int(steps)
    return tuple(seq[:steps]) + (seq[-1],) * max(0, steps - len(seq))


def scalar_iteration(s, coefficients: CoefficientSpec = "quintic", steps: int | None = None):
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
    steps: int | None = None,
    eps: float = 1e-7,
    safety_factor: float = 1.0,
    compute_dtype=None,
    preconditioning: str = "frobenius",
    scale=1.0,
    cast_back: bool = True,
    method: str = "standard",
    eps_mode: str = "floor",
):
    """Approximate the polar factor ``U V^H`` of ``G`` (shape ``(..., m, n)``) by Newton-Schulz.

    Args:
      G: 2-D matrix or a batch ``(..., m, n)`` of same-shape matrices; each is
        orthogonalised on its own.  Real or complex.  Tall matrices are
        transposed internally so the Gram matrix is the small side.
      coefficients: preset name (``original``, ``quintic``, ``polar_express``,
        ``polar_express_safer``), one ``(a, b, c)`` triple, or one per step.
      steps: number of iterations; None = :func:`preset_steps` (8 for the
        Polar Express presets, 5 otherwise).  A coefficient list is truncated
        or its last triple repeated to match.
      eps: floor of the prescale (the norm, or AOL's row sums), applied after
        dividing ``G`` by the power of two at or below its largest entry: so
        the result stays scale-invariant, and with ``safety_factor >= eps``
        only a zero matrix (which maps to zero) meets it.
      safety_factor: divide the prescaled matrix by this (>1 keeps the top
        singular value safely below 1, as Polar Express suggests: 1.01).
      compute_dtype: dtype for the iteration (``"bfloat16"``, ``"float32"``,
        a framework dtype, ``"auto"`` = bfloat16 where the device multiplies
        it natively (GPU, AMX / AVX512-BF16 CPU) else as None, or None for
        ``G.dtype``); the result is returned in ``G.dtype``.  For complex ``G``
        a real precision picks its complex counterpart.
      preconditioning: ``"frobenius"``, ``"spectral"``, ``"aol"`` or
        ``"schatten"`` (see the module docstring); optax's names.
      scale: multiplies the result; a Python number rides on the last step's
        fused GEMM for free (Muon's LR scale), an array is applied after.
      cast_back: return ``G.dtype`` (default); False keeps the compute dtype,
        saving a pass when the caller adds the result into a wider array
        anyway (the widening is exact).
      method: ``"standard"`` or ``"gram"``: Gram Newton-Schulz (module
        docstring), the same polynomials iterated on the ``m x m`` Gram matrix
        with the restarts of :func:`gram_restarts`; it runs where it needs
        fewer FLOPs, on matrices whose long side exceeds 1.5 times the short
        one (tall ones are transposed first).  Square and near-square
        matrices run the standard iteration.  Same result to rounding
        (:func:`gram_error`), every other argument unchanged.
      eps_mode: ``"floor"`` (default: the scale-invariant floor above) or
        ``"add"`` (optax's ``G / (||G|| * safety + eps)``; ``aol`` /
        ``schatten`` floor their unscaled row sums / norm at eps); module
        docstring.

    Returns ``scale`` times an array of ``G``'s shape (and dtype).
    """
    xp, backend = namespace(G, names=("G",))
    check_floating(xp, G, "G", complex_ok=True)
    if G.ndim < 2:
        raise ValueError(f"G must have at least 2 dimensions (..., m, n), got shape {tuple(G.shape)}")
    if is_number(eps) and not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if is_number(safety_factor) and not safety_factor > 0.0:
        raise ValueError(f"safety_factor must be > 0, got {safety_factor!r}")
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(f"preconditioning={preconditioning!r} is not valid; use one of {list(PRECONDITIONINGS)}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method={method!r} is not valid; use one of {list(METHODS)}")
    if not isinstance(eps_mode, str) or eps_mode not in EPS_MODES:
        raise ValueError(f"eps_mode={eps_mode!r} is not valid; use one of {list(EPS_MODES)}")
    coeffs = resolve_coefficients(coefficients, steps)
    cplx = is_complex(xp, G)
    cdtype = _compute_dtype(xp, backend, G, compute_dtype, cplx)

    in_dtype = G.dtype
    if 0 in tuple(G.shape):  # an empty matrix (or batch) has no norm and nothing to orthogonalise: zeros
        out = xp.zeros_like(G) if cdtype is None else xp.zeros(G.shape, dtype=cdtype, device=device(G))
        return out if out.dtype == in_dtype or not cast_back else xp.astype(out, in_dtype)
    X = G if cdtype is None or cdtype == in_dtype else xp.astype(G, cdtype)
    # Elementwise passes run before the transpose, on the contiguous layout
    # (strided passes over a transposed view cost 5-10x more on CPUs); both
    # norms are transpose-invariant, and the GEMMs take transposed views free.
    # Divide by a power of two near max|X| first: exact (no rounding), and it
    # makes every later square safe from over/underflow (1e30 squared
    # overflows float32, 1e-30 underflows).  A fresh cast is ours to overwrite
    # in place (an allocation less); G never is.
    #
    # eps floors the norm *after* that division (as aol/schatten's row sums), so
    # the prescale is X / max(||X|| * safety, eps * p2): invariant to scaling X
    # by any factor that keeps its entries normal floats.  A nonzero X / p2 has
    # an entry in [1, 2), so its norm is >= 1 and the floor only acts on a zero
    # matrix (which stays zero) or when safety_factor < eps.  (An absolute floor
    # max(||X||, eps) would stop orthogonalising below ||X|| = eps: a 1e-8
    # gradient got a different, smaller "orthogonal" update than a 1e-6 one.)
    div = backend.div_ if X is not G else (lambda x, y: x / y)
    # The backend's one-pass norm skips the power of two; that is exact only
    # where the floor cannot act on a nonzero X (safety_factor >= eps).
    fast = preconditioning == "frobenius" and is_number(eps) and is_number(safety_factor) \
        and safety_factor >= eps and eps_mode == "floor"
    norm = backend.frobenius_norm(X) if fast else None
    p2 = None
    if is_number(norm):  # a Python float in the backend's safe range: > 0
        X = div(X, norm * safety_factor)
    elif norm is not None:  # the backend's one-pass norm was safe; 0 only for a zero matrix
        X = div(X, xp.where(norm > 0, norm * safety_factor, xp.ones_like(norm)))
    else:
        p2 = _pow2_below(xp, _amax(xp, X))
        X = div(X, p2)
        if preconditioning in ("frobenius", "spectral"):
            X = backend.div_(X, _prescale(xp, X, preconditioning, eps, safety_factor,
                                          p2 if eps_mode == "add" else None))
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = xp.matrix_transpose(X)
    A = None
    if preconditioning in ("aol", "schatten"):
        X, A = _first_scaling(xp, X, preconditioning, eps, safety_factor, cplx,
                              p2 if eps_mode == "add" else None)
    fold = is_number(scale)
    s = float(scale) if fold else 1.0
    # Gram: where it saves FLOPs (2 n > 3 m, module docstring).  A plan that
    # restarts before every step is the standard iteration, op for op.
    restarts = _gram_plan(coeffs, float(xp.finfo(X.dtype).eps)) \
        if method == "gram" and 2 * X.shape[-1] > 3 * X.shape[-2] else tuple(range(1, len(coeffs)))
    bounds = (0, *restarts, len(coeffs))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo > 0 or A is None:  # aol/schatten hand the first step its Gram matrix
            A = X @ _adjoint(xp, X, cplx)
        t = s if hi == len(coeffs) else 1.0  # the scale rides on the last GEMM into X or Q
        if hi - lo == 1:  # one step: the standard one
            a, b, c = coeffs[lo]
            B = backend.addmm(A, A, A, beta=b, alpha=c)
            X = backend.addmm(X, B, X, beta=a * t, alpha=t)
        else:
            Q = _gram_segment(xp, backend, _at_least_32(xp, A), coeffs[lo:hi], t, cplx)
            X = (Q if Q.dtype == X.dtype else xp.astype(Q, X.dtype)) @ X
    if not fold:
        X = X * scale
    if X.dtype != in_dtype and cast_back:
        X = xp.astype(X, in_dtype)
    return xp.matrix_transpose(X) if transposed else X


def _at_least_32(xp, A):
    """``A`` in float32 (complex64) if it is narrower: the Gram iteration's ``m x m`` precision.

    ``P = a I + Z`` cancels where the iterate's singular values are large
    (Polar Express's first steps map 1 to 1.76: ``a = 3.9``, ``Z = -3.1``), and
    ``Z`` rounded to bfloat16 before the sum moved the result's top singular
    value by 0.04 to 0.17 (measured, 32 x 128); the standard step sums ``a X +
    B X`` inside the GEMM instead.  So in bf16 / f16 only the two products with
    ``X`` (``X X^H``, ``Q X``) stay narrow, as in the restart model.
    """
    wide = (xp.float32, xp.float64, xp.complex64, xp.complex128)
    return A if A.dtype in wide else xp.astype(A, xp.float32)


def _gram_segment(xp, backend, R, coeffs, s: float, cplx: bool):
    """``s * Q`` with ``Q X`` the iterate after ``coeffs`` (two or more steps) from ``X``, ``R = X X^H``.

    ``Q`` and every ``R`` are polynomials in the first ``R``, so they commute:
    ``Q_{k+1} = Q_k P_k`` and ``R_{k+1} = P_k R_k P_k`` with ``P_k = a I + Z_k``.
    ``Z`` takes ``R R^H`` for ``R^2`` (equal in exact arithmetic): NumPy runs a
    matrix times its own transpose as SYRK, half a GEMM, and it is Hermitian.
    """
    last = len(coeffs) - 1
    Q = None
    for k, (a, b, c) in enumerate(coeffs):
        Z = backend.addmm(R, R, _adjoint(xp, R, cplx), beta=b, alpha=c)
        t = s if k == last else 1.0
        if Q is None:
            eye = xp.eye(R.shape[-1], dtype=R.dtype, device=device(R))
            Q = Z + a * eye
        else:
            Q = backend.addmm(Q, Q, Z, beta=a * t, alpha=t)
        if k < last:
            RP = backend.addmm(R, R, Z, beta=a, alpha=1.0)
            R = backend.addmm(RP, Z, RP, beta=a, alpha=1.0)
    return Q


def gram_restarts(coefficients: CoefficientSpec = "quintic", steps: int | None = None, *,
                  eps: float = 2.0 ** -23) -> tuple[int, ...]:
    """Steps (0-based) before which ``method="gram"`` re-forms ``R = X X^H`` from the iterate.

    ``eps`` is the compute dtype's machine epsilon (``finfo(dtype).eps``:
    float32's by default).  The plan comes from a scalar model of the
    iteration on each singular value ``sigma`` in [0, 1]: the Gram matrix's
    eigenvalue ``x^2`` (``x`` the exact iterate at the segment's start) is
    perturbed by ``+-d``, ``d = u max x^2`` (``u = eps / 2``: one rounding
    relative to ``||R||``, the reference's ``-4e-4`` for float16), and the
    segment's ``Q`` evaluated on the perturbed value; the error is
    ``max(x, sqrt d) |q(x^2 +- d) - q(x^2)|`` (a direction of the perturbed
    ``R`` can carry ``X``'s mass up to ``sqrt d`` even where ``x`` is smaller)
    plus ``u max|q| max x``, the rounding of ``Q`` itself, which ``Q X``
    spreads over every direction.  Greedily, the longest segment whose error
    stays within :data:`GRAM_TOLERANCE` or :data:`GRAM_RATIO` times that of
    its steps run one at a time runs before the next restart.  (The
    reference, Dao-AILab/gram-newton-schulz, simulates the same scalar
    iteration with a ``-4e-4`` eigenvalue for float16 and places a chosen
    number of restarts, one for 5 steps by default, where the spread of
    ``q`` is least; here the count follows from the dtype and the error.)

    float64: none.  float32: ``original`` and ``quintic`` none, the Polar
    Express presets one, before step 4.  float16 and bfloat16: ``original``
    and ``quintic`` before steps 2 and 4; in bfloat16 both Polar Express
    presets before 1, 2, 4 and 6 (the first step's slope of 8 leaves no room
    for a longer first segment).
    Measured (float32, 16 x 40 to 512 x 2048, condition to 1e8 and
    rank-deficient): within 8e-4 of the exact singular values where the
    standard iteration is within 4e-5, and as close as it with a restart.
    """
    return _gram_plan(resolve_coefficients(coefficients, steps), float(eps))


def gram_error(coefficients: CoefficientSpec = "quintic", steps: int | None = None, *,
               eps: float = 2.0 ** -23, restarts=None) -> float:
    """The restart model's error for a plan (default :func:`gram_restarts`'): the sum over its segments.

    A model, conservative on the matrices we measured (module docstring of
    :data:`GRAM_TOLERANCE`), not a proof: tests derive tolerances from it.
    """
    coeffs = resolve_coefficients(coefficients, steps)
    plan = _gram_plan(coeffs, float(eps)) if restarts is None else tuple(restarts)
    traj = _exact_iterates(coeffs)
    bounds = (0, *plan, len(coeffs))
    return sum(_segment_error(traj[lo], coeffs[lo:hi], float(eps) / 2) for lo, hi in zip(bounds[:-1], bounds[1:]))


_PLANS: dict = {}
#: The presets' plans at their own step counts in float64, float32, float16 and
#: bfloat16, as :func:`gram_restarts` computes them (tests/test_gram_ns.py
#: checks): looked up, not computed, so that ``torch.compile`` never traces the
#: model (Python arithmetic on ~700 floats per step: 90 s of tracing).  Other
#: coefficients get theirs computed once, on first use
#: (``MuonOptions(ns_method="gram")`` does it when it is built).
GRAM_EPS = (2.0 ** -52, 2.0 ** -23, 2.0 ** -10, 2.0 ** -7)
_PRESET_PLANS = {
    "original": ((), (), (2, 4), (2, 4)),
    "quintic": ((), (), (2, 4), (2, 4)),
    "polar_express": ((), (4,), (1, 3, 5), (1, 2, 4, 6)),
    "polar_express_safer": ((), (4,), (1, 2, 4, 7), (1, 2, 4, 6)),
}
for _name, _plans in _PRESET_PLANS.items():
    for _eps, _plan in zip(GRAM_EPS, _plans):
        _PLANS[(resolve_coefficients(_name), _eps)] = _plan
#: The model's singular values: 0 and 60 per decade from 1e-12 to 1 (the
#: error peaks near sqrt(u), between 1e-8 and 1e-1 for the dtypes we have).
_GRID = (0.0, *(10.0 ** (e / 60.0) for e in range(-720, 1)))


def _gram_plan(coeffs: tuple, eps: float) -> tuple[int, ...]:
    key = (coeffs, eps)
    plan = _PLANS.get(key)
    if plan is None:
        u = eps / 2
        traj = _exact_iterates(coeffs)
        one = [_segment_error(traj[k], coeffs[k:k + 1], u) for k in range(len(coeffs))]
        out, start = [], 0
        for k in range(1, len(coeffs)):
            allowed = max(GRAM_TOLERANCE, GRAM_RATIO * sum(one[start:k + 1]))
            if not _segment_error(traj[start], coeffs[start:k + 1], u) <= allowed:  # nan: restart
                out.append(k)
                start = k
        plan = tuple(out)
        if len(_PLANS) < 256:
            _PLANS[key] = plan
    return plan


def _exact_iterates(coeffs: tuple) -> list:
    """The grid's singular values before each step (float64, Python floats)."""
    xs = list(_GRID)
    traj = [xs]
    for a, b, c in coeffs:
        xs = [x * (a + x * x * (b + c * x * x)) for x in xs]
        traj.append(xs)
    return traj


def _q(r: float, coeffs) -> float:
    q = 1.0
    for a, b, c in coeffs:
        z = a + r * (b + c * r)
        q *= z
        r *= z * z
    return q


def _segment_error(xs, coeffs, u: float) -> float:
    """The model's extra error of one Gram segment started from exact singular values ``xs``."""
    top = max(xs)
    d = u * top * top
    root = math.sqrt(d)
    worst = qmax = 0.0
    for x in xs:
        r = x * x
        q = _q(r, coeffs)
        for e in (_q(r - d, coeffs) - q, _q(r + d, coeffs) - q):
            e = max(x, root) * abs(e)
            if not e <= worst:  # also nan (an overflow): the segment fails
                worst = e if e == e else math.inf
        qmax = max(qmax, abs(q))
    return worst + u * qmax * top


def _adjoint(xp, X, cplx: bool):
    Xt = xp.matrix_transpose(X)
    return xp.conj(Xt) if cplx else Xt


def _compute_dtype(xp, backend, G, spec, cplx: bool):
    if isinstance(spec, str) and spec == "auto":
        spec = "bfloat16" if not cplx and backend.has_native_bf16(G) else None
    cdtype = resolve_dtype(xp, backend, spec, argname="compute_dtype")
    if cdtype is None or not cplx:
        return cdtype
    if cdtype == xp.float32 or cdtype == xp.complex64:
        return xp.complex64
    if cdtype == xp.float64 or cdtype == xp.complex128:
        return xp.complex128
    raise TypeError(f"compute_dtype={spec!r} has no complex counterpart; complex G computes in complex64 or complex128")


def _pow2_below(xp, amax):
    """``2^floor(log2(amax))``: a power of two in (amax/2, amax], exact to divide by.

    The exponent is kept where both ``p2`` and ``1/p2`` are normal numbers
    (float32: ``[2^-126, 2^126]``), so the division stays exact where it is
    computed as a multiplication by ``1/p2`` (XLA on CPU, which also flushes
    subnormals to zero: ``x / 2^127`` gave 0 there) and ``2^128`` (the
    exponent of an ``amax`` within 6e-6 of float32's max, where ``log2``
    rounds up) never overflows.  An ``amax`` above ``2^127`` then leaves
    ``X / p2`` in [2, 4): as good.  Device ops only: no host read, one graph
    under ``torch.compile``.
    """
    fi = xp.finfo(amax.dtype)
    lo = math.frexp(float(fi.smallest_normal))[1] - 1      # float32: -126
    hi = math.frexp(float(fi.max))[1] - 2                  # float32: 126
    return 2.0 ** xp.clip(xp.floor(xp.log2(amax)), float(lo), float(hi))


def _like(xp, v, ref):
    """A 0-d array hyperparameter in ``ref``'s dtype, so that it never widens the iteration.

    (An ``optax.inject_hyperparams`` float32 ``safety_factor`` would otherwise turn a
    bfloat16 Newton-Schulz into a float32 one; a Python float is weakly typed already.)
    """
    return v if is_number(v) else xp.astype(v, ref.dtype)


def _amax(xp, X):
    """Largest |entry| per matrix, 1 for all-zero ones (so dividing by it is safe)."""
    if is_complex(xp, X):
        amax = xp.max(xp.abs(X), axis=(-2, -1), keepdims=True)
    else:  # two read-only reductions instead of writing an |X| temporary
        amax = xp.maximum(xp.max(X, axis=(-2, -1), keepdims=True), -xp.min(X, axis=(-2, -1), keepdims=True))
    return xp.where(amax > 0, amax, xp.ones_like(amax))


def _prescale(xp, X, preconditioning: str, eps, safety_factor, p2=None):
    """``max(||X|| * safety, eps)`` per matrix (``X`` already has max|X| in [1, 2)).

    With ``p2`` (the power of two ``X`` was divided by; ``eps_mode="add"``):
    ``||X|| * safety + eps / p2``, i.e. ``||G|| * safety + eps`` in ``G``'s units.
    ``eps`` may be an array (an optax hyperparameter).
    """
    if preconditioning == "frobenius":
        norm = xp.linalg.vector_norm(X, axis=(-2, -1), keepdims=True)
    else:  # spectral: an SVD, done in at least float32 (no bf16 SVD anywhere)
        Y = X if X.dtype in (xp.float32, xp.float64, xp.complex64, xp.complex128) else xp.astype(X, xp.float32)
        norm = xp.linalg.matrix_norm(Y, ord=2, keepdims=True)
    norm = xp.astype(xp.abs(norm), _real_dtype(xp, X.dtype))  # real, also for complex X
    if p2 is not None:
        return norm * _like(xp, safety_factor, norm) + _like(xp, eps, norm) / xp.astype(p2, norm.dtype)
    return xp.maximum(norm * _like(xp, safety_factor, norm), _like(xp, eps, norm) * xp.ones_like(norm))


def _real_dtype(xp, dtype):
    if dtype == xp.complex64:
        return xp.float32
    return xp.float64 if dtype == xp.complex128 else dtype


def _at_least(xp, x, floor):
    """``max(x, floor)``: ``floor`` a number (or 0-d array) or an array broadcasting against ``x``."""
    if getattr(floor, "ndim", 0) > 0:
        return xp.maximum(x, floor)
    return xp.maximum(x, xp.full_like(x, floor))


def _first_scaling(xp, X, preconditioning: str, eps, safety_factor, cplx: bool, p2=None):
    """``(X, A = X X^H)`` after AOL's row scaling or the Schatten-4 prescale.

    Both are invariant to a scalar factor on ``X``, so the caller has divided
    ``X`` by a power of two near its largest entry (its Gram matrix could
    overflow otherwise); ``eps`` floors the rescaled row sums / norm, or with
    ``p2`` (``eps_mode="add"``) the unscaled ones (``eps / p2^2`` here).  The
    rescaled Gram matrix is then reused by the first Newton-Schulz step.
    """
    A = X @ _adjoint(xp, X, cplx)
    if p2 is not None:  # A is (G G^H) / p2^2
        p2 = xp.astype(p2, _real_dtype(xp, A.dtype))
        eps = (_like(xp, eps, p2) / p2) / p2
    if preconditioning == "aol":
        d = xp.sum(xp.abs(A), axis=-1, keepdims=True)          # (..., m, 1), real
        s = 1.0 / (xp.sqrt(_at_least(xp, d, eps)) * _like(xp, safety_factor, d))
        s = xp.astype(s, X.dtype) if cplx else s
        return X * s, A * (s * xp.matrix_transpose(s))
    r = xp.linalg.vector_norm(A, axis=(-2, -1), keepdims=True)  # ||X||_S4^2, real
    s2 = 1.0 / (_at_least(xp, r, eps) * _like(xp, safety_factor, r) ** 2)
    s2 = xp.astype(s2, X.dtype) if cplx else s2
    return X * xp.sqrt(s2), A * s2
