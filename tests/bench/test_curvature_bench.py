"""Smoke test of bench/curvature.py: a tiny run completes and its figures are consistent.

Timings are never asserted (the machine is shared): only that λmax runs converge to the
reference and that every cost is a finite positive number.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import curvature  # noqa: E402 - bench/ is not a package: importable only after the path insert


def test_tiny_run(tmp_path: Path) -> None:
    out = curvature.main(
        [
            "--widths",
            "0.0625",
            "--lrs",
            "0.01",
            "--batch-size",
            "4",
            "--pretrain-steps",
            "1",
            "--rounds",
            "1",
            "--repeats",
            "1",
            "--basis-sweep",
            "3",
            "--out",
            str(tmp_path / "c.json"),
        ]
    )
    kinds = [r["kind"] for r in out["counts"]]
    assert kinds == ["cold", "cold, max_basis 3", "cold, max_basis 3", "cold", "warm, same batch", "warm, new batch"]
    for r in out["counts"]:
        assert r["converged"] and r["rel_error"] <= 1e-3 and r["to_1e-3_hvps"] <= r["stop_hvps"]
    assert [r["model"] for r in out["costs"]] == ["VGG-11-BN w=0.0625", "MLP 3x100 BN, batch 128"]
    for r in out["costs"]:
        for key in ("retained_setup_steps", "retained_steps", "double_backward_steps", "jvp_steps"):
            assert math.isfinite(r[key]) and r[key] > 0
    assert (tmp_path / "c.json").exists()


def test_bad_argument_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        curvature.parse_args(["--basis-sweep", "4,1"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: argument --max-basis/--basis-sweep: max_basis must be >= 2, got 1"
    ]
