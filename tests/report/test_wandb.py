"""The W&B report spec builds offline; saving is refused without credentials."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bnlightning.cli import main
from bnlightning.report.wandb_report import GROUP_KEYS, LAYERS_PER_PANEL, build_report, layers_in, report_spec


def _walk(node: object):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_spec_builds_offline_with_every_panel_grouped_by_norm_and_lr() -> None:
    spec = report_spec("my-team", "bnlightning", groups=["vgg-lr", "dln"])
    text = json.dumps(spec)
    assert spec["viewspec"]["project"] == {"name": "bnlightning", "entityName": "my-team"}
    for metric in (
        "train/acc",
        "val/acc",
        "train/loss",
        "landscape/beta_eff",
        "landscape/grad_l2_max",
        "landscape/loss_min",
        "diverged_at_step",
    ):
        assert metric in text, metric
    for regex in ("ics/l2/.*", "ics/cos/.*", "act/.*/q(15|50|85)"):
        assert regex in text, regex
    groupings = [d["grouping"] for d in _walk(spec) if "grouping" in d]
    assert groupings and all(
        [g["name"] for g in grouping]
        == ["cli.value.model.init_args.norm", "cli.value.model.init_args.optimizer.init_args.lr"]
        for grouping in groupings
    )
    # One runset per experiment group, filtered on the W&B run group.
    assert sum('"value": "vgg-lr"' in json.dumps(d) for d in _walk(spec) if d.get("op") == "=") >= 1
    assert GROUP_KEYS[0].endswith("norm")


def test_linked_report_object_builds_without_network() -> None:
    report = build_report("my-team", "bnlightning", title="t")
    grids = [b for b in report.blocks if type(b).__name__ == "PanelGrid"]
    assert len(grids) == 7 and all(
        rs.entity == "my-team" and rs.project == "bnlightning" for g in grids for rs in g.runsets
    )


def test_command_dry_run_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "spec.json"
    assert main(["wandb-report", "--entity", "e", "--project", "p", "--dry-run", "--spec-out", str(out)]) == 0
    assert json.loads(out.read_text())["viewspec"]["displayName"].startswith("bnlightning")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(SystemExit) as e:
        main(["wandb-report", "--entity", "e", "--project", "p"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: saving a W&B report needs a W&B account")
    with pytest.raises(SystemExit) as e:
        main(["wandb-report", "--entity", "e", "--project", "p", "--title", "x" * 200, "--dry-run"])
    assert e.value.code == 2


def _line_plots(spec: dict) -> list[dict]:
    return [d for d in _walk(spec) if d.get("viewType") == "Run History Line Plot"]


def test_every_measurement_has_panels_with_axis_titles() -> None:
    spec = report_spec("e", "p")
    text = json.dumps(spec)
    for key in (
        "hessian/(lambda_max|eig_",
        "hessian/trace",
        "hessian/sharpness_ratio",
        "meanshift/.*/cos",
        "meanshift/majority_share",
        "resvar/.*/ratio",
    ):
        assert key in text, key
    plots = _line_plots(spec)
    assert len(plots) == 17  # 3 training, 3 ICS, 3 landscape, 2 activation, 3 Hessian, 2 mean-shift, 1 residual
    for plot in plots:
        config = plot["config"]
        assert config["xAxisTitle"] == "optimizer step" and config["yAxisTitle"], config.get("chartTitle")


def test_known_layers_get_one_panel_per_group_of_layers() -> None:
    vgg = [f"net.conv{i}" for i in range(1, 14)]
    keys = (
        [f"ics/{m}/{layer}" for m in ("l2", "cos", "rel") for layer in vgg]
        + [f"act/{layer}/q{q}" for layer in vgg for q in (15, 50, 85)]
        + ["train/loss"]
    )
    layers = layers_in(keys)
    assert layers["ics/l2"] == vgg and layers["act"] == vgg and layers["resvar"] == []
    plots = _line_plots(report_spec("e", "p", layers=layers))
    ics_l2 = [p["config"] for p in plots if p["config"].get("metricRegex", "").startswith("ics/l2/")]
    assert len(ics_l2) == 4  # 13 layers, 4 per panel
    groups = [c["metricRegex"].removeprefix("ics/l2/(").removesuffix(")$").split("|") for c in ics_l2]
    assert [name for group in groups for name in group] == [re.escape(layer) for layer in vgg], (
        "every layer in exactly one panel, in forward order"
    )
    assert all(len(group) <= LAYERS_PER_PANEL for group in groups)
    assert "net.conv1 … net.conv4" in ics_l2[0]["chartTitle"]


def test_the_command_finds_the_layers_in_local_runs(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "dln" / "batch_lr1e-06_s0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("epoch,step,ics/l2/net.fc9,ics/l2/net.fc17,train/loss\n0,9,0.1,0.2,1.0\n")
    out = tmp_path / "spec.json"
    assert (
        main(
            [
                "wandb-report",
                "--entity",
                "e",
                "--project",
                "p",
                "--dry-run",
                "--spec-out",
                str(out),
                "--runs",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    regexes = [p["config"].get("metricRegex", "") for p in _line_plots(json.loads(out.read_text()))]
    assert r"ics/l2/(net\.fc9|net\.fc17)$" in regexes and "ics/l2/.*" not in regexes
