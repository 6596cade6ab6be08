"""The command line: every config parses, runs train end to end, mixed precision and DDP on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlightning.cli import main
from tests.helpers import CONFIGS, QUICK, REPO, fake_cifar10_args

ALL_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_the_paper_configs_are_all_there() -> None:
    expected = {
        "vgg.yaml",
        "vgg_bn.yaml",
        "vgg_noisy_bn.yaml",
        "vgg_l1.yaml",
        "vgg_l2.yaml",
        "vgg_linf.yaml",
        "vgg_a_bn4.yaml",
        "dln.yaml",
        "dln_bn.yaml",
        "mlp_sigmoid.yaml",
        "mlp_sigmoid_bn.yaml",
        "quickstart.yaml",
    }
    assert expected <= set(ALL_CONFIGS)


@pytest.mark.parametrize("name", [n for n in ALL_CONFIGS if n != "measure.yaml"])
def test_every_config_parses(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: bnlightning.models." in printed and "class_path: bnlightning.data." in printed


def test_python_dash_m_entry_point_prints_help() -> None:
    out = subprocess.run([sys.executable, "-m", "bnlightning", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fit" in out.stdout


def test_quickstart_trains_and_reports_accuracy(in_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    cli = main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_steps", "120", *QUICK])
    acc = float(cli.trainer.callback_metrics["val/acc"])
    assert acc > 0.5, "BN MLP should be well above chance (10%) after 120 steps on digits"
    assert f"val/acc={acc:.4f}" in caplog.text
    run = in_tmp / "runs" / "quickstart" / "version_0"
    assert (run / "metrics.csv").exists() and (run / "config.yaml").exists()
    assert (run / "checkpoints" / "last.ckpt").exists(), "checkpoints live in the run's own folder"


def test_vgg_bn_config_runs_three_steps_on_cifar_format_files(in_tmp: Path, fake_cifar10: Path) -> None:
    cli = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "vgg_bn.yaml"),
            "--trainer.max_steps",
            "3",
            *fake_cifar10_args(fake_cifar10),
            "--data.init_args.batch_size",
            "16",
            *QUICK,
        ]
    )
    assert cli.trainer.global_step == 3
    assert cli.model.hparams["config"] == "D" and cli.model.hparams["norm"] == "batch"


def test_bf16_mixed_training_runs_on_cpu(in_tmp: Path) -> None:
    cli = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            "--trainer.precision",
            "bf16-mixed",
            "--trainer.max_steps",
            "30",
            *QUICK,
        ]
    )
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 30
    assert all(p.dtype == torch.float32 for p in cli.model.parameters()), "weights stay fp32 under autocast"


def test_ddp_two_processes_on_cpu(tmp_path: Path) -> None:
    # keep an existing PYTHONPATH (site folders of an environment installed there) after the repository root
    # (tests.helpers is imported by path)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "PYTHONPATH": path}
    cmd = [
        sys.executable,
        "-m",
        "bnlightning",
        "fit",
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "20",
        *QUICK,
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fit done for MLP(norm=batch): 20 steps" in out.stdout + out.stderr
    ckpt = torch.load(tmp_path / "runs/quickstart/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20


def test_the_command_destroys_the_process_group_it_leaves(tmp_path: Path) -> None:
    """Lightning destroys only NCCL groups; a gloo group left to interpreter shutdown can abort a finished run (-6)."""
    from bnlightning import teardown

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        teardown.end_command(0, {}, in_process=True)
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_checkpointing_can_be_switched_off(in_tmp: Path) -> None:
    cli = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.max_steps",
            "5",
            *QUICK,
        ]
    )
    assert cli.trainer.checkpoint_callback is None
    assert not (in_tmp / "runs" / "quickstart" / "version_0" / "checkpoints").exists()
