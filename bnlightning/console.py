"""A quiet console: our own lines and errors, not other libraries' tips, banners and deprecations.

A plain ``fit`` would otherwise print Lightning's hardware lines and tips ("GPU available",
"💡 Tip: ... litlogger"), torch's and Lightning's deprecation warnings on every run, and W&B's
banner and its 25-line run summary, burying the one ``bnlightning: fit done ...`` line.

While :func:`quiet` is active:

* Python warnings are shown only when they are ours: their text starts with ``bnlightning``
  or with the name of one of ``bnlightning.callbacks``' public classes or functions (how
  every warning of the callbacks begins, e.g. ``InternalCovariateShift: ...``), or they are
  attributed to a ``bnlightning`` module. Every other warning is ignored.
* Lightning's and Lightning Fabric's log records below WARNING are dropped unless our code
  logged them (our ``rank_zero_info`` lines go through Lightning's logger too) or they start
  with ``bnlightning``, are
  the model summary table (``enable_model_summary``, on unless a config turns it off) or say
  which checkpoint was loaded ("Restored all states from the checkpoint at ...").
* W&B is told to be silent (``WANDB_SILENT=true``) unless ``WANDB_SILENT`` or ``WANDB_QUIET``
  is already set; our W&B lines (offline mode, the ``wandb sync`` command) still show.

Errors are never hidden: exceptions, ``error:`` lines and log records at WARNING or above
pass. Progress bars are not touched. ``--verbose`` on the command line, or the environment
variable ``BNLIGHTNING_VERBOSE=1``, brings everything back.

Example::

    argv, verbose = take_verbose_flag(argv)
    with console(verbose):
        run_the_command(argv)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator

#: The command-line flag and the environment variable that turn quieting off.
VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "BNLIGHTNING_VERBOSE"

#: Loggers whose handlers Lightning installs (records of their children propagate to them).
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")

#: Lightning loggers whose info lines stay: the model summary is a table the trainer setting
#: ``enable_model_summary`` asks for (off in the quickstart).
SHOWN_LOGGERS = ("lightning.pytorch.callbacks.model_summary",)

#: Info lines that stay, by how they start: ours, and the one line saying which checkpoint a
#: resumed ``fit`` (or a ``validate``/``test`` on a checkpoint) loaded.
SHOWN_LINES = ("bnlightning", "Restored all states from the checkpoint", "Loaded model weights from the checkpoint")


def verbose_requested() -> bool:
    """Whether ``BNLIGHTNING_VERBOSE`` is set to a true value (anything but empty, 0, false, no)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def take_verbose_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--verbose``, and whether it was there (LightningCLI would reject it).

    >>> take_verbose_flag(["fit", "--verbose", "--config", "c.yaml"])
    (['fit', '--config', 'c.yaml'], True)
    """
    kept = [a for a in argv if a != VERBOSE_FLAG]
    return kept, len(kept) != len(argv)


def own_text_pattern() -> re.Pattern[str]:
    """What our own warnings start with: ``bnlightning`` or a public name of ``bnlightning.callbacks``."""
    import bnlightning.callbacks as callbacks

    names = sorted({"bnlightning", *callbacks.__all__}, key=len, reverse=True)
    return re.compile(r"(" + "|".join(map(re.escape, names)) + r")\b")


def own_source_folders() -> tuple[str, ...]:
    """The folders of our code (``bnlightning/`` and the callbacks' folder, which an editable install keeps apart)."""
    import bnlightning
    import bnlightning.callbacks

    return tuple(
        os.path.dirname(os.path.abspath(m.__file__ or "")) + os.sep for m in (bnlightning, bnlightning.callbacks)
    )


class _OwnLinesOnly(logging.Filter):
    """Passes warnings and errors, info lines of our code, the model summary and the checkpoint loaded.

    ``rank_zero_info`` records carry the caller's file (Lightning passes a ``stacklevel``), so a
    line our code logs through Lightning's logger is recognised by where it comes from.
    """

    def __init__(self) -> None:
        super().__init__()
        self.folders = own_source_folders()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or record.name in SHOWN_LOGGERS:
            return True
        return os.path.abspath(record.pathname).startswith(self.folders) or record.getMessage().startswith(SHOWN_LINES)


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Silence other libraries' console output inside the block (see the module docstring).

    Everything is restored on exit (warning filters, logging filters, ``WANDB_SILENT``), so
    calling the CLI in-process (tests, notebooks) leaves the interpreter as it was.

    Args:
        enabled: False makes the block a no-op (``--verbose``).
    """
    if not enabled:
        yield
        return
    import lightning.pytorch  # noqa: F401  (creates Lightning's loggers, so they can be filtered now)

    own = _OwnLinesOnly()
    # Lightning's records propagate to its top-level handlers, or to the root logger's
    # handlers when those exist (pytest, notebooks): filter at every Lightning logger.
    filtered = [
        lg
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and (name == "lightning" or name.startswith("lightning."))
    ]
    handlers = [h for name in LIGHTNING_LOGGERS for h in logging.getLogger(name).handlers]
    for target in (*filtered, *handlers):
        target.addFilter(own)
    wandb_env = {} if ("WANDB_SILENT" in os.environ or "WANDB_QUIET" in os.environ) else {"WANDB_SILENT": "true"}
    os.environ.update(wandb_env)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            warnings.filterwarnings("default", module=r"bnlightning(\.|$)")
            warnings.filterwarnings("default", message=own_text_pattern().pattern)
            yield
    finally:
        for target in (*filtered, *handlers):
            target.removeFilter(own)
        for key in wandb_env:
            os.environ.pop(key, None)


@contextlib.contextmanager
def console(verbose: bool = False) -> Iterator[None]:
    """The console for one command: :func:`quiet` unless ``verbose`` or ``BNLIGHTNING_VERBOSE``.

    ``verbose=True`` also sets ``BNLIGHTNING_VERBOSE=1`` inside the block, so processes the
    command starts (DDP's workers run the command line again, without ``--verbose``) are
    verbose too.
    """
    if not verbose:
        with quiet(enabled=not verbose_requested()):
            yield
        return
    before = os.environ.get(VERBOSE_ENV)
    os.environ[VERBOSE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VERBOSE_ENV, None)
        else:
            os.environ[VERBOSE_ENV] = before
