"""One command per experiment of PROTOCOL §7, and W&B sweeps run locally.

An experiment is a grid (normalization x learning rate) times seeds; each grid point is
one independent ``python -m bnlightning fit`` process, so the list can be run here one
after another, or printed and spread over GPUs and machines (``xargs -P``, a job queue,
one line per GPU) with no new machinery. Every run of an experiment logs under
``<runs-dir>/<experiment>/<run-name>/`` (CSV) and into the W&B group ``<experiment>``,
named ``<norm>_lr<lr>_s<seed>``, which is what ``python -m bnlightning report`` reads.

Usage::

    python -m bnlightning.experiments list
    python -m bnlightning.experiments show vgg-lr --seeds 0 1 2        # print the commands
    python -m bnlightning.experiments run vgg-lr dln --seeds 0 1 2     # run them here, in turn
    python -m bnlightning.experiments run dln mlp-sigmoid vgg-lr --cpu --seeds 0 1   # CPU-sized
    python -m bnlightning.experiments sweep configs/sweeps/vgg-lr.yaml [--run] [-- --trainer.max_steps=100]

While runs go, the terminal shows one line per run under one progress bar over the grid
(with an ETA); each fit's own output is in ``<runs-dir>/<experiment>/<run>.out``. ``--quiet``
drops the bar, ``--verbose`` streams every fit's output instead.

``run`` is safe to repeat: finished runs (``run.json`` says completed or diverged) are
skipped, interrupted or killed runs with a checkpoint resume with ``--ckpt_path=last``.

Arguments after ``--`` are appended to every ``fit`` command (e.g. a smaller
``--trainer.max_steps`` or ``--trainer.devices``).

``--cpu`` selects each experiment's CPU-sized variant: fewer steps, and for VGG a
narrow VGG-A on scikit-learn's digits resized to 32x32 RGB (labelled as that
substitute in every figure and table, never as CIFAR-10).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn

from bnlightning.experiments.registry import EXPERIMENTS
from bnlightning.experiments.runner import run_all
from bnlightning.experiments.runs import expand
from bnlightning.experiments.sweeps import expand_sweep, load_sweep


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m bnlightning.experiments",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` are appended to every fit command.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the experiments and the claims they reproduce")
    for action, text in (
        ("show", "print the fit commands, one per line"),
        ("run", "run the fit commands here, one after another"),
    ):
        q = sub.add_parser(action, help=text)
        q.add_argument("names", nargs="+", metavar="EXPERIMENT", help=f"one or more of: {', '.join(EXPERIMENTS)}")
        q.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; with --cpu 0 1)")
        q.add_argument(
            "--cpu", action="store_true", help="the CPU-sized variant (fewer steps; VGG on the digits substitute)"
        )
        q.add_argument("--runs-dir", default="runs", help="where runs log (default runs/)")
        q.add_argument("--project", default="bnlightning", help="W&B project")
        if action == "run":
            _output_flags(q)
    q = sub.add_parser("sweep", help="expand a W&B grid sweep YAML into local runs (no W&B server needed)")
    q.add_argument("file", help="sweep YAML, e.g. configs/sweeps/vgg-lr.yaml")
    q.add_argument("--run", action="store_true", help="run the commands (default: print them)")
    q.add_argument("--runs-dir", default="runs")
    q.add_argument("--project", default="bnlightning")
    _output_flags(q)
    return p


def _output_flags(q: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--verbose``: what the terminal shows while the runs go (see ``run_all``)."""
    q.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar: one line per run (each run's output is in <runs-dir>/<experiment>/<run>.out)",
    )
    q.add_argument(
        "--verbose",
        action="store_true",
        help=(
            "stream every fit's own output (progress bars, other libraries' lines) instead of one progress bar over "
            "the runs"
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (1 if any run failed or was interrupted, 2 for bad input).

    Runs go under the current directory (``--runs-dir``, default ``runs/``), wherever the
    package is installed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    args = _parser().parse_args(argv)
    try:
        if args.action == "list":
            lines = [
                f"{e.name:16s} {len(list(itertools.product(*e.grid.values())))} settings x seeds   {e.claim}"
                for e in EXPERIMENTS.values()
            ]
            return _print_lines(lines)
        if args.action == "sweep":
            specs = expand_sweep(load_sweep(args.file), args.runs_dir, extra, project=args.project)
            run = args.run
        else:
            unknown = [n for n in args.names if n not in EXPERIMENTS]
            if unknown:
                raise ValueError(f"unknown experiment {unknown[0]!r}; known: {', '.join(EXPERIMENTS)}")
            seeds = args.seeds if args.seeds is not None else ([0, 1] if args.cpu else [0, 1, 2])
            specs = [
                s
                for n in args.names
                for s in expand(EXPERIMENTS[n], seeds, args.runs_dir, args.cpu, extra, args.project)
            ]
            run = args.action == "run"
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if not run:
        return _print_lines(spec.shell() for spec in specs)
    results = run_all(specs, Path.cwd(), quiet=args.quiet, verbose=args.verbose)
    done = [s.name for s, o in results if o in ("ok", "diverged", "skipped")]
    interrupted = [s.name for s, o in results if o in ("interrupted", "not started")]
    failed = [s.name for s, o in results if o == "failed"]
    line = f"done: {len(done)}/{len(results)} runs finished"
    line += f"; interrupted (run again to resume): {', '.join(interrupted)}" if interrupted else ""
    line += f"; failed: {', '.join(failed)}" if failed else ""
    print(line)
    return 1 if failed or interrupted else 0


def _print_lines(lines: Iterable[str]) -> int:
    """Print ``lines``; a reader that leaves early (``... | head``) is not an error."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        sys.stderr.close()
    return 0
