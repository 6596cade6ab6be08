"""A ``fit``'s output folders: never another run's, pointed at by what writes there, checked writable.

One folder per run (the CSV logger's version folder) holds its logs, ``run.json`` and
``checkpoints/``. These checks run before training, so a read-only or full disk, or a
folder that already holds another run, fails with one line instead of at step 1,000.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl

from bnlightning import runstate
from bnlightning.checkpointing import RunCheckpoint
from bnlightning.errors import RunError
from bnlightning.loggers import CSVLogger


def refuse_finished_folder(csv: CSVLogger) -> None:
    """A new run never writes into a folder that holds another run's checkpoints.

    Raises:
        RunError: the logger's given version folder already holds checkpoints.
    """
    if not csv.version_given:
        return  # a fresh folder will be claimed
    folder = csv.log_dir
    status = runstate.read_status(folder).get("status")
    checkpoints = os.path.join(folder, "checkpoints")
    has_ckpt = os.path.isdir(checkpoints) and any(f.endswith(".ckpt") for f in os.listdir(checkpoints))
    if has_ckpt:
        what = f"a {status} run" if status else "another run's checkpoints"
        raise RunError(
            f"{folder} already holds {what}; resume it with --ckpt_path last, or give the logger another version/name"
        )


def place_outputs(trainer: pl.Trainer, run_dir: str, checkpoint_dir_given: bool) -> None:
    """Point the run's checkpoints (unless the user gave ``checkpoint.dirpath``) and its ``run.json`` at ``run_dir``;
    on rank 0, check every output folder writable."""
    ckpt_cb = trainer.checkpoint_callback
    if isinstance(ckpt_cb, RunCheckpoint) and not checkpoint_dir_given:
        ckpt_cb.dirpath = os.path.join(run_dir, "checkpoints")
    for cb in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's connectors, not declared on Trainer
        if isinstance(cb, runstate.RunState):
            cb.run_dir = run_dir
    if trainer.is_global_zero:
        folders = [run_dir, getattr(ckpt_cb, "dirpath", None)] + [
            getattr(lg, "save_dir", None) for lg in trainer.loggers
        ]
        for folder in dict.fromkeys(f for f in folders if f):
            check_writable(folder)


def check_writable(folder: str) -> None:
    """Create ``folder`` and write a probe file, so a read-only or full disk fails now, not at step 1,000.

    Raises:
        RunError: the folder cannot be created or written (its ``strerror`` named).
    """
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
