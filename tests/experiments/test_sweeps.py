"""W&B sweep YAMLs: generated from the registry, loaded with wandb's own loader, schema-checked, expanded like the
agent does."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from bnlightning.cli import main
from bnlightning.experiments import (
    EXPERIMENTS,
    expand,
    expand_sweep,
    load_sweep,
    sweep_config,
    sweep_problems,
    sweep_text,
    write_sweep,
)
from bnlightning.report.runs import _get, read_metrics
from tests.helpers import REPO

SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


_MISSING = object()


def _at_repo(path: str) -> Path:
    """A config path from a sweep (relative to the repository root, or absolute) as an absolute path."""
    return (REPO / path).resolve()


def _lookup(tree: Any, dotted: str) -> bool:
    return _get(tree, dotted, _MISSING) is not _MISSING


def test_there_are_sweeps() -> None:
    assert {p.stem for p in SWEEPS} >= {"vgg-lr", "vgg-noisy", "vgg-lp", "dln", "mlp-sigmoid"}


@pytest.mark.parametrize("name", sorted(set(EXPERIMENTS) | {p.stem for p in SWEEPS}))
def test_sweep_file_is_generated_from_the_registry(name: str, tmp_path: Path) -> None:
    """One source of truth: every registry entry has its sweep file, every sweep file its entry, and they agree."""
    path = REPO / "configs" / "sweeps" / f"{name}.yaml"
    assert name in EXPERIMENTS, (
        f"{path} has no registry entry: add one to bnlightning/experiments/registry.py (the sweep files are generated)"
    )
    assert path.is_file(), f"{name} has no sweep file: write it with write_sweep({name!r}) from the repository root"
    assert path.read_text() == sweep_text(name), (
        f"{path} drifted from the registry: regenerate it with write_sweep({name!r})"
    )
    assert write_sweep(name, tmp_path).read_text() == path.read_text()
    config = load_sweep(path)  # wandb's own loader + schema checks
    expected = sweep_config(EXPERIMENTS[name])
    assert {k: config[k] for k in expected} == expected
    # The agent's runs and the registry's runs are the same fit commands (logger aside), value for value.
    from_sweep = {s.name: _normalise(s.args) for s in expand_sweep(config, runs_dir="r")}
    from_registry = {s.name: _normalise(s.args) for s in expand(EXPERIMENTS[name], [0, 1, 2], runs_dir="r")}
    assert from_sweep == from_registry


def _normalise(args: tuple[str, ...]) -> list[tuple[str, object]]:
    """``--config X`` and ``--config=X`` alike, config paths as the registry writes them, values as YAML reads them
    (the agent writes ``True``/``2.0``, the registry ``true``/``2``)."""
    out: list[tuple[str, object]] = []
    items = list(args)
    while items:
        a = items.pop(0)
        key, value = (a, items.pop(0)) if a == "--config" else a.split("=", 1)
        if key in ("--trainer.logger", "--trainer.default_root_dir"):
            continue
        if key == "--config":  # resolved against the cwd, the package or the checkout: compare the name under configs/
            value = "configs/" + Path(value).resolve().relative_to((REPO / "configs").resolve()).as_posix()
        out.append((key, yaml.safe_load(value)))
    return out


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_is_valid_for_wandb(path: Path) -> None:
    config = load_sweep(path)  # wandb.sdk.launch.sweeps.utils.load_sweep_config + schema checks
    assert config["method"] == "grid" and config["metric"]["goal"] in ("minimize", "maximize")
    command = config["command"]
    assert command[:5] == ["${env}", "${interpreter}", "-m", "bnlightning", "fit"] and command[-1] == "${args}"
    # Every swept key is a key of the configs the command loads (a typo would only fail on the agent).
    merged: dict[str, Any] = {}
    for i, arg in enumerate(command):
        if arg == "--config":
            cfg = _at_repo(command[i + 1])
            assert cfg.is_file(), cfg
            merged.update(yaml.safe_load(cfg.read_text()))
    for key in config["parameters"]:
        assert _lookup(merged, key), f"{path.name}: {key} is not set in {command}"
    n = 1
    for spec in config["parameters"].values():
        n *= len(spec["values"])
    specs = expand_sweep(config)
    assert len(specs) == n and len({s.name for s in specs}) == n


def test_expansion_uses_the_agents_argument_format() -> None:
    specs = expand_sweep(load_sweep(REPO / "configs" / "sweeps" / "vgg-lr.yaml"), runs_dir="r")
    combos = {(s.args[2], s.args[3], s.args[4]) for s in specs}
    expected = {
        (f"--model.init_args.norm={n}", f"--model.init_args.optimizer.init_args.lr={lr}", f"--seed_everything={seed}")
        for n, lr, seed in itertools.product(["none", "batch"], [0.1, 0.5], [0, 1, 2])
    }
    assert combos == expected
    # The path is relative to the repository root or absolute, depending on where pytest runs.
    assert specs[0].args[0] == "--config" and _at_repo(specs[0].args[1]) == REPO / "configs" / "vgg.yaml"
    assert all(s.log_dir == Path("r") / "vgg-lr" / s.name for s in specs)


def test_sweep_problems_are_found() -> None:
    bad = {"method": "grid", "parameters": {"x": {"min": 0}}, "command": ["python", "-m", "bnlightning", "fit"]}
    problems = sweep_problems(bad)
    assert any("'values' or 'value'" in p for p in problems)
    assert any("${args}" in p for p in problems)
    assert sweep_problems({"method": "nope", "parameters": {}})[:1] == [
        "method must be one of grid, random, bayes, got 'nope'"
    ]
    with pytest.raises(ValueError, match="only grid sweeps"):
        expand_sweep({"method": "random", "parameters": {"x": {"values": [1]}}, "command": ["fit", "${args}"]})


def test_sweep_file_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bnlightning.experiments import main as experiments_main

    assert experiments_main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no such sweep file: {tmp_path / 'missing.yaml'}"
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nparameters: {a: {values: [1]}}\ncommand: [python, fit]\n")
    assert experiments_main(["sweep", str(bad)]) == 2
    assert "command must contain ${args}" in capsys.readouterr().err


def test_an_expanded_sweep_run_trains(in_tmp: Path) -> None:
    """The agent's ``--key=value`` arguments parse and train with LightningCLI (one grid point, 4 steps)."""
    config = load_sweep(REPO / "configs" / "sweeps" / "mlp-sigmoid.yaml")
    spec = expand_sweep(config, runs_dir=str(in_tmp / "runs"))[-1]
    # Absolute config paths: the test runs from a temporary folder, wherever pytest started.
    args = [f"--config={_at_repo(a.split('=', 1)[1])}" if a.startswith("--config=") else a for a in spec.args]
    args = [str(_at_repo(a)) if i and args[i - 1] == "--config" else a for i, a in enumerate(args)]
    main(
        [
            "fit",
            *args,
            "--trainer.max_steps=4",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1",
        ]
    )
    metrics = read_metrics(spec.log_dir / "metrics.csv")
    assert metrics["train/loss"][0].max() == 3
    saved = yaml.safe_load((spec.log_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["norm"] == "noisy_batch" and saved["seed_everything"] == 2
    assert saved["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 2.0
