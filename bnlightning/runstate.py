"""A run records how it ended, and stops cleanly when it is pre-empted.

Every run folder holds ``run.json``::

    {"status": "running" | "completed" | "diverged" | "interrupted" | "failed",
     "step": 480, "max_steps": 480, "signal": "SIGTERM", "checkpoint": ".../last.ckpt", ...}

written atomically (temporary file + ``os.replace``), so a reader never sees half a
file. ``running`` that never changes means the process was killed (SIGKILL, power
loss): the report treats such a run as incomplete and never averages it in.

Pre-emption: Lightning's own signal connector already catches SIGTERM (it sets
``trainer.received_sigterm`` and its loops raise ``SIGTERMException``), but by itself
that exits with status 0 and no checkpoint. :class:`RunState` adds what is missing: at
the end of the training step during which SIGTERM (or SIGUSR1, SLURM's warning signal,
handed to the same handler) arrived it saves ``last.ckpt`` where ``ModelCheckpoint``
saves, Lightning logs that step and raises ``SIGTERMException``, and then the loggers are
flushed and ``interrupted`` recorded; the CLI turns that into one line with the resume
command and exit status 128 + signal number. SIGUSR1 is left alone when
Lightning's ``SLURMEnvironment(auto_requeue=True)`` handles it (checkpoint + requeue).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bnlightning import _private
from bnlightning.loggers import logger_identity

RUN_FILE = "run.json"
#: Statuses of a run that ended on its own: the only ones a report averages.
FINISHED = ("completed", "diverged")

#: Set when a run of this process was interrupted: read by the CLI for its last line.
last_interrupt: dict[str, Any] = {}

#: Where this process's ``fit`` is: "startup", "training" (Lightning's handler acts on
#: SIGTERM) or "ended" (the run has recorded how it ended). Read by :func:`guard_signals`.
phase: dict[str, str] = {"now": "startup"}
#: A SIGTERM/SIGUSR1 that arrived after the run ended: ``{"signal": "SIGTERM"}``.
late_signal: dict[str, str] = {}


class StartupInterrupted(Exception):
    """SIGTERM/SIGUSR1 before training began: nothing to save."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.signal = name
        self.code = 128 + int(getattr(signal, name))


def _guard(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if phase["now"] == "training":
        return  # Lightning's handler (which calls this one too) stops the loop
    if phase["now"] == "ended":
        late_signal["signal"] = name  # the run is recorded: finish flushing, exit normally
        return
    raise StartupInterrupted(name)


_guard.bnlightning_guard = True  # type: ignore[attr-defined]


def guard_signals() -> dict[int, Any]:
    """Handle SIGTERM and SIGUSR1 for a whole ``fit`` command, outside Lightning's window.

    Before training a signal stops the command at once (:class:`StartupInterrupted`);
    after the run recorded its end (completed, diverged, failed) it is noted and the
    process finishes flushing its loggers and exits as the run ended, instead of dying
    with status 143 and no line. Returns the previous handlers (for :func:`restore_signals`).
    """
    phase["now"] = "startup"
    late_signal.clear()
    old: dict[int, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        try:
            old[signum] = signal.signal(signum, _guard)
        except ValueError:  # not the main thread
            pass
    return old


def restore_signals(old: dict[int, Any]) -> None:
    for signum, handler in old.items():
        signal.signal(signum, handler)


def read_status(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's ``run.json`` as a dict; ``{}`` when there is none or it is unreadable."""
    try:
        with open(os.path.join(os.fspath(run_dir), RUN_FILE)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_status(run_dir: str | os.PathLike[str], replace: bool = False, **fields: Any) -> None:
    """Merge ``fields`` into ``run.json`` (or replace it) atomically: a reader sees the old or the new file."""
    path = os.path.join(os.fspath(run_dir), RUN_FILE)
    data = {**({} if replace else read_status(run_dir)), **fields, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _non_finite_count(batch: Any) -> int:
    """Number of NaN/inf entries in the floating-point tensors of ``batch``."""
    if isinstance(batch, torch.Tensor):
        return int((~torch.isfinite(batch)).sum()) if batch.is_floating_point() else 0
    if isinstance(batch, (list, tuple)):
        return sum(_non_finite_count(b) for b in batch)
    if isinstance(batch, dict):
        return sum(_non_finite_count(b) for b in batch.values())
    return 0


class RunState(pl.Callback):
    """Writes ``run.json`` and turns SIGTERM/SIGUSR1 into a checkpoint and a clean stop.

    The CLI adds one to every ``fit`` and sets :attr:`run_dir` (the run's version folder)
    before training starts.

    Args:
        run_dir: folder of ``run.json``; ``None`` uses ``trainer.log_dir``.

    Example::

        trainer = pl.Trainer(callbacks=[RunState("runs/x/version_0"), ModelCheckpoint(...)])
    """

    def __init__(self, run_dir: str | None = None) -> None:
        self.run_dir = run_dir
        self._usr1 = False
        self._old_usr1: Any = None
        self._saved_at: int | None = None
        self._checked_first_step = False
        self._held_handler: Any = None  # Lightning's SIGTERM handler, while validation holds signals
        self._held: list[int] = []
        self._started = False  # on_fit_start ran: the run exists (a set-up failure leaves no record)

    # --- status ---------------------------------------------------------------------
    def _dir(self, trainer: pl.Trainer) -> str:
        return self.run_dir or trainer.log_dir or trainer.default_root_dir

    def _write(self, trainer: pl.Trainer, replace: bool = False, **fields: Any) -> None:
        if trainer.is_global_zero:
            write_status(self._dir(trainer), replace, step=trainer.global_step, max_steps=trainer.max_steps, **fields)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Which logger runs to continue on resume; flush so the CSV holds every row
        # logged before this checkpoint (a crash loses only rows the resume re-logs).
        checkpoint["bnlightning_loggers"] = logger_identity(trainer.loggers)
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last_interrupt.clear()
        phase["now"] = "training"
        self._started = True
        wandb_id = next(
            (
                lg.version
                for lg in trainer.loggers
                if isinstance(lg, WandbLogger) and _private.wandb_run(lg) is not None
            ),
            None,
        )
        self._write(
            trainer, replace=True, status="running", pid=os.getpid(), **({"wandb_id": wandb_id} if wandb_id else {})
        )
        env = _private.cluster_environment(trainer)
        slurm_requeues = isinstance(env, SLURMEnvironment) and env.auto_requeue
        current = signal.getsignal(signal.SIGUSR1)
        if not slurm_requeues and (current in (signal.SIG_DFL, None) or getattr(current, "bnlightning_guard", False)):
            try:
                self._old_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)
            except ValueError:  # not the main thread: Lightning skips its handlers there too
                self._old_usr1 = None

    def _on_usr1(self, signum: int, frame: Any) -> None:
        # SIGUSR1 means what SIGTERM means: hand it to the SIGTERM handler Lightning
        # installed, so its loops stop at the same safe point (and DDP ranks are told).
        self._usr1 = True
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            handler(signal.SIGTERM, frame)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Validation ended by an exception: Lightning's teardown already put back the
        # SIGTERM handler from before fit, so the one held here is just dropped.
        self._held_handler = None
        if self._old_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._old_usr1)
            self._old_usr1 = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        diverged = getattr(pl_module, "diverged_at_step", None)
        if diverged is not None:
            self._write(trainer, status="diverged", diverged_at_step=int(diverged))
        else:
            self._write(trainer, status="completed")
        phase["now"] = "ended"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning skips the whole loop (no on_train_end) when a resumed checkpoint had
        # already reached max_steps/max_epochs: the run was complete, say so.
        if phase["now"] == "training":
            self._write(trainer, status="completed")
            phase["now"] = "ended"

    # --- first step ------------------------------------------------------------------
    def _check_first_step(self, trainer: pl.Trainer, outputs: Any, batch: Any) -> None:
        """A non-finite loss on the very first step is nearly always bad data: say so."""
        self._checked_first_step = True
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or math.isfinite(float(loss.detach())):
            return
        bad = _non_finite_count(batch)
        what = (
            f"the first training batch holds {bad} NaN/inf values"
            if bad
            else "the first batch is finite, so check the inputs' scale, the loss and the initialisation"
        )
        rank_zero_warn(
            f"bnlightning: the loss is not finite at the very first step: the training data may hold NaN/inf ({what})."
        )

    # --- pre-emption -----------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._checked_first_step and trainer.global_step <= 1:
            self._check_first_step(trainer, outputs, batch)
        stop = trainer.received_sigterm
        if trainer.world_size > 1:
            # Every rank must save together: trainer.save_checkpoint has a barrier.
            stop = trainer.strategy.reduce_boolean_decision(bool(stop), all=False)
        if stop and self._saved_at != trainer.global_step:
            # Save here, where ModelCheckpoint saves too (a state Lightning resumes exactly);
            # Lightning logs this step's row, then its loop raises SIGTERMException.
            self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        cb = trainer.checkpoint_callback
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            trainer.save_checkpoint(os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION))
            self._saved_at = trainer.global_step

    # --- a signal during validation waits for its end ----------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hold SIGTERM (and SIGUSR1, routed to it) until this validation ends.

        Lightning stops mid-validation otherwise, and a checkpoint taken there resumes
        with the validation row lost or one epoch skipped (every later ``step`` off by
        one). Held, the stop comes at ``on_validation_end``, the point where
        ``ModelCheckpoint`` itself saves after validating, which Lightning resumes exactly.
        """
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        handler = signal.getsignal(signal.SIGTERM)
        if not callable(handler):
            return
        try:
            signal.signal(signal.SIGTERM, lambda signum, frame: self._held.append(signum))
        except ValueError:  # not the main thread: nothing to hold
            return
        self._held_handler = handler

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._held_handler is None:
            return
        handler, self._held_handler = self._held_handler, None
        signal.signal(signal.SIGTERM, handler)
        if self._held:
            self._held.clear()
            handler(signal.SIGTERM, None)  # Lightning's: its loop stops after this step
        stop = trainer.received_sigterm
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(bool(stop), all=False)
        if stop and self._saved_at != trainer.global_step:
            self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        phase["now"] = "ended"
        if not self._started:
            return  # failed while setting up: no run to record (the CLI removes its empty folder)
        if isinstance(exception, SIGTERMException):
            if self._saved_at != trainer.global_step:
                self._save(trainer)  # the signal came during validation or after our check
            for logger in trainer.loggers:
                logger.save()
            cb = trainer.checkpoint_callback
            checkpoint = (
                os.path.join(cb.dirpath, "last.ckpt")
                if self._saved_at is not None and isinstance(cb, ModelCheckpoint) and cb.dirpath
                else None
            )
            name = "SIGUSR1" if self._usr1 else "SIGTERM"
            self._write(trainer, status="interrupted", signal=name, checkpoint=checkpoint)
            last_interrupt.update(
                signal=name, code=128 + int(getattr(signal, name)), step=trainer.global_step, checkpoint=checkpoint
            )
        elif isinstance(exception, KeyboardInterrupt):
            # Ctrl-C can land inside an optimizer step: no checkpoint of a half-updated model.
            self._write_quietly(trainer, status="interrupted", signal="SIGINT")
        else:
            self._write_quietly(trainer, status="failed", error=f"{type(exception).__name__}: {exception}"[:500])

    def _write_quietly(self, trainer: pl.Trainer, **fields: Any) -> None:
        """Record the end, unless the storage itself is what failed (the error says so)."""
        try:
            self._write(trainer, **fields)
        except OSError:
            pass


def resume_hint(argv: list[str]) -> str:
    """The command that resumes the run started by ``argv`` (``fit ...`` arguments)."""
    import shlex

    args: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--ckpt_path":
            skip = True
            continue
        if a.startswith("--ckpt_path="):
            continue
        args.append(a)
    return shlex.join(["python", "-m", "bnlightning", *args, "--ckpt_path", "last"])


def describe_interrupt(argv: list[str]) -> str:
    """The one line printed when a run stops on a signal."""
    info = last_interrupt
    where = f"checkpoint {info['checkpoint']}" if info.get("checkpoint") else "no checkpoint (checkpointing is off)"
    return (
        f"interrupted by {info.get('signal', 'SIGTERM')} at step {info.get('step', '?')}; saved {where}; resume with: "
        f"{resume_hint(argv)}"
    )
