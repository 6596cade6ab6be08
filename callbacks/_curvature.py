"""Curvature of a loss through Hessian-vector products: top eigenvalues and trace (PROTOCOL §9).

Pure torch; no Lightning. Vectors are ``dict[str, Tensor]`` shaped like the parameters
(float32), so the Hessian H is only ever touched through a caller-supplied
``hvp(v) -> H v``. Two estimators:

- :func:`top_eigenvalues`: the k algebraically largest eigenvalues of H (H is indefinite:
  the largest *magnitude* eigenvalue is often negative early in training), by thick-restart
  Lanczos with full reorthogonalization inside a bounded basis (Wu & Simon 2000).
- :func:`hutchinson_trace`: tr(H) ≈ mean_j v_jᵀ H v_j over Rademacher probes v_j, with its
  standard error.

Memory, in parameter-sized vectors (P = one copy of the parameters): the eigen solver holds
its basis (``max_basis`` vectors, 4 by default for k = 1) and the next Lanczos vector, so
``max_basis + 1`` P (5 P by default), plus a transient copy of each HVP result; a restart
rewrites the basis in place, slice by slice. The trace holds 2 P. The HVP needs what ``make_hvp`` documents on top. Fewer vectors cost
HVPs: on VGG-11-BN, cold, ``max_basis`` 2 / 3 / 4 / 6 / 8 / 20 took 148 / 80 / 26 / 21 / 20 / 20
HVPs (docs/benchmarks.md, "Curvature").

Side effects: none. Random starts and probes come from a ``torch.Generator`` (a fresh one
seeded 0 when none is given), never from the global generator; nothing is written into the
vectors the caller passes.

``reduce`` (optional) is applied to every HVP result before it is used; under DDP pass an
all-reduce mean so that H is the Hessian of the global-batch loss. Every rank must then call
with the same generator seed (or ``v0``) so that all ranks build the same vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "HVP_METHODS",
    "EigenResult",
    "hutchinson_trace",
    "make_hvp",
    "top_eigenvalues",
]

Vec = dict[str, Tensor]
Hvp = Callable[[Vec], Vec]
HvpMethod = Literal["retained", "double_backward", "jvp"]
HVP_METHODS: tuple[str, ...] = ("retained", "double_backward", "jvp")


# --- vector algebra on parameter dicts ------------------------------------------------------
# Scalars are accumulated in float64 so that reorthogonalization coefficients do not lose
# the digits the convergence test needs; the vectors themselves stay in their own dtype.
def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    # Summed on each device first: one host sync per device and dot product, not per tensor.
    per_device: dict[torch.device, Tensor] = {}
    for k in a:
        d = torch.vdot(a[k].reshape(-1), b[k].reshape(-1)).double()
        per_device[d.device] = per_device[d.device] + d if d.device in per_device else d
    return math.fsum(float(t) for t in per_device.values())


def _norm(a: Mapping[str, Tensor]) -> float:
    return math.sqrt(max(_dot(a, a), 0.0))


def _scale_(a: Vec, alpha: float) -> Vec:
    for t in a.values():
        t.mul_(alpha)
    return a


def _axpy_(y: Vec, alpha: float, x: Mapping[str, Tensor]) -> Vec:
    """y += alpha * x, in place."""
    for k, t in y.items():
        t.add_(x[k], alpha=alpha)
    return y


def _combine(vectors: list[Vec], coeffs: list[float]) -> Vec:
    """sum_i coeffs[i] * vectors[i], as a new vector."""
    out = {k: torch.zeros(t.shape, dtype=t.dtype, device=t.device) for k, t in vectors[0].items()}
    for c, v in zip(coeffs, vectors):
        _axpy_(out, c, v)
    return out


def _random_like(like: Mapping[str, Tensor], generator: torch.Generator, rademacher: bool = False) -> Vec:
    """Gaussian (or ±1) entries drawn from ``generator`` on its device, moved to each tensor's device."""
    out = {}
    gen_device = generator.device
    for k, t in like.items():
        if rademacher:
            r = torch.randint(0, 2, t.shape, generator=generator, device=gen_device).mul_(2).sub_(1)
        else:
            r = torch.randn(t.shape, generator=generator, device=gen_device, dtype=torch.float32)
        out[k] = r.to(device=t.device, dtype=torch.float32)
    return out


def _check_like(like: Mapping[str, Tensor], what: str = "like") -> None:
    if not isinstance(like, Mapping) or not like:
        raise ValueError(f"{what} must be a non-empty dict of tensors, got {type(like).__name__}")
    for k, t in like.items():
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{what}[{k!r}] must be a float32 tensor, got {got}")


def _apply(hvp: Hvp, reduce: Callable[[Vec], Vec] | None, v: Vec) -> Vec:
    hv = hvp(v)
    if reduce is not None:
        hv = reduce(hv)
    # Own the result: the caller's hvp may return views or tensors it reuses.
    return {k: hv[k].detach().to(torch.float32).clone(memory_format=torch.contiguous_format) for k in v}


# --- Hessian-vector products ----------------------------------------------------------------
def make_hvp(loss_of: Callable[[Vec], Tensor], params: Mapping[str, Tensor], method: HvpMethod = "retained") -> Hvp:
    """``v -> H v`` for H the Hessian of ``loss_of`` at ``params``.

    Methods (timings: ``bench/curvature.py``, docs/benchmarks.md "Curvature"; one HVP in
    training steps, forward + backward, on a 2-core CPU: VGG-11-BN at width 0.125 / 0.25 and a
    3x100 BN MLP: retained 1.99 / 1.87 / 1.67 (+ a one-off set-up of about 1 step),
    double_backward 2.97 / 2.71 / 2.76, jvp 4.03 / 3.16 / 5.36):

    - ``"retained"`` (default, the fastest measured): double backward through one
      retained graph. ``loss_of`` runs once, here, with ``create_graph=True``; each call is
      one backward of ``<grad, v>`` through that graph (no new forward). It holds the graph
      (the activations and the first backward's) until the returned function is dropped, which
      is what the two other methods build anyway during each call.
    - ``"double_backward"``: the same, rebuilding the graph (forward + backward) on every call.
    - ``"jvp"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad(loss_of)``:
      the memory-lean form (no second-order graph), forward and backward on every call.

    With ``"jvp"``/``"double_backward"``, ``loss_of`` must compute the same function on every
    call: replay the RNG state inside it when the loss draws random numbers (dropout, noisy
    BatchNorm). In all cases pass cloned buffers to ``functional_call`` so that a train-mode
    BatchNorm does not update the module's own running statistics.

    Args:
        loss_of: ``params_dict -> scalar loss`` (e.g. a ``torch.func.functional_call`` wrapper).
        params: the point at which H is taken (float32 tensors; never written).
        method: ``"retained"``, ``"double_backward"`` or ``"jvp"``.

    Returns:
        ``hvp(v: dict[str, Tensor]) -> dict[str, Tensor]``.

    Raises:
        ValueError: an unknown ``method`` or non-float32 ``params``.

    Example::

        buffers = dict(model.named_buffers())
        def loss_of(p):
            b = {k: t.clone() for k, t in buffers.items()}
            return F.cross_entropy(functional_call(model, {**p, **b}, (x,)), y)
        hvp = make_hvp(loss_of, {k: p.detach() for k, p in model.named_parameters()})
    """
    if method not in HVP_METHODS:
        raise ValueError(f"unknown HVP method {method!r}; accepted: {', '.join(HVP_METHODS)}")
    _check_like(params, "params")
    point = {k: t.detach() for k, t in params.items()}

    if method == "jvp":
        grad_fn = torch.func.grad(loss_of)

        def hvp_jvp(v: Vec) -> Vec:
            return torch.func.jvp(grad_fn, (point,), ({k: v[k] for k in point},))[1]

        return hvp_jvp

    def first_order() -> tuple[list[Tensor], tuple[Tensor | None, ...]]:
        leaves = [t.detach().requires_grad_(True) for t in point.values()]
        with torch.enable_grad():
            loss = loss_of(dict(zip(point, leaves)))
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return leaves, grads

    def second_order(leaves: list[Tensor], grads: tuple[Tensor | None, ...], v: Vec, retain: bool) -> Vec:
        # A parameter whose gradient is constant (or absent) has a zero row in H.
        terms = [(g * v[k]).sum() for g, k in zip(grads, point) if g is not None and g.requires_grad]
        if not terms:
            return {k: torch.zeros_like(t) for k, t in point.items()}
        with torch.enable_grad():
            hv = torch.autograd.grad(torch.stack(terms).sum(), leaves, retain_graph=retain, allow_unused=True)
        return {k: torch.zeros_like(t) if h is None else h for (k, t), h in zip(point.items(), hv)}

    if method == "double_backward":
        return lambda v: second_order(*first_order(), v, retain=False)
    leaves, grads = first_order()
    return lambda v: second_order(leaves, grads, v, retain=True)


# --- top eigenvalues --------------------------------------------------------------------------
class EigenResult(NamedTuple):
    """What :func:`top_eigenvalues` found.

    Attributes:
        eigenvalues: float64 tensor of the k Ritz values, algebraically descending.
        eigenvectors: k unit vectors (dicts like the parameters); pass them as ``v0`` next time.
        iterations: the number of HVPs used.
        converged: whether every one of the k pairs met ``residual <= tol * |eigenvalue|``.
        residuals: float64 tensor of the k Ritz residual norms ``||H v - θ v||`` (unit v).
        history: (HVPs so far, current largest Ritz value, its residual) after every HVP.
    """

    eigenvalues: Tensor
    eigenvectors: list[Vec]
    iterations: int
    converged: bool
    residuals: Tensor
    history: list[tuple[int, float, float]]


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
) -> EigenResult:
    """The ``k`` algebraically largest eigenvalues of the symmetric operator ``hvp``.

    Thick-restart Lanczos (Wu & Simon 2000): the Krylov basis is kept orthonormal by full
    reorthogonalization (classical Gram-Schmidt, twice) and bounded to ``max_basis``
    vectors; when full, it restarts from its ``keep`` best Ritz vectors (``keep = max_basis // 2``,
    at least k) plus the current residual direction, so no Krylov information about the wanted
    pairs is thrown away. Power iteration would find the largest eigenvalue in *magnitude*.

    Convergence: pair i is converged when its Ritz residual ``||H v_i - θ_i v_i||₂ <= tol * |θ_i|``
    (v_i of unit norm; the residual is the Lanczos estimate ``β · |s_last,i|``, which equals the
    true residual up to rounding because the basis is reorthogonalized). So ``tol`` bounds a
    *relative residual*: θ_i lies within ``tol · |θ_i|`` of an eigenvalue of H, and its error as
    an estimate of that eigenvalue is typically about ``tol² · |θ_i|² / gap``. The solver stops when the k pairs are converged or after
    ``max_iter`` HVPs (then ``converged`` is False and the best estimates are returned).

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
        max_basis: Lanczos basis size before a restart (default ``4`` for k = 1,
            ``max(2k + 2, 10)`` otherwise; capped at the dimension).

    Returns:
        :class:`EigenResult`.

    Raises:
        ValueError: bad ``k``, ``tol``, ``max_iter``, ``max_basis``, ``like`` or ``v0``.

    Example::

        res = top_eigenvalues(make_hvp(loss_of, params), params, k=1)
        lam_max = res.eigenvalues[0].item()
        res2 = top_eigenvalues(make_hvp(loss_of, new_params), new_params, v0=res.eigenvectors)
    """
    _check_like(like)
    n = sum(t.numel() for t in like.values())
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}] (the number of parameters), got {k!r}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < k:
        raise ValueError(f"max_iter must be an integer >= k = {k} (one HVP per basis vector), got {max_iter!r}")
    if max_basis is None:
        max_basis = 4 if k == 1 else max(2 * k + 2, 10)
    elif not isinstance(max_basis, int) or isinstance(max_basis, bool) or max_basis < k + 1:
        raise ValueError(f"max_basis must be an integer >= k + 1 = {k + 1}, got {max_basis!r}")
    max_basis = min(max_basis, n)
    keep = min(max(k, max_basis // 2), max_basis - 1) if max_basis > 1 else 0
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    start = _start_vector(like, v0, gen)
    basis: list[Vec] = [start]
    # T = Qᵀ H Q, the projection on the basis (float64, small); filled column by column.
    T = torch.zeros(max_basis, max_basis, dtype=torch.float64)
    history: list[tuple[int, float, float]] = []
    hvps = 0
    theta = torch.zeros(0, dtype=torch.float64)
    S = torch.zeros(0, 0, dtype=torch.float64)
    res = torch.zeros(0, dtype=torch.float64)
    converged = False
    while True:
        j = len(basis) - 1
        w = _apply(hvp, reduce, basis[j])
        hvps += 1
        h = _orthogonalize_(w, basis)
        T[: j + 1, j] = h
        T[j, : j + 1] = h
        beta = _norm(w)
        theta, S = torch.linalg.eigh(T[: j + 1, : j + 1])
        theta, S = theta.flip(0), S.flip(1)  # descending
        res = beta * S[j].abs()
        history.append((hvps, float(theta[0]), float(res[0])))
        scale = float(theta.abs().max())
        converged = j + 1 >= k and bool((res[:k] <= tol * theta[:k].abs()).all())
        if converged or hvps >= max_iter:
            break
        if beta <= 1e-5 * max(scale, 1e-30):
            # Invariant subspace: the basis holds exact eigenpairs. If more are wanted,
            # continue from a random direction orthogonal to it.
            w = _random_like(like, gen)
            _orthogonalize_(w, basis)
            beta_new = _norm(w)
            if beta_new == 0.0:  # pragma: no cover - basis already spans everything
                break
            coupling = 0.0
            beta = beta_new
        else:
            coupling = beta
        _scale_(w, 1.0 / beta)
        if len(basis) == max_basis:
            # Thick restart: keep the `keep` best Ritz vectors; w stays the next Lanczos vector.
            basis = _rotate_(basis, S[:, :keep])
            T.zero_()
            T[:keep, :keep] = torch.diag(theta[:keep])
            # H y_i = θ_i y_i + β s_{j,i} w, so the coupling of w to y_i is β s_{j,i}.
            couple = coupling * S[j, :keep]
            T[keep, :keep] = couple
            T[:keep, keep] = couple
            basis.append(w)
        else:
            T[j + 1, j] = T[j, j + 1] = coupling
            basis.append(w)

    vectors = _rotate_(basis, S[:, : min(k, len(basis))])
    return EigenResult(theta[:k].clone(), vectors, hvps, converged, res[:k].clone(), history)


def _start_vector(like: Mapping[str, Tensor], v0: Vec | list[Vec] | None, gen: torch.Generator) -> Vec:
    if v0 is None:
        v = _random_like(like, gen)
    else:
        vs = v0 if isinstance(v0, list) else [v0]
        if not vs:
            raise ValueError("v0 must be a dict of tensors or a non-empty list of them, got []")
        for x in vs:
            if not isinstance(x, Mapping) or set(x) != set(like):
                raise ValueError("v0 must have exactly the keys of `like` (the parameter names)")
        v = _combine([{k: x[k].detach().to(like[k].device, torch.float32) for k in like} for x in vs], [1.0] * len(vs))
    nrm = _norm(v)
    if not (nrm > 0 and math.isfinite(nrm)):
        raise ValueError(f"v0 must be a non-zero finite vector, got norm {nrm}")
    return _scale_(v, 1.0 / nrm)


#: Elements per slice in :func:`_rotate_`: bounds its scratch memory to a few MB, not vectors.
_ROTATE_CHUNK = 1 << 18


def _rotate_(basis: list[Vec], coeffs: Tensor) -> list[Vec]:
    """Overwrite ``basis[:l]`` with ``basis @ coeffs`` (``coeffs``: len(basis) × l) and return it.

    Slice by slice, so the Ritz vectors of a thick restart replace the basis without ever
    holding a second basis: scratch memory is (len(basis) + n_new) × ``_ROTATE_CHUNK`` elements (n_new = the number of new vectors).
    """
    n_new = coeffs.shape[1]
    for key in basis[0]:
        flat = [q[key].view(-1) for q in basis]
        c = coeffs.to(device=flat[0].device, dtype=flat[0].dtype)
        for s in range(0, flat[0].numel(), _ROTATE_CHUNK):
            block = torch.stack([f[s : s + _ROTATE_CHUNK] for f in flat])  # m × chunk
            new = c.T @ block  # n_new × chunk
            for i in range(n_new):
                flat[i][s : s + _ROTATE_CHUNK] = new[i]
    return basis[:n_new]


def _orthogonalize_(w: Vec, basis: list[Vec]) -> Tensor:
    """Make ``w`` orthogonal to the orthonormal ``basis`` in place (CGS2); return the coefficients."""
    coeffs = torch.zeros(len(basis), dtype=torch.float64)
    for _ in range(2):  # "twice is enough" (Giraud et al. 2005)
        c = torch.tensor([_dot(q, w) for q in basis], dtype=torch.float64)
        for ci, q in zip(c.tolist(), basis):
            _axpy_(w, -ci, q)
        coeffs += c
    return coeffs


# --- trace ------------------------------------------------------------------------------------
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
    _check_like(like)
    if not isinstance(n_probes, int) or isinstance(n_probes, bool) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    basis: list[Vec] = []
    exact = 0.0
    for d in deflate or []:
        if not isinstance(d, Mapping) or set(d) != set(like):
            raise ValueError("deflate must be a list of dicts with exactly the keys of `like` (the parameter names)")
        q = {k: d[k].detach().to(like[k].device, torch.float32).clone(memory_format=torch.contiguous_format) for k in like}
        _orthogonalize_(q, basis)
        nrm = _norm(q)
        if nrm > 1e-6:  # skip vectors (nearly) in the span of the earlier ones
            basis.append(_scale_(q, 1.0 / nrm))
            exact += _dot(q, _apply(hvp, reduce, q))
    terms = []
    for _ in range(n_probes):
        v = _random_like(like, gen, rademacher=True)
        _orthogonalize_(v, basis)
        terms.append(_dot(v, _apply(hvp, reduce, v)))
    t = torch.tensor(terms, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(n_probes)) if n_probes > 1 else float("nan")
    return exact + float(t.mean()), se
