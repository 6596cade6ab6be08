"""Fault injection: crash and resume, divergence, bad input, flaky logging, safe loading."""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlightning.checkpointing import AtomicCheckpointIO
from bnlightning.cli import main
from bnlightning.loggers import WandbLogger
from tests.helpers import CONFIGS, CSV_ONLY, QUICK, REPO, csv_quickstart, fake_cifar10_args


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fit_subprocess(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_DIR": str(cwd)}
    cmd = [sys.executable, "-m", "bnlightning", "fit", *args, *QUICK]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


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
        "trainer:\n  callbacks:\n    - class_path: tests.helpers.faults.KillAtStep\n      init_args: {step: 33}\n"
        + "".join(f"    {line}\n" for line in _callback_items(callbacks))
    )
    common = [
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--trainer.max_steps",
        "45",
        "--trainer.log_every_n_steps",
        "1",
        "--checkpoint.every_n_train_steps",
        "10",
    ]
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    ref_dir.mkdir(), crash_dir.mkdir()
    ref = _fit_subprocess(ref_dir, *common, "--config", str(measure))
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _fit_subprocess(crash_dir, *common, "--config", str(kill))
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpts = crash_dir / "runs/quickstart/version_0/checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 30
    resumed = _fit_subprocess(crash_dir, *common, "--config", str(measure), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr

    a = torch.load(ref_dir / "runs/quickstart/version_0/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 45
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    # One run folder, the same rows (measurements included) as the uninterrupted run.
    assert sorted(p.name for p in (crash_dir / "runs/quickstart").iterdir()) == ["version_0"]
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
        items.append(line.removeprefix("    "))
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
        (
            "quickstart.yaml",
            [
                "--model.init_args.norm",
                "none",
                "--model.init_args.activation",
                "identity",
                "--model.init_args.optimizer.init_args.lr",
                "1e6",
            ],
        ),
        ("dln.yaml", ["--model.init_args.optimizer.init_args.lr", "1.0", "--trainer.accelerator", "cpu"]),
    ],
)
def test_divergence_is_recorded_and_ends_cleanly(
    in_tmp: Path, caplog: pytest.LogCaptureFixture, config: str, overrides: list[str]
) -> None:
    cli = main(
        [
            "fit",
            "--config",
            str(CONFIGS / config),
            "--trainer.max_steps",
            "200",
            "--trainer.log_every_n_steps",
            "1",
            *overrides,
            *QUICK,
        ]
    )
    model = cli.model
    assert model.diverged_at_step is not None and model.diverged_at_step < 200
    assert cli.trainer.global_step < 200, "training stops at the next check after divergence"
    assert f"diverged (non-finite loss) at step {model.diverged_at_step}; stopping this run cleanly" in caplog.text
    name = config.removesuffix(".yaml")
    rows = _rows(in_tmp / "runs" / name / "version_0" / "metrics.csv")
    recorded = [float(r["diverged_at_step"]) for r in rows if r.get("diverged_at_step")]
    assert recorded == [model.diverged_at_step]
    # The step recorded is the first non-finite training loss in the log.
    first_bad = min(
        int(r["step"]) for r in rows if r.get("train/loss") and not torch.isfinite(torch.tensor(float(r["train/loss"])))
    )
    assert first_bad == model.diverged_at_step


# --- bad input: one line, exit code 2, no traceback ----------------------------------
BAD_INPUT = [
    (
        ["--model", "bnlightning.models.Nope"],
        r"^error: model: cannot use class_path 'bnlightning.models.Nope': .*has no attribute 'Nope'$",
    ),
    (
        ["--model.init_args.norm", "batchnorm"],
        r"^error: model.norm: got 'batchnorm'; accepted: none, batch, noisy_batch, l1, l2, linf, layer, group$",
    ),
    (
        ["--model.init_args.activation", "gelu"],
        r"^error: model.activation: got 'gelu'; accepted: relu, tanh, sigmoid, identity$",
    ),
    (
        ["--model.init_args.norm_layers", "[5]"],
        r"^error: norm_layers index 5 out of range: this network has 3 hidden layers, so indices run from 0 to 2$",
    ),
    (["--data.init_args.batch_size", "0"], r"^error: .*batch_size.*0"),
    (["--trainer.max_steps", "many"], r"^error: trainer.max_steps: got 'many'; expected an integer$"),
    (["--model.init_args.optimizer.init_args.lr", "abc"], r"^error: model.optimizer.lr: got 'abc'; expected a number$"),
]


@pytest.mark.parametrize(("args", "pattern"), BAD_INPUT)
def test_bad_input_is_one_clear_line(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], args: list[str], pattern: str
) -> None:
    _assert_one_line_error(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *args, *QUICK], pattern, capsys)


def test_yaml_that_does_not_parse_names_line_and_column(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = in_tmp / "bad.yaml"
    bad.write_text("model:\n  class_path: bnlightning.models.MLP\n  init_args: {norm: batch\n")
    _assert_one_line_error(
        ["fit", "--config", str(bad)], r"^error: .*bad.yaml: invalid YAML at line 4, column 1: ", capsys
    )


def test_missing_cifar_directory(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "fit",
        "--config",
        str(CONFIGS / "vgg_bn.yaml"),
        "--data.init_args.root",
        str(in_tmp / "nowhere"),
        "--data.init_args.download",
        "false",
        *QUICK,
    ]
    _assert_one_line_error(args, r"^error: CIFAR-10 not found.*nowhere", capsys)


def test_corrupted_cifar_batch_file_is_detected(
    in_tmp: Path, fake_cifar10: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = fake_cifar10 / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])  # truncated
    args = [
        "fit",
        "--config",
        str(CONFIGS / "vgg_bn.yaml"),
        *fake_cifar10_args(fake_cifar10),
        "--trainer.max_steps",
        "1",
        *QUICK,
    ]
    _assert_one_line_error(args, r"^error: .*data_batch_3", capsys)


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
@pytest.mark.parametrize(
    "content", [b"", b"PK\x03\x04 truncated zip", os.urandom(2048)], ids=["empty", "truncated", "garbage"]
)
def test_unreadable_ckpt_path_is_one_line_naming_the_file(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], subcommand: str, content: bytes
) -> None:
    bad = in_tmp / "model.ckpt"
    bad.write_bytes(content)
    args = [subcommand, "--config", str(CONFIGS / "quickstart.yaml"), "--ckpt_path", str(bad), *QUICK]
    _assert_one_line_error(args, rf"^error: .*{re.escape(str(bad))}.* not a readable checkpoint", capsys)


@pytest.mark.parametrize("error", [KeyError, ValueError])
def test_a_bug_keeps_its_traceback(in_tmp: Path, monkeypatch: pytest.MonkeyPatch, error: type[Exception]) -> None:
    """A ValueError/KeyError from our own code during training is not "bad input": it propagates."""
    from bnlightning.models.mlp import MLP

    def broken(self: object, batch: object, batch_idx: int) -> None:
        raise error("internal bug")

    monkeypatch.setattr(MLP, "training_step", broken)
    with pytest.raises(error, match="internal bug"):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "quickstart.yaml"),
                "--trainer.max_steps",
                "1",
                "--trainer.logger",
                "false",
                *QUICK,
            ]
        )


def test_a_constructor_value_error_is_bad_input_but_keeps_its_cause(in_tmp: Path) -> None:
    """At the config boundary a constructor's ValueError is the user's value: RunError, chained."""
    from bnlightning.cli import build_cli
    from bnlightning.errors import RunError

    with pytest.raises(RunError, match="batch_size") as exc:
        build_cli(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--data.init_args.batch_size", "0"], run=True)
    assert isinstance(exc.value.__cause__, ValueError)


def _assert_one_line_error(args: list[str], pattern: str, capsys: pytest.CaptureFixture[str]) -> None:
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
def test_no_credentials_means_offline_with_one_message(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
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
        "    - class_path: tests.helpers.faults.FailingLogger\n"
    )
    with pytest.raises(ConnectionError):
        # A bare Lightning logger that raises would end the run ...
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "quickstart.yaml"),
                "--config",
                str(cfg),
                "--trainer.max_steps",
                "20",
                "--trainer.log_every_n_steps",
                "5",
                *QUICK,
            ]
        )


def test_wandb_errors_mid_run_do_not_stop_training(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """... but our WandbLogger turns a W&B error into one warning and the CSV keeps everything."""
    from wandb.sdk.wandb_run import Run

    def broken_log(self: object, *args: object, **kwargs: object) -> None:
        raise ConnectionError("simulated W&B outage")

    monkeypatch.setattr(Run, "log", broken_log)
    with pytest.warns(UserWarning, match="W&B logging failed .*training goes on"):
        cli = main(
            [
                "fit",
                "--config",
                str(CONFIGS / "quickstart.yaml"),
                "--trainer.max_steps",
                "20",
                "--trainer.log_every_n_steps",
                "5",
                *QUICK,
            ]
        )
    assert cli.trainer.global_step == 20
    rows = _rows(in_tmp / "runs" / "quickstart" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [4, 9, 14, 19]


CALLBACK_BAD_INPUT = [
    (
        ["--trainer.callbacks.layers", "[net.fc99]"],
        r"^error: .*'net\.fc99'.*net\.fc1",
    ),
    (["--trainer.callbacks.every_n_steps", "0"], r"^error: .*every_n_steps.*>= 1, got 0"),
    (
        ["--trainer.callbacks.max_overhead", "1.5"],
        r"^error: .*max_overhead must be None or a number in \(0, 1\).*got 1\.5",
    ),
    (["--trainer.callbacks.schedule", "cosine"], r"^error: .*unknown schedule 'cosine'; accepted: fixed, log"),
]


@pytest.mark.parametrize(("args", "pattern"), CALLBACK_BAD_INPUT)
def test_bad_callback_arguments_are_one_clear_line(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], args: list[str], pattern: str
) -> None:
    measure = in_tmp / "ics.yaml"
    measure.write_text(
        "trainer:\n  callbacks:\n    - class_path: bnlightning.callbacks.InternalCovariateShift\n"
        "      init_args: {every_n_steps: 10}\n"
    )
    base = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(measure), "--trainer.max_steps", "2"]
    _assert_one_line_error([*base, *args, *QUICK], pattern, capsys)


def test_non_positive_landscape_step_size_is_one_clear_line(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    measure = in_tmp / "landscape.yaml"
    measure.write_text(
        "trainer:\n  callbacks:\n    - class_path: bnlightning.callbacks.LossLandscape\n"
        "      init_args: {step_sizes: [0.5, -1.0]}\n"
    )
    args = [
        "fit",
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--config",
        str(measure),
        "--trainer.max_steps",
        "2",
        *QUICK,
    ]
    _assert_one_line_error(args, r"^error: .*step.*-1\.0", capsys)


# --- runs never mix, survive pre-emption, fail early ------------------------


def _quick(tmp: Path, *extra: str) -> list[str]:
    """Quickstart, CSV logger only (no W&B start-up cost), checkpoints every 10 steps."""
    return [*csv_quickstart(tmp), "--checkpoint.every_n_train_steps", "10", "--trainer.log_every_n_steps", "1", *extra]


def _callback(tmp: Path, class_path: str, **init_args: int) -> list[str]:
    path = tmp / f"{class_path.rsplit('.', 1)[-1]}.yaml"
    path.write_text(
        f"trainer:\n  callbacks:\n    - class_path: {class_path}\n      init_args: {json.dumps(init_args)}\n"
    )
    return ["--config", str(path)]


def _state(run: Path) -> dict[str, object]:
    return json.loads((run / "run.json").read_text())


def test_ckpt_path_last_resumes_the_killed_run_not_its_neighbour(in_tmp: Path) -> None:
    """Issue case 1: `make quickstart` (norm none, then batch) with batch killed and resumed."""
    common = _quick(in_tmp, "--trainer.max_steps", "12", "--checkpoint.every_n_train_steps", "5", *QUICK)
    main(["fit", *common, "--model.init_args.norm", "none"])
    run_a = in_tmp / "runs/quickstart/version_0"
    before = {f: (run_a / f).read_bytes() for f in ("metrics.csv", "config.yaml", "run.json")}
    killed = _fit_subprocess(
        in_tmp,
        *common,
        "--model.init_args.norm",
        "batch",
        *_callback(in_tmp, "tests.helpers.faults.KillAtStep", step=11),
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    cli = main(["fit", *common, "--model.init_args.norm", "batch", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 12
    assert {f: (run_a / f).read_bytes() for f in before} == before, "run A's folder is untouched"
    run_b = in_tmp / "runs/quickstart/version_1"
    assert "norm: batch" in (run_b / "config.yaml").read_text()
    assert [int(r["step"]) for r in _rows(run_b / "metrics.csv") if r.get("train/loss")] == list(range(12))
    assert _state(run_b)["status"] == "completed"
    assert sorted(p.name for p in (in_tmp / "runs/quickstart").iterdir()) == ["version_0", "version_1"]


def _claim_many(root: str, n: int) -> list[int]:
    from bnlightning.loggers import claim_version

    return [claim_version(root) for _ in range(n)]


def test_concurrent_runs_never_share_a_folder(tmp_path: Path) -> None:
    """Issue case 2: two runs created together get two folders (Lightning's listing gave both version_0) ..."""
    from bnlightning.loggers import CSVLogger

    a, b = CSVLogger(save_dir=str(tmp_path), name="q"), CSVLogger(save_dir=str(tmp_path), name="q")
    assert (a.log_dir, b.log_dir) == (str(tmp_path / "q/version_0"), str(tmp_path / "q/version_1"))
    # ... and so do processes racing for the next number (an exclusive mkdir each).
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(4) as pool:
        claimed = [v for chunk in pool.starmap(_claim_many, [(str(tmp_path / "race"), 10)] * 4) for v in chunk]
    assert sorted(claimed) == list(range(40))


def test_sigterm_saves_stops_nonzero_and_resumes_exactly(in_tmp: Path) -> None:
    """Issue case 3: a real SIGTERM at step 7 (between checkpoints): checkpoint at 7, one line,
    exit 143; resuming gives the weights and rows of an uninterrupted run."""
    common = _quick(in_tmp, "--trainer.max_steps", "12", "--checkpoint.every_n_train_steps", "5", *QUICK)
    out = _fit_subprocess(in_tmp, *common, *_callback(in_tmp, "tests.helpers.faults.SignalAtStep", step=7))
    assert out.returncode == 128 + 15, out.stderr[-2000:]
    run = in_tmp / "runs/quickstart/version_0"
    state = _state(run)
    assert state["status"] == "interrupted" and state["step"] == 7 and state["signal"] == "SIGTERM"
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 7
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("bnlightning: interrupted")]
    assert len(line) == 1 and "by SIGTERM at step 7" in line[0] and line[0].endswith("--ckpt_path last"), out.stderr[
        -2000:
    ]
    assert "Traceback" not in out.stderr
    main(["fit", *common, "--ckpt_path", "last"])
    assert _state(run)["status"] == "completed"
    main(["fit", *common])  # the uninterrupted reference, in version_1
    ref = in_tmp / "runs/quickstart/version_1"
    a = torch.load(ref / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(run / "metrics.csv") == _rows(ref / "metrics.csv")


def test_experiment_runner_reports_interrupted_then_resumes_then_skips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue case 3 (runner), with SLURM's warning signal SIGUSR1: "INTERRUPTED", not "ok"; the
    next invocation resumes, the one after skips."""
    import signal

    from bnlightning.experiments import RunSpec, run_all

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    args = (
        f"--config={CONFIGS / 'quickstart.yaml'}",
        "--trainer.max_steps=12",
        "--trainer.log_every_n_steps=4",
        "--checkpoint.every_n_train_steps=100",
        "--trainer.logger="
        + json.dumps(
            [
                {
                    "class_path": "bnlightning.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs", "name": "exp", "version": "a"},
                }
            ]
        ),
        *_callback(tmp_path, "tests.helpers.faults.SignalAtStep", step=6, signum=int(signal.SIGUSR1)),
        *QUICK,
    )
    spec = RunSpec("exp", "a", Path("runs/exp/a"), tuple(args))
    assert [o for _, o in run_all([spec], tmp_path)] == ["interrupted"]
    assert "INTERRUPTED (checkpoint saved; run the same command again to resume)" in capsys.readouterr().out
    assert _state(tmp_path / "runs/exp/a")["signal"] == "SIGUSR1"
    assert [o for _, o in run_all([spec], tmp_path)] == ["ok"]
    assert "(resuming the interrupted run)" in capsys.readouterr().out
    assert _state(tmp_path / "runs/exp/a")["status"] == "completed"
    assert [int(r["step"]) for r in _rows(tmp_path / "runs/exp/a/metrics.csv") if r.get("train/loss")] == [3, 7, 11]
    assert [o for _, o in run_all([spec], tmp_path)] == ["skipped"]


def test_kill_before_first_checkpoint_is_not_counted_as_a_seed(in_tmp: Path) -> None:
    """Issue case 4: the fragment is marked unfinished; the restart is a new run; the report keeps them apart."""
    from bnlightning.report.page import write_markdown
    from bnlightning.report.runs import load_runs, split_runs

    common = _quick(in_tmp, "--trainer.max_steps", "10", "--checkpoint.every_n_train_steps", "1000", *QUICK)
    killed = _fit_subprocess(in_tmp, *common, *_callback(in_tmp, "tests.helpers.faults.KillAtStep", step=3))
    assert killed.returncode == -9
    assert _state(in_tmp / "runs/quickstart/version_0")["status"] == "running"
    main(["fit", *common, "--ckpt_path", "last"])  # nothing to resume: a new run
    done, unfinished = split_runs(load_runs([in_tmp / "runs"]))
    assert [r.path.name for r in done] == ["version_1"] and [r.path.name for r in unfinished] == ["version_0"]
    md = write_markdown(
        done, [], in_tmp, "t", unfinished
    ).read_text()  # the page `report` writes (figures left out: slow)
    tables, apart = md.split("## Incomplete runs")
    assert "version_1" in tables and "version_0" not in tables
    assert "| version_0 | running |" in apart.replace("runs/quickstart/", "")


def test_failed_resume_touches_nothing(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue case 5: a resume that cannot work fails in one line before writing; an unreadable
    last.ckpt is passed over for the newest intact checkpoint; old step checkpoints are pruned (keep_last)."""
    common = ["fit", *_quick(in_tmp, "--trainer.max_steps", "12", "--checkpoint.every_n_train_steps", "3", *QUICK)]
    with pytest.raises(SystemExit):
        main([*common, *_callback(in_tmp, "tests.helpers.faults.SignalAtStep", step=10)])
    run = in_tmp / "runs/quickstart/version_0"
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=6.ckpt", "epoch=0-step=9.ckpt", "last.ckpt"], (
        "keep_last=2 by default"
    )
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    _assert_one_line_error(
        [*common, "--model.init_args.width", "50", "--ckpt_path", str(ckpts / "last.ckpt")],
        (
            r"^error: --ckpt_path .*last\.ckpt: it was saved from another model: "
            r"width is 100 in the checkpoint but 50 in this run's settings"
        ),
        capsys,
    )
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before, "nothing written before the check"
    (ckpts / "last.ckpt").write_bytes(b"")
    with pytest.warns(
        UserWarning,
        match=(
            r"last\.ckpt cannot be resumed \(the file is empty \(0 bytes\)\); "
            r"resuming from the newest intact checkpoint .*epoch=0-step=9\.ckpt"
        ),
    ):
        with pytest.raises(SystemExit):
            main(
                [
                    *common,
                    "--ckpt_path",
                    str(ckpts / "last.ckpt"),
                    *_callback(in_tmp, "tests.helpers.faults.SignalAtStep", step=11),
                ]
            )
    assert _state(run)["step"] == 11
    for p in ckpts.iterdir():
        p.write_bytes(p.read_bytes()[:1000])  # truncated, every one of them
    _assert_one_line_error(
        [*common, "--ckpt_path", "last"],
        r"^error: cannot resume .*version_0: none of its checkpoints is readable",
        capsys,
    )
    _assert_one_line_error(
        [*common, "--checkpoint.keep_last", "0"], r"^error: .*keep_last must be >= 1 \(or -1 .*\), got 0", capsys
    )


def _in_private_mount(tmp: Path, mount_opts: str, *fit_args: str) -> subprocess.CompletedProcess[str]:
    """``fit`` in a user+mount namespace with a fresh tmpfs at ``tmp/disk`` (real ENOSPC / EROFS)."""
    import shutil

    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False).returncode != 0
    ):
        pytest.skip("user namespaces (unshare -rm) are not available here")
    disk = tmp / "disk"
    disk.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    script = f'mount -t tmpfs -o {mount_opts} tmpfs "$1" || exit 77; shift; exec "$@"'
    cmd = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        script,
        "sh",
        str(disk),
        sys.executable,
        "-m",
        "bnlightning",
        "fit",
        *fit_args,
        *QUICK,
    ]
    out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300, check=False)
    if out.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    return out


@pytest.mark.parametrize(
    ("opts", "pattern"),
    [
        ("ro,size=1m", r"^error: Read-only file system: .*disk/runs \(make it writable, or point the run elsewhere"),
        (
            "size=48k",
            (
                r"^error: No space left on device: .*disk/runs/quickstart/version_0/checkpoints/.*ckpt.* "
                r"\(free space there"
            ),
        ),
    ],
    ids=["read-only", "full"],
)
def test_full_or_read_only_storage_is_one_line(tmp_path: Path, opts: str, pattern: str) -> None:
    """Issue case 6: a read-only folder fails at start-up, a full disk at the first checkpoint,
    each as one line naming the path (no "unexpected pos" traceback)."""
    csv_only = tmp_path / "csv.yaml"
    csv_only.write_text(CSV_ONLY.replace("save_dir: runs", f"save_dir: {tmp_path / 'disk' / 'runs'}"))
    out = _in_private_mount(
        tmp_path,
        opts,
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--config",
        str(csv_only),
        "--trainer.max_steps",
        "5",
        "--checkpoint.every_n_train_steps",
        "2",
    )
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in out.stderr


def test_report_ignores_cut_rows_and_empty_logs(tmp_path: Path) -> None:
    """Issue case 7: a last line cut mid-write is dropped (with a warning); an empty metrics.csv is no run."""
    from bnlightning.report.runs import load_runs

    good, empty = tmp_path / "good", tmp_path / "empty"
    for d in (good, empty):
        d.mkdir()
        (d / "config.yaml").write_text("model: {class_path: bnlightning.models.MLP, init_args: {norm: batch}}\n")
    (good / "metrics.csv").write_text("epoch,step,val/acc\r\n0,9,0.5\r\n0,19,0.9375\r\n0,29,0.9")
    (empty / "metrics.csv").write_text("epoch,step,val/acc\r\n")
    with pytest.warns(UserWarning) as record:
        runs = load_runs([tmp_path])
    messages = " ".join(str(w.message) for w in record)
    assert "ignoring its last line, which was cut short: '0,29,0.9'" in messages
    assert "metrics.csv holds no rows; not a run, skipped" in messages
    assert [r.path for r in runs] == [good] and runs[0].final("val/acc") == 0.9375 and runs[0].last_step == 19


def test_failed_cifar_download_is_one_line_with_the_fix(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue case 8: no internet (here: a refused connection) is one line saying where the files go."""
    from bnlightning.data.cifar10 import CIFAR10Dataset

    monkeypatch.setattr(CIFAR10Dataset, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    root = in_tmp / "data"
    args = [
        "fit",
        "--config",
        str(CONFIGS / "vgg_bn.yaml"),
        "--data.init_args.root",
        str(root),
        "--trainer.max_steps",
        "1",
        *QUICK,
    ]
    _assert_one_line_error(
        args,
        (
            r"^error: CIFAR-10 download failed \(.*refused.*\); without internet, "
            rf".* so that {re.escape(str(root))}/cifar-10-batches-py holds .* --data\.init_args\.root"
        ),
        capsys,
    )


def test_nan_in_data_is_named_and_a_diverged_run_does_not_resume(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Non-finite loss at the very first step points at the data; resuming that run stops at once."""
    common = [
        "fit",
        *_quick(in_tmp, "--trainer.max_steps", "12", "--data", "tests.helpers.faults.PoisonedDigits", *QUICK),
    ]
    with pytest.warns(
        UserWarning,
        match=(
            r"loss is not finite at the very first step: the training data may hold NaN/inf "
            r"\(the first training batch holds 60 NaN/inf values\)"
        ),
    ):
        cli = main(common)
    assert cli.model.diverged_at_step == 0
    run = in_tmp / "runs/quickstart/version_0"
    assert _state(run)["status"] == "diverged"
    finished = (
        r"^error: --ckpt_path .*last\.ckpt: its run .*version_0 already diverged; a finished run is never reopened"
    )
    _assert_one_line_error([*common, "--ckpt_path", str(run / "checkpoints/last.ckpt")], finished, capsys)
    loose = in_tmp / "diverged.ckpt"
    loose.write_bytes((run / "checkpoints/last.ckpt").read_bytes())
    _assert_one_line_error(
        [*common, "--ckpt_path", str(loose)],
        r"^error: .*diverged\.ckpt: this run diverged at step 0 \(non-finite loss\); resuming would train on NaN",
        capsys,
    )
