"""Callbacks that inject faults into a real training process (used by test_faults.py)."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    """SIGKILL this process right after optimizer step ``step`` (no cleanup, like a pre-emption)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
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
