"""The layering rule, read off the imports: ``callbacks/functional/`` is pure torch and imports nothing above it.

Every file under ``callbacks/functional/`` is parsed (``ast``; imports inside functions count too) and
may import only the standard library, torch, NumPy, torchmetrics (its metric states are restored),
``lightning_utilities`` (``apply_to_collection``, which carries no Trainer) and other modules of
``bnlightning.callbacks.functional``: never ``bnlightning.callbacks.<anything else>`` (the callback
level), never ``bnlightning`` outside ``callbacks`` (models, data, report), never Lightning itself.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import bnlightning.callbacks.functional as functional

FUNCTIONAL = "bnlightning.callbacks.functional"
THIRD_PARTY = {"torch", "numpy", "torchmetrics", "lightning_utilities"}


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, a module of ``package``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.append((node.lineno, ".".join([*base, node.module] if node.module else base)))
            else:
                out.append((node.lineno, node.module or ""))
    return sorted(out)  # ast.walk is breadth first: by line


def broken_rules(source: str, package: str = FUNCTIONAL) -> list[str]:
    """Why each import of ``source`` breaks the layering rule (empty: none does)."""
    bad = []
    for line, name in imported_modules(source, package):
        top = name.split(".")[0]
        if name == FUNCTIONAL or name.startswith(FUNCTIONAL + "."):
            continue
        if top == "bnlightning":
            bad.append(f"line {line}: {name} is above functional/")
        elif top not in THIRD_PARTY and top not in sys.stdlib_module_names:
            bad.append(f"line {line}: {name} is neither torch nor the standard library")
    return bad


FILES = sorted(Path(functional.__file__).parent.rglob("*.py"))


def _package_of(path: Path) -> str:
    parts = path.relative_to(Path(functional.__file__).parent).with_suffix("").parts
    return ".".join([FUNCTIONAL, *parts[:-1]])


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_functional_imports_nothing_above_it(path: Path) -> None:
    assert broken_rules(path.read_text(), _package_of(path)) == []


def test_the_rule_catches_every_kind_of_import_above_functional() -> None:
    source = "\n".join(
        [
            "import torch",
            "from bnlightning.callbacks.functional._state import RngState",
            "from . import _loss",
            "from bnlightning.callbacks.guard import observer_guard",
            "from .. import base",
            "import lightning.pytorch as pl",
            "def f():\n    from pytorch_lightning import Trainer",
            "from bnlightning.models import VGG",
        ]
    )
    assert broken_rules(source) == [
        "line 4: bnlightning.callbacks.guard is above functional/",
        "line 5: bnlightning.callbacks is above functional/",
        "line 6: lightning.pytorch is neither torch nor the standard library",
        "line 8: pytorch_lightning is neither torch nor the standard library",
        "line 9: bnlightning.models is above functional/",
    ]
