"""``TwoStepMeasurement``: a measurement that spans the optimizer step (Cockpit's ``TwoStepQuantity``).

Some quantities need the weights before *and* after the step the trainer really takes: the
gradient change of internal covariate shift, the curvature along the real update, the angle a
scale-invariant weight turns by. Such a callback splits its measurement in two named phases:

1. ``before_step(step)`` in ``on_before_optimizer_step``, at W^t, inside the observer guard: keep
   what the second phase needs (a copy of W^t, the shared G) and return it; it is ``step.kept``.
2. ``after_step(step)`` in an optimizer step post-hook, right after the optimizer has stepped, so
   the module holds the W^(t+1) the trainer applied (any optimizer and scheduler, after gradient
   accumulation, unscaling, the DDP all-reduce and gradient clipping): inside the observer guard,
   with the RNG rewound to W^t's moment (``step.rng``), return the metrics.

Both phases count as one measurement for the overhead budget. A step a GradScaler skips (inf/NaN
gradients: the optimizer does not step) is not measured, with a one-time warning. A subclass may
measure in one phase instead on some configurations (``spans_step``), through ``measure``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from bnlightning.callbacks.base import MeasurementCallback
from bnlightning.callbacks.guard import RngState, observer_guard

__all__ = ["MeasuredStep", "TwoStepMeasurement"]


@dataclass
class MeasuredStep:
    """One measured optimizer step, handed to both phases of a ``TwoStepMeasurement``.

    Attributes:
        trainer, module, optimizer: as in ``on_before_optimizer_step``.
        batch: the step's batch (with gradient accumulation, its last micro-batch).
        step: ``trainer.global_step`` before the step (the step the metrics are logged at).
        rng: every RNG's state at W^t's moment; ``after_step`` runs with it restored.
        kept: what ``before_step`` returned.
    """

    trainer: pl.Trainer
    module: pl.LightningModule
    optimizer: Any
    batch: Any
    step: int
    rng: RngState
    kept: Any = None


class TwoStepMeasurement(MeasurementCallback):
    """Base class of the measurements that need W^t and the W^(t+1) the trainer applied.

    Subclasses implement ``before_step(step) -> kept`` and ``after_step(step) -> dict[str, Tensor]``
    (see the module's docstring); arguments as ``MeasurementCallback``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hooks: list[RemovableHandle] = []
        self._pending: MeasuredStep | None = None
        self._warned_skipped = False

    def spans_step(self) -> bool:
        """Whether this callback measures across the step (else in one phase, through ``measure``)."""
        return True

    def before_step(self, step: MeasuredStep) -> Any:
        """At W^t, inside the guard: what ``after_step`` needs."""
        raise NotImplementedError

    def after_step(self, step: MeasuredStep) -> dict[str, Tensor]:
        """At W^(t+1), inside the guard, RNG at W^t's moment: the metrics of ``step.step``."""
        raise NotImplementedError

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._remove_hooks()
        if self.spans_step():
            for opt in trainer.optimizers:
                self._hooks.append(opt.register_step_post_hook(lambda *_: self._after_step()))

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._pending = None

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.spans_step():
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            return
        if self._batch is None or not self.is_measurement_step(trainer.global_step):
            return
        step = MeasuredStep(trainer, pl_module, optimizer, self._batch, trainer.global_step, RngState.capture())

        def first_phase() -> MeasuredStep:
            with self.timed(trainer, step.step), observer_guard(pl_module, [optimizer]):
                step.kept = self.before_step(step)
            return step

        self._pending = self.measure_or_stop(trainer, step.step, first_phase)
        if self._pending is None:
            self._batch = None

    def _after_step(self) -> None:
        """The optimizer's step post-hook: the second phase of the pending measurement, if any."""
        step, self._pending = self._pending, None
        if step is None:
            return

        def second_phase() -> dict[str, Tensor]:
            with self.timed(step.trainer, step.step), observer_guard(step.module, [step.optimizer]):
                step.rng.restore()  # the random draws of W^t's moment (the guard rewinds afterwards)
                return self.after_step(step)

        metrics = self.measure_or_stop(step.trainer, step.step, second_phase)
        self._batch = None
        if metrics is not None:
            self.record(step.trainer, metrics, step=step.step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None and self._pending.step == trainer.global_step:
            return  # accumulating: the optimizer steps after a later micro-batch
        if self._pending is not None:  # pragma: no cover - needs a GradScaler skip (CUDA fp16)
            if not self._warned_skipped:
                self._warned_skipped = True
                warnings.warn(
                    f"{type(self).__name__}: the optimizer skipped step {self._pending.step} (inf/NaN gradients under "
                    "a GradScaler); not measured.",
                    stacklevel=2,
                )
            self._pending = None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
