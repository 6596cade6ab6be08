"""The experiment registry: one command per PROTOCOL §7 claim, runs named per (norm, lr, seed)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from bnlightning.experiments import EXPERIMENTS, LR, NORM, expand, main, run_name
from tests.helpers import REPO


@pytest.mark.parametrize(("name", "cpu"), [(n, False) for n in EXPERIMENTS] + [(n, True) for n, e in EXPERIMENTS.items() if e.cpu])
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
    assert len(lines) == 12 and all(line.startswith("python -m bnlightning fit ") and line.endswith("--trainer.devices=2") for line in lines)
    assert main(["show", "nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown experiment 'nope'")
