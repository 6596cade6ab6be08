"""Residual branch vs skip path, per block (the article "Batch Normalization… or not?"; De & Smith 2020).

The claim: in a residual network, BatchNorm on the residual branch downscales it relative
to the skip path at initialisation (the skip path's variance grows with depth while BN
keeps the branch at unit variance), so a deep BN-ResNet starts close to a shallow one.

A *block* is any module with two children named ``branch`` and ``shortcut`` (as in
``bnlightning.models.ResNet``). ``residual_variance`` is the pure function on the two outputs;
``bnlightning.callbacks.ResidualVariance`` the callback that reads them in one side-effect-free pass
(``read_variance`` at hook time, ``block_metrics`` after).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from bnlightning.callbacks.functional.names import resvar_key

__all__ = ["block_metrics", "read_variance", "residual_blocks", "residual_variance"]


def residual_blocks(module: nn.Module) -> list[str]:
    """Names of the submodules that have both a ``branch`` and a ``shortcut`` child."""
    out = []
    for name, m in module.named_modules():
        children = dict(m.named_children())
        if name and "branch" in children and "shortcut" in children:
            out.append(name)
    return out


def residual_variance(outputs: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Per block, the variance of the branch's and the skip path's outputs over the batch.

    Variance: of all entries of the output (examples, channels, pixels pooled; population
    variance). ``resvar/<block>/ratio`` = var(branch) / var(skip): below 1, the block is
    close to the identity.

    Args:
        outputs: block name -> (branch output, shortcut output) on one batch.

    Raises:
        ValueError: the two outputs of a block differ in shape.

    Example::

        residual_variance({"stage1.block1": (torch.randn(8, 4), 3 * torch.randn(8, 4))})
    """
    out: dict[str, Tensor] = {}
    for name, (branch, skip) in outputs.items():
        out.update(block_metrics(name, read_variance(name, branch), read_variance(name, skip)))
    return out


def read_variance(name: str, x: Tensor) -> tuple[torch.Size, Tensor]:
    """What a block needs of one output: its shape and its population variance (float64), at hook time."""
    return x.shape, x.detach().double().var(unbiased=False)


def block_metrics(name: str, branch: tuple[torch.Size, Tensor], skip: tuple[torch.Size, Tensor]) -> dict[str, Tensor]:
    (shape_b, vb), (shape_s, vs) = branch, skip
    if shape_b != shape_s:
        raise ValueError(f"block {name!r}: branch output {tuple(shape_b)} and shortcut output {tuple(shape_s)} differ")
    ratio = (vb / vs).float() if vs > 0 else torch.tensor(float("inf"))
    return {
        resvar_key(name, "branch"): vb.float(),
        resvar_key(name, "skip"): vs.float(),
        resvar_key(name, "ratio"): ratio,
    }
