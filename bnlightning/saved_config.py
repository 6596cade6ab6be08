"""The run's config, saved beside its logs and handed to every logger.

LightningCLI writes ``config.yaml`` into the run's folder (the CSV logger's version folder);
:class:`ConfigToLoggers` also logs the whole config to every logger, so W&B can group runs
by any setting (norm, learning rate, seed), and names and seeds the W&B run.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback

from bnlightning.loggers import WandbLogger, csv_logger


class ConfigToLoggers(SaveConfigCallback):
    """Writes ``config.yaml`` beside the run's logs and hands the full config to every
    logger, so W&B can group runs by any setting (norm, learning rate, seed)."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = self.config.clone().as_dict()
        config.pop("config", None)
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's connectors, not declared on Trainer
        if datamodule is not None and hasattr(datamodule, "dataset_name"):
            config["dataset_name"] = datamodule.dataset_name
        _pin_seeds(trainer, config.get("seed_everything"))
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli": config})
        _name_wandb_runs(trainer, self.config)


def _pin_seeds(trainer: pl.Trainer, seed: Any) -> None:
    """W&B's top-level ``seed`` is the run's ``seed_everything``; a data module's ``seed`` (its split) is ``data_seed``.

    Lightning logs the data module's hyper-parameters at the top level, where its split seed
    would read as the run's seed (0 in a ``--seed_everything 1`` run).
    """
    hparams = getattr(getattr(trainer, "datamodule", None), "hparams", {})
    renames = {"seed": "data_seed"} if "seed" in hparams else {}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.pin_hyperparams({"seed": seed}, renames)


def _name_wandb_runs(trainer: pl.Trainer, config: Any) -> None:
    """Name unnamed W&B runs after the run's folder (``quickstart/version_3``), else its config files."""
    csv = csv_logger(trainer.loggers)
    if csv is not None:
        name = f"{csv.name}/{csv.version if isinstance(csv.version, str) else f'version_{csv.version}'}"
    else:
        name = (
            "+".join(os.path.splitext(os.path.basename(str(c)))[0] for c in config.get("config") or [])
            or type(trainer.lightning_module).__name__
        )
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.name_if_unnamed(name)
