"""The Hessian's eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019; PROTOCOL §12).

For each of ``n_starts`` random unit vectors v, m Lanczos steps on H (full reorthogonalization)
give a tridiagonal T_m whose eigenvalues θ_k (Ritz values) and squared first eigenvector
components w_k form the Gauss quadrature of vᵀ f(H) v: Σ_k w_k f(θ_k), exact for polynomials f
of degree < 2m. Averaged over the starts, Σ w_k δ(λ − θ_k) estimates the spectral density
(1/n) Σ_i δ(λ − λ_i); ``density`` smooths it with Gaussians of width σ.

Cost: m · n_starts HVPs per mode (plus one HVP set-up) and the reorthogonalization (one or two passes over the
basis per step: O(m²) vector passes per start); memory: m + 1 parameter-sized vectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from bnlightning.callbacks.functional._harness import LossHarness
from bnlightning.callbacks.functional._hvp import make_hvp
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional._numerics import Reduce, reduce_dict, to_float32
from bnlightning.callbacks.functional._vectors import Layout, Vec, orthogonalize_, row_norm
from bnlightning.callbacks.functional.gauges import is_norm

__all__ = ["NORM_MODES", "SLQResult", "density", "lanczos_quadrature", "spectral_density"]

#: ``train``: normalization in training mode (batch statistics); ``running``: BatchNorm layers use
#: their running statistics (eval mode for the norms only; dropout stays as the module has it).
NORM_MODES = ("train", "running")


class SLQResult(NamedTuple):
    """Ritz values and weights of every start (``n_starts`` × m, float64) and the HVPs used."""

    nodes: Tensor
    weights: Tensor
    hvps: int


def lanczos_quadrature(hvp: Any, like: Vec, steps: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the m-point Gauss quadrature of vᵀ f(H) v for one Gaussian start v (unit norm).

    Plain Lanczos with full reorthogonalization (``_vectors.orthogonalize_``: Gram–Schmidt, a second pass where the
    first cancelled); stops early on an invariant subspace (then fewer nodes, still exact for that v). The basis is
    held as rows of one flat matrix (``_vectors.Layout``), m + 1 parameter-sized vectors.
    """
    layout = Layout(like)
    rows = layout.rows(steps + 1)
    start = layout.gaussian(generator)
    rows[0].copy_(start.mul_(1.0 / row_norm(start)))
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = layout.product(hvp, None, rows[j], out=rows[j + 1])
        coeffs, beta = orthogonalize_(w, rows[: j + 1])
        alphas.append(float(coeffs[j]))  # qⱼᵀ H qⱼ; the other coefficients are the couplings and rounding
        if j == steps - 1 or beta <= 1e-10 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        w.mul_(1.0 / beta)
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    return theta, S[0].pow(2)


@contextmanager
def _norms_on_running_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in eval mode (running statistics) for the block; every flag put back after."""
    norms = [m for m in module.modules() if is_norm(m) and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    try:
        for m in norms:
            m.training = False
        yield
    finally:
        for m, t in zip(norms, modes):
            m.training = t


def spectral_density(
    module: nn.Module,
    batch: Any,
    *,
    lanczos_steps: int = 20,
    n_starts: int = 2,
    norm_mode: str = "train",
    seed: int = 0,
    hvp_method: str = "retained",
    loss_fn: LossFn | None = None,
    reduce: Reduce | None = None,
) -> SLQResult:
    """Stochastic Lanczos quadrature of the training loss's Hessian on ``batch`` (every trainable parameter).

    Args:
        module, batch, loss_fn: as in ``internal_covariate_shift``.
        lanczos_steps: m, the Lanczos steps (HVPs) per start (>= 1).
        n_starts: n_v, the random starts (>= 1); every rank must use the same ``seed`` under DDP.
        norm_mode: ``train`` (BatchNorm on batch statistics, as training) or ``running`` (BatchNorm
            on its running statistics; other modules as they are).
        seed: seed of the start vectors (a CPU ``torch.Generator``: the global RNG is untouched).
        hvp_method: see ``_hvp.make_hvp``.
        reduce: mean over ranks (DDP), applied to every HVP.

    Raises:
        ValueError: a bad ``lanczos_steps``, ``n_starts`` or ``norm_mode``.
    """
    for what, value in (("lanczos_steps", lanczos_steps), ("n_starts", n_starts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    if norm_mode not in NORM_MODES:
        raise ValueError(f"unknown norm_mode {norm_mode!r}; accepted: {', '.join(NORM_MODES)}")
    model = LossHarness(module, loss_fn)
    batch = to_float32(batch)
    point = {n: model.values[n] for n in model.trainable}
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    with (
        model.session(second_order=True) as rng,
        _norms_on_running_stats(module) if norm_mode == "running" else _nothing(),
    ):
        buffers = model.fresh_buffers()

        def loss_of(p: Vec) -> Tensor:
            rng.restore()
            return model.loss({**model.values, **buffers, **p}, batch)

        raw = make_hvp(loss_of, point, hvp_method)  # type: ignore[arg-type]
        hvps = [0]

        def hvp(v: Vec) -> Vec:
            hvps[0] += 1
            return reduce_dict(raw(v), reduce)

        for _ in range(n_starts):
            theta, w = lanczos_quadrature(hvp, point, lanczos_steps, gen)
            pad = lanczos_steps - theta.numel()  # an early stop: zero-weight nodes keep the shape
            nodes.append(torch.cat([theta, theta.new_full((pad,), float(theta[-1]))]))
            weights.append(torch.cat([w, w.new_zeros(pad)]))
    return SLQResult(torch.stack(nodes), torch.stack(weights), hvps[0])


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """(1/n_v) Σ_starts Σ_k w_k 𝒩(λ; θ_k, σ²) on ``grid``: the smoothed spectral density (integrates to 1)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    g = grid.double().view(-1, 1)
    z = (g - nodes.double().reshape(1, -1)) / sigma
    return (torch.exp(-0.5 * z * z) * weights.double().reshape(1, -1)).sum(1) / (
        nodes.shape[0] * sigma * math.sqrt(2 * math.pi)
    )
