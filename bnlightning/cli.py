"""Command-line entry point: ``python -m bnlightning fit|validate|test|report|wandb-report``.

``fit``/``validate``/``test`` are LightningCLI in subclass mode, so every model, data
module, logger and callback is chosen in YAML by ``class_path``. ``report`` and
``wandb-report`` draw figures and W&B reports from finished runs. Tests call
``main([...])`` in-process.

This module holds the LightningCLI subclass and the dispatch; what it calls lives beside
it: ``argv`` (the command line before parsing), ``resume`` (which run a ``fit``
continues), ``folders`` (output folders), ``saved_config`` (the config handed to the
loggers), ``exits`` (how an error ends the command) and ``teardown`` (what every
command closes).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from bnlightning import argv as cmdline
from bnlightning import checkpointing, console, exits, folders, resume, runstate, teardown, validation
from bnlightning.checkpointing import (
    AtomicCheckpointIO,
    RunCheckpoint,
    checkpoint_problem,
    foreign_model_problem,
    model_mismatch,
    read_checkpoint,
    resolve_resume,
)
from bnlightning.errors import RunError, condense, yaml_error
from bnlightning.loggers import CSVLogger, csv_logger
from bnlightning.models.base import BaseModule
from bnlightning.saved_config import ConfigToLoggers
from bnlightning.settings import RESUME_ONLY_KEYS, without_keys

# Subcommands that are not LightningCLI's: name -> "module:function" taking argv.
EXTRA_COMMANDS: dict[str, str] = {
    "report": "bnlightning.report.commands:report_main",
    "wandb-report": "bnlightning.report.commands:wandb_report_main",
}

# Default checkpoint interval, in optimizer steps (plus last.ckpt at the end of fit).
CHECKPOINT_EVERY_N_STEPS = 1000


class BNLightningCLI(LightningCLI):
    """LightningCLI with bnlightning's run hygiene.

    * One folder per run: the CSV logger's version folder (claimed atomically) holds
      ``metrics.csv``, ``config.yaml``, ``hparams.yaml``, ``run.json`` (status, W&B id)
      and ``checkpoints/`` (Lightning's convention: checkpoints under the logger's
      version folder). ``checkpoint.*`` configures a ``RunCheckpoint``: every 1,000
      steps, the last ``keep_last`` step checkpoints kept, ``last.ckpt`` also at the end,
      written atomically and loaded with ``weights_only=True``.
    * ``--ckpt_path last`` picks the run to continue among the folders of the CSV
      logger's ``save_dir/name`` (the one whose settings match, unfinished first, newest
      first) and takes the checkpoint *and* the logger identity from that folder. The
      checkpoint is read and compared with the model before anything is written.
    * Output folders are checked writable before training; SIGTERM/SIGUSR1 save a
      checkpoint and stop with one line (see ``bnlightning.runstate``).
    * A one-line summary ends ``fit``/``validate``/``test``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.every_n_train_steps": CHECKPOINT_EVERY_N_STEPS, "checkpoint.save_last": True})

    # --- the input boundary: what goes wrong here is the user's input -----------------
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check ``--ckpt_path`` before Lightning reads it.

        Raises:
            RunError: a bad option or value (jsonargparse's report condensed to one line,
                or a value ``bnlightning.validation`` refuses), or a ``--ckpt_path`` file
                that is not a readable checkpoint of this model.
        """
        checkpointing.hold_reads()  # the --ckpt_path checks below and before training read a file once
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise RunError(validation.explain(condense(str(err)))) from err
        cmdline.check_logger_override(list(sys.argv[1:] if args is None else args), self.config)
        self._check_ckpt_file()
        self._check_values()
        self._record_asked_settings()

    def _check_values(self) -> None:
        """Values the types let through but training cannot use (a seed numpy refuses, a NaN lr): one line now."""
        subcommand = self.config.get("subcommand")
        validation.check_config(self.config[subcommand] if subcommand else self.config)

    def _record_asked_settings(self) -> None:
        """This command's own settings, kept before Lightning fills the model's from a ``--ckpt_path`` file."""
        subcommand = self.config.get("subcommand")
        self._asked_settings = self._settings(self.config[subcommand]) if subcommand == "fit" else {}

    def _check_ckpt_file(self) -> None:
        """Fail with one line naming a ``--ckpt_path`` file that cannot be loaded.

        Lightning loads the file right after parsing (to read hyper-parameters), so a
        corrupt one would end in a ``torch.load`` traceback. For ``fit``, a corrupt
        ``last*.ckpt`` falls back to the newest intact checkpoint beside it.
        """
        subcommand = self.config.get("subcommand")
        asked = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not asked or not os.path.isfile(asked):
            return
        if subcommand == "fit":
            path, warning = resolve_resume(asked)
            if warning:
                rank_zero_warn(warning)
            self.config[subcommand].ckpt_path = path
        elif problem := checkpoint_problem(asked):
            raise RunError(f"--ckpt_path {asked} is not a readable checkpoint: {problem}")
        self._check_ckpt_model(self.config[subcommand].ckpt_path)

    def _check_ckpt_model(self, path: str) -> None:
        """Refuse a checkpoint of another model before LightningCLI copies its hyper-parameters into the config.

        That copy would import the class the checkpoint names and replace the run's model
        settings with the checkpoint's (another model's checkpoint then fails deep in a
        forward pass with a shape error). A checkpoint is data: it is compared, not obeyed.
        """
        model = self.config[self.config.subcommand].get("model") or {}
        init_args = model.get("init_args")
        as_dict = getattr(init_args, "as_dict", None)  # a jsonargparse Namespace, or a plain dict
        settings = as_dict() if callable(as_dict) else dict(init_args or {})
        settings.update(model.get("dict_kwargs") or {})  # a model taking **kwargs
        hparams = read_checkpoint(path).get("hyper_parameters")
        if problem := foreign_model_problem(hparams, model.get("class_path"), settings):
            raise RunError(f"--ckpt_path {path}: {problem}")

    def before_validate(self) -> None:
        self._check_ckpt_fits_model("validate")

    def before_test(self) -> None:
        self._check_ckpt_fits_model("test")

    def _check_ckpt_fits_model(self, subcommand: str) -> None:
        """For ``validate``/``test``: the checkpoint's tensors fit the model, or one line (not a ``load_state_dict``
        traceback)."""
        path = self.config[subcommand].get("ckpt_path")
        if (
            path
            and os.path.isfile(path)
            and (problem := model_mismatch(self.model, read_checkpoint(path).get("state_dict", {})))
        ):
            raise RunError(f"--ckpt_path {path} does not match this model: {problem}; use the config that trained it")
        checkpointing.drop_reads()  # the checks are done; Lightning reads the file itself

    def instantiate_classes(self) -> None:
        """Build model, data and callbacks; a ``ValueError`` from their constructors is bad input.

        The constructors validate the values the user wrote in the config, so their
        ``ValueError`` becomes a :class:`RunError` here, at the one place where config
        meets code. A ``ValueError`` raised later (during training) stays a bug.
        """
        try:
            super().instantiate_classes()
        except ValueError as err:
            if isinstance(err, RunError):
                raise
            raise RunError(condense(str(err))) from err
        validation.check_objects(self.model, self.trainer.callbacks)  # type: ignore[attr-defined]  # set by Lightning's connectors, not declared on Trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[pl.Callback]) -> pl.Trainer:
        if config.get("enable_checkpointing") is False:
            # The user turned checkpointing off: drop the checkpoint callback we add.
            callbacks = [c for c in callbacks if not isinstance(c, RunCheckpoint)]
        if self.subcommand == "fit":
            callbacks = [*callbacks, runstate.RunState()]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        """Choose what ``fit`` starts from (``bnlightning.resume``), claim and lock the run's folder, check it
        writable."""
        trainer = self.trainer
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        csv = csv_logger(trainer.loggers)
        plan = resume.plan_fit(trainer, self.model, csv, self.config.fit.get("ckpt_path"), self._asked_settings)
        checkpointing.drop_reads()  # the checks are done; Lightning reads the checkpoint itself
        if plan.checkpoint is None and isinstance(csv, CSVLogger):
            folders.refuse_finished_folder(csv)
        self.config_init.fit.ckpt_path = plan.checkpoint
        csv = csv_logger(trainer.loggers)  # a resume may have pointed it at the checkpoint's run
        run_dir = csv.log_dir if csv is not None else trainer.default_root_dir  # claims the folder (rank 0)
        if csv is not None and trainer.is_global_zero:
            resume.lock_run(run_dir)
        folders.place_outputs(trainer, run_dir, checkpoint_dir_given=self.config.fit.checkpoint.dirpath is not None)

    def _settings(self, config: Any) -> dict[str, Any]:
        """What makes two runs the same experiment (``bnlightning.settings``): the dumped config less its resume-only
        keys."""
        import yaml

        with warnings.catch_warnings():
            # skip_none is deprecated in jsonargparse >= 4.49 for skip_unset, which the oldest version we support lacks
            warnings.simplefilter("ignore", DeprecationWarning)
            dumped = yaml.safe_load(self._parser("fit").dump(config, skip_none=False, skip_validation=True))
        return without_keys(dumped, RESUME_ONLY_KEYS)

    def after_fit(self) -> None:
        self._summarize("fit")

    def after_validate(self) -> None:
        self._summarize("validate")

    def after_test(self) -> None:
        self._summarize("test")

    def _summarize(self, stage: str) -> None:
        trainer, model = self.trainer, self.model
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("val/", "test/")) and v.numel() == 1
        }
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        what = type(model).__name__ + (
            f"(norm={model.hparams['norm']})" if "norm" in getattr(model, "hparams", {}) else ""
        )
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
        parser_kwargs={
            "exit_on_error": False,
            **{c: {"exit_on_error": False} for c in ("fit", "validate", "test", "predict")},
        },
        auto_configure_optimizers=False,
    )


def main(args: Sequence[str] | None = None) -> Any:
    """Run the command line ``args`` (default: ``sys.argv[1:]``).

    Bad input, and full or read-only storage, exit with code 2 and one ``error:`` line;
    set ``BNLIGHTNING_DEBUG=1`` to see the traceback instead. SIGTERM/SIGUSR1 during
    ``fit`` exit with 128 + the signal number after saving a checkpoint.

    Other libraries' tips, banners and warnings are silenced (``bnlightning.console``);
    ``--verbose`` anywhere on the command line, or ``BNLIGHTNING_VERBOSE=1``, shows them.
    """
    if args is None:
        sys.argv[1:], verbose = console.take_verbose_flag(sys.argv[1:])  # LightningCLI reads sys.argv itself
    else:
        args, verbose = console.take_verbose_flag(list(args))
    with console.console(verbose):
        return _run(args)


def _run(args: Sequence[str] | None) -> Any:
    """``main`` without the console handling: dispatch, then LightningCLI with its endings (``bnlightning.exits``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        module, func = EXTRA_COMMANDS[argv[0]].split(":")
        command: Callable[[list[str]], Any] = getattr(importlib.import_module(module), func)
        return command(argv[1:])
    argv = _read_configs(argv, in_sys_argv=args is None)
    exit_code = 1
    guarded = runstate.guard_signals() if argv[:1] == ["fit"] else {}
    try:
        # None lets LightningCLI read sys.argv itself (passing both makes it warn).
        cli = build_cli(None if args is None else argv)
        exit_code = 0
        teardown.say_late_signal()
        return cli
    except resume.AlreadyFinished as err:
        exit_code = 0
        print(f"bnlightning: {err}", file=sys.stderr)
        raise SystemExit(0) from None
    except BaseException as err:
        exits.exit_for(err, argv)
        raise  # a bug: keep the traceback
    finally:
        teardown.end_command(exit_code, guarded, in_process=args is not None)


def _read_configs(argv: list[str], in_sys_argv: bool) -> list[str]:
    """``argv`` with shipped configs found (``sys.argv`` too, which LightningCLI reads itself); one line for a config
    that is not YAML."""
    if (shipped := cmdline.shipped_configs(argv)) != argv:
        argv = shipped
        if in_sys_argv:
            sys.argv[1:] = argv
    for path in cmdline.config_paths(argv):
        if problem := yaml_error(path):
            exits.fail(problem)
    return argv
