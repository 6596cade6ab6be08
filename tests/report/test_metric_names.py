"""The report reads every metric name from ``bnlightning.callbacks.functional.names``, the module the
callbacks build their names with, so a renamed metric cannot leave the report reading a name nobody logs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bnlightning.callbacks.functional.names as names
import bnlightning.report

REPORT = Path(bnlightning.report.__file__).parent
PREFIXES = tuple(f"{family}/" for family in names.FAMILIES)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _typed_names(path: Path) -> list[str]:
    """String literals (and f-string pieces) in ``path``'s code, docstrings left out, that start like a metric name."""
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if node.value.startswith(PREFIXES):  # a bare family ("ics") also names a figure
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    return found


@pytest.mark.parametrize("path", sorted(REPORT.glob("*.py")), ids=lambda p: p.name)
def test_report_types_no_metric_name(path: Path) -> None:
    assert _typed_names(path) == []


def test_the_scan_finds_a_typed_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('"""Doc: ``hessian/trace`` is fine here."""\nX = "hessian/trace"\nY = f"ics/l2/{1}"\n')
    assert [line.split(": ", 1)[1] for line in _typed_names(bad)] == ["'hessian/trace'", "'ics/l2/'"]


def test_every_name_belongs_to_a_family() -> None:
    constants = {k: v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)}
    assert constants, "names.py lost its constants"
    for key, value in constants.items():
        assert value in names.FAMILIES or value.startswith(PREFIXES), key
    built = [
        names.ics_key("l2", "net.fc1"),
        names.act_key("net.fc1", "q15"),
        names.meanshift_key("net.fc1", "cos"),
        names.resvar_key("layer1.0", "ratio"),
        names.gradact_key("net.bn1", "norm"),
        names.efflr_key("net.fc1", "lr"),
        names.sld_key("train", "hvps"),
        names.hessian_eig(1),
        names.hessian_curvature("update"),
        names.hessian_curvature_ratio("grad"),
        names.hessian_prefix("net.fc1") + "trace",
    ]
    assert built == [
        "ics/l2/net.fc1",
        "act/net.fc1/q15",
        "meanshift/net.fc1/cos",
        "resvar/layer1.0/ratio",
        "gradact/net.bn1/norm",
        "efflr/net.fc1/lr",
        "sld/train/hvps",
        "hessian/eig_1",
        "hessian/update_curvature",
        "hessian/grad_curvature_ratio",
        "hessian/net.fc1/trace",
    ]
    assert names.LANDSCAPE_METRICS == (
        "landscape/loss_min",
        "landscape/loss_max",
        "landscape/grad_l2_max",
        "landscape/beta_eff",
    )


def test_the_report_layer_families_are_logged_families() -> None:
    from bnlightning.report.wandb_report import LAYER_FAMILIES

    assert set(LAYER_FAMILIES) == {names.ICS_L2, names.ICS_COS, names.ICS_REL, names.ACT, names.MEANSHIFT, names.RESVAR}
