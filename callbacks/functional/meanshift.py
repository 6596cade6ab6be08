"""Mean shift (PROTOCOL §10): how alike different examples look inside the network.

Brock et al. (2021) and the article "Batch Normalization… or not?": without normalization, ReLU outputs have a positive
mean per channel, the shift grows with depth, and every example's hidden representation points the same way, until the
network predicts one label for every input at initialisation. BatchNorm removes the per-channel mean at every layer;
scaled weight standardisation removes it from the weights instead.

``mean_shift`` is the pure function on captured activations; ``bnlightning.callbacks.MeanShift``
the callback that applies it to chosen layers' outputs during one side-effect-free pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from bnlightning.callbacks.functional.names import MEANSHIFT_MAJORITY_SHARE, meanshift_key

__all__ = ["looks_like_logits", "majority_share", "mean_shift", "pairwise_cosine_mean"]


def pairwise_cosine_mean(a: Tensor) -> Tensor:
    """Mean of ``cos(A_a, A_b)`` over ordered pairs of different examples ``a != b``.

    Each example's activations are flattened to one vector. An all-zero vector (a ReLU
    layer that is silent for that example) has cosine 0 with every other vector.

    Args:
        a: activations, batch first, at least 2 examples: (N, ...).

    Raises:
        ValueError: fewer than 2 examples (no pair to compare).

    Example::

        pairwise_cosine_mean(torch.ones(4, 3))  # tensor(1.)
    """
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"mean shift needs at least 2 examples in the batch, got {n}")
    x = a.detach().reshape(n, -1).double()  # float64: the sum of N^2 cosines must not lose the small ones
    norms = x.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, x / norms.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
    # sum_{a != b} cos = ||sum_a u_a||^2 - sum_a ||u_a||^2: O(N F) instead of the N x N Gram matrix.
    total = unit.sum(0).pow(2).sum() - unit.pow(2).sum()
    return (total / (n * (n - 1))).to(a.dtype if a.is_floating_point() else torch.float32)


def mean_shift(activations: Mapping[str, Tensor], logits: Tensor | None = None) -> dict[str, Tensor]:
    """Mean-shift statistics of captured activations and the predictions (PROTOCOL §10).

    Per layer ``<name>`` with output ``A`` (N, C) or (N, C, H, W):

    - ``meanshift/<name>/cos``: mean over pairs of different examples of ``cos(A_a, A_b)``
      (0: unrelated directions; 1: every example looks alike);
    - ``meanshift/<name>/channel_mean``: the mean over channels of each channel's mean over
      the batch (and pixels) -- positive for ReLU outputs without normalization.

    With ``logits`` (N, classes): ``meanshift/majority_share``, the share of examples given
    the most frequent predicted label (1: the same label for every example).

    Args:
        activations: layer name -> its output on one batch (batch first, same batch for all).
        logits: the network's outputs on that batch, or None.

    Raises:
        ValueError: a tensor with fewer than 2 examples or fewer than 2 dimensions.

    Example::

        stats = mean_shift({"relu1": torch.relu(torch.randn(8, 16))}, logits=torch.randn(8, 10))
    """
    out: dict[str, Tensor] = {}
    for name, a in activations.items():
        if a.dim() < 2:
            raise ValueError(f"activations of {name!r} must be batch first with features, got shape {tuple(a.shape)}")
        out[meanshift_key(name, "cos")] = pairwise_cosine_mean(a)
        dims = [0, *range(2, a.dim())]  # batch and pixels: one mean per channel
        out[meanshift_key(name, "channel_mean")] = a.detach().float().mean(dims).mean()
    if logits is not None:
        out[MEANSHIFT_MAJORITY_SHARE] = majority_share(logits)
    return out


def majority_share(logits: Tensor) -> Tensor:
    """Share of the examples given the most frequent predicted label (``argmax`` over classes).

    Raises:
        ValueError: ``logits`` is not (N, classes) with N >= 1.
    """
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise ValueError(f"logits must be (N, classes), got shape {tuple(logits.shape)}")
    counts = torch.bincount(logits.detach().argmax(1), minlength=logits.shape[1])
    return counts.max().float() / logits.shape[0]


def looks_like_logits(x: Tensor) -> bool:
    return x.dim() == 2 and x.is_floating_point() and x.shape[0] >= 1 and x.shape[1] >= 2
