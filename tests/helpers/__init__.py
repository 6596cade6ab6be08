"""What the tests share besides fixtures: repository paths and quiet trainer flags.

Imported as ``from tests.helpers import CONFIGS`` (``tests`` is a package, so pytest puts the
repository root on ``sys.path`` whatever the working directory). Fixtures stay in ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The repository root (the folder holding ``bnlightning/``, ``configs/`` and ``tests/``).
REPO = Path(__file__).resolve().parents[2]
#: The bundled LightningCLI configs.
CONFIGS = REPO / "configs"
#: Command-line flags that keep a test's trainer quiet (no progress bar, no model summary).
QUICK = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
#: A config that replaces the bundled configs' loggers with one CSV logger (no wandb) under ``runs/quickstart``.
CSV_ONLY = (
    "trainer:\n  logger:\n    - class_path: bnlightning.loggers.CSVLogger\n"
    "      init_args: {save_dir: runs, name: quickstart}\n"
)


def csv_quickstart(tmp: Path) -> list[str]:
    """``--config`` flags for the quickstart config with its loggers replaced by one CSV logger (``CSV_ONLY``, written
    to ``tmp/csv_only.yaml``): no W&B start-up cost."""
    (tmp / "csv_only.yaml").write_text(CSV_ONLY)
    return ["--config", str(CONFIGS / "quickstart.yaml"), "--config", str(tmp / "csv_only.yaml")]


#: ``Trainer`` keyword arguments of a quiet CPU test run (no progress bar, summary or checkpoints).
TRAINER_KW: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "accelerator": "cpu",
}


def fake_cifar10_args(root: Path) -> list[str]:
    """CLI flags pointing ``CIFAR10DataModule`` at a generated CIFAR-format folder (no download, no checksums)."""
    return [
        "--data.init_args.root",
        str(root),
        "--data.init_args.download",
        "false",
        "--data.init_args.verify_checksums",
        "false",
    ]


def require_modern_setuptools() -> None:
    """Skip a test that builds a wheel when setuptools cannot read PEP 639's ``license = "MIT"``.

    The builds run without build isolation (no network), so they use this environment's
    setuptools; the dev extra (``pip install -e '.[dev]'``, what ``make`` runs) installs >= 77.
    """
    import pytest
    import setuptools
    from packaging.version import Version

    if Version(setuptools.__version__) < Version("77"):
        pytest.skip(
            "building needs setuptools>=77 (pip install -e '.[dev]' installs it); "
            f"this environment has {setuptools.__version__}"
        )


def build_wheel(project: Path, dist: Path, pattern: str, timeout: float) -> Path:
    """Build ``project``'s wheel into ``dist`` offline (no index, no build isolation: this environment's setuptools)
    and return the one wheel matching ``pattern``; a failed build fails the test with pip's last lines."""
    import os
    import subprocess
    import sys

    require_modern_setuptools()
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        str(project),
        "-w",
        str(dist),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = dist.glob(pattern)
    return built
