"""A non-editable install works away from the checkout: the wheel ships every module and config.

The wheel is built from a copy of the sources (no network: ``--no-build-isolation``
uses the setuptools already installed), unpacked, and ``python -m bnlightning.experiments``
runs from another empty directory with only the unpacked wheel (and the third-party
packages' folder) importable: ``-S`` skips the ``.pth`` files, so the checkout's editable
finder cannot lend it the sources.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bnlightning.experiments import EXPERIMENTS
from tests.helpers import REPO, build_wheel

SOURCES = ("pyproject.toml", "README.md", "bnlightning", "callbacks", "configs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a clean copy (an in-tree build leaves build/ behind and can ship stale files)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    return build_wheel(src, tmp / "dist", "bnlightning-*.whl", timeout=120)


def _shipped(source: Path) -> str:
    """Where a source file lands in the wheel (``callbacks/`` and ``configs/`` are mapped under ``bnlightning/``)."""
    rel = source.relative_to(REPO).as_posix()
    return rel if rel.startswith("bnlightning/") else "bnlightning/" + rel


def test_the_wheel_ships_every_module_and_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        _shipped(p)
        for root in ("bnlightning", "callbacks")
        for p in (REPO / root).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    expected |= {_shipped(p) for p in (REPO / "configs").rglob("*.yaml")}
    assert (
        "bnlightning/configs/sweeps/vgg-lr.yaml" in expected and "bnlightning/callbacks/functional/ics.py" in expected
    )
    assert not expected - names, (
        f"missing from the wheel (pyproject's packages / package-data): {sorted(expected - names)}"
    )


def test_experiments_run_from_a_non_editable_install_elsewhere(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    third_party = Path(importlib.util.find_spec("yaml").origin).parents[1]  # type: ignore[arg-type]
    assert not (third_party / "bnlightning").exists()  # the checkout is installed editable, never copied there
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(third_party)]),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
    }

    def child(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-S", *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    where = child(
        "-c", "import bnlightning, bnlightning.experiments as e; print(bnlightning.__file__); print(e.configs_root())"
    ).split()
    assert where == [str(site / "bnlightning" / "__init__.py"), str(site / "bnlightning" / "configs")]

    listed = child("-m", "bnlightning.experiments", "list")
    assert [line.split()[0] for line in listed.splitlines()] == list(EXPERIMENTS)

    lines = child("-m", "bnlightning.experiments", "show", "vgg-lr", "--cpu", "--seeds", "0").splitlines()
    assert len(lines) == 4
    configs = {a.split("=", 1)[1] for line in lines for a in line.split() if a.startswith("--config=")}
    assert {Path(c).name for c in configs} == {"vgg.yaml", "digits32.yaml"}
    assert all(Path(c).is_file() and Path(c).is_relative_to(site) for c in configs), configs
    assert all(
        line.endswith(f"--trainer.default_root_dir=runs/vgg-lr-cpu/{name}")
        for line, name in zip(lines, ["none_lr0.1_s0", "none_lr0.5_s0", "batch_lr0.1_s0", "batch_lr0.5_s0"])
    )

    # A sweep file named as in the checkout is found in the package too.
    swept = child("-m", "bnlightning.experiments", "sweep", "configs/sweeps/dln.yaml").splitlines()
    assert len(swept) == 12 and f"--config {site / 'bnlightning' / 'configs' / 'dln.yaml'}" in swept[0]
    assert not any(elsewhere.iterdir())  # printing commands writes nothing
