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
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from bnlightning.errors import condense, yaml_error
from bnlightning.models.base import BaseModule

# Subcommands that are not LightningCLI's: name -> "module:function" taking argv.
EXTRA_COMMANDS: dict[str, str] = {
    "report": "bnlightning.report.commands:report_main",
    "wandb-report": "bnlightning.report.commands:wandb_report_main",
}

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
    """LightningCLI that prints a one-line summary at the end of ``fit``/``test``."""

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
    try:
        # None lets LightningCLI read sys.argv itself (passing both makes it warn).
        return build_cli(None if args is None else argv)
    except (*USER_ERRORS, ArgumentError) as err:
        if os.environ.get("BNLIGHTNING_DEBUG"):
            raise
        _fail(condense(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)))


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
