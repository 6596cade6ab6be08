"""Every private Lightning and W&B attribute bnlightning relies on, in one place.

Each function below stands for something those libraries do not expose publicly (the docstring
says what, and why no public route serves). Everything else in the package goes through these
functions, never through the attributes themselves, and ``tests/test_private_api.py`` checks
that every name listed in :data:`PRIVATE_NAMES` still exists (and, for the overridden methods,
is still called) in the installed versions, so an upgrade that moves one fails there, loudly,
rather than silently changing how runs resume or checkpoint.

Public routes used instead where they exist: ``WandbLogger.version`` (the run id),
``Trainer.loggers``, ``Callback.on_save_checkpoint`` (what a checkpoint remembers),
``ModelCheckpoint.save_last``.
"""

from __future__ import annotations

from typing import Any

#: (owner, attribute) of every private name used, for the upgrade test. Owners are
#: import paths; "instance" attributes are set in the owner's ``__init__``.
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.loggers.WandbLogger", "_wandb_init"),  # instance: kwargs of wandb.init
    ("lightning.pytorch.loggers.WandbLogger", "_id"),  # instance: the run id given to wandb.init
    ("lightning.pytorch.loggers.WandbLogger", "_experiment"),  # instance: the wandb Run, None until started
    ("lightning.pytorch.loggers.WandbLogger", "_offline"),  # instance: offline mode
    ("lightning.pytorch.loggers.CSVLogger", "_version"),  # instance: the version asked for (None: next free)
    ("lightning.pytorch.loggers.CSVLogger", "_experiment"),  # instance: the ExperimentWriter, None until used
    ("lightning.pytorch.loggers.CSVLogger", "_get_next_version"),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "_check_log_dir_exists"),  # overridden
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "_rewrite_with_new_header"),  # overridden
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_last_checkpoint"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_monitor_candidates"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_last_global_step_saved"),  # instance
    ("lightning.pytorch.cli.LightningCLI", "_instantiate_trainer"),  # overridden
    ("lightning.pytorch.Trainer", "_accelerator_connector"),  # instance, .cluster_environment
    ("lightning.pytorch.Trainer", "_logger_connector"),  # instance
    ("lightning.pytorch.trainer.connectors.logger_connector.logger_connector._LoggerConnector", "should_update_logs"),
    ("wandb_workspaces.reports.v2.Report", "_to_model"),
)


# --- WandbLogger ----------------------------------------------------------------------------
def wandb_run(logger: Any) -> Any:
    """The wandb run ``logger`` has started, or None, *without* starting one.

    ``WandbLogger.experiment`` (public) starts a run when there is none, which must not happen
    while deciding whether one exists (resume, run.json).
    """
    return logger._experiment


def forget_wandb_run(logger: Any) -> None:
    """Drop a run that failed to start, so the next ``experiment`` access tries again."""
    logger._experiment = None


def set_wandb_run_id(logger: Any, run_id: str | None) -> None:
    """Make the next ``wandb.init`` continue ``run_id`` (None: a new run).

    The public route is ``WandbLogger(version=run_id)`` at construction; the CLI learns the id
    from the checkpoint only after LightningCLI has built the loggers from the config.
    """
    logger._wandb_init["id"] = logger._id = run_id


def drop_wandb_init_kwarg(logger: Any, key: str) -> None:
    """Remove a keyword Lightning always passes to ``wandb.init`` (e.g. the deprecated ``anonymous``)."""
    logger._wandb_init.pop(key, None)


def wandb_offline(logger: Any) -> bool:
    return bool(logger._offline)


def set_wandb_offline(logger: Any) -> None:
    """Switch a logger whose ``wandb.init`` failed (no network) to offline mode before retrying."""
    logger._offline = True


# --- CSVLogger ------------------------------------------------------------------------------
def csv_requested_version(logger: Any) -> int | str | None:
    """The version ``logger`` was given (None: it picks the next free one).

    The public ``version`` property *picks* (and, in bnlightning's logger, claims) a folder
    when none was given, so it cannot answer whether one was given.
    """
    return logger._version


def set_csv_version(logger: Any, version: int | str | None) -> None:
    logger._version = version


def csv_next_version(logger: Any) -> int:
    """Lightning's own choice of the next version (listing the folders)."""
    return logger._get_next_version()


def csv_writer(logger: Any) -> Any:
    """The logger's ``ExperimentWriter``, or None, without creating one (``experiment`` creates it)."""
    return logger._experiment


def set_csv_writer(logger: Any, writer: Any) -> None:
    """Install bnlightning's writer (resume keeps old rows); Lightning's ``experiment`` has no writer-class hook."""
    logger._experiment = writer


# --- ModelCheckpoint ------------------------------------------------------------------------
def last_step_saved(callback: Any) -> int:
    return int(callback._last_global_step_saved)


def save_last_checkpoint(callback: Any, trainer: Any) -> None:
    """Write ``last.ckpt`` now, as ``ModelCheckpoint`` does at a save point (no public method saves it)."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


# --- Trainer --------------------------------------------------------------------------------
def cluster_environment(trainer: Any) -> Any:
    """The cluster environment Lightning detected (e.g. SLURM), whatever the strategy.

    ``trainer.strategy.cluster_environment`` is public but exists only for parallel strategies;
    a single-device SLURM job has the environment only here.
    """
    return trainer._accelerator_connector.cluster_environment


def logs_this_step(trainer: Any) -> bool:
    """Whether Lightning hands this step's ``self.log`` values to the loggers.

    No public API answers it, and re-deriving it from public ``trainer.log_every_n_steps`` and
    ``global_step`` would drift from the decision Lightning actually takes
    (``_LoggerConnector.should_update_logs``): that counts batches which stepped an optimizer
    (once per batch, however many optimizers stepped; ``global_step`` counts every optimizer
    step), a step ahead before the step runs, the evaluation batch index outside ``fit``, and
    ``trainer.should_stop``. True for Fabric's trainer stand-in, which has no logger connector.
    """
    connector = getattr(trainer, "_logger_connector", None)  # None: Fabric's trainer stand-in
    return bool(getattr(connector, "should_update_logs", True))


# --- wandb-workspaces -----------------------------------------------------------------------
def report_viewspec(report: Any) -> dict[str, Any]:
    """A report's JSON spec, the model ``Report.save()`` uploads, built offline (``save`` needs the server)."""
    return report._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)
