"""``LossLandscape``: loss band, gradient predictiveness and effective smoothness (PROTOCOL §2)."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from bnlightning.callbacks.base import MeasurementCallback
from bnlightning.callbacks.functional import MODES, loss_landscape
from bnlightning.callbacks.functional._batching import check_chunk_size, check_memory_budget, check_mode
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional._optimizer import torch_optimizer
from bnlightning.callbacks.functional.landscape import check_step_sizes
from bnlightning.callbacks.functional.names import (
    LANDSCAPE_BETA_EFF,
    LANDSCAPE_GRAD_L2_MAX,
    LANDSCAPE_LOSS_MAX,
    LANDSCAPE_LOSS_MIN,
    LANDSCAPE_METRICS,
)

__all__ = ["LossLandscape"]

METRICS = LANDSCAPE_METRICS


class LossLandscape(MeasurementCallback):
    r"""Log how the loss and gradient change along the descent direction (the paper's Fig. 4).

    On the current training batch, with g the gradient over every trainable parameter,
    evaluates the loss and gradient at ``w - s * g`` for each step size s (same batch,
    same random draws, norms in training mode, running statistics untouched).

    Step sizes: with ``step_size_mode="relative"`` (default) each entry of
    ``step_sizes`` multiplies the current learning rate, read from the optimizer's
    ``param_groups`` at the measured step (so schedulers are followed); parameters in a
    group with a different lr move by ``s * lr_group / lr_first_group * g``; parameters
    outside the optimizer do not move. A learning rate of 0 (warm-up) logs NaN.
    ``"absolute"`` uses the numbers as given. Paper: VGG ``[0.5, 1, 2, 4]`` x lr;
    deep linear network a range of ``[0.01, 30]`` x lr.

    Logged metrics:

    - ``landscape/loss_min``, ``landscape/loss_max``: the loss band over the grid (Fig. 4a)
    - ``landscape/grad_l2_max`` = max_s ||g - g(w - s g)||_2: gradient predictiveness (Fig. 4b)
    - ``landscape/beta_eff`` = max_s ||g - g(w - s g)||_2 / ||s g||_2: effective beta-smoothness (Fig. 4c)

    Args:
        step_sizes: positive step sizes (relative to lr, or absolute).
        step_size_mode: ``relative`` or ``absolute``.
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        mode: ``auto`` (a loop for networks with convolutions, else vmap in chunks that fit
            ``memory_budget``, else the loop; the choice is logged once), ``vmap`` or ``loop``.
        chunk_size: at most this many step sizes per vmap call.
        memory_budget: bytes ``auto`` may spend on batched step sizes (see ``InternalCovariateShift``).
        loss_fn: ``(module, batch) -> scalar loss`` or its import path (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).
        max_overhead: ``None``, or the fraction in (0, 1) of training time this callback's measurements may
            take: it then times them and skips scheduled steps to stay within it (shared fairly with the
            other budgeted callbacks; ``every_n_steps`` is the densest spacing) and logs ``landscape/cost_steps``.
        schedule: ``"fixed"`` (every ``every_n_steps`` steps) or ``"log"`` (about 10 steps per decade:
            1, 2, 3, 4, 6, 7, 8, 10, 13, 16, 20, ..., 100, 126, ...).

    Under DDP g, every g(w - s g) and every loss are averaged over ranks first (the global batch).

    Raises:
        ValueError: an empty grid, a non-positive or non-finite step size, a bad mode/chunk_size/every_n_steps.
        MisconfigurationException: at setup, manual optimization or an unsupported strategy.
        AttributeError: at setup, no ``loss_fn``, ``loss_method`` or ``training_step`` to measure with.

    Example::

        trainer = Trainer(callbacks=[LossLandscape(step_sizes=[0.5, 1, 2, 4], every_n_steps=100)])
    """

    metric_prefix = "landscape"

    def __init__(
        self,
        step_sizes: list[float] | None = None,
        step_size_mode: Literal["relative", "absolute"] = "relative",
        every_n_steps: int = 100,
        mode: Literal["auto", "vmap", "loop"] = "auto",
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        loss_fn: LossFn | str | None = None,
        loss_method: str | None = None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__(every_n_steps, loss_fn, loss_method, max_overhead, schedule)
        steps = check_step_sizes([0.5, 1.0, 2.0, 4.0] if step_sizes is None else step_sizes)
        if step_size_mode not in ("relative", "absolute"):
            raise ValueError(f"unknown step_size_mode {step_size_mode!r}; accepted: relative, absolute")
        check_mode(mode, MODES)
        check_chunk_size(chunk_size)
        check_memory_budget(memory_budget)
        self.memory_budget = memory_budget
        self.step_sizes = steps
        self.step_size_mode = step_size_mode
        self.mode = mode
        self.chunk_size = chunk_size
        self._warned_zero_lr = False

    needs_gradient = True  # g is shared with InternalCovariateShift on a step both measure (the coordinator)

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any
    ) -> dict[str, Tensor]:
        steps, scale = self.step_sizes, None
        if self.step_size_mode == "relative":
            opt = torch_optimizer(optimizer)
            base = float(opt.param_groups[0]["lr"])
            if not base > 0:
                if not self._warned_zero_lr:
                    self._warned_zero_lr = True
                    warnings.warn(
                        f"LossLandscape: learning rate is {base}; relative step sizes are 0, logging NaN.", stacklevel=2
                    )
                return {k: torch.tensor(float("nan")) for k in METRICS}
            lr_of = {id(p): float(g["lr"]) / base for g in opt.param_groups for p in g["params"]}
            scale = {n: lr_of.get(id(p), 0.0) for n, p in pl_module.named_parameters()}
            steps = [s * base for s in self.step_sizes]
        shared = self.shared_gradient(trainer, pl_module, batch)
        if shared is not None:
            shared.rng.restore()  # the draws g was computed with (the same as now between our callbacks)
        return loss_landscape(
            pl_module,
            batch,
            steps,
            loss_fn=self.measured_loss(pl_module),
            param_scale=scale,
            mode=self.mode,
            chunk_size=self.chunk_size,
            memory_budget=self.memory_budget,
            gradient=shared.gradient if shared is not None else None,
            reduce=self.reduce(trainer),
        )

    @override
    def charts(self) -> dict[str, list[str]]:
        return {
            "landscape_loss_band": [LANDSCAPE_LOSS_MIN, LANDSCAPE_LOSS_MAX],
            "landscape_grad_l2_max": [LANDSCAPE_GRAD_L2_MAX],
            "landscape_beta_eff": [LANDSCAPE_BETA_EFF],
        }
