"""The trace of a symmetric operator ``v -> A v`` by Hutchinson's estimator (pure torch; PROTOCOL §9).

tr(A) ≈ mean_j v_jᵀ A v_j over Rademacher probes v_j (Hutchinson 1990), optionally deflated by vectors
the caller already has. Probes come from a ``torch.Generator`` (a fresh one seeded 0 when none is
given), never from the global generator; under DDP pass ``reduce`` (an all-reduce mean) and the same
generator seed on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from bnlightning.callbacks.functional._vectors import Hvp, Vec, apply, check_like, dot, norm, orthogonalize_, random_like, scale_

__all__ = ["hutchinson_trace"]


def hutchinson_trace(
    hvp: Hvp,
    like: Mapping[str, Tensor],
    n_probes: int = 100,
    *,
    generator: torch.Generator | None = None,
    reduce: Callable[[Vec], Vec] | None = None,
    deflate: list[Vec] | None = None,
) -> tuple[float, float]:
    """Hutchinson's estimate of tr(H) and its standard error, optionally deflated.

    tr(H) ≈ (1/m) Σ_j v_jᵀ H v_j with v_j Rademacher (independent ±1 entries), m = ``n_probes``;
    each term is unbiased, so the standard error is the sample standard deviation of the
    terms over √m (NaN for m = 1). Its variance is 2 Σ_{a≠b} H_ab²: exact for a diagonal H.

    Deflation (the idea of Hutch++, with vectors the caller already has, e.g. the
    ``eigenvectors`` of :func:`top_eigenvalues`): with V the orthonormalized ``deflate``
    vectors and P = I − VVᵀ, tr(H) = Σ_i v_iᵀ H v_i + tr(PHP); the first part is computed
    exactly (one HVP per vector) and only tr(PHP) is estimated, with probes P z_j. Unbiased
    whatever V is; the variance drops by the part of H that V captures (the outliers that
    dominate a network Hessian's Frobenius norm). Holds len(deflate) + 2 parameter vectors.

    Args:
        hvp: ``v -> H v``.
        like: a dict with the parameters' keys, shapes, devices.
        n_probes: number of random probes (>= 1); HVPs = n_probes + len(deflate).
        generator: source of the probes; the global RNG is never used (fresh seed 0 if None).
        reduce: applied to every HVP result (DDP all-reduce mean).
        deflate: optional vectors whose span is handled exactly (need not be orthonormal).

    Returns:
        ``(estimate, standard_error)`` as floats.

    Raises:
        ValueError: ``n_probes`` < 1, a bad ``like`` or ``deflate`` vectors without its keys.

    Example::

        trace, se = hutchinson_trace(make_hvp(loss_of, params), params, n_probes=50)
        eig = top_eigenvalues(hvp, params, k=3)
        trace, se = hutchinson_trace(hvp, params, n_probes=50, deflate=eig.eigenvectors)
    """
    check_like(like)
    if not isinstance(n_probes, int) or isinstance(n_probes, bool) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    basis, exact = _deflation(hvp, like, reduce, deflate or [])
    terms = []
    for _ in range(n_probes):
        v = random_like(like, gen, rademacher=True)
        orthogonalize_(v, basis)
        terms.append(dot(v, apply(hvp, reduce, v)))
    t = torch.tensor(terms, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(n_probes)) if n_probes > 1 else float("nan")
    return exact + float(t.mean()), se


def _deflation(hvp: Hvp, like: Mapping[str, Tensor], reduce: Callable[[Vec], Vec] | None, deflate: list[Vec]) -> tuple[list[Vec], float]:
    """An orthonormal basis V of the span of ``deflate`` and tr(VᵀHV) (one HVP per basis vector)."""
    basis: list[Vec] = []
    exact = 0.0
    for d in deflate:
        if not isinstance(d, Mapping) or set(d) != set(like):
            raise ValueError("deflate must be a list of dicts with exactly the keys of `like` (the parameter names)")
        q = {k: d[k].detach().to(like[k].device, torch.float32).clone(memory_format=torch.contiguous_format) for k in like}
        orthogonalize_(q, basis)
        nrm = norm(q)
        if nrm > 1e-6:  # skip vectors (nearly) in the span of the earlier ones
            basis.append(scale_(q, 1.0 / nrm))
            exact += dot(q, apply(hvp, reduce, q))
    return basis, exact
