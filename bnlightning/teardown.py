"""What every command closes, however it ends: the W&B run, folders of runs that never started,
the run-folder lock, the DDP process group, and the signal handlers of an in-process call."""

from __future__ import annotations

import sys
from typing import Any

import torch

from bnlightning import checkpointing, resume, runstate
from bnlightning.loggers import discard_unused_claims


def end_command(exit_code: int, guarded: dict[int, Any], in_process: bool) -> None:
    """Close the W&B run, drop folders of runs that never started, release the run's lock.

    Args:
        exit_code: the command's exit status (W&B records it; non-zero drops unused run folders).
        guarded: the signal handlers ``runstate.guard_signals`` replaced.
        in_process: the command was called as ``main([...])``, not from the command line.
    """
    try:
        finish_wandb_run(exit_code)
    finally:
        if exit_code != 0:
            discard_unused_claims()
        resume.release_runs()
        checkpointing.drop_reads()
        close_process_group()
        if in_process:
            # From the command line the guard stays until the interpreter exits: a signal
            # during W&B's final flush then ends nothing abruptly (the run is recorded).
            runstate.restore_signals(guarded)


def say_late_signal() -> None:
    """One line when SIGTERM/SIGUSR1 arrived after the run had recorded its end (nothing was lost)."""
    if runstate.late_signal:
        print(
            f"bnlightning: {runstate.late_signal['signal']} arrived after the run had recorded its end; nothing was "
            "lost, exiting normally",
            file=sys.stderr,
        )


def finish_wandb_run(exit_code: int) -> None:
    """One CLI call is one W&B run: close it, or the next call in this process reuses it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def close_process_group() -> None:
    """Destroy the process group a DDP run opened before the interpreter exits.

    Lightning does this only for NCCL. A gloo group left to interpreter finalization can
    abort the process (``terminate called without an active exception``, exit status -6)
    after a run that finished well: gloo's worker threads outlive the Python objects they hold.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
