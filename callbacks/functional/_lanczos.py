"""The k algebraically largest eigenvalues of a symmetric operator ``v -> A v``: thick-restart Lanczos.

Pure torch (PROTOCOL §9). H is indefinite (the largest *magnitude* eigenvalue of a network's Hessian is
often negative early in training), so power iteration would find the wrong one; Lanczos with full
reorthogonalization inside a bounded basis (Wu & Simon 2000) finds the algebraically largest.

Memory, in parameter-sized vectors (P = one copy of the parameters): the basis (at most ``max_basis`` vectors,
8 by default for k = 1) and the next Lanczos vector, held as rows of one flat matrix (``_vectors.Layout``) that
grows as the basis does, so at most ``max_basis + 1`` P (9 P by default; ``keep_basis=True`` adds the two rows a
deflated trace probes in), plus a transient copy of each product; a restart rewrites the basis in place, slice by
slice (with ``keep_basis=True`` the result holds that basis until dropped). Fewer vectors cost products: on
VGG-11-BN, cold, ``max_basis`` 2 / 3 / 4 / 6 / 8 / 20 took 148 / 80 / 26 / 21 / 20 / 20 HVPs (docs/benchmarks.md,
"Curvature"); on the demo Transformer, warm, a basis of 4 took 35 HVPs where 8 took 23.

Side effects: none. The random start comes from a ``torch.Generator`` (a fresh one seeded 0 when none
is given), never from the global generator; nothing is written into the vectors the caller passes.
``reduce`` (optional) is applied to every product before it is used; under DDP pass an all-reduce mean
so that H is the Hessian of the global-batch loss, and give every rank the same generator seed (or
``v0``) so that all ranks build the same vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from bnlightning.callbacks.functional._vectors import (
    Hvp,
    Layout,
    Vec,
    check_like,
    orthogonalize_,
    rotate_,
    row_norm,
)

__all__ = ["EigenResult", "RitzBasis", "top_eigenvalues"]


class RitzBasis(NamedTuple):
    """The Krylov basis a Lanczos run built, in Ritz form: H y_i = θ_i y_i + c_i w (exact up to rounding).

    Attributes:
        vectors: the orthonormal Ritz vectors y_i (all of the final basis, the first k are the wanted ones).
        values: float64 tensor of their Ritz values θ_i = y_iᵀ H y_i, descending.
        next: the unit next Lanczos vector w, orthogonal to every y_i (None when the basis is invariant).
        couplings: float64 tensor of c_i = wᵀ H y_i (zeros when ``next`` is None).
        rows: the flat matrix (``_vectors.Layout``) whose rows ``vectors`` and ``next`` view, in that order, then
            spare rows a deflated trace writes its probe and product into (None: ``krylov_trace`` makes its own).
    """

    vectors: list[Vec]
    values: Tensor
    next: Vec | None
    couplings: Tensor
    rows: Tensor | None = None


class EigenResult(NamedTuple):
    """What :func:`top_eigenvalues` found.

    Attributes:
        eigenvalues: float64 tensor of the k Ritz values, algebraically descending.
        eigenvectors: k unit vectors (dicts like the parameters); pass them as ``v0`` next time.
        iterations: the number of HVPs used.
        converged: whether every one of the k pairs met ``error_bounds <= tol * |eigenvalue|``.
        residuals: float64 tensor of the k Ritz residual norms ``||H v - θ v||`` (unit v).
        history: (HVPs so far, current largest Ritz value, its residual) after every HVP.
        error_bounds: float64 tensor of the k eigenvalue error bounds ``min(r, r²/gap)`` (see :func:`top_eigenvalues`).
        basis: with ``keep_basis=True``, the whole final basis (:class:`RitzBasis`), e.g. to deflate a trace.
    """

    eigenvalues: Tensor
    eigenvectors: list[Vec]
    iterations: int
    converged: bool
    residuals: Tensor
    history: list[tuple[int, float, float]]
    error_bounds: Tensor = torch.zeros(0, dtype=torch.float64)
    basis: RitzBasis | None = None


def top_eigenvalues(
    hvp: Hvp,
    like: Mapping[str, Tensor],
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    v0: Vec | list[Vec] | None = None,
    generator: torch.Generator | None = None,
    reduce: Callable[[Vec], Vec] | None = None,
    max_basis: int | None = None,
    keep_basis: bool = False,
) -> EigenResult:
    """The ``k`` algebraically largest eigenvalues of the symmetric operator ``hvp``.

    Thick-restart Lanczos (Wu & Simon 2000): the Krylov basis is kept orthonormal by full
    reorthogonalization (classical Gram-Schmidt, a second pass where the first cancelled more than half of the
    norm: ``_vectors.orthogonalize_``) and bounded to ``max_basis``
    vectors; when full, it restarts from its ``keep`` best Ritz vectors (``keep = max_basis // 2``,
    at least k) plus the current residual direction, so no Krylov information about the wanted
    pairs is thrown away. Power iteration would find the largest eigenvalue in *magnitude*.

    Convergence: ``tol`` bounds the *relative error of each eigenvalue*. With r_i the Ritz residual
    ``||H v_i - θ_i v_i||₂`` (v_i of unit norm; the Lanczos estimate ``β · |s_last,i|``, the true residual
    up to rounding because the basis is reorthogonalized), some eigenvalue of H lies within r_i of θ_i,
    and when it is the only one within the gap to the others the error is at most r_i²/gap
    (Kato–Temple; Parlett, *The Symmetric Eigenvalue Problem*, §11.7; Saad, *Numerical Methods for Large
    Eigenvalue Problems*, §3.2). The gap of θ_i is taken to the nearest other Ritz value θ_j *widened by
    that value's own residual* (``|θ_i − θ_j| − r_j``, the safeguard: the eigenvalue θ_j approximates may
    lie up to r_j closer), and where that is not positive only r_i counts. Pair i is converged when
    ``min(r_i, r_i²/gap_i) <= tol * |θ_i|``. Like every Krylov method, an eigenvalue the Krylov space has
    not yet seen at all (a start orthogonal to its eigenvector) cannot be excluded. The solver stops when
    the k pairs are converged or after ``max_iter`` HVPs (then ``converged`` is False and the best
    estimates are returned).

    Warm start: ``v0`` (one vector or a list, e.g. the previous result's ``eigenvectors``)
    seeds the basis; with a list, the vectors are combined into the start vector (their sum),
    and a random vector from ``generator`` is used when ``v0`` is None.

    Args:
        hvp: ``v -> H v`` on dicts of float32 tensors (H symmetric).
        like: a dict with the parameters' keys, shapes, devices (values are not read).
        k: how many eigenvalues (>= 1).
        tol: relative residual tolerance, > 0.
        max_iter: cap on the number of HVPs (>= k).
        v0: start vector(s); need not be normalized.
        generator: source of the random start (``torch.Generator``); the global RNG is never used.
        reduce: applied to every HVP result (e.g. a DDP all-reduce mean); identity by default.
        max_basis: Lanczos basis size before a restart (default ``8`` for k = 1,
            ``max(2k + 2, 10)`` otherwise; capped at the dimension).
        keep_basis: also return the whole final basis in Ritz form (``basis``; it holds up to
            ``max_basis + 3`` parameter-sized vectors while the result is kept).

    Returns:
        :class:`EigenResult`.

    Raises:
        ValueError: bad ``k``, ``tol``, ``max_iter``, ``max_basis``, ``like`` or ``v0``.

    Example::

        res = top_eigenvalues(make_hvp(loss_of, params), params, k=1)
        lam_max = res.eigenvalues[0].item()
        res2 = top_eigenvalues(make_hvp(loss_of, new_params), new_params, v0=res.eigenvectors)
    """
    max_basis = _check_args(like, k, tol, max_iter, max_basis)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    keep = min(max(k, max_basis // 2), max_basis - 1) if max_basis > 1 else 0  # Ritz vectors kept at a restart
    layout = Layout(like)
    # with keep_basis, two spare rows for the probe and its product of a trace deflated by this basis
    krylov = _Krylov(layout, _start_vector(layout, v0, gen), max_basis, spare=2 if keep_basis else 0)
    history: list[tuple[int, float, float]] = []
    while True:
        layout.product(hvp, reduce, krylov.last, out=krylov.next)
        theta, S, res, beta = krylov.expand()
        history.append((len(history) + 1, float(theta[0]), float(res[0])))
        errors = error_bounds(theta, res)
        converged = krylov.size >= k and bool((errors[:k] <= tol * theta[:k].abs()).all())
        if converged or len(history) >= max_iter:
            break
        coupling = _next_direction(krylov, beta, float(theta.abs().max()), layout, gen)
        if coupling is None:  # pragma: no cover - basis already spans everything
            break
        krylov.append(coupling, theta, S, keep)
    found = (theta[:k].clone(), len(history), converged, res[:k].clone(), history, errors[:k].clone())
    if not keep_basis:
        vectors = rotate_(krylov.basis, S[:, : min(k, krylov.size)], out=layout.rows(min(k, krylov.size)))
        return EigenResult(found[0], [layout.as_dict(v) for v in vectors], *found[1:])
    ritz = _ritz_basis(krylov, layout, beta, theta, S)
    return EigenResult(found[0], ritz.vectors[:k], *found[1:], ritz)


#: The Ritz gap of a neighbour that has not converged overestimates the true gap (the eigenvalue next to
#: θ_i may not be represented in the basis yet): the quadratic bound takes a tenth of it.
GAP_SAFETY = 10.0


def error_bounds(theta: Tensor, res: Tensor) -> Tensor:
    """``min(r_i, GAP_SAFETY · r_i² / gap_i)`` for Ritz values ``theta`` (descending) with residuals ``res``.

    gap_i = min over j ≠ i of ``|θ_i − θ_j| − r_j`` (the eigenvalue near θ_j may be up to r_j closer to
    θ_i), divided by ``GAP_SAFETY``; where no gap is positive (one Ritz value, or overlapping intervals)
    the bound is r_i.
    """
    n = theta.numel()
    if n < 2:
        return res.clone()
    dist = (theta[:, None] - theta[None, :]).abs() - res[None, :]
    dist.fill_diagonal_(float("inf"))
    gap = dist.min(dim=1).values
    quad = torch.where(gap > 0, GAP_SAFETY * res.square() / gap.clamp_min(1e-300), torch.full_like(res, float("inf")))
    return torch.minimum(res, quad)


def _ritz_basis(krylov: _Krylov, layout: Layout, beta: float, theta: Tensor, S: Tensor) -> RitzBasis:
    """The final basis rotated to its Ritz vectors (in place) with the next Lanczos vector and couplings."""
    m = krylov.size
    krylov.reserve(m + 1 + krylov.spare)
    rotate_(krylov.rows, S)
    vectors = [layout.as_dict(krylov.rows[i]) for i in range(m)]
    scale = float(theta.abs().max()) if theta.numel() else 0.0
    if beta <= 1e-12 * max(scale, 1e-30):  # an invariant subspace: nothing couples out of it
        krylov.rows[m].zero_()
        return RitzBasis(vectors, theta.clone(), None, torch.zeros_like(theta), krylov.rows)
    krylov.rows[m].mul_(1.0 / beta)
    return RitzBasis(vectors, theta.clone(), layout.as_dict(krylov.rows[m]), beta * S[m - 1], krylov.rows)


def _check_args(like: Mapping[str, Tensor], k: int, tol: float, max_iter: int, max_basis: int | None) -> int:
    """Validate the arguments of :func:`top_eigenvalues`; return the basis size (capped at the dimension)."""
    check_like(like)
    n = sum(t.numel() for t in like.values())
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}] (the number of parameters), got {k!r}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < k:
        raise ValueError(f"max_iter must be an integer >= k = {k} (one HVP per basis vector), got {max_iter!r}")
    if max_basis is None:
        max_basis = 8 if k == 1 else max(2 * k + 2, 10)
    elif not isinstance(max_basis, int) or isinstance(max_basis, bool) or max_basis < k + 1:
        raise ValueError(f"max_basis must be an integer >= k + 1 = {k + 1}, got {max_basis!r}")
    return min(max_basis, n)


class _Krylov:
    """The Lanczos state: an orthonormal basis Q as the first ``size`` rows of one matrix, the row after it for the
    next vector, and T = QᵀHQ (float64, small), filled column by column."""

    def __init__(self, layout: Layout, start: Tensor, max_basis: int, spare: int) -> None:
        self.layout, self.spare = layout, spare
        # Two rows (the start and its product) and the spare ones, grown to the whole basis at the first need: a run
        # that converges in a few products never holds max_basis vectors, and one that does not copies 2 + spare once.
        self.rows = layout.rows(min(2 + spare, max_basis + 1 + spare))
        self.rows[0].copy_(start)
        self.size = 1
        self.T = torch.zeros(max_basis, max_basis, dtype=torch.float64)
        self.max_basis = max_basis

    def reserve(self, count: int) -> None:
        """At least ``count`` rows: all that the basis, its next vector and the spare rows can take."""
        have = self.rows.shape[0]
        if have < count:
            rows = self.layout.rows(self.max_basis + 1 + self.spare)
            rows[:have].copy_(self.rows)
            self.rows = rows

    @property
    def basis(self) -> Tensor:
        return self.rows[: self.size]

    @property
    def last(self) -> Tensor:
        """The last basis vector q_j."""
        return self.rows[self.size - 1]

    @property
    def next(self) -> Tensor:
        """The row after the basis: H q_j, then the next Lanczos vector."""
        return self.rows[self.size]

    def expand(self) -> tuple[Tensor, Tensor, Tensor, float]:
        """Take ``next = H q_j``, orthogonalize it in place against the basis, fill column j of T; return the Ritz
        values (descending), their vectors in the basis, their residual norms ``β |s_j,i|`` and β = ‖next‖."""
        j = self.size - 1
        h, beta = orthogonalize_(self.next, self.basis)
        self.T[: j + 1, j] = h
        self.T[j, : j + 1] = h
        theta, S = torch.linalg.eigh(self.T[: j + 1, : j + 1])
        theta, S = theta.flip(0), S.flip(1)  # descending
        return theta, S, beta * S[j].abs(), beta

    def append(self, coupling: float, theta: Tensor, S: Tensor, keep: int) -> None:
        """Make the unit vector in ``next``, coupled to the last basis vector by ``coupling``, part of the basis;
        when the basis is full, first restart it from its ``keep`` best Ritz vectors (thick restart)."""
        j = self.size - 1
        if self.size == self.max_basis:
            rotate_(self.rows, S[:, :keep])
            self.rows[keep].copy_(self.rows[self.size])
            self.T.zero_()
            self.T[:keep, :keep] = torch.diag(theta[:keep])
            # H y_i = θ_i y_i + β s_{j,i} w, so the coupling of w to y_i is β s_{j,i}.
            couple = coupling * S[j, :keep]
            self.T[keep, :keep] = couple
            self.T[:keep, keep] = couple
            self.size = keep + 1
        else:
            self.T[j + 1, j] = self.T[j, j + 1] = coupling
            self.reserve(self.size + 2)
            self.size += 1


def _next_direction(krylov: _Krylov, beta: float, scale: float, layout: Layout, gen: torch.Generator) -> float | None:
    """Normalize the residual in ``krylov.next`` (norm ``beta``) in place into the next Lanczos vector; return its
    coupling to the basis, or None when the basis already spans everything."""
    w = krylov.next
    if beta > 1e-5 * max(scale, 1e-30):
        w.mul_(1.0 / beta)
        return beta
    # Invariant subspace: the basis holds exact eigenpairs. If more are wanted, continue from a
    # random direction orthogonal to it (coupling 0).
    w.copy_(layout.gaussian(gen))
    _, beta_new = orthogonalize_(w, krylov.basis)
    if beta_new == 0.0:  # pragma: no cover - basis already spans everything
        return None
    w.mul_(1.0 / beta_new)
    return 0.0


def _start_vector(layout: Layout, v0: Vec | list[Vec] | None, gen: torch.Generator) -> Tensor:
    if v0 is None:
        v = layout.gaussian(gen)
    else:
        vs = v0 if isinstance(v0, list) else [v0]
        if not vs:
            raise ValueError("v0 must be a dict of tensors or a non-empty list of them, got []")
        for x in vs:
            if not isinstance(x, Mapping) or set(x) != set(layout.keys):
                raise ValueError("v0 must have exactly the keys of `like` (the parameter names)")
        v = layout.flatten(vs[0])
        for x in vs[1:]:
            v.add_(layout.flatten(x))
    nrm = row_norm(v)
    if not (nrm > 0 and math.isfinite(nrm)):
        raise ValueError(f"v0 must be a non-zero finite vector, got norm {nrm}")
    return v.mul_(1.0 / nrm)
