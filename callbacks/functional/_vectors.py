"""Vector algebra on parameter dicts, for the curvature operators and algorithms (pure torch).

A vector is a ``dict[str, Tensor]`` shaped like the parameters (float32). Scalars are accumulated in
float64 so that reorthogonalization coefficients keep the digits a convergence test needs; the vectors
themselves stay float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = [
    "Hvp",
    "Vec",
    "apply",
    "axpy_",
    "check_like",
    "combine",
    "dot",
    "norm",
    "orthogonalize_",
    "random_like",
    "scale_",
]

Vec = dict[str, Tensor]
#: ``v -> A v`` for a symmetric operator A (a Hessian) on parameter dicts.
Hvp = Callable[[Vec], Vec]


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """⟨a, b⟩ in float64."""
    # Summed on each device first: one host sync per device and dot product, not per tensor.
    per_device: dict[torch.device, Tensor] = {}
    for k in a:
        d = torch.vdot(a[k].reshape(-1), b[k].reshape(-1)).double()
        per_device[d.device] = per_device[d.device] + d if d.device in per_device else d
    return math.fsum(float(t) for t in per_device.values())


def norm(a: Mapping[str, Tensor]) -> float:
    return math.sqrt(max(dot(a, a), 0.0))


def scale_(a: Vec, alpha: float) -> Vec:
    """a *= alpha, in place."""
    for t in a.values():
        t.mul_(alpha)
    return a


def axpy_(y: Vec, alpha: float, x: Mapping[str, Tensor]) -> Vec:
    """y += alpha * x, in place."""
    for k, t in y.items():
        t.add_(x[k], alpha=alpha)
    return y


def combine(vectors: list[Vec], coeffs: list[float]) -> Vec:
    """sum_i coeffs[i] * vectors[i], as a new vector."""
    out = {k: torch.zeros(t.shape, dtype=t.dtype, device=t.device) for k, t in vectors[0].items()}
    for c, v in zip(coeffs, vectors):
        axpy_(out, c, v)
    return out


def random_like(like: Mapping[str, Tensor], generator: torch.Generator, rademacher: bool = False) -> Vec:
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


def check_like(like: Mapping[str, Tensor], what: str = "like") -> None:
    """``like`` must be a non-empty dict of float32 tensors (ValueError naming the bad entry)."""
    if not isinstance(like, Mapping) or not like:
        raise ValueError(f"{what} must be a non-empty dict of tensors, got {type(like).__name__}")
    for k, t in like.items():
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{what}[{k!r}] must be a float32 tensor, got {got}")


def apply(hvp: Hvp, reduce: Callable[[Vec], Vec] | None, v: Vec) -> Vec:
    """``reduce(hvp(v))`` as float32 tensors of its own (the caller's hvp may return views it reuses)."""
    hv = hvp(v)
    if reduce is not None:
        hv = reduce(hv)
    return {k: hv[k].detach().to(torch.float32).clone(memory_format=torch.contiguous_format) for k in v}


def orthogonalize_(w: Vec, basis: list[Vec]) -> Tensor:
    """Make ``w`` orthogonal to the orthonormal ``basis`` in place (CGS2); return the coefficients."""
    coeffs = torch.zeros(len(basis), dtype=torch.float64)
    for _ in range(2):  # "twice is enough" (Giraud et al. 2005)
        c = torch.tensor([dot(q, w) for q in basis], dtype=torch.float64)
        for ci, q in zip(c.tolist(), basis):
            axpy_(w, -ci, q)
        coeffs += c
    return coeffs
