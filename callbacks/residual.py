"""``ResidualVariance``: residual branch vs skip path, per block (seed 003; De & Smith 2020).

The claim: in a residual network, BatchNorm on the residual branch downscales it relative
to the skip path at initialisation (the skip path's variance grows with depth while BN
keeps the branch at unit variance), so a deep BN-ResNet starts close to a shallow one.

A *block* is any module with two children named ``branch`` and ``shortcut`` (as in
``bnlightning.models.ResNet``); its output must be ``f(branch(x) + shortcut(x))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from bnlightning.callbacks.base import MeasurementCallback
from bnlightning.callbacks.functional import capture_forward
from bnlightning.callbacks.functional._loss import LossFn

__all__ = ["ResidualVariance", "residual_blocks", "residual_variance"]


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
        if branch.shape != skip.shape:
            raise ValueError(f"block {name!r}: branch output {tuple(branch.shape)} and shortcut output {tuple(skip.shape)} differ")
        vb = branch.detach().double().var(unbiased=False)
        vs = skip.detach().double().var(unbiased=False)
        out[f"resvar/{name}/branch"] = vb.float()
        out[f"resvar/{name}/skip"] = vs.float()
        out[f"resvar/{name}/ratio"] = (vb / vs).float() if vs > 0 else torch.tensor(float("inf"))
    return out


class ResidualVariance(MeasurementCallback):
    """Log ``resvar/<block>/{branch,skip,ratio}`` for every residual block.

    When and how: as ``MeanShift`` -- forward hooks on each block's ``branch`` and
    ``shortcut`` only around one float32, no-grad, side-effect-free ``measurement_forward``
    of the measured step's training batch (pre-step weights, norms in training mode).
    ``every_n_steps=1`` with ``max_steps=1`` measures the network at initialisation.

    Args:
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        loss_fn: ``(module, batch) -> scalar loss`` or its import path (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).

    Raises:
        ValueError: at setup, a module without residual blocks (``branch`` + ``shortcut`` children).

    Example::

        trainer = Trainer(max_steps=1, callbacks=[ResidualVariance(every_n_steps=1)])
    """

    def __init__(self, every_n_steps: int = 100, loss_fn: LossFn | str | None = None, loss_method: str | None = None) -> None:
        super().__init__(every_n_steps, loss_fn, loss_method)
        self._blocks: list[str] = []

    @override
    def on_measurement_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._blocks = residual_blocks(pl_module)
        if not self._blocks:
            raise ValueError(f"{type(pl_module).__name__} has no residual block (a module with children named 'branch' and 'shortcut')")

    @override
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any) -> dict[str, Tensor]:
        taps: dict[str, Any] = {}
        for name in self._blocks:
            block = pl_module.get_submodule(name)
            taps[f"{name}\x00branch"], taps[f"{name}\x00skip"] = (block.branch, "output"), (block.shortcut, "output")
        seen = capture_forward(pl_module, batch, taps, loss_fn=self.measured_loss(pl_module))
        pairs = {n: (seen[f"{n}\x00branch"], seen[f"{n}\x00skip"]) for n in self._blocks if f"{n}\x00branch" in seen and f"{n}\x00skip" in seen}
        return residual_variance(pairs)

    @override
    def charts(self) -> dict[str, list[str]]:
        return {"resvar_ratio": [f"resvar/{b}/ratio" for b in self._blocks]}
