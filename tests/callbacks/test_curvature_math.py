"""Curvature mathematics (callbacks/functional/_hvp.py, _lanczos.py, _trace.py) against plain references.

References: the full Hessian of a tiny network built with ``torch.autograd.functional.hessian``
on a flat float64 parameter vector and diagonalized with ``torch.linalg.eigvalsh``; explicit
symmetric matrices; PyHessian on a model without BatchNorm or dropout.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bnlightning.callbacks.functional import (
    EigenResult,
    hutchinson_trace,
    krylov_trace,
    make_hvp,
    top_eigenvalues,
)
from bnlightning.callbacks.functional._lanczos import error_bounds


# --- references -------------------------------------------------------------------------------
def bn_mlp() -> nn.Module:
    """2 hidden layers of 5 with BatchNorm (kept in training mode): 93 parameters."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(),
        nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Tanh(),
        nn.Linear(5, 3),
    ).train()  # fmt: skip


def batch(n: int = 8, d: int = 4, classes: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def loss_fn(model: nn.Module, x: Tensor, y: Tensor):
    """``params -> loss`` through functional_call with cloned buffers (running stats untouched)."""
    buffers = dict(model.named_buffers())

    def loss_of(params: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(
            functional_call(model, {**params, **{k: b.clone() for k, b in buffers.items()}}, (x,)), y
        )

    return loss_of


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def full_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The exact Hessian (float64) of the training-mode loss over the flat parameter vector."""
    m64 = copy.deepcopy(model).double()
    p = params_of(m64)
    names, shapes = list(p), [t.shape for t in p.values()]
    sizes = [t.numel() for t in p.values()]
    loss_of = loss_fn(m64, x.double(), y)

    def flat_loss(flat: Tensor) -> Tensor:
        parts = flat.split(sizes)
        return loss_of({n: t.view(s) for n, t, s in zip(names, parts, shapes)})

    flat0 = torch.cat([t.reshape(-1) for t in p.values()])
    return torch.autograd.functional.hessian(flat_loss, flat0)


def flat(v: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).double() for t in v.values()])


def matrix_hvp(A: Tensor):
    A32 = A.float()
    return lambda v: {"w": A32 @ v["w"]}


def spectrum_matrix(eigs: list[float], n: int | None = None, seed: int = 0, bulk: float = 0.1) -> Tensor:
    """A dense symmetric matrix with the given leading eigenvalues and a small random bulk."""
    g = torch.Generator().manual_seed(seed)
    n = n or len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = bulk * torch.randn(n, generator=g, dtype=torch.float64)
    ev[: len(eigs)] = torch.tensor(eigs, dtype=torch.float64)
    return (Q * ev) @ Q.T


@pytest.fixture(scope="module")
def mlp_case():
    model = bn_mlp()
    x, y = batch()
    H = full_hessian(model, x, y)
    return model, x, y, H, torch.linalg.eigvalsh(H).flip(0)


# --- the tiny BN MLP in training mode ---------------------------------------------------------
@pytest.mark.parametrize("method", ["retained", "double_backward", "jvp"])
def test_hvp_matches_full_hessian(mlp_case, method: str) -> None:
    model, x, y, H, _ = mlp_case
    running = {k: b.clone() for k, b in model.named_buffers()}
    p = params_of(model)
    hvp = make_hvp(loss_fn(model, x, y), p, method=method)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # the retained graph serves several products
        v = {k: torch.randn(t.shape, generator=g) for k, t in p.items()}
        got, want = flat(hvp(v)), H @ flat(v)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    for k, b in model.named_buffers():  # functional_call wrote only into the clones
        assert torch.equal(b, running[k]), k
    for k, t in model.named_parameters():
        assert torch.equal(t.detach(), p[k]), k


@pytest.mark.parametrize("max_basis", [None, 2, 6, 200])
def test_lambda_max_of_bn_mlp(mlp_case, max_basis: int | None) -> None:
    model, x, y, H, eigs = mlp_case
    # Indefinite, and the largest *magnitude* eigenvalue is negative (-9.57 vs 6.76).
    assert -eigs[-1] > eigs[0] > 0, "the test needs λmin < -λmax < 0"
    p = params_of(model)
    res = top_eigenvalues(make_hvp(loss_fn(model, x, y), p), p, k=1, tol=1e-4, max_iter=500, max_basis=max_basis)
    assert res.converged
    assert abs(res.eigenvalues[0].item() - eigs[0].item()) <= 1e-4 * abs(eigs[0].item())
    # The reported residual is the true one of the returned unit vector.
    v = flat(res.eigenvectors[0])
    assert abs(v.norm().item() - 1) < 1e-5
    true_res = (H @ v - res.eigenvalues[0] * v).norm().item()
    assert res.error_bounds[0].item() <= 1e-4 * abs(res.eigenvalues[0].item())  # the stop rule
    assert abs(true_res - res.residuals[0].item()) <= 1e-5 * abs(eigs[0].item())
    assert len(res.history) == res.iterations


def test_iteration_cap_returns_unconverged_lower_bounds(mlp_case) -> None:
    model, x, y, _, eigs = mlp_case
    p = params_of(model)
    res = top_eigenvalues(make_hvp(loss_fn(model, x, y), p), p, k=2, tol=1e-6, max_iter=3)
    assert res.iterations == 3 and not res.converged and len(res.history) == 3
    # Ritz values of a subspace never exceed the true top eigenvalues (Cauchy interlacing).
    assert (res.eigenvalues <= eigs[:2] + 1e-6).all()
    assert (res.residuals > 1e-6 * res.eigenvalues.abs()).any()


@pytest.mark.parametrize("max_basis", [None, 5])
def test_top3_of_bn_mlp(mlp_case, max_basis: int | None) -> None:
    model, x, y, _, eigs = mlp_case
    p = params_of(model)
    res = top_eigenvalues(make_hvp(loss_fn(model, x, y), p), p, k=3, tol=1e-4, max_iter=500, max_basis=max_basis)
    assert res.converged and res.eigenvalues.shape == (3,)
    rel = ((res.eigenvalues - eigs[:3]).abs() / eigs[:3].abs()).max().item()
    assert rel <= 1e-4, (res.eigenvalues.tolist(), eigs[:3].tolist())
    V = torch.stack([flat(v) for v in res.eigenvectors])
    assert torch.allclose(V @ V.T, torch.eye(3, dtype=torch.float64), atol=1e-4)


def test_trace_of_bn_mlp_within_three_standard_errors(mlp_case) -> None:
    model, x, y, H, _ = mlp_case
    p = params_of(model)
    est, se = hutchinson_trace(
        make_hvp(loss_fn(model, x, y), p), p, n_probes=200, generator=torch.Generator().manual_seed(5)
    )
    true = torch.trace(H).item()
    assert se > 0
    assert abs(est - true) <= 3 * se, (est, se, true)


def test_deflated_trace_on_bn_mlp(mlp_case) -> None:
    # Deflating the top eigenvectors (exact part) leaves an unbiased, lower-variance estimate.
    model, x, y, H, _ = mlp_case
    p = params_of(model)
    hvp = make_hvp(loss_fn(model, x, y), p)
    eig = top_eigenvalues(hvp, p, k=3, tol=1e-4, max_iter=200)
    true = torch.trace(H).item()
    plain = hutchinson_trace(hvp, p, n_probes=200, generator=torch.Generator().manual_seed(5))
    deflated = hutchinson_trace(
        hvp, p, n_probes=200, generator=torch.Generator().manual_seed(5), deflate=eig.eigenvectors
    )
    assert abs(deflated[0] - true) <= 3 * deflated[1], (deflated, true)
    assert deflated[1] < 0.95 * plain[1], (deflated[1], plain[1])  # 1.19 vs 1.41 at this seed
    # This Hessian's outliers are at both ends (λmin = -9.57): deflating the 3 most negative too
    # (top eigenvectors of -H) removes most of the variance (SE 0.49 at this seed).
    bottom = top_eigenvalues(lambda v: {k: -t for k, t in hvp(v).items()}, p, k=3, tol=1e-4, max_iter=200)
    both = hutchinson_trace(
        hvp, p, n_probes=200, generator=torch.Generator().manual_seed(5), deflate=eig.eigenvectors + bottom.eigenvectors
    )
    assert abs(both[0] - true) <= 3 * both[1], (both, true)
    assert both[1] < 0.5 * plain[1], (both[1], plain[1])


def test_deflation_by_the_range_is_exact() -> None:
    # H of rank 2 with V spanning its range: PHP = 0, so the estimate is exact with SE 0,
    # whatever basis of the range is passed (not orthonormal, with a redundant vector).
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(30, 2, generator=g, dtype=torch.float64)).Q
    A = U @ torch.diag(torch.tensor([5.0, -2.0], dtype=torch.float64)) @ U.T
    vs = [{"w": (U[:, 0] + U[:, 1]).float()}, {"w": (2 * U[:, 1]).float()}, {"w": U[:, 0].float()}]
    est, se = hutchinson_trace(matrix_hvp(A), {"w": torch.zeros(30)}, n_probes=5, deflate=vs)
    assert est == pytest.approx(3.0, abs=1e-5) and se == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"deflate must be a list of dicts with exactly the keys of `like`"):
        hutchinson_trace(matrix_hvp(A), {"w": torch.zeros(30)}, deflate=[{"x": torch.zeros(30)}])


def test_trace_standard_error_matches_rademacher_variance() -> None:
    # Var(vᵀAv) = 2 Σ_{a≠b} A_ab² for Rademacher v: the SE must estimate sqrt(that / m).
    A = spectrum_matrix([3.0, -2.0, 1.0], n=40, bulk=0.5)
    m = 2000
    est, se = hutchinson_trace(
        matrix_hvp(A), {"w": torch.zeros(40)}, n_probes=m, generator=torch.Generator().manual_seed(0)
    )
    off = A - torch.diag(torch.diag(A))
    want_se = math.sqrt(2 * (off**2).sum().item() / m)
    assert abs(se / want_se - 1) < 0.1, (se, want_se)
    assert abs(est - torch.trace(A).item()) <= 3 * want_se


def test_trace_is_exact_on_a_diagonal_matrix() -> None:
    d = torch.tensor([3.0, -1.5, 0.25, 7.0, -2.0])
    like = {"a": torch.zeros(2), "b": torch.zeros(3)}

    def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"a": d[:2] * v["a"], "b": d[2:] * v["b"]}

    est, se = hutchinson_trace(hvp, like, n_probes=7, generator=torch.Generator().manual_seed(1))
    assert est == pytest.approx(d.sum().item(), abs=1e-6)
    assert se == pytest.approx(0.0, abs=1e-6)


# --- indefinite matrices: algebraic, not magnitude ordering ------------------------------------
def test_lambda_max_is_algebraic_not_magnitude() -> None:
    A = spectrum_matrix([1.0, -5.0, 0.5, -3.0, 0.2, 0.9])
    like = {"w": torch.zeros(6)}
    one = top_eigenvalues(matrix_hvp(A), like, k=1, tol=1e-6)
    assert one.eigenvalues[0].item() == pytest.approx(1.0, rel=1e-5)  # not -5
    three = top_eigenvalues(matrix_hvp(A), like, k=3, tol=1e-6)
    assert three.eigenvalues.tolist() == pytest.approx([1.0, 0.9, 0.5], rel=1e-5)


def test_negative_definite_gives_the_least_negative() -> None:
    A = spectrum_matrix([-0.1, -4.0, -2.0, -3.0, -1.0])
    res = top_eigenvalues(matrix_hvp(A), {"w": torch.zeros(5)}, k=2, tol=1e-6)
    assert res.eigenvalues.tolist() == pytest.approx([-0.1, -1.0], rel=1e-4)


def test_exact_eigenvector_start_converges_in_one_hvp_and_continues_for_k2() -> None:
    A = spectrum_matrix([2.0, 1.0, -3.0, 0.5])
    evecs = torch.linalg.eigh(A).eigenvectors
    top = {"w": evecs[:, -1].float()}
    res = top_eigenvalues(matrix_hvp(A), {"w": torch.zeros(4)}, k=1, v0=top)
    assert res.iterations == 1 and res.converged
    assert res.eigenvalues[0].item() == pytest.approx(2.0, rel=1e-5)
    two = top_eigenvalues(matrix_hvp(A), {"w": torch.zeros(4)}, k=2, v0=top, tol=1e-6)
    assert two.converged and two.eigenvalues.tolist() == pytest.approx([2.0, 1.0], rel=1e-5)


# --- warm start --------------------------------------------------------------------------------
def test_warm_start_uses_fewer_hvps_on_a_perturbed_matrix() -> None:
    eigs = [10.0, 9.3, 8.9, 6.0, -6.0, -8.0]
    A = spectrum_matrix(eigs, n=400, seed=0, bulk=1.0)
    B = A + 0.01 * (spectrum_matrix(eigs, n=400, seed=1, bulk=1.0) - spectrum_matrix(eigs, n=400, seed=2, bulk=1.0))
    like = {"w": torch.zeros(400)}
    first = top_eigenvalues(matrix_hvp(A), like, tol=1e-3)
    cold = top_eigenvalues(matrix_hvp(B), like, tol=1e-3, generator=torch.Generator().manual_seed(9))
    warm = top_eigenvalues(matrix_hvp(B), like, tol=1e-3, v0=first.eigenvectors)
    want = torch.linalg.eigvalsh(B)[-1].item()
    assert cold.converged and warm.converged
    for r in (cold, warm):
        assert abs(r.eigenvalues[0].item() - want) <= 1e-3 * want
    assert warm.iterations <= 10 and 2 * warm.iterations <= cold.iterations, (warm.iterations, cold.iterations)


# --- reproducibility and side effects ----------------------------------------------------------
def test_generator_reproducible_and_global_rng_untouched(mlp_case) -> None:
    model, x, y, _, _ = mlp_case
    p = params_of(model)
    hvp = make_hvp(loss_fn(model, x, y), p)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    runs = []
    for seed in (7, 7, 8):
        e = top_eigenvalues(hvp, p, k=2, tol=1e-2, generator=torch.Generator().manual_seed(seed))
        t = hutchinson_trace(hvp, p, n_probes=5, generator=torch.Generator().manual_seed(seed))
        runs.append((e, t))
    default = (top_eigenvalues(hvp, p, k=2, tol=1e-2), hutchinson_trace(hvp, p, n_probes=5))
    assert torch.equal(torch.get_rng_state(), state)
    (e1, t1), (e2, t2), (e3, t3) = runs
    assert torch.equal(e1.eigenvalues, e2.eigenvalues) and e1.iterations == e2.iterations and t1 == t2
    assert all(torch.equal(a[k], b[k]) for a, b in zip(e1.eigenvectors, e2.eigenvectors) for k in p)
    assert t1 != t3 and e1.history != e3.history  # the seed is really used
    assert default[1] == hutchinson_trace(hvp, p, n_probes=5)  # no generator: fixed seed, still no global draw
    assert torch.equal(torch.get_rng_state(), state)


def test_reduce_is_applied_to_every_hvp() -> None:
    # Two "ranks" with different Hessians: the mean all-reduce makes it the Hessian of the mean.
    A0 = spectrum_matrix([4.0, 1.0, -2.0, 0.5, 0.1], seed=0)
    A1 = spectrum_matrix([3.0, 2.0, -1.0, 0.2, 0.3], seed=1)
    calls = []

    def reduce(hv: dict[str, Tensor]) -> dict[str, Tensor]:
        calls.append(1)
        v = reduce.last_v  # type: ignore[attr-defined]
        return {"w": 0.5 * (hv["w"] + A1.float() @ v)}

    def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
        reduce.last_v = v["w"].clone()  # type: ignore[attr-defined]
        return {"w": A0.float() @ v["w"]}

    like = {"w": torch.zeros(5)}
    res = top_eigenvalues(hvp, like, k=2, tol=1e-6, reduce=reduce)
    want = torch.linalg.eigvalsh(0.5 * (A0 + A1)).flip(0)[:2]
    assert torch.allclose(res.eigenvalues, want, rtol=1e-5)
    assert len(calls) == res.iterations
    calls.clear()
    hutchinson_trace(hvp, like, n_probes=4, reduce=reduce)
    assert len(calls) == 4


def test_does_not_write_into_caller_vectors() -> None:
    A = spectrum_matrix([2.0, 1.0, -3.0, 0.5])
    v0 = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    like = {"w": torch.zeros(4)}
    top_eigenvalues(matrix_hvp(A), like, v0=v0)
    assert v0["w"].tolist() == [1.0, 2.0, 3.0, 4.0] and like["w"].abs().sum() == 0


# --- bad input: one clear message --------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, r"k must be an integer in \[1, 4\].*got 0"),
        ({"k": 5}, r"k must be an integer in \[1, 4\].*got 5"),
        ({"tol": 0.0}, r"tol must be a positive finite number, got 0.0"),
        ({"max_iter": 0}, r"max_iter must be an integer >= k = 1 \(one HVP per basis vector\), got 0"),
        ({"k": 3, "max_iter": 2}, r"max_iter must be an integer >= k = 3"),
        ({"k": 2, "max_basis": 2}, r"max_basis must be an integer >= k \+ 1 = 3, got 2"),
        ({"v0": {"w": torch.zeros(4)}}, r"v0 must be a non-zero finite vector, got norm 0.0"),
        ({"v0": {"x": torch.ones(4)}}, r"v0 must have exactly the keys of `like`"),
    ],
)
def test_bad_eigen_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        top_eigenvalues(matrix_hvp(torch.eye(4)), {"w": torch.zeros(4)}, **kwargs)


def test_bad_trace_and_hvp_arguments() -> None:
    with pytest.raises(ValueError, match=r"n_probes must be a positive integer, got 0"):
        hutchinson_trace(matrix_hvp(torch.eye(2)), {"w": torch.zeros(2)}, n_probes=0)
    with pytest.raises(ValueError, match=r"like\['w'\] must be a float32 tensor, got torch.float64"):
        hutchinson_trace(matrix_hvp(torch.eye(2)), {"w": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"unknown HVP method 'forward'; accepted: retained, double_backward, jvp"):
        make_hvp(lambda p: p["w"].sum(), {"w": torch.zeros(2)}, method="forward")  # type: ignore[arg-type]


# --- PyHessian on a model without BatchNorm or dropout -----------------------------------------
def test_agrees_with_pyhessian() -> None:
    pyhessian = pytest.importorskip("pyhessian")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4))
    x, y = batch(n=32, d=6, classes=4, seed=2)
    H = full_hessian(model, x, y)
    eigs = torch.linalg.eigvalsh(H)
    lam, true_trace = eigs[-1].item(), torch.trace(H).item()
    # PyHessian's power iteration finds the largest magnitude: only comparable when that is λmax.
    assert lam > abs(eigs[0].item()) and true_trace > 0

    p = params_of(model)
    hvp = make_hvp(loss_fn(model, x, y), p)
    ours = top_eigenvalues(hvp, p, tol=1e-4)
    est, se = hutchinson_trace(hvp, p, n_probes=200, generator=torch.Generator().manual_seed(0))

    torch.manual_seed(0)
    comp = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    their_eig = comp.eigenvalues(maxIter=500, tol=1e-6, top_n=1)[0][0]
    their_terms = torch.tensor(comp.trace(maxIter=200, tol=0.0), dtype=torch.float64)
    their_est, their_se = their_terms.mean().item(), (their_terms.std() / math.sqrt(len(their_terms))).item()

    assert ours.eigenvalues[0].item() == pytest.approx(their_eig, rel=1e-3)
    assert ours.eigenvalues[0].item() == pytest.approx(lam, rel=1e-4)
    assert abs(est - their_est) <= 3 * math.hypot(se, their_se), (est, se, their_est, their_se)
    assert abs(est - true_trace) <= 3 * se and abs(their_est - true_trace) <= 3 * their_se


def test_eigen_result_fields() -> None:
    res = top_eigenvalues(
        matrix_hvp(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))), {"w": torch.zeros(3)}, k=2
    )
    assert isinstance(res, EigenResult)
    assert res.eigenvalues.dtype == torch.float64 and res.residuals.shape == (2,)
    assert res.eigenvalues.tolist() == pytest.approx([3.0, 2.0], rel=1e-5)


# --- the eigenvalue stop rule and the Krylov-deflated trace ----------------------------------------
def exact_spectrum_matrix(eigs: list[float], seed: int = 0) -> Tensor:
    """A dense symmetric float64 matrix with exactly the eigenvalues ``eigs`` (a random orthogonal basis)."""
    q, _ = torch.linalg.qr(
        torch.randn(len(eigs), len(eigs), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return (q * torch.tensor(eigs, dtype=torch.float64)) @ q.T


def test_error_bounds_take_the_gap_widened_by_the_neighbours_residual() -> None:
    theta = torch.tensor([10.0, 9.0, 1.0], dtype=torch.float64)
    res = torch.tensor([0.01, 0.5, 2.0], dtype=torch.float64)
    got = error_bounds(theta, res)
    # GAP_SAFETY = 10. θ_1: gap min(10 - 9 - 0.5, 10 - 1 - 2) = 0.5 -> 10 · 0.01²/0.5 = 0.002 < r;
    # θ_2: gap min(1 - 0.01, 8 - 2) = 0.99 -> 10 · 0.25/0.99 > r = 0.5 -> r; θ_3: the residual, 2
    assert got.tolist() == pytest.approx([0.002, 0.5, 2.0])
    assert error_bounds(theta[:1], res[:1]).tolist() == [0.01]  # one Ritz value: the residual alone
    overlapping = error_bounds(
        torch.tensor([1.0, 0.9], dtype=torch.float64), torch.tensor([0.05, 0.2], dtype=torch.float64)
    )
    assert overlapping[0].item() == pytest.approx(0.05)  # gap 0.1 - 0.2 < 0: the residual alone


@pytest.mark.parametrize("tol", [1e-2, 1e-3])
def test_lambda_max_of_the_explicit_hessian_is_within_tol(mlp_case, tol: float) -> None:
    model, x, y, H, eigs = mlp_case
    p = params_of(model)
    hvp = make_hvp(loss_fn(model, x, y), p)
    lam = eigs[0].item()
    for seed in range(6):
        res = top_eigenvalues(hvp, p, tol=tol, generator=torch.Generator().manual_seed(seed), max_iter=500)
        assert res.converged and res.error_bounds[0] <= tol * abs(res.eigenvalues[0])
        assert abs(res.eigenvalues[0].item() - lam) <= tol * abs(lam), (seed, res.eigenvalues[0].item(), lam)


@pytest.mark.parametrize("gap", [1e-7, 1e-5, 3e-2])
def test_lambda_max_with_a_tiny_gap_is_within_tol(gap: float) -> None:
    """A second eigenvalue gap·λ below λmax: Ritz values that mix the two are still within tol of λmax."""
    n = 80
    eigs = [10.0, 10.0 * (1 - gap)] + [6.0 * math.cos(i) for i in range(n - 2)]
    A = exact_spectrum_matrix(eigs)
    for seed in range(5):
        res = top_eigenvalues(
            matrix_hvp(A), {"w": torch.zeros(n)}, tol=1e-3, generator=torch.Generator().manual_seed(seed), max_iter=500
        )
        assert res.converged and abs(res.eigenvalues[0].item() - 10.0) <= 1e-3 * 10.0, (seed, res.eigenvalues[0].item())


def _trace_runs(A: Tensor, probes: int, runs: int) -> tuple[Tensor, Tensor, list[float]]:
    """``runs`` independent Krylov-deflated estimates (cold Lanczos, then ``probes`` probes) and plain ones."""
    n = A.shape[0]
    like = {"w": torch.zeros(n)}
    deflated, plain, ratios = [], [], []
    for s in range(runs):
        eig = top_eigenvalues(
            matrix_hvp(A), like, tol=1e-3, generator=torch.Generator().manual_seed(s), keep_basis=True
        )
        assert eig.basis is not None
        t = krylov_trace(matrix_hvp(A), like, eig.basis, probes, generator=torch.Generator().manual_seed(10_000 + s))
        deflated.append(t.estimate)
        ratios.append(t.variance_ratio)
        plain.append(hutchinson_trace(matrix_hvp(A), like, 20, generator=torch.Generator().manual_seed(20_000 + s))[0])
    return torch.tensor(deflated, dtype=torch.float64), torch.tensor(plain, dtype=torch.float64), ratios


@pytest.mark.parametrize("spectrum", ["decaying", "flat"])
def test_krylov_trace_is_unbiased_and_matches_twenty_plain_probes(spectrum: str) -> None:
    n = 60
    eigs = [50 * 0.7**i for i in range(n)] if spectrum == "decaying" else torch.linspace(-1, 1, n).tolist()
    A = exact_spectrum_matrix(eigs, seed=1)
    trace = float(sum(eigs))
    # the variance ratio estimated by the probes, averaged over runs, sets the probes for 20 plain probes' SE
    _, _, ratios = _trace_runs(A, 20, 20)
    ratio = sum(ratios) / len(ratios)
    probes = max(4, math.ceil(20 * ratio))
    deflated, plain, _ = _trace_runs(A, probes, 300)
    # unbiased: the mean of 300 independent estimates is within 4 standard errors of the exact trace
    assert abs(deflated.mean().item() - trace) <= 4 * deflated.std().item() / math.sqrt(300) + 1e-6 * abs(trace)
    # the standard error claim: as spread out as 20 plain probes (within the sampling error of 300 runs)
    assert deflated.std().item() <= 1.2 * plain.std().item()
    if spectrum == "decaying":  # the basis holds the outliers: far fewer probes, and a ratio well below 1
        assert probes <= 10 and ratio < 0.5
    else:  # nothing to deflate: the ratio stays near 1 and so do the probes
        assert 0.7 < ratio < 1.3 and probes >= 14


def test_krylov_trace_is_exact_when_the_basis_holds_the_whole_range() -> None:
    A = exact_spectrum_matrix([5.0, -2.0] + [0.0] * 18)  # rank 2: a basis of 3 spans the range
    like = {"w": torch.zeros(20)}
    eig = top_eigenvalues(matrix_hvp(A), like, tol=1e-6, keep_basis=True, max_basis=3)
    assert eig.basis is not None
    t = krylov_trace(matrix_hvp(A), like, eig.basis, 4)
    assert t.estimate == pytest.approx(3.0, abs=1e-4) and t.standard_error < 1e-4 and t.probes == 4
    with pytest.raises(ValueError, match=r"n_probes must be a positive integer, got 0"):
        krylov_trace(matrix_hvp(A), like, eig.basis, 0)


def test_krylov_trace_without_deflation_is_plain_hutchinson_on_the_same_probes() -> None:
    """A heavy diagonal: plain Hutchinson is exact, deflating raises the variance (ratio > 1)."""
    A = torch.diag(torch.linspace(1.0, 3.0, 30, dtype=torch.float64)) + 0.01 * exact_spectrum_matrix(
        [1.0] * 5 + [0.0] * 25
    )
    like = {"w": torch.zeros(30)}
    eig = top_eigenvalues(matrix_hvp(A), like, tol=1e-3, keep_basis=True)
    assert eig.basis is not None
    plain = krylov_trace(matrix_hvp(A), like, eig.basis, 8, deflate=False, generator=torch.Generator().manual_seed(3))
    deflated = krylov_trace(matrix_hvp(A), like, eig.basis, 8, generator=torch.Generator().manual_seed(3))
    reference = hutchinson_trace(matrix_hvp(A), like, 8, generator=torch.Generator().manual_seed(3))
    # The same terms up to float32 rounding of the inner products; the terms differ by about 0.03 around 60, so
    # their standard deviation keeps only about 4 of float32's 7 digits.
    assert plain.estimate == pytest.approx(reference[0], rel=1e-6) and plain.standard_error == pytest.approx(
        reference[1], rel=1e-3
    )
    assert plain.variance_ratio == pytest.approx(deflated.variance_ratio) and plain.variance_ratio > 1
    assert deflated.standard_error > plain.standard_error


def test_the_basis_memory_grows_only_as_far_as_the_run_goes() -> None:
    """Rows are allocated as the basis grows: a warm start on the top eigenvector stops after one product holding
    the start, its product and the trace's two spare rows, not ``max_basis + 3`` rows."""
    A = exact_spectrum_matrix(torch.linspace(9.0, 0.0, 60).tolist())  # small gaps: a slow, restarted run
    like = {"w": torch.zeros(60)}
    top = top_eigenvalues(matrix_hvp(A), like, tol=1e-8, max_iter=500, keep_basis=True)
    assert top.basis is not None and top.basis.rows is not None
    grown = top.basis.rows.shape[0]
    assert top.iterations > 8 and grown == 8 + 1 + 2  # the default basis for k = 1 is 8, the cap
    warm = top_eigenvalues(matrix_hvp(A), like, tol=1e-4, v0=top.eigenvectors, keep_basis=True)
    assert warm.iterations == 1 and warm.eigenvalues[0].item() == pytest.approx(9.0, rel=1e-4)
    assert warm.basis is not None and warm.basis.rows is not None and warm.basis.rows.shape[0] == 1 + 1 + 2
    t = krylov_trace(matrix_hvp(A), like, warm.basis, 4)  # the spare rows are where its probe goes
    assert t.probes == 4 and math.isfinite(t.estimate)


def test_krylov_trace_reads_the_basis_in_the_order_of_its_own_like() -> None:
    """A basis made with one key order and a trace asked with another: the rows are laid out in the first order,
    so the trace must not read them as if they were in the second (it copies the vectors instead)."""
    A = exact_spectrum_matrix([5.0, -2.0] + [0.0] * 8)  # rank 2: the basis spans the range, the trace is exact

    def hvp(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = (A @ torch.cat([v["a"], v["b"]]).double()).float()
        return {"a": out[:3], "b": out[3:]}

    like = {"a": torch.zeros(3), "b": torch.zeros(7)}
    eig = top_eigenvalues(hvp, like, tol=1e-6, keep_basis=True, max_basis=3)
    assert eig.basis is not None
    assert krylov_trace(hvp, like, eig.basis, 4).estimate == pytest.approx(3.0, abs=1e-4)
    swapped = {"b": like["b"], "a": like["a"]}
    assert krylov_trace(hvp, swapped, eig.basis, 4).estimate == pytest.approx(3.0, abs=1e-4)
