"""NoisyBatchNorm and LpNorm against PROTOCOL §4-5, written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlightning.models.norms import NORM_KINDS, LpNorm, NoisyBatchNorm, make_norm


def test_noisy_bn_noise_has_the_protocol_moments() -> None:
    torch.manual_seed(0)
    channels, n = 4000, 64
    layer = NoisyBatchNorm(channels, dims=1)
    s, m = layer.sample_noise(torch.zeros(n, channels))
    # Per unit: mu_j ~ U(-0.5, 0.5) is recovered as the mean of m over samples; m - mu_j ~ U(-0.1, 0.1).
    mu_hat = m.mean(0)
    assert mu_hat.abs().max() <= 0.5 + 0.1
    assert abs(mu_hat.mean().item()) < 0.02
    assert mu_hat.var().item() == pytest.approx(1 / 12 + 0.1**2 / 3 / n, rel=0.1)
    within = m - mu_hat
    assert within.abs().max() <= 0.2 + 1e-6
    assert within.var().item() == pytest.approx(0.1**2 / 3, rel=0.1)
    # sigma_j ~ U(1, 1.25), s_ij ~ N(sigma_j, 0.1).
    sigma_hat = s.mean(0)
    assert sigma_hat.mean().item() == pytest.approx(1.125, abs=0.005)
    assert sigma_hat.var().item() == pytest.approx(0.25**2 / 12 + 0.01 / n, rel=0.15)
    assert (s - sigma_hat).std().item() == pytest.approx(0.1, rel=0.05)


def test_noisy_bn_conv_counts_pixels_as_samples_and_applies_s_a_plus_m() -> None:
    torch.manual_seed(1)
    layer = NoisyBatchNorm(3, dims=2).train()
    x = torch.randn(5, 3, 4, 4)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    ref_bn = nn.BatchNorm2d(3).train()
    a = ref_bn(x)
    s, m = layer.sample_noise(a)
    torch.testing.assert_close(out, s * a + m)
    assert s.shape == x.shape and m.shape == x.shape
    # One (mu_j, sigma_j) per channel: per-pixel noise varies, the channel centre does not.
    assert torch.unique(m[:, 0]).numel() == m[:, 0].numel()


def test_noisy_bn_is_plain_bn_in_eval_mode() -> None:
    layer = NoisyBatchNorm(3, dims=2)
    layer.train()(torch.randn(8, 3, 4, 4))  # give it running statistics
    layer.eval()
    x = torch.randn(2, 3, 4, 4)
    rng = torch.get_rng_state()
    torch.testing.assert_close(layer(x), layer.bn(x), rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng), "eval mode must not draw noise"


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("shape", [(16, 5), (6, 5, 3, 3)])
def test_lp_norm_matches_the_plain_formula(p: float, shape: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    y = torch.randn(*shape) * 3 + 1
    layer = LpNorm(5, p=p)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
    out = layer.train()(y)
    # Plain formula, channel by channel with explicit loops.
    for c in range(5):
        v = y[:, c].reshape(-1).double()
        mu = v.mean()
        z = v - mu
        if p == 1.0:
            s_p = z.abs().mean() + layer.eps
        elif p == 2.0:
            s_p = (z.pow(2).mean() + layer.eps).sqrt()
        else:
            s_p = z.abs().max() + layer.eps
        expect = (z / s_p) * layer.weight[c].double() + layer.bias[c].double()
        torch.testing.assert_close(out[:, c].reshape(-1).double(), expect.detach(), rtol=1e-5, atol=1e-5)


def test_lp_norm_l2_is_batchnorm_and_uncentred_flag() -> None:
    torch.manual_seed(3)
    y = torch.randn(8, 4, 5, 5) + 2
    torch.testing.assert_close(LpNorm(4, p=2)(y), nn.BatchNorm2d(4)(y), rtol=1e-5, atol=1e-5)
    out = LpNorm(4, p=1, center_scale=False, affine=False)(y)
    mu = y.mean((0, 2, 3), keepdim=True)
    s1 = y.abs().mean((0, 2, 3), keepdim=True) + 1e-5
    torch.testing.assert_close(out, (y - mu) / s1)


@pytest.mark.parametrize("shape", [(16, 4), (8, 4, 5, 5)])
def test_lp_norm_l2_is_batchnorm_in_eval_too(shape: tuple[int, ...]) -> None:
    """Same running statistics as BatchNorm (unbiased variance), so eval outputs agree after training steps."""
    torch.manual_seed(4)
    lp = LpNorm(4, p=2, momentum=0.3)
    bn = nn.BatchNorm1d(4, momentum=0.3) if len(shape) == 2 else nn.BatchNorm2d(4, momentum=0.3)
    with torch.no_grad():
        for m in (lp, bn):
            m.weight.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    for step in range(3):
        y = torch.randn(shape) * (step + 1) + 2
        torch.testing.assert_close(lp(y), bn(y), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.running_mean, bn.running_mean)
    torch.testing.assert_close(lp.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    x = torch.randn(shape) * 3
    torch.testing.assert_close(lp.eval()(x), bn.eval()(x), rtol=1e-5, atol=1e-5)
    # The biased statistic (what it kept before) would be visibly off for a batch this small.
    assert not torch.allclose(bn.running_var, lp.running_var * (1 - 1 / (y.numel() // 4)), rtol=1e-4)


def test_lp_norm_eval_uses_running_statistics() -> None:
    layer = LpNorm(3, p=math.inf, affine=False, momentum=1.0)
    y = torch.randn(10, 3) * 2
    layer.train()(y)
    mu = y.mean(0)
    torch.testing.assert_close(layer.running_mean, mu)
    torch.testing.assert_close(layer.running_scale, (y - mu).abs().amax(0) + 1e-5)
    x = torch.randn(4, 3)
    torch.testing.assert_close(layer.eval()(x), (x - mu) / layer.running_scale)


@pytest.mark.parametrize("kind", NORM_KINDS)
@pytest.mark.parametrize("dims", [1, 2])
def test_make_norm_builds_every_kind(kind: str, dims: int) -> None:
    layer = make_norm(kind, 8, dims=dims)
    x = torch.randn(4, 8) if dims == 1 else torch.randn(4, 8, 3, 3)
    assert layer(x).shape == x.shape
    assert not any(p.requires_grad for p in make_norm(kind, 8, dims=dims, affine=False).parameters())


def test_make_norm_rejects_unknown_names_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm'; accepted: none, batch, noisy_batch"):
        make_norm("batchnorm", 8, dims=2)
