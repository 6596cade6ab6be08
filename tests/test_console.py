"""The console of a run shows our lines and errors, not other libraries' tips, banners and deprecations."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest

from bnlightning.console import console, quiet, take_verbose_flag
from bnlightning.data import cifar10
from bnlightning.experiments import RunSpec, run_all
from bnlightning.runstate import RUN_FILE
from tests.helpers import CONFIGS

#: Lines other libraries print on a plain quickstart fit (Lightning, its tips, W&B's banner and summary).
NOISE = (
    "Seed set to",
    "GPU available",
    "TPU available",
    "💡 Tip",
    "litlogger",
    "wandb: Tracking run",
    "wandb: Run summary",
    "wandb: Run history",
    "wandb: Find logs",
)


def _fit_console(tmp_path: Path) -> str:
    """Everything a 3-step quickstart ``fit`` prints (stdout and stderr), as a user would see it."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_QUIET", "BNLIGHTNING_VERBOSE")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_DISABLE_GIT="true")
    args = [
        "fit",
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--trainer.max_steps",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "bnlightning", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_fit_prints_our_lines_and_none_of_the_third_party_noise(tmp_path: Path) -> None:
    text = _fit_console(tmp_path)
    assert "bnlightning: fit done for MLP(norm=batch): 3 steps" in text
    assert "bnlightning: W&B offline mode (WANDB_MODE=offline); upload later with: wandb sync" in text
    assert [n for n in NOISE if n in text] == []
    assert "Warning" not in text, text  # no third-party warning either
    assert len(text.strip().splitlines()) == 2, text


def test_quiet_keeps_our_warnings_and_errors_and_drops_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet():
            warnings.warn("LeafSpec is deprecated, use TreeSpec.is_leaf()", FutureWarning, stacklevel=1)
            warnings.warn("The 'train_dataloader' does not have many workers", UserWarning, stacklevel=1)
            warnings.warn("bnlightning: the loss is not finite at the very first step", UserWarning, stacklevel=1)
            warnings.warn("InternalCovariateShift: the optimizer skipped step 3", UserWarning, stacklevel=1)
            lines = (
                "GPU available: False",
                "bnlightning: fit done",
                "Restored all states from the checkpoint at last.ckpt",
            )
            kept = [
                r
                for r in lines
                if all(
                    f.filter(logging.LogRecord(rank_zero.name, logging.INFO, "", 0, r, None, None))
                    for f in rank_zero.filters
                )
            ]
            error_passes = all(
                f.filter(logging.LogRecord(rank_zero.name, logging.ERROR, "", 0, "GPU broke", None, None))
                for f in rank_zero.filters
            )
            summary = logging.getLogger("lightning.pytorch.callbacks.model_summary")
            summary_passes = bool(summary.filters) and all(
                f.filter(logging.LogRecord(summary.name, logging.INFO, "", 0, "  | Name | Type", None, None))
                for f in summary.filters
            )
            assert os.environ.get("WANDB_SILENT") == "true" or "WANDB_SILENT" in os.environ
        warnings.warn("after the block everything shows again", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == [
        "bnlightning: the loss is not finite at the very first step",
        "InternalCovariateShift: the optimizer skipped step 3",
        "after the block everything shows again",
    ]
    assert (
        kept == ["bnlightning: fit done", "Restored all states from the checkpoint at last.ckpt"]
        and error_passes
        and summary_passes
    )
    # A line our code logs through Lightning's logger, whatever its text, is ours by its source file.
    ours = logging.LogRecord(
        rank_zero.name, logging.INFO, str(Path(cifar10.__file__)), 286, "CIFAR-10: downloading to 'data'", None, None
    )
    theirs = logging.LogRecord(
        rank_zero.name, logging.INFO, str(Path(pl.__file__)), 1, "CIFAR-10: downloading to 'data'", None, None
    )
    with quiet():
        assert [all(f.filter(r) for f in rank_zero.filters) for r in (ours, theirs)] == [True, False]
    assert rank_zero.filters == [] and all(not h.filters for h in logging.getLogger("lightning.pytorch").handlers)


def test_verbose_is_taken_off_the_command_line_and_passed_to_child_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BNLIGHTNING_VERBOSE", raising=False)
    assert take_verbose_flag(["fit", "--config", "a.yaml", "--verbose"]) == (["fit", "--config", "a.yaml"], True)
    assert take_verbose_flag(["fit"]) == (["fit"], False)
    with console(verbose=True):
        assert os.environ["BNLIGHTNING_VERBOSE"] == "1"
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            warnings.warn("LeafSpec is deprecated", FutureWarning, stacklevel=1)
        assert len(seen) == 1
    assert "BNLIGHTNING_VERBOSE" not in os.environ


class _FakeRun(RunSpec):
    """A run whose process prints a lot (like a fit's progress bars) and marks itself completed."""

    def command(self, python: str = sys.executable) -> list[str]:
        status = self.log_dir / RUN_FILE
        code = (
            f"print('Epoch 0: 50%|#####|\\n' * 200); open({str(status)!r}, 'w').write('{{\"status\": \"completed\"}}')"
        )
        return [python, "-c", code]


def test_the_runner_keeps_each_fits_output_in_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    specs = [_FakeRun("exp", name, tmp_path / "runs" / "exp" / name, ()) for name in ("a", "b")]
    for spec in specs:
        spec.log_dir.mkdir(parents=True)
    assert [o for _, o in run_all(specs, progress=True)] == ["ok", "ok"]
    out, err = capfd.readouterr()
    assert "Epoch 0" not in out + err
    assert (tmp_path / "runs" / "exp" / "a.out").read_text().count("Epoch 0") == 200
    assert [line.split(": ")[-1].split(" in ")[0] for line in out.splitlines() if ": " in line] == ["ok", "ok"]
    assert "2/2" in err and "run" in err  # the one progress bar over the grid, on stderr
    for spec in specs:
        (spec.log_dir / RUN_FILE).unlink()
    run_all(specs)  # stderr is not a terminal here: no bar, the lines alone
    out, err = capfd.readouterr()
    assert err == "" and len(out.splitlines()) == 4
