"""Which run a ``fit`` continues, and what a resume may touch.

The rules (``docs/reliability.md`` states them for users):

* ``--ckpt_path last`` continues the newest *unfinished* run, under the CSV logger's
  ``save_dir/name``, whose settings equal this command's: the whole config except the
  keys in :data:`~bnlightning.settings.RESUME_ONLY_KEYS`, which say how a run is
  watched, not what it trains (``bnlightning.settings`` defines them, for the report too).
  None: a new run in a new folder. A matching run that already completed (or diverged)
  is never reopened: :class:`AlreadyFinished` (one line, exit status 0, so a requeued
  job that finds its work done ends cleanly).
* ``--ckpt_path FILE`` inside a run folder (``<run>/checkpoints/FILE``) continues that
  run, and only if this command's settings equal the run's (one line naming the first
  setting that differs otherwise); a loose FILE starts a new folder from its weights,
  its hyper-parameters checked against this command's model and data the same way.
* A resume writes only into the folder of the checkpoint it resumes, whatever the
  logger settings of this command say.
* Within a run the newest *intact* checkpoint wins, compared by the ``global_step``
  stored in it (file names and ``last.ckpt`` say nothing reliable after a kill or a
  full disk).
* A run's folder is locked while a process writes it (:func:`lock_run`: ``flock``,
  released by the kernel when the process dies, also on SIGKILL): a second process
  gets one line naming the folder and the pid holding it.

Lightning's SLURM requeue decides identity by folder alone (the highest-numbered
``hpc_ckpt_N.ckpt`` in ``default_root_dir``, picked by file name, with no check of the
settings or of whether the run had finished); W&B's ``resume="must"`` by a run id the
user must supply. bnlightning needs neither an id nor a per-job folder: the settings
and the folder's ``run.json`` are the identity, and the lock keeps two processes apart.
"""

from __future__ import annotations

import fcntl
import glob
import os
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from bnlightning import runstate
from bnlightning.checkpointing import model_mismatch, read_checkpoint, resolve_resume
from bnlightning.errors import RunError
from bnlightning.loggers import CSVLogger, csv_logger, resume_loggers
from bnlightning.settings import RESUME_ONLY_KEYS, without_keys

LOCK_FILE = ".lock"
_TMP_MARK = ".tmp-"

#: Folders this process holds locked: folder -> file descriptor.
_locks: dict[str, int] = {}


class AlreadyFinished(Exception):
    """``--ckpt_path last`` found the run already finished: nothing to do (exit status 0)."""


@dataclass(frozen=True)
class Resume:
    """What ``fit`` starts from: ``checkpoint`` (None: from scratch) and ``run_dir``
    (the existing run folder it continues; None: a new folder)."""

    checkpoint: str | None
    run_dir: str | None = None
    step: int = 0


# --- settings -----------------------------------------------------------------------
def first_difference(saved: Any, current: Any, prefix: str = "") -> str | None:
    """``"model.init_args.width: 100 there, 50 here"`` for the first differing key, or None."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current), key=str):
            if (diff := first_difference(saved.get(key), current.get(key), f"{prefix}{key}.")) is not None:
                return diff
        return None
    if saved == current:
        return None
    return f"{prefix.rstrip('.')}: {saved!r} there, {current!r} here"


def saved_settings(run_dir: str) -> dict[str, Any] | None:
    """The run's ``config.yaml`` without resume-only keys; None when unreadable."""
    import yaml

    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            saved = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return without_keys(saved, RESUME_ONLY_KEYS) if isinstance(saved, dict) else None


def hparams_difference(state: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """How a loose checkpoint's model/data hyper-parameters differ from this command's, or None."""
    for key, section in (("hyper_parameters", "model"), ("datamodule_hyper_parameters", "data")):
        hparams = state.get(key)
        given = settings.get(section)
        if not isinstance(hparams, dict) or not isinstance(given, dict):
            continue
        if "_class_path" in hparams and given.get("class_path") != hparams["_class_path"]:
            return f"{section}.class_path: {hparams['_class_path']!r} there, {given.get('class_path')!r} here"
        init = given.get("init_args") or {}
        for name in sorted(init):
            if name in hparams and hparams[name] != init[name]:
                return f"{section}.init_args.{name}: {hparams[name]!r} there, {init[name]!r} here"
    return None


# --- checkpoints of a run -------------------------------------------------------------
def stored_step(path: str) -> int | None:
    """The ``global_step`` a checkpoint stores; None when it cannot be read (cut, empty, not ours).

    Memory-mapped: only the small pickle is read, not the tensors.
    """
    try:
        state = read_checkpoint(path)
    except Exception:  # zip, pickle, EOF errors: not a whole checkpoint
        return None
    if not isinstance(state, dict) or "state_dict" not in state:
        return None
    return int(state.get("global_step", 0))


def newest_checkpoint(run_dir: str) -> tuple[str, int] | None:
    """``(path, step)`` of the run's intact checkpoint with the largest stored step.

    Ties go to the file written last (``last.ckpt`` saved on SIGTERM after validation
    beside the step checkpoint saved before it).
    """
    found = []
    for path in glob.glob(os.path.join(glob.escape(os.path.join(run_dir, "checkpoints")), "*.ckpt")):
        step = stored_step(path)
        if step is not None:
            found.append((step, os.path.getmtime(path), path))
    if not found:
        return None
    step, _, path = max(found)
    return path, step


def run_folder_of(checkpoint: str) -> str | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` with a ``run.json``
    or ``config.yaml`` in ``<run>``), or None for a loose file."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    if os.path.basename(parent) != "checkpoints":
        return None
    run = os.path.dirname(parent)
    has_record = any(os.path.isfile(os.path.join(run, f)) for f in (runstate.RUN_FILE, "config.yaml"))
    return run if has_record else None


# --- choosing --------------------------------------------------------------------------
def _candidates(root: str, only: str | None) -> list[str]:
    if only is not None:
        return [only] if os.path.isdir(only) else []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    return [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]


def find_last(root: str, settings: dict[str, Any], only: str | None = None) -> Resume:
    """What ``--ckpt_path last`` continues among the run folders under ``root``.

    Args:
        root: the CSV logger's ``save_dir/name``.
        settings: this command's settings (its config less :data:`RESUME_ONLY_KEYS`).
        only: the one folder to consider (a logger ``version`` was given).

    Raises:
        AlreadyFinished: the newest matching run has finished and none is unfinished.
        RunError: ``only`` holds a run with other settings.
    """
    unfinished, finished = [], []
    for folder in _candidates(root, only):
        saved = saved_settings(folder)
        ckpt = newest_checkpoint(folder)
        if saved != settings:
            if only is not None and ckpt is not None:
                diff = first_difference(saved, settings) if saved is not None else "its config.yaml cannot be read"
                raise RunError(
                    f"{folder} holds a run with other settings ({diff}); resume it with its own settings, or give the "
                    "logger another version/name"
                )
            continue
        status = runstate.read_status(folder).get("status")
        if status in runstate.FINISHED:
            finished.append((os.path.getmtime(folder), folder, status, ckpt))
        elif ckpt is None and (
            files := glob.glob(os.path.join(glob.escape(os.path.join(folder, "checkpoints")), "*.ckpt"))
        ):
            names = ", ".join(sorted(os.path.basename(f) for f in files))
            raise RunError(
                f"cannot resume {folder}: none of its checkpoints is readable ({names}: cut, empty or not a "
                "checkpoint); start a new run without --ckpt_path"
            )
        elif ckpt is not None:
            unfinished.append((os.path.getmtime(ckpt[0]), folder, ckpt))
    if unfinished:
        _, folder, (path, step) = max(unfinished)
        return Resume(path, folder, step)
    if finished:
        _, folder, status, ckpt = max(finished)
        at = f" at step {ckpt[1]}" if ckpt else ""
        raise AlreadyFinished(
            f"{folder} already {status}{at} with these settings; a finished run is never reopened (nothing to do)"
        )
    return Resume(None)


def check_explicit(path: str, state: dict[str, Any], settings: dict[str, Any]) -> Resume:
    """Check ``--ckpt_path FILE`` against this command: the run it belongs to, or its hyper-parameters.

    Raises:
        RunError: the run finished, or its settings differ from this command's.
    """
    run = run_folder_of(path)
    if run is None:
        if diff := hparams_difference(state, settings):
            raise RunError(
                f"--ckpt_path {path} was trained with other settings ({diff}); drop the option or resume with the "
                "checkpoint's own settings"
            )
        return Resume(path, None, int(state.get("global_step", 0)))
    status = runstate.read_status(run).get("status")
    if status in runstate.FINISHED:
        what = "to train on from these weights, copy the file out of the run folder: a new run starts from it"
        raise RunError(f"--ckpt_path {path}: its run {run} already {status}; a finished run is never reopened ({what})")
    saved = saved_settings(run)
    if saved is not None and (diff := first_difference(saved, settings)):
        raise RunError(
            f"--ckpt_path {path} belongs to a run with other settings ({diff}); resume with the run's own settings "
            "(its config.yaml) or start a new run"
        )
    if saved is None and (diff := hparams_difference(state, settings)):
        raise RunError(
            f"--ckpt_path {path} was trained with other settings ({diff}); resume with the checkpoint's own settings"
        )
    return Resume(path, run, int(state.get("global_step", 0)))


# --- the plan of a fit -------------------------------------------------------------------
#: ``--ckpt_path`` values that Lightning resolves itself (no file of ours to check).
LIGHTNING_CKPT_PATHS = ("best", "hpc", "registry")


def plan_fit(
    trainer: pl.Trainer, model: pl.LightningModule, csv: Any, asked: str | None, settings: dict[str, Any]
) -> Resume:
    """What ``fit --ckpt_path asked`` starts from, checked, with the loggers pointed at its run.

    Args:
        trainer: the command's trainer (its loggers are pointed at the resumed run).
        model: the command's model, which the checkpoint's tensors must fit.
        csv: the command's CSV logger (None: Lightning's own ``last`` lookup).
        asked: ``--ckpt_path`` (None: a new run).
        settings: this command's settings (its config less :data:`RESUME_ONLY_KEYS`).

    Raises:
        AlreadyFinished: the run to continue has finished.
        RunError: the checkpoint cannot be resumed by this command (see :func:`continue_from`).
    """
    if not asked:
        return Resume(None)
    if asked in LIGHTNING_CKPT_PATHS or asked.startswith("registry:"):
        return Resume(asked)
    if asked != "last":
        return continue_from(trainer, model, asked, settings)
    if csv is None:
        return Resume("last")  # no run folders to choose from: Lightning's own lookup
    plan = find_last(csv.root_dir, settings, csv.log_dir if getattr(csv, "version_given", False) else None)
    if plan.checkpoint is None:
        rank_zero_info(f"bnlightning: no unfinished run with these settings under {csv.root_dir}; starting a new run")
        return plan
    assert plan.run_dir is not None, "find_last names the folder of the checkpoint it found"
    if trainer.is_global_zero:
        lock_run(plan.run_dir)  # before anything is read for writing
    return continue_from(trainer, model, plan.checkpoint, settings, chosen=True)


def continue_from(
    trainer: pl.Trainer, model: pl.LightningModule, asked: str, settings: dict[str, Any], chosen: bool = False
) -> Resume:
    """Resume from the checkpoint file ``asked``: its run (locked, loggers pointed at it), or a new run from its
    weights.

    Args:
        chosen: :func:`find_last` chose the file, so its run's status and settings are checked already.

    Raises:
        AlreadyFinished: its run already reached ``max_steps``.
        RunError: no such file; it diverged; it does not fit ``model``; its run finished or has other settings.
    """
    if not os.path.isfile(asked):
        raise RunError(f"--ckpt_path {asked}: no such checkpoint file")
    path, warning = resolve_resume(asked)
    if warning:
        rank_zero_warn(warning)
    state = read_checkpoint(path)
    plan = (
        Resume(path, run_folder_of(path), int(state.get("global_step", 0)))
        if chosen
        else check_explicit(path, state, settings)
    )
    if state.get("diverged_at_step") is not None:
        raise RunError(
            f"{path}: this run diverged at step {state['diverged_at_step']} (non-finite loss); resuming would train on "
            "NaN. Start a new run (e.g. a smaller learning rate) instead"
        )
    if problem := model_mismatch(model, state.get("state_dict", {})):
        raise RunError(
            f"{path} does not match this model: {problem}; resume with the run's own settings (its config.yaml) or "
            "start a new run"
        )
    if plan.run_dir is not None:
        check_not_done(plan, trainer.max_steps)
        if trainer.is_global_zero:
            lock_run(plan.run_dir)
        continue_run(trainer, plan, state)
    rank_zero_info(f"bnlightning: resuming {plan.run_dir or 'a new run'} from {path} (step {plan.step})")
    return plan


# --- continuing the chosen run -------------------------------------------------------------
def check_not_done(plan: Resume, max_steps: int) -> None:
    """A run whose checkpoint already reached ``max_steps`` finished (killed before it said so): record it, reopen
    nothing."""
    if plan.run_dir is not None and max_steps is not None and max_steps > 0 and plan.step >= max_steps:
        runstate.write_status(plan.run_dir, status="completed", step=plan.step, max_steps=max_steps)
        raise AlreadyFinished(
            f"{plan.run_dir} already completed at step {plan.step} (its checkpoint reached max_steps); a finished run "
            "is never reopened (nothing to do)"
        )


def continue_run(trainer: pl.Trainer, plan: Resume, state: dict[str, Any]) -> None:
    """Point the loggers at ``plan.run_dir``: the CSV log there (whatever this command's logger
    settings say) and the W&B run it recorded."""
    run_dir = plan.run_dir or ""
    ident = dict(state.get("bnlightning_loggers", {}))
    ident.pop("csv_version", None)
    if wandb_id := runstate.read_status(run_dir).get("wandb_id"):
        ident["wandb_id"] = wandb_id
    loggers = list(trainer.loggers)
    csv = csv_logger(loggers)
    same_root = csv is not None and os.path.realpath(csv.root_dir) == os.path.realpath(os.path.dirname(run_dir))
    if csv is not None and not (same_root and isinstance(csv, CSVLogger)):
        # This command's CSV logger points elsewhere: a new one writes into the run's own folder.
        flush = getattr(csv, "flush_logs_every_n_steps", 100)
        ours = CSVLogger(
            save_dir=os.path.dirname(os.path.dirname(run_dir)),
            name=os.path.basename(os.path.dirname(run_dir)),
            version=os.path.basename(run_dir),
            flush_logs_every_n_steps=flush,
        )
        loggers[loggers.index(csv)] = ours
        trainer.loggers = loggers
    resume_loggers(trainer.loggers, {**ident, "csv_version": os.path.basename(run_dir)}, plan.step)


# --- the run folder, held -------------------------------------------------------------
def lock_run(folder: str) -> None:
    """Hold ``folder`` for this process (``flock`` on ``folder/.lock``), then clear what
    dead writers left there (``*.tmp-PID`` files).

    The kernel drops the lock when the process ends, however it ends, so a killed run
    never blocks its own resume. ``flock`` is advisory and works on local file systems
    and, on Linux, on NFS (emulated with byte-range locks).

    Raises:
        RunError: another live process holds ``folder``.
    """
    folder = os.path.abspath(folder)
    if folder in _locks:
        return
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = runstate.read_status(folder).get("pid")
        who = f"process {pid}" if pid else "another process"
        raise RunError(
            f"{folder} is in use by {who}, which is still running; wait for it to end, or start a new run (without "
            "--ckpt_path, or with another logger version)"
        ) from None
    _locks[folder] = fd
    remove_temporaries(folder)


def release_runs() -> None:
    """Release every folder this process holds (``main`` does it when a command ends)."""
    while _locks:
        _, fd = _locks.popitem()
        os.close(fd)


def remove_temporaries(folder: str) -> None:
    """Delete ``*.tmp-PID`` files in ``folder`` and its ``checkpoints/`` (never a valid file)."""
    for sub in (folder, os.path.join(folder, "checkpoints")):
        for stale in glob.glob(os.path.join(glob.escape(sub), f"*{_TMP_MARK}*")):
            try:
                os.remove(stale)
            except OSError:
                pass
