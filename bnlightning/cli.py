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
import warnings
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import (
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import (
    MisconfigurationException,
    SIGTERMException,
)

from bnlightning import console, resume, runstate, validation
from bnlightning.checkpointing import (
    AtomicCheckpointIO,
    RunCheckpoint,
    checkpoint_problem,
    foreign_model_problem,
    model_mismatch,
    read_checkpoint,
    resolve_resume,
)
from bnlightning.errors import RunError, condense, storage_error_line, yaml_error
from bnlightning.loggers import CSVLogger, WandbLogger, csv_logger, discard_unused_claims
from bnlightning.models.base import BaseModule

# Subcommands that are not LightningCLI's: name -> "module:function" taking argv.
EXTRA_COMMANDS: dict[str, str] = {
    "report": "bnlightning.report.commands:report_main",
    "wandb-report": "bnlightning.report.commands:wandb_report_main",
}

# Default checkpoint interval, in optimizer steps (plus last.ckpt at the end of fit).
CHECKPOINT_EVERY_N_STEPS = 1000

# Errors that mean "the user's input is wrong": shown as one line, no traceback. Anything
# else (a KeyError or ValueError from our own code included) is a bug and keeps its traceback.
# Lightning raises MisconfigurationException for bad Trainer/callback settings.
USER_ERRORS: tuple[type[BaseException], ...] = (RunError, MisconfigurationException)


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
        name = "+".join(os.path.splitext(os.path.basename(str(c)))[0] for c in config.get("config") or []) or type(trainer.lightning_module).__name__
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.name_if_unnamed(name)


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
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise RunError(validation.explain(condense(str(err)))) from err
        _check_logger_override(list(sys.argv[1:] if args is None else args), self.config)
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
        """For ``validate``/``test``: the checkpoint's tensors fit the model, or one line (not a ``load_state_dict`` traceback)."""
        path = self.config[subcommand].get("ckpt_path")
        if not path or not os.path.isfile(path):
            return
        if problem := model_mismatch(self.model, read_checkpoint(path).get("state_dict", {})):
            raise RunError(f"--ckpt_path {path} does not match this model: {problem}; use the config that trained it")

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
        trainer = self.trainer
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        csv = csv_logger(trainer.loggers)
        plan = self._resume(csv)
        if plan.checkpoint is None and isinstance(csv, CSVLogger):
            _refuse_finished_folder(csv)
        self.config_init.fit.ckpt_path = plan.checkpoint
        csv = csv_logger(trainer.loggers)  # a resume may have pointed it at the checkpoint's run
        run_dir = csv.log_dir if csv is not None else trainer.default_root_dir  # claims the folder (rank 0)
        if csv is not None and trainer.is_global_zero:
            resume.lock_run(run_dir)
        ckpt_cb = trainer.checkpoint_callback
        if isinstance(ckpt_cb, RunCheckpoint) and self.config.fit.checkpoint.dirpath is None:
            ckpt_cb.dirpath = os.path.join(run_dir, "checkpoints")
        for cb in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's connectors, not declared on Trainer
            if isinstance(cb, runstate.RunState):
                cb.run_dir = run_dir
        if trainer.is_global_zero:
            folders = [run_dir, getattr(ckpt_cb, "dirpath", None)] + [getattr(lg, "save_dir", None) for lg in trainer.loggers]
            for folder in dict.fromkeys(f for f in folders if f):
                _check_writable(folder)

    def _resume(self, csv: Any) -> resume.Resume:
        """What ``fit`` starts from (see ``bnlightning.resume``), checked, with the loggers pointed at its run."""
        asked = self.config.fit.get("ckpt_path")
        if not asked:
            return resume.Resume(None)
        settings = self._asked_settings
        if asked == "last":
            if csv is None:
                return resume.Resume("last")  # no run folders to choose from: Lightning's own lookup
            only = csv.log_dir if getattr(csv, "version_given", False) else None
            plan = resume.find_last(csv.root_dir, settings, only)
            if plan.checkpoint is None:
                rank_zero_info(f"bnlightning: no unfinished run with these settings under {csv.root_dir}; starting a new run")
                return plan
            assert plan.run_dir is not None, "find_last names the folder of the checkpoint it found"
            if self.trainer.is_global_zero:
                resume.lock_run(plan.run_dir)  # before anything is read for writing
            asked = plan.checkpoint
        elif asked in ("best", "hpc", "registry") or asked.startswith("registry:"):
            return resume.Resume(asked)
        if not os.path.isfile(asked):
            raise RunError(f"--ckpt_path {asked}: no such checkpoint file")
        path, warning = resolve_resume(asked)
        if warning:
            rank_zero_warn(warning)
        state = torch.load(path, map_location="cpu", weights_only=True)
        plan = resume.check_explicit(path, state, settings)
        if state.get("diverged_at_step") is not None:
            raise RunError(f"{path}: this run diverged at step {state['diverged_at_step']} (non-finite loss); resuming would train on NaN. Start a new run (e.g. a smaller learning rate) instead")
        if problem := model_mismatch(self.model, state.get("state_dict", {})):
            raise RunError(f"{path} does not match this model: {problem}; resume with the run's own settings (its config.yaml) or start a new run")
        if plan.run_dir is not None:
            resume.check_not_done(plan, self.trainer.max_steps)
            if self.trainer.is_global_zero:
                resume.lock_run(plan.run_dir)
            resume.continue_run(self.trainer, plan, state)
        rank_zero_info(f"bnlightning: resuming {plan.run_dir or 'a new run'} from {path} (step {plan.step})")
        return plan

    def _settings(self, config: Any) -> dict[str, Any]:
        """What makes two runs the same experiment: the dumped config less ``resume.RESUME_ONLY_KEYS``."""
        import yaml

        with warnings.catch_warnings():
            # skip_none is deprecated in jsonargparse >= 4.49 for skip_unset, which the oldest version we support lacks
            warnings.simplefilter("ignore", DeprecationWarning)
            dumped = yaml.safe_load(self._parser("fit").dump(config, skip_none=False, skip_validation=True))
        return resume.without_resume_only_keys(dumped)

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


def _refuse_finished_folder(csv: CSVLogger) -> None:
    """A new run never writes into a folder that holds another run's checkpoints."""
    if not csv.version_given:
        return  # a fresh folder will be claimed
    folder = csv.log_dir
    status = runstate.read_status(folder).get("status")
    has_ckpt = os.path.isdir(os.path.join(folder, "checkpoints")) and any(f.endswith(".ckpt") for f in os.listdir(os.path.join(folder, "checkpoints")))
    if has_ckpt:
        what = f"a {status} run" if status else "another run's checkpoints"
        raise RunError(f"{folder} already holds {what}; resume it with --ckpt_path last, or give the logger another version/name")


def _check_logger_override(argv: list[str], config: Any) -> None:
    """Refuse ``--trainer.logger.class_path X`` (or ``.init_args.*``) when the config holds a list of loggers.

    jsonargparse applies such a dotted option to one element of the list (the last), so
    ``--trainer.logger.class_path ...`` silently swaps the W&B logger of the quickstart,
    or adds a logger, instead of replacing the list the user meant.
    """
    dotted = next((a.split("=", 1)[0] for a in argv if a.startswith("--trainer.logger.")), None)
    if dotted is None:
        return
    section = config.get(config.get("subcommand")) if config.get("subcommand") else config
    loggers = section.get("trainer", {}).get("logger") if section is not None else None
    if isinstance(loggers, list) and len(loggers) > 1:
        raise RunError(
            f"{dotted} is ambiguous: the config's trainer.logger is a list of {len(loggers)} loggers and a dotted option changes only the last of them; "
            'replace the list with --trainer.logger=\'[{"class_path": ..., "init_args": {...}}]\', or add one with --trainer.logger+=CLASS'
        )


def _check_writable(folder: str) -> None:
    """Create ``folder`` and write a probe file, so a read-only or full disk fails now, not at step 1,000."""
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise RunError(f"cannot write to the output folder {folder}: {err.strerror or err}") from None
    finally:
        if os.path.exists(probe):  # also when the disk filled up mid-probe
            os.remove(probe)


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
    """``main`` without the console handling."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        module, func = EXTRA_COMMANDS[argv[0]].split(":")
        command: Callable[[list[str]], Any] = getattr(importlib.import_module(module), func)
        return command(argv[1:])
    if (shipped := _shipped_configs(argv)) != argv:
        argv = shipped
        if args is None:  # LightningCLI reads sys.argv itself
            sys.argv[1:] = argv
    for path in _config_paths(argv):
        if problem := yaml_error(path):
            _fail(problem)
    exit_code = 1
    guarded = runstate.guard_signals() if argv[:1] == ["fit"] else {}
    try:
        # None lets LightningCLI read sys.argv itself (passing both makes it warn).
        cli = build_cli(None if args is None else argv)
        exit_code = 0
        _say_late_signal()
        return cli
    except SIGTERMException:
        # Pre-empted: the checkpoint is saved; one line, and a non-zero status for schedulers.
        print(f"bnlightning: {runstate.describe_interrupt(argv)}", file=sys.stderr)
        raise SystemExit(runstate.last_interrupt.get("code", 128 + 15)) from None
    except runstate.StartupInterrupted as err:
        print(f"bnlightning: interrupted by {err.signal} before training began; nothing to save; run the same command again to start", file=sys.stderr)
        raise SystemExit(err.code) from None
    except resume.AlreadyFinished as err:
        exit_code = 0
        print(f"bnlightning: {err}", file=sys.stderr)
        raise SystemExit(0) from None
    except USER_ERRORS as err:
        if os.environ.get("BNLIGHTNING_DEBUG"):
            raise
        _fail(condense(str(err)))
    except ValueError as err:
        if not _raised_by_setup_check(err) or os.environ.get("BNLIGHTNING_DEBUG"):
            raise  # a bug: keep the traceback
        _fail(condense(str(err)))
    except OSError as err:
        line = storage_error_line(err)
        if line is None or os.environ.get("BNLIGHTNING_DEBUG"):
            raise
        _fail(line)
    finally:
        _end_command(exit_code, guarded, in_process=args is not None)


def _say_late_signal() -> None:
    if runstate.late_signal:
        print(f"bnlightning: {runstate.late_signal['signal']} arrived after the run had recorded its end; nothing was lost, exiting normally", file=sys.stderr)


def _end_command(exit_code: int, guarded: dict[int, Any], in_process: bool) -> None:
    """Close the W&B run, drop folders of runs that never started, release the run's lock."""
    try:
        _finish_wandb_run(exit_code)
    finally:
        if exit_code != 0:
            discard_unused_claims()
        resume.release_runs()
        _close_process_group()
        if in_process:
            # From the command line the guard stays until the interpreter exits: a signal
            # during W&B's final flush then ends nothing abruptly (the run is recorded).
            runstate.restore_signals(guarded)


def _close_process_group() -> None:
    """Destroy the process group a DDP run opened before the interpreter exits.

    Lightning does this only for NCCL. A gloo group left to interpreter finalization can
    abort the process (``terminate called without an active exception``, exit status -6)
    after a run that finished well: gloo's worker threads outlive the Python objects they hold.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _raised_by_setup_check(err: BaseException) -> bool:
    """Whether ``err`` came out of a callback's or data module's ``setup``/``prepare_data``.

    Those hooks check the config against the model once it exists (a callback's layer
    names, for one), so their ``ValueError`` is the user's input, like a constructor's.
    """
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in ("setup", "prepare_data") and isinstance(frame.f_locals.get("self"), (pl.Callback, pl.LightningDataModule)):
            return True
        tb = tb.tb_next
    return False


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


def _shipped_configs(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config configs/...`` missing from the cwd pointed at the copy the package ships.

    So the commands in the docs and the sweep files (written from the repository root)
    also run from a non-editable install in any directory; a file that exists here wins.
    """
    from bnlightning.experiments.configs import config_path

    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = config_path(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + config_path(arg.split("=", 1)[1])
    return out


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
