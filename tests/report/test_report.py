"""``python -m bnlightning report`` on small runs made here, and forced divergence.

The runs are real (``main([...])`` in-process): an MLP on the digits with all three
measurement callbacks (standard and BN, BN with two seeds for a band) and a deep linear
network at lr 1e6, which must diverge, be recorded, and end cleanly.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from bnlightning.cli import main
from bnlightning.experiments import logger_override
from bnlightning.report.commands import report_main
from bnlightning.report.runs import aggregate, load_runs, read_metrics
from tests.helpers import CONFIGS

CALLBACKS = [
    {
        "class_path": "bnlightning.callbacks.InternalCovariateShift",
        "init_args": {"layers": ["net.fc1", "net.fc3"], "every_n_steps": 2},
    },
    {"class_path": "bnlightning.callbacks.LossLandscape", "init_args": {"every_n_steps": 2}},
    {"class_path": "bnlightning.callbacks.ActivationStats", "init_args": {"every_n_steps": 2, "histogram": False}},
]


def _fit(root: Path, experiment: str, name: str, config: str, *extra: str) -> None:
    """One small run logging into ``root/runs/<experiment>/<name>``; must end without an exception."""
    runs = str(root / "runs")
    result = main(
        [
            "fit",
            f"--config={CONFIGS / config}",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={runs}/{experiment}/{name}",
            logger_override(experiment, name, runs, "bnlightning-tests"),
            *extra,
        ]
    )
    assert result is not None


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("WANDB_DIR", str(root))
        small = [
            "--trainer.max_steps=8",
            "--trainer.log_every_n_steps=2",
            "--trainer.val_check_interval=4",
            "--model.init_args.width=16",
            f"--trainer.callbacks={json.dumps(CALLBACKS)}",
        ]
        for norm, seed in (("none", 0), ("batch", 0), ("batch", 1)):
            _fit(
                root,
                "mlp",
                f"{norm}_s{seed}",
                "mlp_sigmoid.yaml",
                *small,
                f"--model.init_args.norm={norm}",
                f"--seed_everything={seed}",
            )
        # Divergence is a result: the DLN at lr 1e6 blows up within a few steps.
        _fit(
            root,
            "dln",
            "none_lr1e6_s0",
            "dln.yaml",
            "--trainer.max_steps=30",
            "--model.init_args.optimizer.init_args.lr=1e6",
            "--trainer.log_every_n_steps=1",
        )
    return root


def test_forced_divergence_is_recorded_and_clean(run_root: Path) -> None:
    path = run_root / "runs" / "dln" / "none_lr1e6_s0" / "metrics.csv"
    metrics = read_metrics(path)
    assert "diverged_at_step" in metrics, "the module must log diverged_at_step"
    step = int(metrics["diverged_at_step"][1][0])
    assert 0 <= step < 30
    # Training stopped soon after (the flag is read every 10 steps), not at max_steps.
    assert metrics["train/loss"][0].max() < 30


def test_report_writes_every_figure_and_the_page(run_root: Path) -> None:
    out = run_root / "report"
    assert report_main([str(run_root / "runs"), "--out", str(out), "--dpi", "40"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    for kind in ("accuracy", "ics", "landscape", "activations"):
        assert any(p.startswith("mlp-3x16-sigmoid") and p.endswith(f"_{kind}.png") for p in pngs), (kind, pngs)
    assert any(p.startswith("deep-linear-network") and p.endswith("_accuracy.png") for p in pngs), pngs
    md = (out / "report.md").read_text()
    page = (out / "index.html").read_text()
    # Each figure is on both pages; the HTML embeds the images (self-contained).
    for png in pngs:
        assert f"]({png})" in md
    assert page.count("data:image/png;base64,") == len(pngs)
    # The data set is named as its module labels it, never as CIFAR-10.
    assert "digits" in md.lower() and "cifar" not in md.lower()
    # The diverged run is marked with its step, in the summary and the run table.
    step = load_runs([run_root / "runs" / "dln"])[0].diverged_at_step
    assert step is not None
    assert f"**1/1** (step {step})" in md
    assert f"| **{step}** |" in md
    assert "class='bad'" in page


def test_report_groups_seeds_into_one_setting(run_root: Path) -> None:
    runs = load_runs([run_root / "runs" / "mlp"])
    settings = {r.setting for r in runs}
    assert len(runs) == 3 and len(settings) == 2
    bn = [r for r in runs if r.norm == "batch"]
    assert sorted(r.seed for r in bn) == [0, 1]
    assert all(r.lr == pytest.approx(0.1) for r in runs)
    assert all(r.layers("ics/l2/") == ["net.fc1", "net.fc3"] for r in runs)


def test_report_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        report_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no such run folder") and "Traceback" not in "".join(err)
    with pytest.raises(SystemExit) as e:
        report_main([str(tmp_path), "--out", str(tmp_path / "o")])  # exists, but holds no runs
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: no run folders")
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])  # --out missing: argparse's message, same format
    assert e.value.code == 2
    assert "error: the following arguments are required: --out" in capsys.readouterr().err


def test_read_metrics_and_aggregate_handle_gaps_and_nan(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "val/acc"])
        w.writerows([[0, 1, "2.0", ""], [0, 1, "", "0.5"], [0, 3, "nan", ""], [0, 5, "inf", ""]])
    m = read_metrics(path)
    assert m["val/acc"][0].tolist() == [1] and m["val/acc"][1].tolist() == [0.5]
    assert m["train/loss"][0].tolist() == [1, 3, 5]
    assert np.isnan(m["train/loss"][1][1]) and np.isinf(m["train/loss"][1][2])
    # Two seeds, one of which diverged at step 3: the band ignores its non-finite points.
    from bnlightning.report.runs import Run

    other = {"train/loss": (np.array([1, 3, 5]), np.array([4.0, 3.0, 2.0]))}
    runs = [Run(tmp_path, {}, {}, m), Run(tmp_path, {}, {}, other)]
    steps, mean, lo, hi = aggregate(runs, "train/loss")
    assert steps.tolist() == [1, 3, 5]
    assert mean.tolist() == [3.0, 3.0, 2.0] and lo.tolist() == [2.0, 3.0, 2.0] and hi.tolist() == [4.0, 3.0, 2.0]
    assert runs[0].diverged_at_step == 3 and runs[1].diverged_at_step is None
