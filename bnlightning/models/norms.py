"""Normalization layers: BatchNorm's variants studied in the paper, and one factory.

``NoisyBatchNorm`` follows PROTOCOL.md §4 (the paper's Algorithm 1) and ``LpNorm``
follows §5. ``make_norm`` turns a CLI-friendly name into a module, with one clear
error for a name it does not know.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

NormKind = Literal["none", "batch", "noisy_batch", "l1", "l2", "linf", "layer", "group"]
NORM_KINDS: tuple[str, ...] = NormKind.__args__  # type: ignore[attr-defined]


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    """Dimensions a batch statistic runs over: the batch and, for images, the pixels."""
    if x.dim() not in (2, 4):
        raise ValueError(f"expected a 2-D (N, C) or 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    return (0,) if x.dim() == 2 else (0, 2, 3)


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) vector so it broadcasts over ``x``'s channel dimension."""
    return v.view(1, -1) if x.dim() == 2 else v.view(1, -1, 1, 1)


class NoisyBatchNorm(nn.Module):
    """BatchNorm followed by the paper's time-varying, non-Gaussian noise (PROTOCOL §4).

    In training mode, after BatchNorm (and its affine), every step draws per unit j
    ``mu_j ~ U(-n_mu, n_mu)`` and ``sigma_j ~ U(1, n_sigma)``, then per sample i and unit j
    ``m_ij ~ U(mu_j - r_mu, mu_j + r_mu)`` and ``s_ij ~ N(sigma_j, r_sigma)``, and returns
    ``s_ij * a_ij + m_ij``. For images the spatial positions count as samples, so j is
    the channel. In eval mode it is exactly the wrapped BatchNorm. Random numbers come
    from torch's default generator of the input's device, so seeding torch seeds them.

    Args:
        num_features: channels (images) or units (vectors).
        dims: 1 for (N, C) inputs, 2 for (N, C, H, W) inputs.
        affine: BatchNorm's learnable gamma and beta.
        n_mu, n_sigma, r_mu, r_sigma: the noise parameters (paper: 0.5, 1.25, 0.1, 0.1).
        eps, momentum: passed to the BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        dims: Literal[1, 2] = 2,
        affine: bool = True,
        n_mu: float = 0.5,
        n_sigma: float = 1.25,
        r_mu: float = 0.1,
        r_sigma: float = 0.1,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if n_sigma < 1:
            raise ValueError(f"n_sigma must be >= 1 (sigma_j ~ U(1, n_sigma)), got {n_sigma}")
        if min(n_mu, r_mu, r_sigma) < 0:
            raise ValueError(f"noise ranges must be non-negative, got n_mu={n_mu}, r_mu={r_mu}, r_sigma={r_sigma}")
        bn_cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.bn = bn_cls(num_features, eps=eps, momentum=momentum, affine=affine)
        self.n_mu, self.n_sigma, self.r_mu, self.r_sigma = n_mu, n_sigma, r_mu, r_sigma

    def sample_noise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Draw this step's multiplicative ``s`` and additive ``m`` noise, shaped like ``x``."""
        c = x.shape[1]
        mu = (torch.rand(c, device=x.device, dtype=x.dtype) * 2 - 1) * self.n_mu
        sigma = 1 + torch.rand(c, device=x.device, dtype=x.dtype) * (self.n_sigma - 1)
        m = _per_channel(mu, x) + (torch.rand_like(x) * 2 - 1) * self.r_mu
        s = _per_channel(sigma, x) + torch.randn_like(x) * self.r_sigma
        return s, m

    def forward(self, x: Tensor) -> Tensor:
        a = self.bn(x)
        if not self.training:
            return a
        s, m = self.sample_noise(a)
        return s * a + m

    def extra_repr(self) -> str:
        return f"n_mu={self.n_mu}, n_sigma={self.n_sigma}, r_mu={self.r_mu}, r_sigma={self.r_sigma}"


class LpNorm(nn.Module):
    """BatchNorm with the standard deviation replaced by an l_p batch statistic (PROTOCOL §5).

    ``y_hat = (y - mu_B) / s_p`` then ``gamma * y_hat + beta``, with, per channel over the
    batch (and pixels), ``s_1 = mean|y - mu_B|``, ``s_2 = sqrt(mean (y - mu_B)^2 + eps)``
    and ``s_inf = max|y - mu_B|``; for ``p`` in {1, inf} ``eps`` is added to ``s_p``. With
    ``center_scale=False`` the statistic is taken of the uncentred ``y`` instead (the
    paper's "before shifting the mean" read the other way).

    Eval mode uses running averages (``momentum``), as BatchNorm does. ``p=2`` with
    ``center_scale=True`` is exactly BatchNorm in both modes: it keeps BatchNorm's
    ``running_var`` (the *unbiased* batch variance, averaged) and divides by
    ``sqrt(running_var + eps)`` in eval. Every other setting keeps ``running_scale``, the
    average of ``s_p`` itself, because no variance underlies it.

    Args:
        num_features: channels (images) or units (vectors).
        p: 1, 2 or ``inf`` (``float("inf")``).
        affine: learnable gamma and beta.
        center_scale: take ``s_p`` of the centred (True) or uncentred (False) input.
        eps, momentum: as in BatchNorm.
    """

    # registered buffers and parameters, typed for the checker (nn.Module.__getattr__ is untyped)
    running_mean: Tensor
    running_var: Tensor
    running_scale: Tensor
    num_batches_tracked: Tensor
    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        p: float = 2.0,
        affine: bool = True,
        center_scale: bool = True,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if p not in (1.0, 2.0, math.inf):
            raise ValueError(f"LpNorm p must be 1, 2 or inf, got {p}")
        self.num_features, self.p, self.center_scale = num_features, float(p), center_scale
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        # p=2, centred: BatchNorm's own statistic (unbiased variance), so eval matches it too.
        self.tracks_variance = self.p == 2.0 and center_scale
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var" if self.tracks_variance else "running_scale", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def batch_scale(self, y: Tensor, mean: Tensor) -> Tensor:
        """The l_p statistic ``s_p`` per channel (before any running average)."""
        dims = _reduce_dims(y)
        z = y - _per_channel(mean, y) if self.center_scale else y
        if self.p == 1.0:
            return z.abs().mean(dims) + self.eps
        if self.p == 2.0:
            return (z.pow(2).mean(dims) + self.eps).sqrt()
        return z.abs().amax(dims) + self.eps

    def forward(self, y: Tensor) -> Tensor:
        if self.training:
            mean = y.mean(_reduce_dims(y))
            scale = self.batch_scale(y, mean)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                if self.tracks_variance:
                    n = y.numel() // y.shape[1]  # values per channel
                    biased = scale.detach().pow(2) - self.eps
                    self.running_var.lerp_(biased * n / max(n - 1, 1), self.momentum)
                else:
                    self.running_scale.lerp_(scale.detach(), self.momentum)
                self.num_batches_tracked.add_(1)
        elif self.tracks_variance:
            mean, scale = self.running_mean, (self.running_var + self.eps).sqrt()
        else:
            mean, scale = self.running_mean, self.running_scale
        out = (y - _per_channel(mean, y)) / _per_channel(scale, y)
        if self.weight is not None and self.bias is not None:
            out = out * _per_channel(self.weight, y) + _per_channel(self.bias, y)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, p={self.p}, center_scale={self.center_scale}, eps={self.eps}"


def _num_groups(channels: int, preferred: int = 32) -> int:
    """The largest group count <= ``preferred`` that divides ``channels``."""
    return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


def make_norm(kind: str, num_features: int, dims: Literal[1, 2], affine: bool = True) -> nn.Module:
    """Build the normalization layer named ``kind`` for ``num_features`` channels or units.

    ``dims`` is 1 for vectors (N, C) and 2 for images (N, C, H, W). ``none`` gives
    ``nn.Identity``; ``layer`` normalizes each sample over all its features (GroupNorm
    with one group for images); ``group`` uses up to 32 groups.

    Raises:
        ValueError: for a name not in ``NORM_KINDS``, naming the accepted ones.
    """
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm1d(num_features, affine=affine) if dims == 1 else nn.BatchNorm2d(num_features, affine=affine)
    if kind == "noisy_batch":
        return NoisyBatchNorm(num_features, dims=dims, affine=affine)
    if kind in ("l1", "l2", "linf"):
        return LpNorm(num_features, p={"l1": 1.0, "l2": 2.0, "linf": math.inf}[kind], affine=affine)
    if kind == "layer":
        if dims == 1:
            return nn.LayerNorm(num_features, elementwise_affine=affine)
        return nn.GroupNorm(1, num_features, affine=affine)
    if kind == "group":
        return nn.GroupNorm(_num_groups(num_features), num_features, affine=affine)
    raise ValueError(f"unknown norm {kind!r}; accepted: {', '.join(NORM_KINDS)}")
