"""What the report counts as one setting and one seed, and what it says a run did.

Run folders are written here as ``fit`` writes them (``config.yaml``, ``metrics.csv``,
``run.json``), small enough that no training is needed: a batch-size sweep with the linear
learning-rate rule, unreadable files, and the same seed run twice.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bnlightning.report.commands import report_main
from bnlightning.report.runs import drop_repeated_seeds, load_runs, split_runs, varying_keys


def write_run(
    folder: Path,
    *,
    seed: int = 0,
    norm: str = "batch",
    batch: int = 128,
    lr: float = 0.8,
    steps: int = 1000,
    val_acc: float = 0.9,
    lr_scaled: float | None = None,
    status: str | None = "completed",
    updated: str = "2026-01-01T00:00:00+0000",
    model: dict[str, Any] | None = None,
) -> Path:
    """A finished run's folder as ``fit`` leaves it: the last logged step is ``steps - 1`` (Lightning counts from 0)."""
    folder.mkdir(parents=True)
    config = {
        "seed_everything": seed,
        "trainer": {
            "max_steps": steps,
            "default_root_dir": str(folder),
            "logger": [
                {
                    "class_path": "bnlightning.loggers.CSVLogger",
                    "init_args": {"save_dir": str(folder.parent), "version": folder.name},
                }
            ],
            "callbacks": [
                {"class_path": "bnlightning.batchsize.LinearLRScaling", "init_args": {"reference_batch_size": 128}}
            ],
        },
        "model": {
            "class_path": "bnlightning.models.MLP",
            "init_args": {
                "depth": 3,
                "width": 100,
                "activation": "relu",
                "norm": norm,
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": lr}},
                **(model or {}),
            },
        },
        "data": {"class_path": "bnlightning.data.DigitsDataModule", "init_args": {"batch_size": batch, "seed": 0}},
        "checkpoint": {"every_n_train_steps": 1000},
        "ckpt_path": None,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows: list[dict[str, Any]] = []
    if lr_scaled is not None:
        rows.append({"step": 0, "lr_scaled": lr_scaled})
    rows += [{"step": s, "train/loss": 1.0 / (s + 1), "train/acc": 0.5} for s in range(9, steps, 10)]
    rows.append({"step": steps - 1, "val/acc": val_acc, "val/loss": 0.3})
    with (folder / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["epoch", "step", "lr_scaled", "train/loss", "train/acc", "val/acc", "val/loss"])
        w.writeheader()
        w.writerows(rows)
    if status is not None:
        (folder / "run.json").write_text(json.dumps({"status": status, "step": steps, "updated": updated}))
    return folder


@pytest.fixture
def batch_sweep(tmp_path: Path) -> Path:
    """norm {none, batch} x batch {2, 8, 32, 128}, seeds 0 and 1, lr 0.8 scaled by B / 128 (claim 1's grid)."""
    root = tmp_path / "bn-batch-size"
    for norm in ("none", "batch"):
        for batch in (2, 8, 32, 128):
            for seed in (0, 1):
                acc = 0.3 + 0.1 * seed + batch / 200 if norm == "batch" else 0.95
                write_run(
                    root / f"{norm}_b{batch}_s{seed}",
                    seed=seed,
                    norm=norm,
                    batch=batch,
                    lr_scaled=0.8 * batch / 128,
                    val_acc=acc,
                    steps=40,
                )
    return root


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows of the Markdown table under ``heading``."""
    block = text.split(heading, 1)[1].split("\n\n", 2)[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_a_batch_size_sweep_is_one_setting_per_norm_and_batch_in_every_table(batch_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert report_main([str(batch_sweep), "--out", str(out), "--dpi", "30"]) == 0
    md = (out / "report.md").read_text()
    rows = _table(md, "### MLP 3x100 relu")
    header = md.split("### MLP 3x100 relu", 1)[1].split("\n\n", 2)[1].splitlines()[0]
    assert header.startswith("| batch_size | norm | lr (ran) | seeds |"), header
    assert len(rows) == 8, "one row per (batch size, norm), never the settings pooled"
    assert all(r[3] == "0,1" for r in rows), [r[3] for r in rows]
    bn2 = next(r for r in rows if r[:2] == ["2", "BN"])
    assert bn2[2] == "0.0125" and bn2[4] == "0.36 ± 0.05", bn2  # lr 0.8 * 2 / 128; seeds 0.31 and 0.41
    page = (out / "index.html").read_text()
    assert page.count("<td>0,1</td>") == 8 and "0,0" not in page and "0,1,0,1" not in page
    assert "<td>BN</td><td>0.0125</td><td>0,1</td><td>0.36 ± 0.05</td>" in page.replace("<td>2</td>", "")
    # the claims table agrees: one notion of a setting
    assert "| batch_size | norm | seeds |" in (out / "claims.md").read_text()


def test_runs_table_shows_the_steps_taken_and_the_lr_that_ran(batch_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert report_main([str(batch_sweep), "--out", str(out), "--dpi", "30"]) == 0
    rows = {r[0]: r for r in _table((out / "report.md").read_text(), "## Runs")}
    assert rows["../bn-batch-size/batch_b2_s0"][1:5] == ["BN, batch_size=2", "0", "40", "0.0125 (configured 0.8)"]
    assert rows["../bn-batch-size/batch_b128_s1"][3:5] == ["40", "0.8"], "unscaled at the reference batch: one number"


def test_step_count_without_run_json_is_one_past_the_last_logged_step(tmp_path: Path) -> None:
    write_run(tmp_path / "old", steps=1000, status=None)
    (run,) = load_runs([tmp_path])
    assert run.last_step == 999 and run.steps == 1000


def test_a_seed_run_twice_counts_once_the_newest_finished_run(tmp_path: Path) -> None:
    write_run(tmp_path / "a/s0", seed=0, val_acc=0.5, updated="2026-01-01T00:00:00+0000")
    write_run(
        tmp_path / "b/s0_again", seed=0, val_acc=0.7, updated="2026-02-01T00:00:00+0000"
    )  # re-run elsewhere, newer
    write_run(tmp_path / "b/s1", seed=1, val_acc=0.9)
    write_run(tmp_path / "c/s0_killed", seed=0, val_acc=0.1, status="running", updated="2026-03-01T00:00:00+0000")
    write_run(tmp_path / "c/s0_other_lr", seed=0, lr=0.1, val_acc=0.2)  # another setting: not a repeat
    done, unfinished = split_runs(load_runs([tmp_path]))
    with pytest.warns(
        UserWarning, match=r"a/s0: seed 0 of this setting was run again in .*b/s0_again; counting only the newer run"
    ):
        kept, repeats = drop_repeated_seeds(done)
    assert sorted(r.path.name for r in kept) == ["s0_again", "s0_other_lr", "s1"]
    assert [r.path.name for r in repeats] == ["s0"] and [r.path.name for r in unfinished] == ["s0_killed"]
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="counting only the newer run"):
        assert (
            report_main(
                [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--out", str(out), "--dpi", "30"]
            )
            == 0
        )
    md = (out / "report.md").read_text()
    rows = _table(md, "### MLP 3x100 relu")
    assert [r[:3] for r in rows] == [["0.1", "0", "0.2"], ["0.8", "0,1", "0.8 ± 0.1"]], rows  # 0.7 and 0.9, not 0.5
    repeated = _table(md, "## Repeated seeds")
    assert repeated == [["../a/s0", "0", "completed", "1000", "0.5", "../b/s0_again"]]


def test_unreadable_run_folders_are_skipped_with_a_warning_naming_the_file(tmp_path: Path) -> None:
    good = write_run(tmp_path / "good")
    latin = write_run(tmp_path / "latin1")
    (latin / "metrics.csv").write_bytes(
        (latin / "metrics.csv").read_bytes() + "0,999,,0.5,,caf\xe9,\n".encode("latin-1")
    )
    cut = write_run(tmp_path / "cut")
    text = (cut / "config.yaml").read_text()
    (cut / "config.yaml").write_text(
        text[: text.index("norm:") + 9]
    )  # not written atomically, killed mid-line: "norm: bat"
    garbled = write_run(tmp_path / "garbled")
    (garbled / "config.yaml").write_text(text[: text.index("norm:")] + "norm: [batch\n")  # not YAML
    headless = write_run(tmp_path / "headless")
    (headless / "config.yaml").write_text(text[: text.index("model:")])  # cut at a line boundary: valid YAML, no model
    with pytest.warns(UserWarning) as record:
        runs = load_runs([tmp_path])
    assert [r.path for r in runs] == [good]
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 4, messages
    assert re.fullmatch(
        r".*/cut/config\.yaml: cut short mid-write \(its last line has no newline\); run skipped", messages[0]
    ), messages[0]
    assert re.fullmatch(
        r".*/garbled/config\.yaml: not valid YAML \(line \d+\); cut short mid-write\?; run skipped", messages[1]
    ), messages[1]
    assert re.fullmatch(
        r".*/headless/config\.yaml: no model section; cut short mid-write\?; run skipped", messages[2]
    ), messages[2]
    assert re.fullmatch(
        r".*/latin1/metrics\.csv: not UTF-8 text \(invalid continuation byte at byte \d+\); run skipped", messages[3]
    ), messages[3]
    # the whole report goes on with the readable run
    with pytest.warns(UserWarning):
        assert report_main([str(tmp_path), "--out", str(tmp_path / "out"), "--dpi", "30"]) == 0
    assert "| ../good | BN | 0 | 1000 |" in (tmp_path / "out" / "report.md").read_text()


def test_settings_leave_out_seed_and_resume_only_keys(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", seed=0)
    b = write_run(tmp_path / "b", seed=1)
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    cfg["ckpt_path"] = "last"
    cfg["checkpoint"]["every_n_train_steps"] = 7
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    runs = load_runs([a, b])
    assert varying_keys(runs) == [] and runs[0].setting == runs[1].setting
    write_run(tmp_path / "c", seed=0, model={"init_gain": 10.0})
    assert varying_keys(load_runs([tmp_path])) == ["model.init_args.init_gain"]
