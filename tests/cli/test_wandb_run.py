"""What a plain ``fit`` hands W&B: a run name from its folder, the run's seed as ``seed``, the split seed apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bnlightning.cli import main
from bnlightning.loggers import WandbLogger
from tests.helpers import CONFIGS, QUICK


@pytest.fixture
def handed(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Records every config update and name the W&B run is given (the real, offline run)."""
    from wandb.sdk.wandb_run import Run

    seen: dict[str, Any] = {"config": {}, "names": []}
    real_name = Run.name

    def set_name(run: Run, name: str) -> None:
        seen["names"].append(name)
        real_name.fset(run, name)

    monkeypatch.setattr(Run, "name", property(real_name.fget, set_name))
    real_log = WandbLogger.log_hyperparams

    def log_hyperparams(self: WandbLogger, params: Any) -> None:
        real_log(self, params)
        seen["config"].update(dict(self.experiment.config))

    monkeypatch.setattr(WandbLogger, "log_hyperparams", log_hyperparams)
    return seen


def test_a_plain_fit_names_its_run_and_logs_the_seed_it_ran_with(in_tmp: Path, handed: dict[str, Any]) -> None:
    cli = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            "--seed_everything",
            "1",
            "--trainer.max_steps",
            "2",
            *QUICK,
        ]
    )
    assert handed["names"] == ["quickstart/version_0"]
    config = handed["config"]
    assert config["seed"] == 1, "the run's seed is seed_everything"
    assert config["data_seed"] == 0, "the data module's split seed, under its own name"
    assert config["cli"]["seed_everything"] == 1 and config["cli"]["data"]["init_args"]["seed"] == 0
    assert cli.trainer.global_step == 2


def test_a_run_named_in_the_config_keeps_its_name(in_tmp: Path, handed: dict[str, Any]) -> None:
    logger = '[{"class_path": "bnlightning.loggers.WandbLogger", "init_args": {"save_dir": "runs", "name": "mine"}}]'
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            "--trainer.logger",
            logger,
            "--trainer.max_steps",
            "1",
            *QUICK,
        ]
    )
    assert handed["names"] == []
    assert handed["config"]["seed"] == 0 and handed["config"]["data_seed"] == 0
