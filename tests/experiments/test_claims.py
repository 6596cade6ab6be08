"""The further claims (beyond the paper's) have a CPU-sized variant and a sweep; every CPU variant's runs parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnlightning.cli import main
from bnlightning.experiments import EXPERIMENTS, LR, NORM, expand
from tests.helpers import REPO

#: The further claims (docs/reproduction-cpu.md, "Other claims"); every registry entry's sweep is checked in
#: test_sweeps.py.
CLAIMS = (
    "bn-batch-size",
    "lr-range",
    "mean-shift",
    "init-gain",
    "bn-placement",
    "bn-regularizer",
    "normfree",
    "normfree-nf",
    "resnet-residual",
    "resnet",
    "resnet-nf",
)


#: claims whose CPU-sized runs are another experiment's (the same commands): name -> that experiment
CPU_RUNS_OF = {"normfree": "lr-range"}


def test_every_claim_has_a_cpu_variant_and_a_sweep() -> None:
    for name in CLAIMS:
        assert EXPERIMENTS[CPU_RUNS_OF.get(name, name)].cpu_overrides, name
        assert (REPO / "configs" / "sweeps" / f"{name}.yaml").is_file()


def test_normfree_cpu_baselines_are_lr_range_runs() -> None:
    """Claim 7 on CPU compares normfree-nf with lr-range's runs: same configs, CPU settings and learning rates."""
    nf, lr_range = EXPERIMENTS["normfree-nf"], EXPERIMENTS["lr-range"]
    assert nf.cpu_grid is not None and lr_range.cpu_grid is not None
    assert set(nf.cpu_grid[LR]) <= set(lr_range.cpu_grid[LR])
    assert set(lr_range.cpu_grid[NORM]) == {"none", "batch"}
    assert nf.configs[0] == lr_range.configs[0] and nf.cpu_overrides == lr_range.cpu_overrides


@pytest.mark.parametrize("name", [n for n, e in EXPERIMENTS.items() if e.cpu_overrides])
def test_cpu_variant_parses(name: str, in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every CPU run's argument list (booleans, config swaps, callbacks) is valid for LightningCLI."""
    spec = expand(EXPERIMENTS[name], [0], runs_dir=str(in_tmp / "runs"), cpu=True)[-1]
    with pytest.raises(SystemExit) as done:
        main(["fit", *spec.args, "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: bnlightning.models." in printed
