"""Shared test setup: W&B stays offline and every run writes under a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# W&B cannot reach its server here: offline mode is the real thing to test.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test from an empty folder, so ``runs/`` and ``wandb/`` land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


# ---- data (owned by bnlightning/data): a CIFAR-10-format folder, see bnlightning/data/fake.py ----
@pytest.fixture
def fake_cifar10(tmp_path: Path) -> Path:
    """A ``root`` holding ``cifar-10-batches-py`` with 100 train / 40 test random images.

    Not the official files: load with ``verify_checksums=False``
    (``--data.init_args.verify_checksums false`` on the command line).
    """
    from bnlightning.data.fake import make_fake_cifar10

    root = tmp_path / "cifar10"
    make_fake_cifar10(root, n_train=100, n_test=40)
    return root
