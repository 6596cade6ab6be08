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
from tests.helpers import CONFIGS, QUICK, REPO, csv_quickstart


def _args(tmp: Path, *extra: str, steps: int = 12) -> list[str]:
    common = [*csv_quickstart(tmp), "--trainer.max_steps", str(steps)]
    return ["fit", *common, "--checkpoint.every_n_train_steps", "4", "--trainer.log_every_n_steps", "1", *QUICK, *extra]


def _callback(tmp: Path, class_path: str, **init_args: int) -> list[str]:
    path = tmp / f"{class_path.rsplit('.', 1)[-1]}-{'-'.join(map(str, init_args.values()))}.yaml"
    path.write_text(
        f"trainer:\n  callbacks:\n    - class_path: {class_path}\n      init_args: {json.dumps(init_args)}\n"
    )
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
def test_resume_continues_only_the_same_run_and_writes_only_there(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A (lr 0.1) pre-empted at step 6; `last` with lr 0.5 starts B beside it; a FILE with another
    width is one line; resuming A under B's logger settings writes only into A; `last` on the
    completed A is one line and exit 0."""
    lr = "--model.init_args.optimizer.init_args.lr"
    run_a, run_b = in_tmp / "runs/quickstart/version_0", in_tmp / "runs/quickstart/version_1"
    code, _ = _exit(
        [*_args(in_tmp, lr, "0.1"), *_callback(in_tmp, "tests.helpers.faults.SignalAtStep", step=6)], capsys
    )
    assert code == 143 and _state(run_a)["status"] == "interrupted"
    a_before = _files(run_a)
    main([*_args(in_tmp, lr, "0.5", "--ckpt_path", "last")])  # other settings: a new run
    assert _state(run_b)["status"] == "completed" and "lr: 0.5" in (run_b / "config.yaml").read_text()
    assert _files(run_a) == a_before, "run A untouched by a run with other settings"

    last_a = str(run_a / "checkpoints/last.ckpt")
    code, lines = _exit([*_args(in_tmp, lr, "0.1", "--model.init_args.width", "50", "--ckpt_path", last_a)], capsys)
    # refused at parse time, before Lightning copies the checkpoint's settings over the command line's
    assert (
        code == 2 and len(lines) == 1 and "width is 100 in the checkpoint but 50 in this run's settings" in lines[0]
    ), lines
    loose = in_tmp / "loose.ckpt"
    shutil.copy(last_a, loose)
    code, lines = _exit([*_args(in_tmp, lr, "0.1", "--model.init_args.width", "50", "--ckpt_path", str(loose))], capsys)
    assert (
        code == 2 and len(lines) == 1 and "width is 100 in the checkpoint but 50 in this run's settings" in lines[0]
    ), lines
    assert sorted(p.name for p in run_a.parent.iterdir()) == ["version_0", "version_1"], (
        "no folder left by a refused start"
    )

    b_before = _files(run_b)
    b_logger = json.dumps(
        [
            {
                "class_path": "bnlightning.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": "quickstart", "version": 1},
            }
        ]
    )
    main([*_args(in_tmp, lr, "0.1", "--ckpt_path", last_a), f"--trainer.logger={b_logger}"])
    assert _files(run_b) == b_before, "resuming A never writes into B's folder"
    assert _state(run_a)["status"] == "completed"
    assert [int(r["step"]) for r in _rows(run_a / "metrics.csv") if r.get("train/loss")] == list(range(12))
    a_done = _files(run_a)
    code, lines = _exit([*_args(in_tmp, lr, "0.1", "--ckpt_path", "last")], capsys)
    assert (
        code == 0 and len(lines) == 1 and "already completed at step 12" in lines[0] and "never reopened" in lines[0]
    ), lines
    assert _files(run_a) == a_done


# --- point 4: one process per run folder; a runner's children die with it -----------------
HOLD_LOCK = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_live_run_folder_is_locked_and_the_lock_dies_with_its_process(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While another live process holds the run, `last` is one line and exit 2; after a SIGKILL
    of that process (no cleanup) the same command resumes."""
    code, _ = _exit([*_args(in_tmp), *_callback(in_tmp, "tests.helpers.faults.SignalAtStep", step=5)], capsys)
    run = in_tmp / "runs/quickstart/version_0"
    assert code == 143
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = _files(run)
        code, lines = _exit([*_args(in_tmp, "--ckpt_path", "last")], capsys)
        assert code == 2 and len(lines) == 1 and f"{run} is in use by process" in lines[0], lines
        assert _files(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    main([*_args(in_tmp, "--ckpt_path", "last")])
    assert _state(run)["status"] == "completed"
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


RUNNER = """
import sys
from pathlib import Path
from bnlightning.experiments import RunSpec, run_all
run_all([RunSpec("exp", "a", Path("runs/exp/a"), tuple(sys.argv[1:]))], Path.cwd())
"""


def test_a_runner_killed_with_sigkill_takes_its_fit_down(tmp_path: Path) -> None:
    """The kernel sends the orphaned fit SIGTERM (PR_SET_PDEATHSIG): it saves and stops."""
    logger = json.dumps(
        [
            {
                "class_path": "bnlightning.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": "exp", "version": "a"},
            }
        ]
    )
    args = _args(tmp_path, steps=100000)[1:] + [f"--trainer.logger={logger}"]
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = tmp_path / "runs/exp/a"
    deadline = time.monotonic() + 120
    while not (run / "run.json").exists() or _state(run).get("status") != "running":
        assert time.monotonic() < deadline and runner.poll() is None, "the fit never started"
        time.sleep(0.5)
    child = int(_state(run)["pid"])  # type: ignore[call-overload]
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    while _state(run).get("status") == "running":
        assert time.monotonic() < deadline, "the orphaned fit kept training"
        time.sleep(0.5)
    state = _state(run)
    assert state["status"] == "interrupted" and state["signal"] == "SIGTERM"
    while _alive(child):
        assert time.monotonic() < deadline
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


# --- point 5: what a resume restarts from --------------------------------------------------
def test_sigterm_during_end_of_epoch_validation_resumes_exactly(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM after the first validation batch of the end-of-epoch validation (5 steps per
    epoch): the stop waits for validation to end; the resumed run has the weights, rows and
    step numbers of an uninterrupted one."""
    val = ["--data.init_args.batch_size", "240", "--data.init_args.eval_batch_size", "100"]  # 4 validation batches
    main([*_args(in_tmp, *val, steps=8)])  # the reference, version_0
    code, _ = _exit(
        [
            *_args(in_tmp, *val, steps=8),
            *_callback(in_tmp, "tests.helpers.faults.SignalInValidation", step=5, batch_idx=0),
        ],
        capsys,
    )
    run, ref = in_tmp / "runs/quickstart/version_1", in_tmp / "runs/quickstart/version_0"
    assert code == 143 and _state(run)["step"] == 5
    main([*_args(in_tmp, *val, "--ckpt_path", "last", steps=8)])
    a = torch.load(ref / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    rows = _rows(run / "metrics.csv")
    assert rows == _rows(ref / "metrics.csv") and [r["step"] for r in rows if r.get("val/loss")] == ["4"]


def test_resume_takes_the_newest_intact_checkpoint_by_its_stored_step(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Pre-empted at step 1 (before the first periodic save), resumed, pre-empted at 10: one
    last.ckpt (no last-v1). Then last.ckpt is put back to its step-1 copy (as a full disk
    leaves it): the resume starts from the step-8 checkpoint beside it, and clears the
    temporary files a killed save left."""
    code, _ = _exit([*_args(in_tmp), *_callback(in_tmp, "tests.helpers.faults.SignalAtStep", step=1)], capsys)
    ckpts = in_tmp / "runs/quickstart/version_0/checkpoints"
    stale = (ckpts / "last.ckpt").read_bytes()
    code, _ = _exit(
        [*_args(in_tmp, "--ckpt_path", "last"), *_callback(in_tmp, "tests.helpers.faults.SignalAtStep", step=10)],
        capsys,
    )
    assert code == 143 and sorted(p.name for p in ckpts.iterdir()) == [
        "epoch=0-step=4.ckpt",
        "epoch=0-step=8.ckpt",
        "last.ckpt",
    ]
    (ckpts / "last.ckpt").write_bytes(stale)
    (ckpts / "last.ckpt.tmp-999999").write_bytes(b"PK half a checkpoint")
    caplog.clear()
    main([*_args(in_tmp, "--ckpt_path", "last")])
    assert "epoch=0-step=8.ckpt (step 8)" in caplog.text
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 12
    assert not list(ckpts.glob("*.tmp-*"))


# --- point 6: the history survives a kill during a rewrite --------------------------------
def test_sigkill_while_metrics_csv_is_rewritten_keeps_every_row(tmp_path: Path) -> None:
    """A resume rewrites metrics.csv (keeping the rows before its checkpoint); a SIGKILL in the
    middle of that write leaves the whole old file, not a fragment."""
    from bnlightning import loggers

    log_dir = tmp_path / "run"
    log_dir.mkdir()
    metrics = log_dir / "metrics.csv"
    metrics.write_text("epoch,step,train/loss\n" + "".join(f"0,{i},0.5\n" for i in range(6000)))
    before = metrics.read_bytes()
    pid = os.fork()
    if pid == 0:  # the child: a resume from step 3000, killed after writing 100 rows
        real = csv.DictWriter.writerows

        def cut(self: csv.DictWriter, rows: list[dict[str, str]]) -> None:
            real(self, rows[:100])
            os.kill(os.getpid(), signal.SIGKILL)

        csv.DictWriter.writerows = cut  # type: ignore[method-assign]
        loggers._ResumingWriter(str(log_dir), 3000)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert metrics.read_bytes() == before, "the history is whole after the kill"
    loggers._ResumingWriter(str(log_dir), 3000)  # the next resume
    assert [int(r["step"]) for r in _rows(metrics)] == list(range(3000))


# --- point 7: a finished run stays finished -------------------------------------------------
def test_a_run_killed_after_its_last_checkpoint_is_recorded_completed_not_reopened(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SIGKILL between the final checkpoint and the status write (the final W&B flush) leaves
    run.json at "running": the requeued `last` records "completed" and trains nothing."""
    main([*_args(in_tmp, steps=8)])
    run = in_tmp / "runs/quickstart/version_0"
    state = _state(run)
    (run / "run.json").write_text(json.dumps({**state, "status": "running"}))
    rows = _rows(run / "metrics.csv")
    code, lines = _exit([*_args(in_tmp, "--ckpt_path", "last", steps=8)], capsys)
    assert code == 0 and len(lines) == 1 and "already completed at step 8" in lines[0], lines
    assert _state(run)["status"] == "completed" and _state(run)["step"] == 8
    assert _rows(run / "metrics.csv") == rows


def test_sigterm_right_after_training_is_a_completed_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM once training has ended (during the loggers' flush): exit 0 with one line, run.json
    "completed", and the runner says ok."""
    from bnlightning.experiments import RunSpec, run_all

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    logger = json.dumps(
        [
            {
                "class_path": "bnlightning.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": "exp", "version": "a"},
            }
        ]
    )
    args = [
        *_args(tmp_path, steps=4)[1:],
        f"--trainer.logger={logger}",
        *_callback(tmp_path, "tests.helpers.faults.SignalAfterTraining"),
    ]
    spec = RunSpec("exp", "a", Path("runs/exp/a"), tuple(args))
    assert [o for _, o in run_all([spec], tmp_path, quiet=True)] == ["ok"]
    assert _state(tmp_path / "runs/exp/a")["status"] == "completed"
    out = (tmp_path / "runs/exp/a.out").read_text()
    assert "bnlightning: SIGTERM arrived after the run had recorded its end; nothing was lost, exiting normally" in out


# --- point 11: what a user trips over ---------------------------------------------------------
def test_a_run_that_fails_at_start_up_leaves_no_folder(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A callback's bad layer name fails in setup, after the folder was claimed: it is removed."""
    ics = in_tmp / "ics.yaml"
    ics.write_text(
        "trainer:\n  callbacks:\n    - class_path: bnlightning.callbacks.InternalCovariateShift\n"
        "      init_args: {layers: [net.fc99]}\n"
    )
    code, lines = _exit([*_args(in_tmp, steps=2), "--config", str(ics)], capsys)
    assert code == 2 and len(lines) == 1 and "net.fc99" in lines[0], lines
    assert not list((in_tmp / "runs/quickstart").glob("version_*"))


def test_a_dotted_logger_option_on_a_logger_list_is_one_line(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "fit",
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--trainer.logger.class_path",
        "lightning.pytorch.loggers.CSVLogger",
        *QUICK,
    ]
    code, lines = _exit(args, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "--trainer.logger.class_path is ambiguous: the config's trainer.logger is a list of 2 loggers" in lines[0]
    assert not (in_tmp / "runs").exists()


def test_runner_names_follow_an_override_of_a_grid_key() -> None:
    from bnlightning.experiments.registry import EXPERIMENTS
    from bnlightning.experiments.runs import expand

    specs = expand(
        EXPERIMENTS["vgg-lr"],
        [0, 1],
        cpu=True,
        extra=["--model.init_args.optimizer.init_args.lr", "0.05", "--seed_everything=7"],
    )
    assert [s.name for s in specs] == ["none_lr0.05_s7", "batch_lr0.05_s7"]
    assert all(
        s.args[-3:] == ("--model.init_args.optimizer.init_args.lr", "0.05", "--seed_everything=7") for s in specs
    )
