"""Which run a resume continues, what it may write, and how runs end: real processes and signals.

Each test is one cluster scenario (a requeue with other settings, a second process on a
live run, a runner killed with SIGKILL, SIGTERM during validation or after training, a
kill during a metrics rewrite). Tiny runs: the quickstart MLP, a dozen steps, CSV only.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnlightning.cli import main
from tests.helpers import CONFIGS, QUICK, REPO

CSV_ONLY = "trainer:\n  logger:\n    - class_path: bnlightning.loggers.CSVLogger\n      init_args: {save_dir: runs, name: quickstart}\n"


def _args(tmp: Path, *extra: str, steps: int = 12) -> list[str]:
    (tmp / "csv_only.yaml").write_text(CSV_ONLY)
    common = ["--config", str(CONFIGS / "quickstart.yaml"), "--config", str(tmp / "csv_only.yaml"), "--trainer.max_steps", str(steps)]
    return ["fit", *common, "--checkpoint.every_n_train_steps", "4", "--trainer.log_every_n_steps", "1", *QUICK, *extra]


def _callback(tmp: Path, class_path: str, **init_args: int) -> list[str]:
    path = tmp / f"{class_path.rsplit('.', 1)[-1]}-{'-'.join(map(str, init_args.values()))}.yaml"
    path.write_text(f"trainer:\n  callbacks:\n    - class_path: {class_path}\n      init_args: {json.dumps(init_args)}\n")
    return ["--config", str(path)]


def _exit(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run ``main(args)`` expecting SystemExit; its code and its non-empty stderr lines."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return int(exc.value.code or 0), [ln for ln in err.splitlines() if ln.startswith(("error:", "bnlightning:"))]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _state(run: Path) -> dict[str, object]:
    return json.loads((run / "run.json").read_text())


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp)}


# --- points 1, 2, 3, 7: which run `last` and a FILE continue -----------------------------
def test_resume_continues_only_the_same_run_and_writes_only_there(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A (lr 0.1) pre-empted at step 6; `last` with lr 0.5 starts B beside it; a FILE with another
    width is one line; resuming A under B's logger settings writes only into A; `last` on the
    completed A is one line and exit 0."""
    lr = "--model.init_args.optimizer.init_args.lr"
    run_a, run_b = in_tmp / "runs/quickstart/version_0", in_tmp / "runs/quickstart/version_1"
    code, _ = _exit([*_args(in_tmp, lr, "0.1"), *_callback(in_tmp, "tests.helpers.faults.SignalAtStep", step=6)], capsys)
    assert code == 143 and _state(run_a)["status"] == "interrupted"
    a_before = _files(run_a)
    main([*_args(in_tmp, lr, "0.5", "--ckpt_path", "last")])  # other settings: a new run
    assert _state(run_b)["status"] == "completed" and "lr: 0.5" in (run_b / "config.yaml").read_text()
    assert _files(run_a) == a_before, "run A untouched by a run with other settings"

    last_a = str(run_a / "checkpoints/last.ckpt")
    code, lines = _exit([*_args(in_tmp, lr, "0.1", "--model.init_args.width", "50", "--ckpt_path", last_a)], capsys)
    assert code == 2 and len(lines) == 1 and "model.init_args.width: 100 there, 50 here" in lines[0], lines
    loose = in_tmp / "loose.ckpt"
    shutil.copy(last_a, loose)
    code, lines = _exit([*_args(in_tmp, lr, "0.1", "--model.init_args.width", "50", "--ckpt_path", str(loose))], capsys)
    assert code == 2 and len(lines) == 1 and "model.init_args.width: 100 there, 50 here" in lines[0], lines
    assert sorted(p.name for p in run_a.parent.iterdir()) == ["version_0", "version_1"], "no folder left by a refused start"

    b_before = _files(run_b)
    b_logger = json.dumps([{"class_path": "bnlightning.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "quickstart", "version": 1}}])
    main([*_args(in_tmp, lr, "0.1", "--ckpt_path", last_a), f"--trainer.logger={b_logger}"])
    assert _files(run_b) == b_before, "resuming A never writes into B's folder"
    assert _state(run_a)["status"] == "completed"
    assert [int(r["step"]) for r in _rows(run_a / "metrics.csv") if r.get("train/loss")] == list(range(12))
    a_done = _files(run_a)
    code, lines = _exit([*_args(in_tmp, lr, "0.1", "--ckpt_path", "last")], capsys)
    assert code == 0 and len(lines) == 1 and "already completed at step 12" in lines[0] and "never reopened" in lines[0], lines
    assert _files(run_a) == a_done
