"""Checkpoints are data, and bad values fail before training: one ``error:`` line, exit code 2.

Each case runs through the real command line (``bnlightning.cli.main``); the full-disk case in
a real process on a real, tiny tmpfs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlightning.cli import main
from tests.helpers import CONFIGS, CSV_ONLY, QUICK, REPO, csv_quickstart


def _quick(tmp: Path, *extra: str) -> list[str]:
    """Quickstart, CSV logger only (no W&B start-up cost), one step."""
    return [*csv_quickstart(tmp), "--trainer.max_steps", "1", *QUICK, *extra]


def _one_line_error(args: list[str], pattern: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in err
    return errors[0]


def _yaml(tmp: Path, name: str, text: str) -> list[str]:
    path = tmp / name
    path.write_text(text)
    return ["--config", str(path)]


# --- checkpoints are data ----------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real quickstart checkpoint (width 100) and one of another model (width 50), 2 steps each."""
    root = tmp_path_factory.mktemp("ckpts")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", *_quick(root, "--trainer.max_steps", "2")])
        main(["fit", *_quick(root, "--trainer.max_steps", "2", "--model.init_args.width", "50")])
    finally:
        os.chdir(cwd)
    return {
        "ours": root / "runs/quickstart/version_0/checkpoints/last.ckpt",
        "width50": root / "runs/quickstart/version_1/checkpoints/last.ckpt",
    }


PROBE = "bnl_checkpoint_probe"


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
@pytest.mark.parametrize("where", ["model", "nested"])
def test_checkpoint_naming_a_module_does_not_import_it(
    in_tmp: Path,
    checkpoints: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    subcommand: str,
    where: str,
) -> None:
    """A checkpoint that loads with weights_only but names a module in its hyper_parameters: refused, not imported."""
    marker = in_tmp / "imported"
    (in_tmp / f"{PROBE}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom bnlightning.models import MLP as Model\n"
    )
    monkeypatch.syspath_prepend(str(in_tmp))
    state = torch.load(checkpoints["ours"], weights_only=True)
    if where == "model":
        state["hyper_parameters"]["_class_path"] = f"{PROBE}.Model"
    else:
        state["hyper_parameters"]["norm_layers"] = [{"class_path": f"{PROBE}.Model"}]
    bad = in_tmp / "named.ckpt"
    torch.save(state, bad)
    _one_line_error(
        [subcommand, *_quick(in_tmp), "--ckpt_path", str(bad)],
        (
            rf"^error: --ckpt_path {re.escape(str(bad))}: its hyper_parameters name '{PROBE}\.Model', "
            r"a module this run has not imported \(a checkpoint is data: it is not imported\)"
        ),
        capsys,
    )
    assert not marker.exists() and PROBE not in sys.modules


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_bare_state_dict_file_is_one_line(
    in_tmp: Path, checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str], subcommand: str
) -> None:
    bare = in_tmp / "weights.ckpt"
    torch.save({"state_dict": torch.load(checkpoints["ours"], weights_only=True)["state_dict"]}, bare)
    _one_line_error(
        [subcommand, *_quick(in_tmp), "--ckpt_path", str(bare)],
        (
            rf"^error: .*{re.escape(str(bare))}.*it holds a bare state_dict, "
            r"not a checkpoint written by Lightning's Trainer \(no 'pytorch-lightning_version'\)"
        ),
        capsys,
    )


def test_weights_only_checkpoint_cannot_resume_training(
    in_tmp: Path, checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    state = torch.load(checkpoints["ours"], weights_only=True)
    for key in ("optimizer_states", "loops"):
        del state[key]
    weights = in_tmp / "weights_only.ckpt"
    torch.save(state, weights)
    _one_line_error(
        ["fit", *_quick(in_tmp), "--ckpt_path", str(weights)],
        (
            rf"^error: cannot resume from {re.escape(str(weights))}: .*it holds weights only "
            r"\(no 'loops', 'optimizer_states': saved with save_weights_only\)"
        ),
        capsys,
    )


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_another_models_checkpoint_is_one_line_naming_the_setting(
    in_tmp: Path, checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str], subcommand: str
) -> None:
    """Was: LightningCLI rebuilt the model from the checkpoint's settings, or a shape traceback."""
    other = checkpoints["width50"]
    _one_line_error(
        [subcommand, *_quick(in_tmp), "--ckpt_path", str(other)],
        (
            rf"^error: --ckpt_path {re.escape(str(other))}: it was saved from another model: "
            r"width is 50 in the checkpoint but 100 in this run's settings"
        ),
        capsys,
    )


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_foreign_lightning_checkpoint_is_one_line(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], subcommand: str
) -> None:
    """A checkpoint of a model nobody here wrote (Lightning's BoringModel, no hyper-parameters): no load_state_dict
    traceback."""
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(BoringModel())
    boring = in_tmp / "boring.ckpt"
    trainer.save_checkpoint(boring)
    _one_line_error(
        [subcommand, *_quick(in_tmp), "--ckpt_path", str(boring)],
        (
            rf"^error: .*{re.escape(str(boring))} does not match this model: "
            r"net\.fc1\.weight is missing from the checkpoint"
        ),
        capsys,
    )


def test_the_runs_own_checkpoint_still_validates(in_tmp: Path, checkpoints: dict[str, Path]) -> None:
    cli = main(["validate", *_quick(in_tmp), "--ckpt_path", str(checkpoints["ours"])])
    assert "val/acc" in cli.trainer.callback_metrics


# --- bad values: one line naming the value and what is accepted ---------------------------
BAD_VALUES = [
    (
        ["--model.init_args.optimizer.init_args.lr", "-1"],
        r"^error: model\.optimizer\.lr: got -1\.0; accepted: a finite number >= 0$",
    ),
    (
        ["--model.init_args.optimizer.init_args.momentum", "-1"],
        r"^error: model\.optimizer\.momentum: got -1\.0; accepted: a finite number >= 0$",
    ),
    (
        ["--model.init_args.optimizer.init_args.nesterov", "true"],
        r"^error: model\.optimizer: Nesterov momentum requires a momentum and zero dampening$",
    ),
    (
        ["--seed_everything", "-1"],
        (
            r"^error: seed_everything: got -1; accepted: an integer from 0 to 4294967295, "
            r"true \(draw a seed\) or false \(no seeding\)$"
        ),
    ),
    (
        ["--seed_everything", "1e20"],
        r"^error: seed_everything: got '1e\+20'; accepted: an integer from 0 to 4294967295",
    ),
    (
        ["--seed_everything", str(10**20)],
        rf"^error: seed_everything: got {10**20}; accepted: an integer from 0 to 4294967295",
    ),
    (
        ["--trainer.val_check_interval", "0"],
        (
            r"^error: trainer\.val_check_interval: got 0; accepted: a positive integer \(every N training batches\), "
            r"a fraction of the epoch in \(0\.0, 1\.0\]"
        ),
    ),
    (
        ["--trainer.val_check_interval", "-0.5"],
        r"^error: trainer\.val_check_interval: got -0\.5; accepted: a positive integer",
    ),
    (
        ["--data.init_args.batch_size", "100000"],
        (
            r"^error: batch_size: got 100000; accepted: at most 1437, the training samples per process \(1437\); "
            r"the last partial batch is dropped"
        ),
    ),
]


@pytest.mark.parametrize(("args", "pattern"), BAD_VALUES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_value_is_one_line_naming_it_and_what_is_accepted(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], args: list[str], pattern: str
) -> None:
    _one_line_error(["fit", *_quick(in_tmp), *args], pattern, capsys)


def test_nan_learning_rate_in_yaml_is_refused_not_recorded_as_diverged(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nan = _yaml(
        in_tmp,
        "nan.yaml",
        "model:\n  init_args:\n    optimizer:\n      class_path: torch.optim.SGD\n      init_args: {lr: .nan}\n",
    )
    _one_line_error(
        ["fit", *_quick(in_tmp), *nan],
        r"^error: model\.optimizer\.lr: got nan; accepted: a finite number >= 0$",
        capsys,
    )
    assert not (in_tmp / "runs").exists(), "refused before any run folder is made"


def test_hessian_k_above_the_parameter_count_fails_at_setup(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hessian = _yaml(
        in_tmp,
        "hessian.yaml",
        (
            "trainer:\n  callbacks:\n    - class_path: bnlightning.callbacks.HessianSpectrum\n"
            "      init_args: {k: 30000, max_iter: 30000, every_n_steps: 1}\n"
        ),
    )
    _one_line_error(
        ["fit", *_quick(in_tmp), *hessian],
        (
            r"^error: HessianSpectrum k: got 30000; accepted: an integer from 1 to 28310 "
            r"\(MLP has 28310 trainable parameters\)$"
        ),
        capsys,
    )


def test_hessian_k_above_a_layers_weight_names_the_layer(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    init_args = "{k: 1001, max_iter: 2000, layers: [net.fc4], every_n_steps: 1}"
    hessian = _yaml(
        in_tmp,
        "hessian.yaml",
        (
            "trainer:\n  callbacks:\n    - class_path: bnlightning.callbacks.HessianSpectrum\n"
            f"      init_args: {init_args}\n"
        ),
    )
    _one_line_error(
        ["fit", *_quick(in_tmp), *hessian],
        (
            r"^error: HessianSpectrum k: got 1001; accepted: an integer from 1 to 1000 "
            r"\(the weight of layer 'net\.fc4' has 1000 entries\)$"
        ),
        capsys,
    )


def test_unknown_loss_method_lists_the_models_batch_methods(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ics = _yaml(
        in_tmp,
        "ics.yaml",
        (
            "trainer:\n  callbacks:\n    - class_path: bnlightning.callbacks.InternalCovariateShift\n"
            "      init_args: {loss_method: nope, every_n_steps: 1}\n"
        ),
    )
    _one_line_error(
        ["fit", *_quick(in_tmp), *ics],
        (
            r"^error: InternalCovariateShift\.loss_method: got 'nope'; "
            r"accepted: a method of MLP taking one batch \(loss\), or set loss_fn to 'package\.module:function'$"
        ),
        capsys,
    )


def test_values_at_the_edges_of_what_is_accepted_still_train(in_tmp: Path) -> None:
    args = [
        "--seed_everything",
        str(2**32 - 1),
        "--trainer.val_check_interval",
        "1",
        "--model.init_args.optimizer.init_args.lr",
        "0",
    ]
    cli = main(["fit", *_quick(in_tmp), *args, "--data.init_args.batch_size", "1437"])
    assert cli.trainer.global_step == 1


# --- a full disk at start-up names the file ------------------------------------------------
def test_full_disk_at_start_up_names_the_file(tmp_path: Path) -> None:
    """A 4 KiB tmpfs: the write probe fits, Lightning's hparams.yaml does not (was: "(path unknown)")."""
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False).returncode != 0
    ):
        pytest.skip("user namespaces (unshare -rm) are not available here")
    disk = tmp_path / "disk"
    disk.mkdir()
    csv_only = tmp_path / "csv.yaml"
    csv_only.write_text(CSV_ONLY.replace("save_dir: runs", f"save_dir: {disk / 'runs'}"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    script = 'mount -t tmpfs -o size=4k tmpfs "$1" || exit 77; shift; exec "$@"'
    fit = [
        sys.executable,
        "-m",
        "bnlightning",
        "fit",
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        "--config",
        str(csv_only),
        "--trainer.max_steps",
        "2",
        *QUICK,
    ]
    out = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(disk), *fit],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if out.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    assert re.search(
        rf"^error: No space left on device: {re.escape(str(disk))}/runs/quickstart/version_0/\S+ \(free space there",
        errors[0],
    ), errors[0]
    assert "(path unknown)" not in out.stderr and "Traceback" not in out.stderr
