"""Where the YAML configs are: the cwd, the installed package, or the checkout.

The registry and the sweep files name configs as ``configs/vgg.yaml``, the path they have
in a checkout. The wheel ships the repository's ``configs/`` folder as the package data
``bnlightning/configs/`` (pyproject's ``package-dir``), so an installed package finds them
through ``importlib.resources`` from any working directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: How the registry and the sweep files spell a config path.
PREFIX = "configs/"


def configs_root() -> Path | None:
    """The folder holding the shipped configs, or None when neither place has one.

    First the installed package's data (``bnlightning/configs`` in a wheel), then the
    checkout beside the package (``<repo>/configs``, what an editable install imports).
    """
    package = Path(str(resources.files("bnlightning")))
    candidates = [package / "configs", package.parent / "configs"]
    return next((c for c in candidates if (c / "vgg.yaml").is_file()), None)


def config_path(path: str) -> str:
    """``path`` as given when it exists from the cwd (short commands in a checkout), else the shipped file.

    A path that is found in neither place comes back unchanged, so ``fit`` names it in its
    own one-line error.

    Args:
        path: a config path, e.g. ``configs/vgg.yaml`` or ``configs/experiments/digits32.yaml``.

    Example:
        >>> Path(config_path("configs/vgg.yaml")).is_file()
        True
    """
    if Path(path).exists() or not path.startswith(PREFIX):
        return path
    root = configs_root()
    if root is None or not (root / path[len(PREFIX) :]).is_file():
        return path
    return str(root / path[len(PREFIX) :])
