"""Checkpoints that survive a crash while saving, and safe loading.

Lightning's own save goes through an fsspec transaction whose temporary file lives in
the system temp folder; when that is another file system the final move is a copy, and
a kill during the copy leaves a truncated checkpoint. ``AtomicCheckpointIO`` serialises
into memory, writes the bytes to a temporary file beside the target, fsyncs it and
renames it into place with ``os.replace`` (atomic on POSIX), so a reader sees either the
old checkpoint or the new one, and a full disk raises ``OSError(ENOSPC)`` naming the file
(``torch.save`` straight into a file reports it as "unexpected pos ..."). Loading uses
``torch.load(weights_only=True)``: a checkpoint is data, and nothing in it may run code.

Resuming is checked before anything is written: :func:`resolve_resume` picks the
checkpoint (``last.ckpt``, or the newest intact step checkpoint beside a corrupt one),
and :func:`model_mismatch` compares it with the model. Every check reads the file through
:func:`read_checkpoint`, which the command line holds (:func:`hold_reads`) so that a file is
read once however many checks look at it.
"""

from __future__ import annotations

import glob
import io
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from bnlightning import _private

_TMP_SUFFIX = ".tmp-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save with write-to-temporary + fsync + ``os.replace``; load with ``weights_only=True``."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = os.fspath(path)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        # Leftovers from a process killed mid-save are never valid checkpoints.
        for stale in glob.glob(glob.escape(path) + _TMP_SUFFIX + "*"):
            os.remove(stale)
        tmp = f"{path}{_TMP_SUFFIX}{os.getpid()}"
        # Serialise first: write errors then surface as OSError with errno and file name.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            if err.filename is None:  # file-object writes do not say which file
                raise OSError(err.errno, err.strerror, path) from err
            raise
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _fsync_dir(folder)

    @override
    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Untrusted pickles never run code here; say so rather than fall back silently.
        return torch.load(
            os.fspath(path),
            map_location=map_location or "cpu",
            weights_only=True if weights_only is None else weights_only,
        )


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps the last ``keep_last`` step checkpoints and writes
    ``last.ckpt`` when training ends.

    With ``every_n_train_steps`` set, Lightning saves only on those steps, so the final
    weights of a run whose length is not a multiple of the interval (or that stopped on
    divergence) would be lost. Older step checkpoints are pruned through Lightning's own
    top-k logic on the ``step`` it offers as a monitor (``monitor="step", mode="max"``).

    Args:
        keep_last: how many step checkpoints to keep (-1: all), besides ``last.ckpt``;
            used when ``monitor`` is not set (a monitored metric keeps ``save_top_k``).
        enable_version_counter: ``ModelCheckpoint``'s, but off by default: a run resumed
            from a checkpoint written outside ``ModelCheckpoint`` (on SIGTERM) overwrites
            ``last.ckpt`` instead of writing ``last-v1.ckpt`` beside a stale one.
        **kwargs: ``ModelCheckpoint``'s arguments.

    Raises:
        ValueError: ``keep_last`` is 0 or below -1.

    Example::

        RunCheckpoint(every_n_train_steps=1000, save_last=True, keep_last=3)
    """

    def __init__(self, *args: Any, keep_last: int = 2, enable_version_counter: bool = False, **kwargs: Any) -> None:
        if keep_last == 0 or keep_last < -1:
            raise ValueError(
                f"checkpoint.keep_last must be >= 1 (or -1 to keep every step checkpoint), got {keep_last}"
            )
        if kwargs.get("monitor") is None and not args:
            kwargs.update(monitor="step", mode="max", save_top_k=keep_last)
        # Off by default: a resumed run rewrites last.ckpt, never a last-v1.ckpt beside a stale last.ckpt.
        kwargs["enable_version_counter"] = enable_version_counter
        super().__init__(*args, **kwargs)
        self.keep_last = keep_last

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        fast_dev_run = trainer.fast_dev_run  # type: ignore[attr-defined]  # set by Lightning at init, not declared on Trainer
        if self.save_last and not fast_dev_run and _private.last_step_saved(self) != trainer.global_step:
            _private.save_last_checkpoint(self, trainer)


# --- resuming -------------------------------------------------------------------------
#: What :func:`read_checkpoint` read while reads are held (:func:`hold_reads`), by file identity;
#: None when they are not held.
_held: dict[tuple[str, int, int, int], Any] | None = None


def hold_reads() -> None:
    """From now until :func:`drop_reads`, :func:`read_checkpoint` reads each file once.

    The command line checks a ``--ckpt_path`` file in several places before training (readable,
    of this model, of this run's settings, the step it stores); holding the reads makes those
    checks read it once. A file is known by its path, inode, size and modification time, so one
    rewritten meanwhile is read again.
    """
    global _held
    if _held is None:
        _held = {}


def drop_reads() -> None:
    """Forget what was read since :func:`hold_reads` (the command line does this before training)."""
    global _held
    _held = None


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """A checkpoint's contents as data (``weights_only``: nothing in it runs), memory-mapped where the
    format allows, so reading its small pickle does not copy its tensors."""
    held = _held
    key = _identity(path) if held is not None else None
    if held is not None and key in held:
        return held[key]
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if held is not None and key is not None:
        held[key] = state
    return state


def _identity(path: str | os.PathLike[str]) -> tuple[str, int, int, int] | None:
    """``(real path, inode, size, mtime)``: what tells one file's contents from another's; None when it cannot be
    read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None  # the load below raises the error a caller expects
    return os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns


def checkpoint_problem(path: str | os.PathLike[str], training: bool = False) -> str | None:
    """Why the checkpoint at ``path`` cannot be used (empty, truncated, unreadable, not Lightning's), or None.

    Args:
        path: the checkpoint file.
        training: it is to resume training (``fit``), so it must hold the training state too.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as err:
        return err.strerror or str(err)
    if size == 0:
        return "the file is empty (0 bytes)"
    try:
        state = read_checkpoint(path)
    except Exception as err:  # zip, pickle and EOF errors all mean "not a whole checkpoint"
        return f"it cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:160]})"
    if not isinstance(state, dict) or "state_dict" not in state:
        return "it holds no state_dict (not a Lightning checkpoint)"
    return lightning_keys_problem(state, training)


def _step_checkpoints(folder: str) -> list[str]:
    """Checkpoints in ``folder`` other than last*, newest first."""
    paths = [
        p for p in glob.glob(os.path.join(glob.escape(folder), "*.ckpt")) if not os.path.basename(p).startswith("last")
    ]
    return sorted(paths, key=lambda p: os.path.getmtime(p), reverse=True)


def resolve_resume(path: str) -> tuple[str, str | None]:
    """The checkpoint to resume from, given the one asked for, and a warning if it differs.

    A corrupt ``last*.ckpt`` falls back to the newest intact step checkpoint beside it.

    Args:
        path: the checkpoint file asked for.

    Returns:
        ``(path to load, one-line warning or None)``.

    Raises:
        RunError: the file is unusable and no intact checkpoint lies beside it.

    Example::

        path, warning = resolve_resume("runs/quickstart/version_1/checkpoints/last.ckpt")
    """
    from bnlightning.errors import RunError

    problem = checkpoint_problem(path, training=True)
    if problem is None:
        return path, None
    if os.path.basename(path).startswith("last"):
        for other in _step_checkpoints(os.path.dirname(path) or "."):
            if checkpoint_problem(other, training=True) is None:
                return (
                    other,
                    f"bnlightning: {path} cannot be resumed ({problem}); resuming from the newest intact checkpoint "
                    f"{other}",
                )
    raise RunError(
        f"cannot resume from {path}: not a readable checkpoint ({problem}); no intact checkpoint lies beside it"
    )


def model_mismatch(model: torch.nn.Module, state_dict: dict[str, Any]) -> str | None:
    """How ``state_dict`` does not fit ``model`` (missing/unexpected keys, shapes), or None."""
    own = model.state_dict()
    problems = []
    for key, value in own.items():
        if key not in state_dict:
            problems.append(f"{key} is missing from the checkpoint")
        elif (
            hasattr(value, "shape")
            and hasattr(state_dict[key], "shape")
            and tuple(value.shape) != tuple(state_dict[key].shape)
        ):
            problems.append(
                f"{key} is {tuple(state_dict[key].shape)} in the checkpoint but {tuple(value.shape)} in this model"
            )
    problems += [f"{key} is in the checkpoint but not in this model" for key in state_dict if key not in own]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
    return problems[0] + more


# --- a checkpoint is data -------------------------------------------------------------
# What Lightning's Trainer reads from every checkpoint it restores, and, to resume training,
# the training state (a ``save_weights_only`` checkpoint lacks it). A bare
# ``{"state_dict": ...}`` file ended in Lightning's ``KeyError: 'pytorch-lightning_version'``.
_LIGHTNING_KEYS = ("pytorch-lightning_version",)
_TRAINING_KEYS = ("global_step", "epoch", "loops", "optimizer_states")
# Keys of ``hyper_parameters`` that LightningCLI and ``load_from_checkpoint`` resolve to a class or function by import.
_IMPORTED_KEYS = ("_class_path", "class_path", "_instantiator")


def lightning_keys_problem(state: dict[str, Any], training: bool) -> str | None:
    """What a loaded checkpoint lacks for Lightning to restore it (for ``training``: to resume fit), or None.

    Example:
        >>> lightning_keys_problem({"state_dict": {}}, training=False)
        "it holds a bare state_dict, not a checkpoint written by Lightning's Trainer (no 'pytorch-lightning_version');
        load it with model.load_state_dict(torch.load(path)['state_dict']) instead"
    """
    if any(key not in state for key in _LIGHTNING_KEYS):
        missing = ", ".join(repr(k) for k in _LIGHTNING_KEYS if k not in state)
        return (
            f"it holds a bare state_dict, not a checkpoint written by Lightning's Trainer (no {missing}); load it with "
            "model.load_state_dict(torch.load(path)['state_dict']) instead"
        )
    if training and (absent := [k for k in _TRAINING_KEYS if k not in state]):
        return (
            f"it holds weights only (no {', '.join(repr(k) for k in absent)}: saved with save_weights_only), so "
            "training cannot resume from it; start a new run, or use it with validate/test"
        )
    return None


def foreign_model_problem(hparams: Any, class_path: str | None, init_args: dict[str, Any]) -> str | None:
    """How the model a checkpoint's ``hyper_parameters`` describe differs from this run's, or None.

    LightningCLI copies a ``--ckpt_path`` file's hyper-parameters into the config before it
    builds the model: their ``_class_path`` would be imported (a checkpoint that loads with
    ``weights_only`` could still run the code of any module on the path), and their values
    would replace the run's own settings. Checked first, by string and against modules
    already imported, so nothing a checkpoint names is imported.

    Args:
        hparams: the checkpoint's ``hyper_parameters`` (anything; only a dict is read).
        class_path: the model class this run's config names.
        init_args: this run's model arguments.

    Example:
        >>> foreign_model_problem({"_class_path": "evil.Model"}, "bnlightning.models.MLP", {})
        "its hyper_parameters name 'evil.Model', a module this run has not imported (a checkpoint is data: it is not
        imported); use the config that trained it"
    """
    if not isinstance(hparams, dict):
        return None
    for name in _class_paths(hparams):
        if "." in name and _loaded(name) is None:
            return (
                f"its hyper_parameters name {name!r}, a module this run has not imported (a checkpoint is data: it is "
                "not imported); use the config that trained it"
            )
    saved = hparams.get("_class_path")
    if isinstance(saved, str) and class_path and not _same_class(saved, class_path):
        return f"it was saved from model {saved!r}, but this run builds {class_path!r}; use the config that trained it"
    for key, value in hparams.items():
        if key in _IMPORTED_KEYS:
            continue
        if key not in init_args:
            return (
                f"its hyper_parameters hold {key!r}, which {class_path or 'this model'} does not take: it was saved "
                "from another model"
            )
        if _plain(value) and _plain(init_args[key]) and _normal(value) != _normal(init_args[key]):
            return (
                f"it was saved from another model: {key} is {value!r} in the checkpoint but {init_args[key]!r} in this "
                "run's settings; pass the run's own settings (its config.yaml)"
            )
    return None


def _class_paths(value: Any) -> list[str]:
    """Every string under an import key (``_class_path``, ``class_path``, ``_instantiator``), at any depth."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in _IMPORTED_KEYS and isinstance(item, str):
                found.append(item)
            else:
                found += _class_paths(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += _class_paths(item)
    return found


def _loaded(path: str) -> Any:
    """The object ``module.name`` names if its module is already imported, else None (never imports)."""
    import sys

    module, _, name = path.rpartition(".")
    return getattr(sys.modules[module], name, None) if module in sys.modules else None


def _same_class(saved: str, configured: str) -> bool:
    if saved == configured:
        return True
    if "." not in saved:  # a bare class name, as jsonargparse accepts
        return configured.rpartition(".")[2] == saved
    ours = _loaded(configured)
    return ours is not None and _loaded(saved) is ours


def _plain(value: Any) -> bool:
    """A YAML scalar or a list of them (nested configs are compared by their own class paths)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _normal(value: Any) -> Any:
    return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value
