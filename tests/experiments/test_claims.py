"""Issue 12's claims: the sweeps are generated from the registry and stay equal to it; each expands and parses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bnlightning.cli import main
from bnlightning.experiments import (
    EXPERIMENTS,
    GENERATED_SWEEPS,
    expand,
    expand_sweep,
    load_sweep,
    sweep_config,
)
from tests.helpers import REPO


@pytest.mark.parametrize("name", GENERATED_SWEEPS)
def test_sweep_file_equals_the_registry(name: str) -> None:
    path = REPO / "configs" / "sweeps" / f"{name}.yaml"
    config = load_sweep(path)  # wandb's own loader + schema checks
    expected = sweep_config(EXPERIMENTS[name])
    assert {k: config[k] for k in expected} == expected, f"{path} drifted from the registry: regenerate it with write_sweep({name!r})"
    # The agent's runs and the registry's runs are the same fit commands (logger aside), value for value.
    from_sweep = {s.name: _normalise(s.args) for s in expand_sweep(config, runs_dir="r")}
    from_registry = {s.name: _normalise(s.args) for s in expand(EXPERIMENTS[name], [0, 1, 2], runs_dir="r")}
    assert from_sweep == from_registry


def _normalise(args: tuple[str, ...]) -> list[tuple[str, object]]:
    """``--config X`` and ``--config=X`` alike, repository paths relative, values as YAML reads them
    (the agent writes ``True``/``2.0``, the registry ``true``/``2``)."""
    out: list[tuple[str, object]] = []
    items = list(args)
    while items:
        a = items.pop(0)
        key, value = (a, items.pop(0)) if a == "--config" else a.split("=", 1)
        if key in ("--trainer.logger", "--trainer.default_root_dir"):
            continue
        out.append((key, yaml.safe_load(value.replace(str(REPO) + "/", ""))))
    return out


def test_every_claim_has_a_cpu_variant_and_a_sweep() -> None:
    for name in GENERATED_SWEEPS:
        assert EXPERIMENTS[name].cpu, name
        assert (REPO / "configs" / "sweeps" / f"{name}.yaml").is_file()


@pytest.mark.parametrize("name", GENERATED_SWEEPS)
def test_cpu_variant_parses(name: str, in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every CPU run's argument list (booleans, config swaps, callbacks) is valid for LightningCLI."""
    spec = expand(EXPERIMENTS[name], [0], runs_dir=str(in_tmp / "runs"), cpu=True)[-1]
    with pytest.raises(SystemExit) as done:
        main(["fit", *spec.args, "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: bnlightning.models." in printed
