"""The experiment registry: one command per PROTOCOL §7 claim, runs named per (norm, lr, seed)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from bnlightning.experiments import (
    EXPERIMENTS,
    LR,
    NORM,
    RunSpec,
    config_path,
    configs_root,
    expand,
    main,
    run_all,
    run_name,
)
from tests.helpers import REPO


@pytest.mark.parametrize(
    ("name", "cpu"), [(n, False) for n in EXPERIMENTS] + [(n, True) for n, e in EXPERIMENTS.items() if e.cpu_overrides]
)
def test_every_experiment_expands_to_distinct_named_runs(name: str, cpu: bool) -> None:
    exp = EXPERIMENTS[name]
    specs = expand(exp, [0, 1], runs_dir="r", cpu=cpu)
    grid = exp.cpu_grid if cpu and exp.cpu_grid else exp.grid
    n = 2
    for values in grid.values():
        n *= len(values)
    assert len(specs) == n and len({s.name for s in specs}) == n
    group = name + ("-cpu" if cpu else "")
    for spec in specs:
        assert spec.log_dir == Path("r") / group / spec.name
        configs = [a.split("=", 1)[1] for a in spec.args if a.startswith("--config=")]
        assert configs and all((REPO / c).is_file() or Path(c).is_file() for c in configs), configs
        logger = json.loads(next(a for a in spec.args if a.startswith("--trainer.logger=")).split("=", 1)[1])
        assert logger[0]["init_args"] == {"save_dir": "r", "name": group, "version": spec.name}
        assert logger[1]["init_args"]["group"] == group
        # The printed line is one shell command that splits back into the same arguments.
        assert shlex.split(spec.shell())[4:] == list(spec.args)


def test_cpu_vgg_is_the_labelled_substitute() -> None:
    spec = expand(EXPERIMENTS["vgg-lr"], [0], cpu=True)[0]
    assert any(a.endswith("configs/experiments/digits32.yaml") for a in spec.args)
    text = (REPO / "configs" / "experiments" / "digits32.yaml").read_text()
    assert "image_size: 32" in text and "rgb: true" in text


def test_run_names() -> None:
    assert run_name({NORM: "batch", LR: 0.1, "seed_everything": 2}) == "batch_lr0.1_s2"
    assert run_name({NORM: "none", LR: 1e-6, "seed_everything": 0}) == "none_lr1e-06_s0"


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPERIMENTS)
    assert main(["show", "vgg-lr", "--seeds", "0", "1", "2", "--", "--trainer.devices=2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 12 and all(
        line.startswith("python -m bnlightning fit ") and line.endswith("--trainer.devices=2") for line in lines
    )
    assert main(["show", "nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown experiment 'nope'")
    assert main(["show", "vgg-ics", "--cpu"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith("error: vgg-ics has no CPU-sized variant (--cpu); these have one: vgg-lr, ")
    )


def test_configs_are_found_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Away from the checkout a registry path resolves to the shipped file; a path that exists here wins."""
    monkeypatch.chdir(tmp_path)
    root = configs_root()
    assert root is not None and (root / "vgg.yaml").is_file()
    resolved = config_path("configs/experiments/digits32.yaml")
    assert (
        Path(resolved).is_absolute()
        and Path(resolved).read_text() == (REPO / "configs/experiments/digits32.yaml").read_text()
    )
    assert config_path("configs/no-such.yaml") == "configs/no-such.yaml"  # left for fit's own one-line error
    assert config_path("mine.yaml") == "mine.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "vgg.yaml").write_text("seed_everything: 3\n")
    assert config_path("configs/vgg.yaml") == "configs/vgg.yaml"
    assert all(
        os.path.isabs(a.split("=", 1)[1]) for a in expand(EXPERIMENTS["dln"], [0])[0].args if a.startswith("--config=")
    )


def test_runner_works_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Relative run folders are under the cwd (not the installed package): a finished run there is skipped."""
    from bnlightning.runstate import write_status

    monkeypatch.chdir(tmp_path)
    spec = RunSpec("exp", "a", Path("runs/exp/a"), ("--never-run",))
    (tmp_path / "runs/exp/a").mkdir(parents=True)
    write_status(tmp_path / "runs/exp/a", status="completed")
    assert [o for _, o in run_all([spec])] == ["skipped"]
    assert "exp/a: skipped (already completed)" in capsys.readouterr().out


def test_fit_finds_a_shipped_config_from_another_directory(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``fit --config configs/...`` (the docs' and the sweep files' spelling) works away from the repository root."""
    from bnlightning.cli import main as cli_main

    with pytest.raises(SystemExit) as done:
        cli_main(
            [
                "fit",
                "--config",
                "configs/quickstart.yaml",
                "--config=configs/experiments/digits32.yaml",
                "--print_config",
            ]
        )
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: bnlightning.data.Digits" in printed and "image_size: 32" in printed  # both files were read
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "--config", "configs/missing.yaml"])
    assert done.value.code == 2 and "configs/missing.yaml" in capsys.readouterr().err
