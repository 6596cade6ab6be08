"""How a command that raised ends: the user's mistakes and interruptions as one line and an exit status, bugs with their
traceback.

* Bad input (:data:`USER_ERRORS`; a ``ValueError`` from a callback's or data module's
  ``setup``/``prepare_data``, which check the config against the built model) and full or
  read-only storage: one ``error:`` line, exit status 2.
* SIGTERM/SIGUSR1: the checkpoint is saved; one line, exit status 128 + the signal number.
* Anything else (a ``KeyError`` or ``ValueError`` from our own code included) is a bug and
  keeps its traceback. ``BNLIGHTNING_DEBUG=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from bnlightning import runstate
from bnlightning.errors import RunError, condense, storage_error_line

# Errors that mean "the user's input is wrong": shown as one line, no traceback.
# Lightning raises MisconfigurationException for bad Trainer/callback settings.
USER_ERRORS: tuple[type[BaseException], ...] = (RunError, MisconfigurationException)


def exit_for(err: BaseException, argv: list[str]) -> None:
    """Raise the ``SystemExit`` that ``err`` calls for; return when it is a bug (the caller re-raises it).

    Args:
        err: what the command raised.
        argv: the command line, named in the line that says how to resume an interrupted run.
    """
    if isinstance(err, SIGTERMException):
        # Pre-empted: the checkpoint is saved; one line, and a non-zero status for schedulers.
        print(f"bnlightning: {runstate.describe_interrupt(argv)}", file=sys.stderr)
        raise SystemExit(runstate.last_interrupt.get("code", 128 + 15)) from None
    if isinstance(err, runstate.StartupInterrupted):
        print(
            f"bnlightning: interrupted by {err.signal} before training began; nothing to save; run the same command "
            "again to start",
            file=sys.stderr,
        )
        raise SystemExit(err.code) from None
    if (line := user_error_line(err)) is not None:
        fail(line)


def user_error_line(err: BaseException) -> str | None:
    """The one line that tells the user what to fix, or None: ``err`` is a bug (or ``BNLIGHTNING_DEBUG`` is set)."""
    if os.environ.get("BNLIGHTNING_DEBUG"):
        return None
    if isinstance(err, USER_ERRORS):
        return condense(str(err))
    if isinstance(err, ValueError):
        return condense(str(err)) if raised_by_setup_check(err) else None
    if isinstance(err, OSError):
        return storage_error_line(err)
    return None


def raised_by_setup_check(err: BaseException) -> bool:
    """Whether ``err`` came out of a callback's or data module's ``setup``/``prepare_data``.

    Those hooks check the config against the model once it exists (a callback's layer
    names, for one), so their ``ValueError`` is the user's input, like a constructor's.
    """
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in ("setup", "prepare_data") and isinstance(
            frame.f_locals.get("self"), (pl.Callback, pl.LightningDataModule)
        ):
            return True
        tb = tb.tb_next
    return False


def fail(message: str) -> NoReturn:
    """Print ``error: message`` and exit with status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
