"""Arguments shared by the benchmark scripts: one parser shape, typed options, one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


class BenchParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one ``error: ...`` line (exit 2), like ``bnlightning``'s CLI.

    ``parse_args`` fills every option left at ``None`` from the quick or the full mode's settings.
    """

    quick: dict[str, Any]
    full: dict[str, Any]

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        for key, value in (self.quick if parsed.quick else self.full).items():
            if getattr(parsed, key) is None:
                setattr(parsed, key, value)
        return parsed

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def bench_parser(prog: str, doc: str | None, quick: dict[str, Any], full: dict[str, Any]) -> BenchParser:
    """A script's parser, its description naming what ``--quick`` and the full mode run; with the common options."""
    modes = (
        " Quick mode: "
        + " ".join(f"{k}={v}" for k, v in quick.items())
        + "; full (default): "
        + " ".join(f"{k}={v}" for k, v in full.items())
        + "."
    )
    parser = BenchParser(prog=prog, description=(doc or "").split("\n\n")[0] + modes)
    parser.quick, parser.full = quick, full
    add_common_args(parser)
    return parser


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, else one clear message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "a non-negative integer")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers, e.g. ``128,512``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    return [positive_int(p) for p in parts]


def precision_list(text: str) -> list[str]:
    """argparse type: comma-separated Lightning precisions (``32-true``, ``bf16-mixed``, ``16-mixed``)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PRECISIONS]
    if not parts or bad:
        raise argparse.ArgumentTypeError(
            f"unknown precision {bad[0] if bad else text!r}; accepted: {', '.join(PRECISIONS)}"
        )
    return parts


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every bench script has: device, threads, seed, output file, quick mode."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the model and the synthetic data")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path (default: runs/bench/<script>.json)")
    parser.add_argument(
        "--quick", action="store_true", help="a small run (see the description) to check the ratios fast"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default) or this process's CPU time (steadier on a shared CPU; use with --threads 1)",
    )


def resolve_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``torch.device`` for ``--device``, or one ``error:`` line if it does not exist here."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        parser.error(f"argument --device: {err}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("argument --device: CUDA is not available on this machine (torch sees no GPU)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {name} does not exist ({torch.cuda.device_count()} GPU(s))")
    elif device.type != "cpu":
        parser.error(f"argument --device: only cpu and cuda are supported, got {name!r}")
    return device


def check_precisions(parser: argparse.ArgumentParser, precisions: Sequence[str], device: torch.device) -> None:
    """fp16 autocast on CPU is not a configuration anyone trains with: refuse it clearly."""
    if device.type == "cpu" and "16-mixed" in precisions:
        parser.error("argument --precisions: 16-mixed needs a GPU; use 32-true or bf16-mixed on the CPU")
