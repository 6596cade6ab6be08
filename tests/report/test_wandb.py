"""The W&B report spec builds offline; saving is refused without credentials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnlightning.cli import main
from bnlightning.report.wandb_report import GROUP_KEYS, build_report, report_spec


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
    for metric in ("train/acc", "val/acc", "train/loss", "landscape/beta_eff", "landscape/grad_l2_max", "landscape/loss_min", "diverged_at_step"):
        assert metric in text, metric
    for regex in ("ics/l2/.*", "ics/cos/.*", "act/.*/q(15|50|85)"):
        assert regex in text, regex
    groupings = [d["grouping"] for d in _walk(spec) if "grouping" in d]
    assert groupings and all([g["name"] for g in grouping] == ["cli.value.model.init_args.norm", "cli.value.model.init_args.optimizer.init_args.lr"] for grouping in groupings)
    # One runset per experiment group, filtered on the W&B run group.
    assert sum('"value": "vgg-lr"' in json.dumps(d) for d in _walk(spec) if d.get("op") == "=") >= 1
    assert GROUP_KEYS[0].endswith("norm")


def test_linked_report_object_builds_without_network() -> None:
    report = build_report("my-team", "bnlightning", title="t")
    grids = [b for b in report.blocks if type(b).__name__ == "PanelGrid"]
    assert len(grids) == 4 and all(rs.entity == "my-team" and rs.project == "bnlightning" for g in grids for rs in g.runsets)


def test_command_dry_run_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
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
