"""Shared test setup: W&B stays offline and every run writes under a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# W&B cannot reach its server here: offline mode is the real thing to test.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test from an empty folder, so ``runs/`` and ``wandb/`` land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path
