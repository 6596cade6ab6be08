"""``ActivationStats``: distribution of pre-activations over training (PROTOCOL §3)."""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from bnlightning.callbacks._layers import ModuleLayersCallback, default_activation_layers
from bnlightning.callbacks.base import wandb_loggers
from bnlightning.callbacks.functional import activation_kind, activation_stats, capture_forward
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional.names import ACT, ACT_QUANTILES, act_key, metric_name

__all__ = ["ActivationStats", "default_activation_layers"]


def _finite_values(x: Tensor) -> Tensor:
    """The finite entries of ``x`` as a new float32 vector (a copy, never a view of ``x``)."""
    flat = x.detach().float().flatten()
    return flat[torch.isfinite(flat)]


class ActivationStats(ModuleLayersCallback):
    r"""Log the distribution of each selected layer's pre-activations (Ioffe & Szegedy Fig. 1).

    What is read: for an activation module (``nn.ReLU``, ``nn.Sigmoid``, ``nn.Tanh``, ...)
    its *input*, i.e. the pre-activation; for any other module its *output*. Default
    layers: every activation module, or, in a network without any (a deep linear
    network), every Conv/Linear output. ``saturated`` is logged for tanh/sigmoid-family
    inputs, ``dead`` for ReLU inputs.

    When: forward hooks are registered just before the callback's own measurement pass and
    removed right after it (training's forwards run without them, so the steps between
    measurements pay nothing); they record only during that pass, a float32, no-grad
    forward of ``loss_method(batch)`` on the measured step's training batch (pre-step
    weights, training mode, same RNG state as the training step saw at the start of
    ``on_before_optimizer_step``, buffers cloned, RNG rewound) -- never during training's
    own forwards, so training is untouched and bf16 rounding does not enter the statistics.

    Logged metrics (per layer, ``<layer>`` the module name relative to the LightningModule):

    - ``act/<layer>/q15``, ``act/<layer>/q50``, ``act/<layer>/q85``: quantiles over all entries
    - ``act/<layer>/mean``, ``act/<layer>/std`` (population std)
    - ``act/<layer>/saturated``: share of entries with ``|x| > saturation_threshold`` (tanh/sigmoid)
    - ``act/<layer>/dead``: share of units (features; (channel, row, column) for images) never positive on the batch
      (ReLU)
    - with a ``WandbLogger``: ``act/<layer>/hist`` (``wandb.Histogram``); with a
      ``TensorBoardLogger``: ``add_histogram("act/<layer>", ...)``.

    Args:
        layers: module names relative to the LightningModule (default: see above).
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        saturation_threshold: ``|x|`` above which a tanh/sigmoid unit counts as saturated (> 0).
        histogram: also log a histogram to loggers that take one.
        histogram_bins: bins of that histogram (>= 2).
        loss_fn: ``(module, batch) -> scalar loss`` or its import path (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).
        max_overhead: ``None``, or the fraction in (0, 1) of training time this callback's measurements may
            take: it then times them and skips scheduled steps to stay within it (shared fairly with the
            other budgeted callbacks; ``every_n_steps`` is the densest spacing) and logs ``act/cost_steps``.
        schedule: ``"fixed"`` (every ``every_n_steps`` steps) or ``"log"`` (about 10 steps per decade:
            1, 2, 3, 4, 6, 7, 8, 10, 13, 16, 20, ..., 100, 126, ...).

    Cost: activations only (the guard copies no parameter or optimizer state). Under DDP each rank
    summarises its own shard and rank zero's numbers are logged (statistics of a distribution, not a
    gradient: they are not averaged).

    Raises:
        ValueError: bad arguments; at setup an unknown layer name (the valid ones are listed).
        MisconfigurationException: at setup, manual optimization or an unsupported strategy.
        AttributeError: at setup, no ``loss_fn``, ``loss_method`` or ``training_step`` to measure with.

    Example::

        trainer = Trainer(callbacks=[ActivationStats(layers=["net.act1", "net.act3"], every_n_steps=100)])
    """

    metric_prefix = "act"

    def __init__(
        self,
        layers: list[str] | None = None,
        every_n_steps: int = 100,
        saturation_threshold: float = 2.0,
        histogram: bool = True,
        histogram_bins: int = 64,
        loss_fn: LossFn | str | None = None,
        loss_method: str | None = None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__(layers, every_n_steps, loss_fn, loss_method, max_overhead, schedule)
        if not (
            isinstance(saturation_threshold, (int, float))
            and saturation_threshold > 0
            and math.isfinite(saturation_threshold)
        ):
            raise ValueError(f"saturation_threshold must be a positive number, got {saturation_threshold!r}")
        if histogram_bins < 2:
            raise ValueError(f"histogram_bins must be >= 2, got {histogram_bins}")
        self.saturation_threshold = float(saturation_threshold)
        self.histogram = histogram
        self.histogram_bins = histogram_bins

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any
    ) -> dict[str, Tensor]:
        modules = dict(pl_module.named_modules())
        kinds = {name: activation_kind(modules[name]) for name in self._layers}
        taps = {name: (modules[name], "input" if kinds[name] else "output") for name in self._layers}
        keep_values = self.histogram and bool(self._histogram_targets(trainer))

        def read(name: str, x: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
            # At hook time: an in-place op later in the pass (ReLU(inplace=True)) would rewrite x.
            kind = cast(Literal["saturating", "relu", "other"], kinds[name] or "other")  # activation_kind's values
            stats = activation_stats(x, kind, saturation_threshold=self.saturation_threshold)
            return stats, (_finite_values(x) if keep_values else None)

        captured = capture_forward(pl_module, batch, taps, read=read, loss_fn=self.measured_loss(pl_module))  # type: ignore[arg-type]
        metrics = {
            act_key(name, key): value
            for name in self._layers
            if name in captured
            for key, value in captured[name][0].items()
        }
        if keep_values:
            self._log_histograms(
                trainer,
                {name: values for name, (_, values) in captured.items() if values is not None and values.numel()},
            )
        return metrics

    @staticmethod
    def _histogram_targets(trainer: pl.Trainer) -> list[Any]:
        """The loggers that take a histogram (rank zero only: loggers write there; no collective here)."""
        if not trainer.is_global_zero:
            return []
        from lightning.pytorch.loggers import TensorBoardLogger

        return [*wandb_loggers(trainer), *(lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger))]

    def _log_histograms(self, trainer: pl.Trainer, values: dict[str, Tensor]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        wandb_targets = wandb_loggers(trainer)
        tb_targets = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        step = trainer.global_step
        for name, x in values.items():
            name = metric_name(name)
            for lg in tb_targets:
                lg.experiment.add_histogram(f"{ACT}/{name}", x.cpu(), step)
            if wandb_targets:
                import wandb

                lo, hi = float(x.min()), float(x.max())
                if hi <= lo:
                    hi = lo + 1e-6
                counts = torch.histc(x, bins=self.histogram_bins, min=lo, max=hi).cpu().numpy()
                edges = torch.linspace(lo, hi, self.histogram_bins + 1).numpy()
                for lg in wandb_targets:
                    lg.log_metrics({act_key(name, "hist"): wandb.Histogram(np_histogram=(counts, edges))}, step=step)

    @override
    def charts(self) -> dict[str, list[str]]:
        return {f"act_{name}_quantiles": [act_key(name, q) for q in ACT_QUANTILES] for name in self._layers}
