"""Callbacks that inject faults into a real training process (used by test_faults.py)."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl

from bnlightning.data import DigitsDataModule


class KillAtStep(pl.Callback):
    """SIGKILL this process right after optimizer step ``step`` (no cleanup, like a pre-emption)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class FailingLogger(pl.loggers.Logger):
    """A logger whose every call raises, as a W&B server going away mid-run would."""

    @property
    def name(self) -> str:
        return "failing"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any) -> None:
        return None

    def log_metrics(self, metrics: Any, step: Any = None) -> None:
        raise ConnectionError("simulated W&B outage")


class SignalAtStep(pl.Callback):
    """Send ``signum`` (a real signal, default SIGTERM) to this process after step ``step``.

    After a resume past ``step`` it never fires again, so the same command line can be
    run twice: pre-empted the first time, resumed the second.
    """

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step = step
        self.signum = signum

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class PoisonedDigits(DigitsDataModule):
    """The digits with NaN in every training row's first feature, as a broken preprocessing step would leave them."""

    def load_tensors(self) -> Any:
        train_x, train_y, val_x, val_y = super().load_tensors()
        train_x = train_x.clone()
        train_x[:, 0] = float("nan")
        return train_x, train_y, val_x, val_y


class SignalInValidation(pl.Callback):
    """Send ``signum`` (default SIGTERM) during the validation that runs after optimizer step
    ``step``, at the end of its validation batch ``batch_idx`` (the end-of-epoch validation
    when ``step`` is a multiple of the epoch length)."""

    def __init__(self, step: int, batch_idx: int = 0, signum: int = int(signal.SIGTERM)) -> None:
        self.step = step
        self.batch_idx = batch_idx
        self.signum = signum

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking and trainer.global_step == self.step and batch_idx == self.batch_idx:
            os.kill(os.getpid(), self.signum)


class SignalAfterTraining(pl.Callback):
    """Send SIGTERM once training has ended and the run has recorded it (``on_fit_end``),
    as a scheduler's signal landing during the loggers' final flush would, then keep
    flushing a moment."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
