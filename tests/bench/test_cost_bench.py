"""bench/cost.py: bad arguments are one line; the parts it is built from run on a tiny budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import cost  # noqa: E402 - bench/ is a folder of scripts, not a package


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--models", "alexnet"],
            "error: argument --models: unknown model 'alexnet'; accepted: resnet18, transformer, vgg, vgg16",
        ),
        (
            ["--callbacks", "Foo"],
            "error: argument --callbacks: unknown callback 'Foo'; accepted: " + ", ".join(cost.CALLBACKS),
        ),
    ],
)
def test_bad_arguments_are_one_line(args: list[str], line: str) -> None:
    out = subprocess.run([sys.executable, str(BENCH / "cost.py"), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip() == line


def test_models_and_loaders_fit_each_other() -> None:
    for name in cost.MODELS:
        model = cost.make_model(name, 0)
        batch = next(iter(cost.make_loader(name, 1, 0)))
        assert model.loss(batch).ndim == 0, name


def test_hessian_split_adds_up_and_refuses_an_unknown_model(tmp_path: Path) -> None:
    import hessian_split

    argv = ["--models", "vgg", "--gap", "1", "--measurements", "2", "--max-basis", "4"]  # no --threads: a global
    result = hessian_split.main([*argv, "--out", str(tmp_path / "split.json")])
    rows = result["rows"]
    assert [r["measurement"] for r in rows] == [0, 1] and all(r["max_basis"] == 4 for r in rows)
    for r in rows:
        assert r["backward"] > 0 and r["other"] > 0 and r["steps"] == pytest.approx(r["backward"] + r["other"])
        assert r["hvps"] == r["iterations"] + r["trace_probes"]
    out = subprocess.run(
        [sys.executable, str(BENCH / "hessian_split.py"), "--models", "alexnet"], capture_output=True, text=True
    )
    assert out.returncode == 2
    accepted = "resnet18, transformer, vgg"
    assert out.stderr.strip() == f"error: argument --models: unknown model 'alexnet'; accepted: {accepted}"
