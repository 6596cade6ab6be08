"""The trace of a symmetric operator ``v -> A v`` by Hutchinson's estimator (pure torch; PROTOCOL §9).

tr(A) ≈ mean_j v_jᵀ A v_j over Rademacher probes v_j (Hutchinson 1990), optionally deflated by vectors
the caller already has (:func:`hutchinson_trace`), or deflated by a Lanczos basis with as many probes as
it takes to match the standard error of a given number of plain probes (:func:`krylov_trace`). Probes come from a
``torch.Generator`` (a fresh one seeded 0 when none is given), never from the global generator; under DDP pass
``reduce`` (an all-reduce mean) and the same generator seed on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from bnlightning.callbacks.functional._lanczos import RitzBasis
from bnlightning.callbacks.functional._vectors import (
    Hvp,
    Layout,
    Vec,
    inner,
    orthogonalize_,
    row_norm,
    subtract_combination_,
)

__all__ = ["TraceResult", "hutchinson_trace", "krylov_trace"]


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
    layout = Layout(like)
    if not isinstance(n_probes, int) or isinstance(n_probes, bool) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    rows, exact = _deflation(hvp, layout, reduce, deflate or [])
    basis, z, hz = rows[:-2], rows[-2], rows[-1]
    terms = []
    for _ in range(n_probes):
        layout.rademacher(gen, out=z)
        if basis.shape[0]:  # deflated: the probe P z
            orthogonalize_(z, basis)
        layout.product(hvp, reduce, z, out=hz)
        terms.append(float(inner(z[None], hz[None])))
    t = torch.tensor(terms, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(n_probes)) if n_probes > 1 else float("nan")
    return exact + float(t.mean()), se


def _deflation(
    hvp: Hvp, layout: Layout, reduce: Callable[[Vec], Vec] | None, deflate: list[Vec]
) -> tuple[Tensor, float]:
    """Rows: an orthonormal basis V of the span of ``deflate``, then two spare rows; and tr(VᵀHV) (one HVP per basis
    vector)."""
    rows = layout.rows(len(deflate) + 2)
    size = 0
    exact = 0.0
    for d in deflate:
        if not isinstance(d, Mapping) or set(d) != set(layout.keys):
            raise ValueError("deflate must be a list of dicts with exactly the keys of `like` (the parameter names)")
        q = layout.flatten(d, out=rows[size])
        _, nrm = orthogonalize_(q, rows[:size])
        if nrm > 1e-6:  # skip vectors (nearly) in the span of the earlier ones
            q.mul_(1.0 / nrm)
            exact += float(inner(q[None], layout.product(hvp, reduce, q, out=rows[-1])[None]))
            size += 1
    return torch.cat([rows[:size], rows[-2:]]) if size < len(deflate) else rows, exact


class TraceResult(NamedTuple):
    """What :func:`krylov_trace` found.

    Attributes:
        estimate: the estimate of tr(H).
        standard_error: its standard error, the sample standard deviation of the probe terms over √probes
            (NaN for one probe).
        probes: the random probes used (one HVP each).
        variance_ratio: the estimated per-probe variance of the deflated term over that of a plain
            Hutchinson probe (NaN for one probe): ``n_probes · variance_ratio`` deflated probes have the
            standard error of ``n_probes`` plain ones.
    """

    estimate: float
    standard_error: float
    probes: int
    variance_ratio: float


def krylov_trace(
    hvp: Hvp,
    like: Mapping[str, Tensor],
    basis: RitzBasis,
    n_probes: int,
    *,
    deflate: bool = True,
    generator: torch.Generator | None = None,
    reduce: Callable[[Vec], Vec] | None = None,
) -> TraceResult:
    """tr(H) deflated by a Lanczos basis already paid for, and what the deflation bought.

    With Y the Ritz vectors of ``basis`` (``top_eigenvalues(..., keep_basis=True).basis``), P = I − YYᵀ
    and H Y = Y diag(θ) + w cᵀ (the Lanczos relation), tr(H) = Σθ_i + tr(PHP): the first part is known
    without an HVP, the second is estimated by Hutchinson's terms zᵀPHPz on Rademacher z, one HVP H z
    each (Hutch++'s split, Meyer et al. 2021, on a Krylov basis already built, as in Chen & Hallman
    2023). Unbiased for any Y; the number of probes is fixed in advance, so nothing biases the mean.

    What it bought: Hutchinson's per-probe variance for a symmetric M is 2(‖M‖_F² − Σ M_aa²). Each
    probe's H z also gives, without further products, unbiased estimates of ‖H‖_F² (‖Hz‖²) and of
    Σ H_aa² (inner products of the diagonal estimates z ⊙ Hz of two different probes; Bekas et al.
    2007), and the same for A = PHP (A z = Hz − Y Yᵀ Hz − (cᵀYᵀz) w). ``variance_ratio`` is
    Var(deflated)/Var(plain) from them: the next measurement of a similar H needs
    ``n · variance_ratio`` probes for the standard error of n plain ones. Deflation can also *raise* the
    variance (a Hessian with a heavy diagonal: plain Hutchinson is exact on a diagonal, and projecting
    creates off-diagonal mass); with ``deflate=False`` the same probes give the plain estimate instead,
    and ``variance_ratio`` still says what deflating would have bought. Choose before probing (e.g. from
    a previous measurement's ratio), never from these probes, so that the estimate stays unbiased.

    Args:
        hvp: ``v -> H v``.
        like: a dict with the parameters' keys, shapes, devices.
        basis: the Ritz basis of the same H (:class:`RitzBasis`).
        n_probes: the number of random probes (>= 1).
        deflate: estimate Σθ + tr(PHP) (True) or tr(H) by plain Hutchinson on the same probes (False).
        generator: source of the probes; the global RNG is never used (fresh seed 0 if None).
        reduce: applied to every HVP result (DDP all-reduce mean).

    Returns:
        :class:`TraceResult`.

    Raises:
        ValueError: a bad ``n_probes`` or ``like``.

    Example::

        eig = top_eigenvalues(hvp, params, keep_basis=True)
        trace, se, probes, ratio = krylov_trace(hvp, params, eig.basis, n_probes=10)
    """
    layout = Layout(like)
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    rows, m = _work_rows(layout, basis)  # the Ritz vectors Y, the next vector w (if any), the probe z, its product
    y, z, hz = rows[:m], rows[m], rows[m + 1]
    # A z = P H P z = Hz − Y Yᵀ Hz − (cᵀ Yᵀ z) w, by H Y = Y diag(θ) + w cᵀ (the Lanczos relation)
    k, c = len(basis.vectors), basis.couplings.to(torch.float64)
    plain, deflated = _VarianceEstimate(layout), _VarianceEstimate(layout)
    terms: list[float] = []
    for _ in range(n_probes):
        layout.rademacher(gen, out=z)
        layout.product(hvp, reduce, z, out=hz)
        products = inner(rows[: m + 2], rows[m : m + 2])  # [Y; w; z; Hz] against z and Hz: one pass
        plain.add(z, hz, frob=float(products[m + 1, 1]))
        plain_term = float(products[m, 1])
        coeffs = products[:m, 1].clone()  # Yᵀ Hz (and wᵀ Hz, replaced by cᵀ Yᵀ z)
        if m > k:
            coeffs[-1] = float(c @ products[:k, 0])
        subtract_combination_(hz, y, coeffs)  # hz is now A z (one vector less)
        za = inner(rows[m : m + 2], hz[None])[:, 0]  # zᵀ A z and ‖A z‖²
        deflated.add(z, hz, frob=float(za[1]))
        terms.append(float(za[0]) if deflate else plain_term)
    t = torch.tensor(terms, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(n_probes)) if n_probes > 1 else float("nan")
    v_plain, v_deflated = plain.variance(), max(deflated.variance(), 0.0)
    if math.isnan(v_plain):
        ratio = float("nan")
    else:  # plain variance 0 (a diagonal H): deflation cannot do better
        ratio = v_deflated / v_plain if v_plain > 0 else (1.0 if v_deflated > 0 else 0.0)
    exact = float(basis.values.sum()) if deflate else 0.0
    return TraceResult(exact + float(t.mean()), se, n_probes, ratio)


def _work_rows(layout: Layout, basis: RitzBasis) -> tuple[Tensor, int]:
    """Rows Y, w (when ``basis.next`` is not None), then two spare rows; and the number m of Y and w rows.

    The basis's own matrix when it has the spare rows (``top_eigenvalues(keep_basis=True)`` makes it so), else a copy.
    """
    vectors = basis.vectors + ([basis.next] if basis.next is not None else [])
    m = len(vectors)
    if basis.rows is not None and basis.rows.shape[0] >= m + 2 and _viewed_in_order(layout, vectors, basis.rows):
        return basis.rows[: m + 2], m
    rows = layout.rows(m + 2)
    for i, v in enumerate(vectors):
        layout.flatten(v, out=rows[i])
    return rows, m


def _viewed_in_order(layout: Layout, vectors: list[Vec], rows: Tensor) -> bool:
    """Whether ``vectors[i]`` are views of ``rows[i]`` laid out as ``layout`` lays them (the same keys in the same
    order): else the rows' entries would be read in another order than the probes'."""
    if rows.shape[1] != layout.n:
        return False
    spans = list(zip(layout.keys, layout.offsets))
    return all(v[k].data_ptr() == rows[i, a:].data_ptr() for i, v in enumerate(vectors) for k, a in spans)


class _VarianceEstimate:
    """Running unbiased estimate of Hutchinson's per-probe variance 2(‖M‖_F² − Σ M_aa²) from pairs (z, Mz)."""

    def __init__(self, layout: Layout) -> None:
        self.diag_sum = torch.zeros(layout.n, dtype=torch.float32, device=layout.device)
        self.frob = 0.0  # Σ_j ‖M z_j‖², which is also Σ_j ‖z_j ⊙ M z_j‖² for z of ±1 entries
        self.m = 0

    def add(self, z: Tensor, mz: Tensor, frob: float) -> None:
        """Count the probe ``z`` with its product ``mz`` and ``frob`` = ‖mz‖²."""
        self.diag_sum.addcmul_(z, mz)  # the diagonal estimate z ⊙ Mz (Bekas et al. 2007)
        self.frob += frob
        self.m += 1

    def variance(self) -> float:
        """2(F̂ − D̂); D̂ = Σ_{j≠l} ⟨d_j, d_l⟩ / (m(m−1)) is unbiased for Σ M_aa² (independent probes)."""
        m = self.m
        if m < 2:
            return float("nan")
        diag = (row_norm(self.diag_sum) ** 2 - self.frob) / (m * (m - 1))
        return 2.0 * (self.frob / m - diag)
