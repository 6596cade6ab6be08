"""Every ``>>>`` example in the package's docstrings runs and prints what it says.

Modules are found by their source text, so a new doctest is picked up without a list
to maintain (and ``pytest --doctest-modules`` is not needed on the test command).
"""

from __future__ import annotations

import doctest
import importlib

import pytest

from tests.helpers import REPO

# Package folder -> import name (``callbacks/`` installs as ``bnlightning.callbacks``).
ROOTS = {REPO / "bnlightning": "bnlightning", REPO / "callbacks": "bnlightning.callbacks"}


def _modules_with_doctests() -> list[str]:
    names = []
    for root, package in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            if ">>> " in path.read_text(encoding="utf-8"):
                parts = path.relative_to(root).with_suffix("").parts
                names.append(".".join([package, *(p for p in parts if p != "__init__")]))
    return names


MODULES = _modules_with_doctests()


def test_the_package_has_doctests() -> None:
    assert "bnlightning.data.loader" in MODULES and "bnlightning.errors" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.attempted > 0, f"{name} has '>>> ' in its source but no doctest ran"
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} examples in {name} failed (run `python -m doctest -v` on it)"
    )
