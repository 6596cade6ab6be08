"""Smoke tests of the benchmark scripts: they start, refuse bad input clearly, and a tiny run completes.

Timings are never asserted (the machine is shared); only that the figures exist and are finite.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import _cli  # noqa: E402 - bench/ is a folder of scripts, not a package
import _report  # noqa: E402
import _timing  # noqa: E402


def test_help_runs_as_a_script() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH / "throughput.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "--device" in out.stdout


@pytest.mark.parametrize("script", ["throughput", "overhead"])
def test_help(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        __import__(script).parse_args(["--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("throughput.py", ["--steps", "0"], "error: argument --steps: must be a positive integer, got '0'"),
        ("throughput.py", ["--precisions", "fp8"], "error: argument --precisions: unknown precision 'fp8'"),
        (
            "overhead.py",
            ["--steps", "150"],
            "error: argument --steps: must be a multiple of --every-n-steps (100), got 150",
        ),
    ],
)
def test_bad_arguments_give_one_error_line(
    script: str, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module = __import__(script[:-3])
    with pytest.raises(SystemExit) as exc:
        module.parse_args(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_bad_argument_message_is_one_line() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH / "overhead.py"), "--steps", "-3"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: argument --steps: must be a positive integer, got '-3'"]


def test_cuda_refused_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    import throughput

    with pytest.raises(SystemExit):
        throughput.parse_args(["--device", "cuda"])


def test_throughput_tiny_run(tmp_path: Path) -> None:
    import throughput

    out = tmp_path / "t.json"
    payload = throughput.main(
        [
            "--width",
            "0.03125",
            "--batch-sizes",
            "8",
            "--precisions",
            "bf16-mixed",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--num-workers",
            "0",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["summary"] == payload["summary"]
    assert [r["precision"] for r in saved["parity"]] == ["bf16-mixed"]
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in saved["parity"] + saved["data_paths"])
    assert [r["what"] for r in saved["data_paths"]] == ["loader only", "training"]


def test_overhead_tiny_run(tmp_path: Path) -> None:
    import overhead

    out = tmp_path / "o.json"
    overhead.main(
        [
            "--width",
            "0.03125",
            "--batch-size",
            "8",
            "--steps",
            "4",
            "--every-n-steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--probe-width",
            "0.03125",
            "--probe-batch-size",
            "8",
            "--probe-measurements",
            "1",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert [r["callback"] for r in saved["costs"]] == list(overhead.CALLBACKS)
    for row in saved["costs"]:
        assert row["cost_in_steps"] > 0 and row["step_peak_bytes"] > 0 and row["measurement_peak_bytes"] > 0
    assert math.isfinite(saved["throughput"]["overhead_pct"])


def test_cpu_memory_windows_see_allocations() -> None:
    """The CPU memory probe reports a window's peak above its start, not what was resident before."""
    import overhead

    mem = overhead.MemoryWindows(torch.device("cpu"))
    with mem:
        resident = torch.ones(1_000_000)  # 4 MB, seen by the profiler but allocated before window "a": must not count
        mem.open("a")
        x = torch.empty(2_000_000)  # 8 MB
        y = torch.empty(1_000_000)  # 4 MB, both alive: peak 12 MB
        del x, y
        mem.close("a")
        mem.open("b")
        z = torch.empty(500_000)  # 2 MB
        del z
        mem.close("b")
    peaks = mem.peaks()
    assert peaks["a"] == [12_000_000]
    assert peaks["b"] == [2_000_000]
    del resident


def test_table_and_lists() -> None:
    assert _cli.int_list("128, 512") == [128, 512]
    table = _report.format_table(["a", "b"], [[1, 2.5], ["x", 1234.5]])
    assert table.splitlines()[0].split() == ["a", "b"] and "1,234.5" in table
    assert _timing.alternate(["p", "q"], 0) == ["p", "q"] and _timing.alternate(["p", "q"], 1) == ["q", "p"]


def test_clocks_are_objects_passed_around_wall_vs_cpu() -> None:
    """``--clock cpu`` reads this process's CPU time: a sleep costs it nothing, unlike the wall clock."""
    import time

    cpu = torch.device("cpu")
    wall_s, _ = _timing.Clock(cpu, "wall").timed(lambda: time.sleep(0.2))
    cpu_s, _ = _timing.Clock(cpu, "cpu").timed(lambda: time.sleep(0.2))
    assert wall_s >= 0.2 and cpu_s < 0.1
    parser = _cli.bench_parser("x", None, {}, {})
    assert _timing.make_clock(parser, "cpu", cpu) == _timing.Clock(cpu, "cpu")


def test_a_verdict_is_given_only_beyond_the_runs_noise() -> None:
    """A timing within its noise of the target decides nothing (no "MISSED" from a busy machine)."""
    import doctest

    assert doctest.testmod(_timing, verbose=False).failed == 0
    assert _timing.verdict(0.949, 0.95, 0.02).startswith("within noise")
    assert _timing.verdict(0.90, 0.95, 0.02) == "missed" and _timing.verdict(1.0, 0.95, 0.02) == "met"
    assert _timing.verdict(10.4, 10.0, 1.0, higher_is_better=False).startswith("within noise")
    assert _timing.verdict(12.0, 10.0, 1.0, higher_is_better=False) == "missed"
