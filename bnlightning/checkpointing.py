"""Checkpoints that survive a crash while saving, and safe loading.

Lightning's own save goes through an fsspec transaction whose temporary file lives in
the system temp folder; when that is another file system the final move is a copy, and
a kill during the copy leaves a truncated checkpoint. ``AtomicCheckpointIO`` writes the
temporary file beside the target, fsyncs it and renames it into place with
``os.replace`` (atomic on POSIX), so a reader sees either the old checkpoint or the
new one. Loading uses ``torch.load(weights_only=True)``: a checkpoint is data, and
nothing in it may run code.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

_TMP_SUFFIX = ".tmp-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save with write-to-temporary + fsync + ``os.replace``; load with ``weights_only=True``."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = os.fspath(path)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        # Leftovers from a process killed mid-save are never valid checkpoints.
        for stale in glob.glob(glob.escape(path) + _TMP_SUFFIX + "*"):
            os.remove(stale)
        tmp = f"{path}{_TMP_SUFFIX}{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _fsync_dir(folder)

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Untrusted pickles never run code here; say so rather than fall back silently.
        return torch.load(os.fspath(path), map_location=map_location or "cpu", weights_only=True if weights_only is None else weights_only)


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
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends.

    With ``every_n_train_steps`` set, Lightning saves only on those steps, so the final
    weights of a run whose length is not a multiple of the interval (or that stopped on
    divergence) would be lost. Arguments are ``ModelCheckpoint``'s.
    """

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
