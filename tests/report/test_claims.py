"""The claims report: settings from every swept config key, tables with seeds and spread, figures."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from bnlightning.report.claims import (
    claim_rows,
    draw_claims,
    varying_keys,
    write_claims_markdown,
)
from bnlightning.report.commands import report_main
from bnlightning.report.runs import load_runs


def _run(
    root: Path, name: str, norm: str, batch: int, seed: int, rows: list[dict[str, float]], extra: dict | None = None
) -> None:
    d = root / name
    d.mkdir(parents=True)
    config = {
        "seed_everything": seed,
        "trainer": {
            "default_root_dir": str(d),
            "logger": [{"class_path": "x"}],
            "callbacks": [{"class_path": "bnlightning.batchsize.TrainModeAccuracy"}],
        },
        "model": {
            "class_path": "bnlightning.models.MLP",
            "init_args": {"depth": 3, "width": 100, "activation": "relu", "norm": norm, **(extra or {})},
        },
        "data": {"class_path": "bnlightning.data.DigitsDataModule", "init_args": {"batch_size": batch, "seed": 0}},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    keys = sorted({k for r in rows for k in r})
    with (d / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["step", *keys])
        w.writeheader()
        for r in rows:
            w.writerow(r)


@pytest.fixture
def batch_runs(tmp_path: Path) -> Path:
    root = tmp_path / "bn-batch-size"
    acc = {
        ("batch", 2): (0.5, 0.6),
        ("batch", 8): (0.8, 0.9),
        ("batch", 32): (0.95, 0.97),
        ("none", 2): (0.9, 0.92),
        ("none", 8): (0.93, 0.95),
        ("none", 32): (0.94, 0.96),
    }
    for (norm, b), per_seed in acc.items():
        for seed, a in enumerate(per_seed):
            rows = [{"step": s, "train/acc": 0.9, "train/loss": 0.3} for s in range(0, 50, 10)]
            rows.append({"step": 49, "val/acc": a, "val/acc_train_mode": a - 0.2})
            _run(root, f"{norm}_batch_size{b}_s{seed}", norm, b, seed, rows)
    return root


def test_settings_are_every_swept_key_and_the_table_has_seeds_and_spread(batch_runs: Path) -> None:
    runs = load_runs([batch_runs])
    assert varying_keys(runs) == ["data.init_args.batch_size", "model.init_args.norm"]
    header, rows = claim_rows(runs)
    assert header[:3] == ["batch_size", "norm", "seeds"]
    row = next(r for r in rows if r[:2] == ["2", "BN"])  # norms by their names, as in every table
    col = header.index("val acc (mean ± std [min, max])")
    assert row[2] == "0,1" and row[col] == "0.55 ± 0.05 [0.5, 0.6]"
    gap = header.index("train - val acc (mean ± std [min, max])")
    assert row[gap] == "0.35 ± 0.05 [0.3, 0.4]"
    assert row[header.index("val acc (BN train mode) (mean ± std [min, max])")] == "0.35 ± 0.05 [0.3, 0.4]"
    assert row[-1] == "0/2"


def test_figures_and_claims_md_from_the_report_command(batch_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert report_main([str(batch_runs), "--out", str(out), "--dpi", "40"]) == 0
    sweep = list(out.glob("*_sweep.png"))
    assert len(sweep) == 1 and sweep[0].stat().st_size > 1000
    text = (out / "claims.md").read_text()
    assert "| batch_size | norm | seeds |" in text and "0.55 ± 0.05 [0.5, 0.6]" in text
    assert sweep[0].name in (out / "report.md").read_text()


def test_categorical_settings_get_a_bar_chart_and_meanshift_its_figure(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for i, (norm, ws) in enumerate((("none", False), ("batch", False), ("none", True))):
        cos = np.linspace(0.5, 0.99, 4) if norm == "none" and not ws else np.full(4, 0.3)
        row = {"step": 0, "meanshift/majority_share": 1.0 if cos[-1] > 0.9 else 0.2}
        row.update({f"meanshift/net.relu{j + 1}/cos": c for j, c in enumerate(cos)})
        row.update({f"meanshift/net.relu{j + 1}/channel_mean": 0.1 for j in range(4)})
        _run(
            root,
            f"r{i}",
            norm,
            128,
            0,
            [row, {"step": 0, "val/acc": 0.1 * (i + 1), "train/acc": 0.5}],
            {"weight_standardization": ws},
        )
    runs = load_runs([root])
    figs = draw_claims(runs, tmp_path / "out", dpi=40)
    assert sorted(f.path.name.rsplit("_", 1)[1] for f in figs) == ["meanshift.png", "sweep.png"]
    text = write_claims_markdown(runs, tmp_path / "out").read_text()
    assert "| norm | weight_standardization | seeds | layers | cos first | cos middle | cos last |" in text
    assert "0.99 ± 0 [0.99, 0.99]" in text


def test_placement_settings_get_their_own_ics_and_landscape_curves(tmp_path: Path) -> None:
    # claim 4: four BN variants share (norm, lr), so only the measures figure tells them apart
    root = tmp_path / "runs"
    for pos in ("before", "after"):
        for affine in (True, False):
            for seed in (0, 1):
                rel = 0.05 if pos == "before" else 0.4
                rows = [
                    {"step": s, "ics/rel/net.fc2": rel * (1 + seed), "landscape/beta_eff": 2.0, "train/acc": 0.9}
                    for s in (50, 100)
                ]
                rows.append({"step": 100, "val/acc": 0.96})
                _run(
                    root,
                    f"{pos}_{affine}_s{seed}",
                    "batch",
                    60,
                    seed,
                    rows,
                    {"norm_position": pos, "norm_affine": affine},
                )
    runs = load_runs([root])
    figs = draw_claims(runs, tmp_path / "out", dpi=40)
    measures = [f for f in figs if f.path.name.endswith("_measures.png")]
    assert len(measures) == 1 and measures[0].path.stat().st_size > 1000
    # a (norm, lr)-only sweep is the paper figures' job: no measures figure
    for d in root.iterdir():
        if "after" in d.name or "False" in d.name:
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    runs = load_runs([root])
    assert not [f for f in draw_claims(runs, tmp_path / "out2", dpi=40) if f.path.name.endswith("_measures.png")]


def test_setting_labels_drop_callback_arguments_but_the_table_keeps_them(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for i, cbs in enumerate(
        ([], [{"class_path": "bnlightning.normfree.AdaptiveGradientClipping", "init_args": {"clip_factor": 0.08}}])
    ):
        _run(root, f"r{i}", "none", 128, 0, [{"step": 9, "val/acc": 0.5, "train/acc": 0.5}])
        cfg = yaml.safe_load((root / f"r{i}" / "config.yaml").read_text())
        cfg["trainer"]["callbacks"] = cbs
        (root / f"r{i}" / "config.yaml").write_text(yaml.safe_dump(cfg))
    runs = load_runs([root])
    from bnlightning.report.claims import setting_label

    assert sorted(setting_label(r, ["trainer.callbacks"]) for r in runs) == [
        "callbacks=AdaptiveGradientClipping",
        "callbacks=none",
    ]
    (tmp_path / "out").mkdir()
    assert "AdaptiveGradientClipping(clip_factor=0.08)" in write_claims_markdown(runs, tmp_path / "out").read_text()
