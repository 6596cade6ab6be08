"""Issue 12's claims have a CPU-sized variant and a sweep; every CPU variant's runs parse."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from bnlightning.cli import main
from bnlightning.experiments import EXPERIMENTS, expand

#: Issue 12's claims (docs/reproduction-cpu.md, "Other claims"); every registry entry's sweep is checked in test_sweeps.py.
CLAIMS = (
    "bn-batch-size", "lr-range", "mean-shift", "init-gain", "bn-placement", "bn-regularizer", "normfree", "normfree-nf",
    "resnet-residual", "resnet", "resnet-nf",
)


def test_every_claim_has_a_cpu_variant_and_a_sweep() -> None:
    for name in CLAIMS:
        assert EXPERIMENTS[name].cpu_overrides, name
        assert (REPO / "configs" / "sweeps" / f"{name}.yaml").is_file()


@pytest.mark.parametrize("name", [n for n, e in EXPERIMENTS.items() if e.cpu_overrides])
def test_cpu_variant_parses(name: str, in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every CPU run's argument list (booleans, config swaps, callbacks) is valid for LightningCLI."""
    spec = expand(EXPERIMENTS[name], [0], runs_dir=str(in_tmp / "runs"), cpu=True)[-1]
    with pytest.raises(SystemExit) as done:
        main(["fit", *spec.args, "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: bnlightning.models." in printed
