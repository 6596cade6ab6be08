"""Command-line entry point: ``python -m bnlightning fit|validate|test|report|wandb-report``.

``fit``/``validate``/``test`` are LightningCLI in subclass mode, so every model, data
module, logger and callback is chosen in YAML by ``class_path``. ``report`` and
``wandb-report`` draw figures and W&B reports from finished runs. Tests call
``main([...])`` in-process.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from argparse import ArgumentError
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from bnlightning.checkpointing import AtomicCheckpointIO, RunCheckpoint
from bnlightning.errors import condense, yaml_error
from bnlightning.loggers import resume_loggers
from bnlightning.models.base import BaseModule

# Subcommands that are not LightningCLI's: name -> "module:function" taking argv.
EXTRA_COMMANDS: dict[str, str] = {
    "report": "bnlightning.report.commands:report_main",
    "wandb-report": "bnlightning.report.commands:wandb_report_main",
}

# Default checkpoint interval, in optimizer steps (plus last.ckpt at the end of fit).
CHECKPOINT_EVERY_N_STEPS = 1000

# Errors that mean "the user's input is wrong": shown as one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, MisconfigurationException, KeyError)


class ConfigToLoggers(SaveConfigCallback):
    """Writes ``config.yaml`` beside the run's logs and hands the full config to every
    logger, so W&B can group runs by any setting (norm, learning rate, seed)."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = self.config.clone().as_dict()
        config.pop("config", None)
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "dataset_name"):
            config["dataset_name"] = datamodule.dataset_name
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli": config})


class BNLightningCLI(LightningCLI):
    """LightningCLI with bnlightning's run hygiene.

    * Every run checkpoints: ``checkpoint.*`` configures a ``ModelCheckpoint`` that saves
      every 1,000 steps and ``last.ckpt`` (also at the end of training) into ``<default_root_dir>/checkpoints``, written
      atomically (``AtomicCheckpointIO``) and loaded with ``weights_only=True``.
    * ``--ckpt_path last`` resumes there, and the CSV and W&B loggers continue the same
      runs instead of starting new ones.
    * A one-line summary ends ``fit``/``validate``/``test``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.every_n_train_steps": CHECKPOINT_EVERY_N_STEPS, "checkpoint.save_last": True})

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[pl.Callback]) -> pl.Trainer:
        if config.get("enable_checkpointing") is False:
            # The user turned checkpointing off: drop the checkpoint callback we add.
            callbacks = [c for c in callbacks if not isinstance(c, RunCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is not None and config.get("checkpoint") is not None and config.checkpoint.dirpath is None:
            # A fixed folder (not the logger's new version folder) is what lets
            # `--ckpt_path last` find the previous attempt's checkpoint.
            root = config.trainer.default_root_dir or "."
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")

    def before_fit(self) -> None:
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        ckpt = self._resume_checkpoint()
        if ckpt is not None:
            state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
            resume_loggers(self.trainer.loggers, state.get("bnlightning_loggers", {}), int(state.get("global_step", 0)))

    def _resume_checkpoint(self) -> str | None:
        """The checkpoint file ``fit`` will resume from, if any."""
        path = self.config.fit.get("ckpt_path")
        if path == "last":
            dirpath = self.config.fit.checkpoint.dirpath
            path = os.path.join(dirpath, "last.ckpt") if dirpath else None
        return path if path and os.path.isfile(path) else None

    def after_fit(self) -> None:
        self._summarize("fit")

    def after_validate(self) -> None:
        self._summarize("validate")

    def after_test(self) -> None:
        self._summarize("test")

    def _summarize(self, stage: str) -> None:
        trainer, model = self.trainer, self.model
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "test/")) and v.numel() == 1}
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        what = type(model).__name__ + (f"(norm={model.hparams['norm']})" if "norm" in getattr(model, "hparams", {}) else "")
        diverged = getattr(model, "diverged_at_step", None)
        status = f"DIVERGED at step {diverged}" if diverged is not None else f"{trainer.global_step} steps"
        rank_zero_info(f"bnlightning: {stage} done for {what}: {status}; {shown or 'no validation metrics'}")


def build_cli(args: Sequence[str] | None, run: bool = True) -> BNLightningCLI:
    """The LightningCLI object; exposed so tests and notebooks can build without running."""
    return BNLightningCLI(
        BaseModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=ConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
        # Raise instead of printing usage, so main() can print one line.
        parser_kwargs={"exit_on_error": False, **{c: {"exit_on_error": False} for c in ("fit", "validate", "test", "predict")}},
        auto_configure_optimizers=False,
    )


def main(args: Sequence[str] | None = None) -> Any:
    """Run the command line ``args`` (default: ``sys.argv[1:]``).

    Bad input exits with code 2 and one ``error:`` line; set ``BNLIGHTNING_DEBUG=1`` to
    see the traceback instead.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        module, func = EXTRA_COMMANDS[argv[0]].split(":")
        command: Callable[[list[str]], Any] = getattr(importlib.import_module(module), func)
        return command(argv[1:])
    for path in _config_paths(argv):
        if problem := yaml_error(path):
            _fail(problem)
    exit_code = 1
    try:
        # None lets LightningCLI read sys.argv itself (passing both makes it warn).
        cli = build_cli(None if args is None else argv)
        exit_code = 0
        return cli
    except (*USER_ERRORS, ArgumentError) as err:
        if os.environ.get("BNLIGHTNING_DEBUG"):
            raise
        _fail(condense(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)))
    finally:
        _finish_wandb_run(exit_code)


def _finish_wandb_run(exit_code: int) -> None:
    """One CLI call is one W&B run: close it, or the next call in this process reuses it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def _config_paths(argv: list[str]) -> list[str]:
    """The files named by ``--config``/``-c`` (``--config=X`` too)."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return [p for p in paths if not p.lstrip().startswith(("{", "["))]


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
