"""Fault injection: crash and resume, divergence, bad input, flaky logging, safe loading."""

from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlightning.checkpointing import AtomicCheckpointIO
from bnlightning.cli import main
from bnlightning.loggers import WandbLogger
from conftest import CONFIGS, REPO

QUICK = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fit_subprocess(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "offline", "WANDB_DIR": str(cwd)}
    cmd = [sys.executable, "-m", "bnlightning", "fit", *args, *QUICK]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# --- crash and resume ---------------------------------------------------------------
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Killed at step 33 (mid-epoch 1, three steps after the step-30 checkpoint), resumed
    with --ckpt_path last: same final weights, same metrics.csv, same loader position."""
    # All three measurement callbacks, every 5 steps, so the window between the
    # checkpoint and the kill holds measurements that the resumed run must log again.
    measure = tmp_path / "measure.yaml"
    measure.write_text((CONFIGS / "measure.yaml").read_text().replace("every_n_steps: 100", "every_n_steps: 5"))
    kill = tmp_path / "kill.yaml"
    callbacks = measure.read_text().strip()
    kill.write_text(
        "trainer:\n  callbacks:\n    - class_path: fault_helpers.KillAtStep\n      init_args: {step: 33}\n"
        + "".join(f"    {line}\n" for line in _callback_items(callbacks))
    )
    common = [
        "--config", str(CONFIGS / "quickstart.yaml"),
        "--trainer.max_steps", "45",
        "--trainer.log_every_n_steps", "1",
        "--checkpoint.every_n_train_steps", "10",
    ]
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    ref_dir.mkdir(), crash_dir.mkdir()
    ref = _fit_subprocess(ref_dir, *common, "--config", str(measure))
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _fit_subprocess(crash_dir, *common, "--config", str(kill))
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpts = crash_dir / "runs/quickstart/checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 30
    resumed = _fit_subprocess(crash_dir, *common, "--config", str(measure), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr

    a = torch.load(ref_dir / "runs/quickstart/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 45
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    # One run folder, the same rows (measurements included) as the uninterrupted run.
    assert sorted(p.name for p in (crash_dir / "runs/quickstart").iterdir()) == ["checkpoints", "version_0"]
    ref_rows = _rows(ref_dir / "runs/quickstart/version_0/metrics.csv")
    assert _rows(crash_dir / "runs/quickstart/version_0/metrics.csv") == ref_rows
    assert len([r for r in ref_rows if r.get("train/loss")]) == 45
    measured = [int(r["step"]) for r in ref_rows if r.get("landscape/beta_eff")]
    assert measured == [4, 9, 14, 19, 24, 29, 34, 39, 44]
    assert any(k.startswith("ics/cos/") for k in ref_rows[0]) and any(k.startswith("act/") for k in ref_rows[0])


def _callback_items(measure_yaml: str) -> list[str]:
    """The ``- class_path: ...`` items of a config's trainer.callbacks, re-indented."""
    lines = measure_yaml.splitlines()
    if "  callbacks:" not in lines:
        return []
    start = lines.index("  callbacks:") + 1
    items = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        items.append(line[4:] if line.startswith("    ") else line)
    return [i for i in items if i.strip() and not i.strip().startswith("#")]


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash_midway(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1, "the previous checkpoint must survive a crash mid-save"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file left behind"


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_checkpoints_load_without_running_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        torch.save({"state_dict": {}, "payload": _RunsCode()}, f)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path)


# --- divergence ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        ("quickstart.yaml", ["--model.init_args.norm", "none", "--model.init_args.activation", "identity", "--model.init_args.optimizer.init_args.lr", "1e6"]),
        ("dln.yaml", ["--model.init_args.optimizer.init_args.lr", "1.0", "--trainer.accelerator", "cpu"]),
    ],
)
def test_divergence_is_recorded_and_ends_cleanly(in_tmp: Path, caplog: pytest.LogCaptureFixture, config: str, overrides: list[str]) -> None:
    cli = main(["fit", "--config", str(CONFIGS / config), "--trainer.max_steps", "200", "--trainer.log_every_n_steps", "1", *overrides, *QUICK])
    model = cli.model
    assert model.diverged_at_step is not None and model.diverged_at_step < 200
    assert cli.trainer.global_step < 200, "training stops at the next check after divergence"
    assert f"diverged (non-finite loss) at step {model.diverged_at_step}; stopping this run cleanly" in caplog.text
    name = config.removesuffix(".yaml")
    rows = _rows(in_tmp / "runs" / name / "version_0" / "metrics.csv")
    recorded = [float(r["diverged_at_step"]) for r in rows if r.get("diverged_at_step")]
    assert recorded == [model.diverged_at_step]
    # The step recorded is the first non-finite training loss in the log.
    first_bad = min(int(r["step"]) for r in rows if r.get("train/loss") and not torch.isfinite(torch.tensor(float(r["train/loss"]))))
    assert first_bad == model.diverged_at_step


# --- bad input: one line, exit code 2, no traceback ----------------------------------
BAD_INPUT = [
    (["--model", "bnlightning.models.Nope"], r"^error: model: cannot use class_path 'bnlightning.models.Nope': .*has no attribute 'Nope'$"),
    (["--model.init_args.norm", "batchnorm"], r"^error: model.norm: got 'batchnorm'; accepted: none, batch, noisy_batch, l1, l2, linf, layer, group$"),
    (["--model.init_args.activation", "gelu"], r"^error: model.activation: got 'gelu'; accepted: relu, tanh, sigmoid, identity$"),
    (["--model.init_args.norm_layers", "[5]"], r"^error: norm_layers index 5 out of range: this network has 3 hidden layers, so indices run from 0 to 2$"),
    (["--data.init_args.batch_size", "0"], r"^error: .*batch_size.*0"),
    (["--trainer.max_steps", "many"], r"^error: trainer.max_steps: Expected a <class 'int'>. Got value: many$"),
]


@pytest.mark.parametrize(("args", "pattern"), BAD_INPUT)
def test_bad_input_is_one_clear_line(in_tmp: Path, capsys: pytest.CaptureFixture[str], args: list[str], pattern: str) -> None:
    _assert_one_line_error(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *args, *QUICK], pattern, capsys)


def test_yaml_that_does_not_parse_names_line_and_column(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = in_tmp / "bad.yaml"
    bad.write_text("model:\n  class_path: bnlightning.models.MLP\n  init_args: {norm: batch\n")
    _assert_one_line_error(["fit", "--config", str(bad)], r"^error: .*bad.yaml: invalid YAML at line 4, column 1: ", capsys)


def test_missing_cifar_directory(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", str(CONFIGS / "vgg_bn.yaml"), "--data.init_args.root", str(in_tmp / "nowhere"), "--data.init_args.download", "false", *QUICK]
    _assert_one_line_error(args, r"^error: CIFAR-10 not found.*nowhere", capsys)


def test_corrupted_cifar_batch_file_is_detected(in_tmp: Path, fake_cifar10: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batch = fake_cifar10 / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])  # truncated
    args = [
        "fit", "--config", str(CONFIGS / "vgg_bn.yaml"), "--data.init_args.root", str(fake_cifar10),
        "--data.init_args.download", "false", "--data.init_args.verify_checksums", "false", "--trainer.max_steps", "1", *QUICK,
    ]
    _assert_one_line_error(args, r"^error: .*data_batch_3", capsys)


def _assert_one_line_error(args: list[str], pattern: str, capsys: pytest.CaptureFixture[str]) -> None:
    import re

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in err


# --- offline and flaky logging -------------------------------------------------------
def test_no_credentials_means_offline_with_one_message(in_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(in_tmp / "no-netrc"))
    main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_steps", "20", *QUICK])
    text = caplog.text
    assert text.count("bnlightning: W&B offline mode (no W&B credentials found)") == 1
    assert f"wandb sync {in_tmp}/runs/wandb/offline-run-*" in text
    assert list((in_tmp / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_failing_wandb_init_falls_back_to_offline(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # "credentials", but no server to reach
    monkeypatch.delenv("WANDB_MODE", raising=False)
    real_init = wandb.init
    calls: list[str] = []

    def init(**kwargs: object) -> object:
        calls.append(os.environ.get("WANDB_MODE", "online"))
        if len(calls) == 1:
            raise wandb.errors.CommError("could not reach the server")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    logger = WandbLogger(save_dir=str(in_tmp))
    assert not logger._offline
    with pytest.warns(UserWarning, match="switching to W&B offline mode"):
        run = logger.experiment
    assert run is not None and logger._offline and calls == ["online", "dryrun"]
    run.finish()


def test_logging_errors_mid_run_do_not_stop_training(in_tmp: Path) -> None:
    cfg = in_tmp / "loggers.yaml"
    cfg.write_text(
        "trainer:\n  logger:\n"
        "    - class_path: bnlightning.loggers.CSVLogger\n      init_args: {save_dir: runs, name: flaky}\n"
        "    - class_path: fault_helpers.FailingLogger\n"
    )
    with pytest.raises(ConnectionError):
        # A bare Lightning logger that raises would end the run ...
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(cfg), "--trainer.max_steps", "20", "--trainer.log_every_n_steps", "5", *QUICK])


def test_wandb_errors_mid_run_do_not_stop_training(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """... but our WandbLogger turns a W&B error into one warning and the CSV keeps everything."""
    from wandb.sdk.wandb_run import Run

    def broken_log(self: object, *args: object, **kwargs: object) -> None:
        raise ConnectionError("simulated W&B outage")

    monkeypatch.setattr(Run, "log", broken_log)
    with pytest.warns(UserWarning, match="W&B logging failed .*training goes on"):
        cli = main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_steps", "20", "--trainer.log_every_n_steps", "5", *QUICK])
    assert cli.trainer.global_step == 20
    rows = _rows(in_tmp / "runs" / "quickstart" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [4, 9, 14, 19]


CALLBACK_BAD_INPUT = [
    (
        ["--trainer.callbacks.layers", "[net.fc99]"],
        r"^error: .*'net\.fc99'.*net\.fc1",
    ),
    (["--trainer.callbacks.every_n_steps", "0"], r"^error: .*every_n_steps.*>= 1, got 0"),
]


@pytest.mark.parametrize(("args", "pattern"), CALLBACK_BAD_INPUT)
def test_bad_callback_arguments_are_one_clear_line(in_tmp: Path, capsys: pytest.CaptureFixture[str], args: list[str], pattern: str) -> None:
    measure = in_tmp / "ics.yaml"
    measure.write_text("trainer:\n  callbacks:\n    - class_path: bnlightning.callbacks.InternalCovariateShift\n      init_args: {every_n_steps: 10}\n")
    base = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(measure), "--trainer.max_steps", "2"]
    _assert_one_line_error([*base, *args, *QUICK], pattern, capsys)


def test_non_positive_landscape_step_size_is_one_clear_line(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    measure = in_tmp / "landscape.yaml"
    measure.write_text("trainer:\n  callbacks:\n    - class_path: bnlightning.callbacks.LossLandscape\n      init_args: {step_sizes: [0.5, -1.0]}\n")
    args = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(measure), "--trainer.max_steps", "2", *QUICK]
    _assert_one_line_error(args, r"^error: .*step.*-1\.0", capsys)
