"""The command line before LightningCLI parses it: the config files it names, and where they are.

``main`` reads these first, so a config file that is not YAML fails with one line naming
it, and ``--config configs/...`` also runs from an installed package in any directory.
:func:`check_logger_override` runs right after parsing, on the same argv.
"""

from __future__ import annotations

from typing import Any

from bnlightning.errors import RunError


def config_paths(argv: list[str]) -> list[str]:
    """The files named by ``--config``/``-c`` (``--config=X`` too); inline YAML (``{...}``, ``[...]``) is left out."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return [p for p in paths if not p.lstrip().startswith(("{", "["))]


def shipped_configs(argv: list[str]) -> list[str]:
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


def check_logger_override(argv: list[str], config: Any) -> None:
    """Refuse ``--trainer.logger.class_path X`` (or ``.init_args.*``) when the config holds a list of loggers.

    jsonargparse applies such a dotted option to one element of the list (the last), so
    ``--trainer.logger.class_path ...`` silently swaps the W&B logger of the quickstart,
    or adds a logger, instead of replacing the list the user meant.

    Raises:
        RunError: a dotted ``--trainer.logger.*`` option against a list of loggers.
    """
    dotted = next((a.split("=", 1)[0] for a in argv if a.startswith("--trainer.logger.")), None)
    if dotted is None:
        return
    section = config.get(config.get("subcommand")) if config.get("subcommand") else config
    loggers = section.get("trainer", {}).get("logger") if section is not None else None
    if isinstance(loggers, list) and len(loggers) > 1:
        raise RunError(
            f"{dotted} is ambiguous: the config's trainer.logger is a list of {len(loggers)} loggers and a dotted "
            "option changes only the last of them; "
            'replace the list with --trainer.logger=\'[{"class_path": ..., "init_args": {...}}]\', '
            "or add one with --trainer.logger+=CLASS"
        )
