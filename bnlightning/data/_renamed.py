"""The data modules' old names, kept importable (a user's YAML may still say ``bnlightning.data.CIFAR10``).

Each old name resolves, through a module ``__getattr__`` (PEP 562), to the renamed class itself, so
``isinstance`` checks and saved configs see one class; the first use of each old name in a process
logs one ``rank_zero_deprecation`` line naming the new class.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning.pytorch.utilities import rank_zero_deprecation

#: old name -> (module that defines the new class, new name)
RENAMED = {
    "CIFAR10": ("bnlightning.data.cifar10", "CIFAR10DataModule"),
    "Digits": ("bnlightning.data.digits", "DigitsDataModule"),
    "LinearRegression": ("bnlightning.data.linear", "LinearRegressionDataModule"),
}
_warned: set[str] = set()


def renamed_attribute(module: str, name: str, names: tuple[str, ...] = tuple(RENAMED)) -> Any:
    """The class an old data-module name of ``module`` stands for, warning on its first use.

    Args:
        module: the module asked (for the ``AttributeError`` of any other name).
        name: the attribute asked for.
        names: the old names this module answers (a submodule answers only its own).

    Raises:
        AttributeError: ``name`` is not an old data-module name of ``module``.

    Example (in a module, so that ``from bnlightning.data.digits import Digits`` still works)::

        def __getattr__(name: str) -> Any:
            return renamed_attribute(__name__, name, names=("Digits",))
    """
    if name not in names:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    where, new = RENAMED[name]
    if name not in _warned:
        _warned.add(name)
        rank_zero_deprecation(f"bnlightning.data.{name} is renamed bnlightning.data.{new}; the old name will be removed (in YAML: class_path: bnlightning.data.{new})")
    return getattr(importlib.import_module(where), new)
