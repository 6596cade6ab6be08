"""``ResidualVariance``: residual branch vs skip path, per block (the article "Batch Normalization… or not?"; De & Smith
2020).

The claim: in a residual network, BatchNorm on the residual branch downscales it relative
to the skip path at initialisation (the skip path's variance grows with depth while BN
keeps the branch at unit variance), so a deep BN-ResNet starts close to a shallow one.

A *block* is any module with two children named ``branch`` and ``shortcut`` (as in
``bnlightning.models.ResNet``); its output must be ``f(branch(x) + shortcut(x))``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from bnlightning.callbacks.base import MeasurementCallback
from bnlightning.callbacks.functional import capture_forward
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional.names import resvar_key
from bnlightning.callbacks.functional.residual import block_metrics, read_variance, residual_blocks, residual_variance

__all__ = ["ResidualVariance", "residual_blocks", "residual_variance"]


class ResidualVariance(MeasurementCallback):
    """Log ``resvar/<block>/{branch,skip,ratio}`` for every residual block.

    When and how: as ``MeanShift`` -- forward hooks on each block's ``branch`` and
    ``shortcut`` only around one float32, no-grad, side-effect-free ``measurement_forward``
    of the measured step's training batch (pre-step weights, norms in training mode). Each
    variance is taken inside the hook, when the output is produced, so a block written
    ``out = self.branch(x); out += self.shortcut(x)`` (which rewrites the branch output in place)
    is measured right; a block called several times in the pass is read at its last call.
    ``every_n_steps=1`` with ``max_steps=1`` measures the network at initialisation.

    Args:
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        loss_fn: ``(module, batch) -> scalar loss`` or its import path (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).
        max_overhead: ``None``, or the fraction in (0, 1) of training time this callback's measurements may
            take: it then times them and skips scheduled steps to stay within it (shared fairly with the
            other budgeted callbacks; ``every_n_steps`` is the densest spacing) and logs ``resvar/cost_steps``.
        schedule: ``"fixed"`` (every ``every_n_steps`` steps) or ``"log"`` (about 10 steps per decade:
            1, 2, 3, 4, 6, 7, 8, 10, 13, 16, 20, ..., 100, 126, ...).

    Raises:
        ValueError: at setup, a module without residual blocks (``branch`` + ``shortcut`` children).

    Example::

        trainer = Trainer(max_steps=1, callbacks=[ResidualVariance(every_n_steps=1)])
    """

    metric_prefix = "resvar"

    def __init__(
        self,
        every_n_steps: int = 100,
        loss_fn: LossFn | str | None = None,
        loss_method: str | None = None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__(every_n_steps, loss_fn, loss_method, max_overhead, schedule)
        self._blocks: list[str] = []

    @override
    def on_measurement_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._blocks = residual_blocks(pl_module)
        if not self._blocks:
            raise ValueError(
                f"{type(pl_module).__name__} has no residual block (a module with children named 'branch' and "
                "'shortcut')"
            )

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any
    ) -> dict[str, Tensor]:
        taps: dict[tuple[str, str], Any] = {}
        for name in self._blocks:
            block = pl_module.get_submodule(name)
            taps[name, "branch"], taps[name, "skip"] = (block.branch, "output"), (block.shortcut, "output")
        # The variances are taken in the hooks: `out = branch(x); out += shortcut(x)` rewrites the branch output.
        seen = capture_forward(pl_module, batch, taps, read=read_variance, loss_fn=self.measured_loss(pl_module))
        out: dict[str, Tensor] = {}
        for n in self._blocks:
            if (n, "branch") in seen and (n, "skip") in seen:
                out.update(block_metrics(n, seen[n, "branch"], seen[n, "skip"]))
        return out

    @override
    def charts(self) -> dict[str, list[str]]:
        return {"resvar_ratio": [resvar_key(b, "ratio") for b in self._blocks]}
