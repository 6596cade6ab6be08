"""From an experiment to its runs: names, ``fit`` argument lists, the logger naming each run."""

from __future__ import annotations

import itertools
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlightning.experiments.configs import config_path
from bnlightning.experiments.registry import EXPERIMENTS, LR, NORM, SEED, Experiment


@dataclass(frozen=True)
class RunSpec:
    """One ``fit`` process: its name, the folder it logs into, and its argument list.

    Example:
        >>> spec = RunSpec("exp", "batch_lr0.1_s0", Path("runs/exp/batch_lr0.1_s0"), ("--seed_everything=0",))
        >>> spec.shell()
        'python -m bnlightning fit --seed_everything=0'
    """

    experiment: str
    name: str
    log_dir: Path
    args: tuple[str, ...] = field(repr=False)

    def command(self, python: str = sys.executable) -> list[str]:
        """The argument vector that runs it with ``python``."""
        return [python, "-m", "bnlightning", "fit", *self.args]

    def shell(self) -> str:
        """The command as one copy-pasteable shell line (``python`` from PATH)."""
        return shlex.join(self.command("python"))


def _value_text(value: Any) -> str:
    """A grid value as the CLI reads it (``1e-06`` stays a float, ``none`` a string)."""
    return repr(value) if isinstance(value, float) else str(value)


def run_name(values: Mapping[str, Any]) -> str:
    """``batch_lr0.1_s0``: short, unique per (norm, lr, seed), safe as a folder name."""
    parts = []
    for key, value in values.items():
        if key == NORM:
            parts.append(str(value))
        elif key == LR:
            parts.append(f"lr{value:g}" if isinstance(value, (int, float)) else f"lr{value}")
        elif key == SEED:
            parts.append(f"s{value}")
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}{value}")
    return "_".join(parts).replace("/", "-")


def overridden_values(extra: Sequence[str], keys: Sequence[str]) -> dict[str, Any]:
    """The values ``extra`` (arguments after ``--``) gives to any of ``keys``, as YAML reads them.

    ``--key=value`` and ``--key value`` both count; the last one wins, as on the command line.

    Example:
        >>> overridden_values(["--seed_everything=5", "--trainer.max_steps", "10"], ["seed_everything"])
        {'seed_everything': 5}
    """
    import yaml

    found: dict[str, Any] = {}
    for i, arg in enumerate(extra):
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in keys:
            continue
        if not eq:
            if i + 1 >= len(extra):
                continue
            value = extra[i + 1]
        try:
            found[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            found[key] = value
    return found


def pin_overridden(grid: Mapping[str, Sequence[Any]], extra: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """``grid`` with each axis that ``extra`` overrides reduced to the value it gives.

    An argument after ``--`` is appended to every run and wins over the grid's value;
    pinning the axis keeps the folder and W&B names true to what each run trains (and
    drops the runs that would have repeated one setting under different names).
    """
    pinned = overridden_values(extra, list(grid))
    return {k: (pinned[k],) if k in pinned else tuple(v) for k, v in grid.items()}


#: The CSV logger that resumes a run's folder (named, not imported: printing commands needs no torch).
CSV_LOGGER = "bnlightning.loggers.CSVLogger"


def logger_override(experiment: str, name: str, runs_dir: str, project: str, csv_class: str = CSV_LOGGER) -> str:
    """``--trainer.logger=[CSV, W&B]`` naming this run: replaces the config's logger list.

    A list given on the command line replaces the YAML's list (jsonargparse), so both
    loggers are restated: the CSV log the report reads and the W&B run, grouped by
    experiment.
    """
    loggers = [
        {"class_path": csv_class, "init_args": {"save_dir": runs_dir, "name": experiment, "version": name}},
        {
            "class_path": "bnlightning.loggers.WandbLogger",
            "init_args": {
                "project": project,
                "save_dir": runs_dir,
                "group": experiment,
                "name": name,
                "tags": [experiment],
            },
        },
    ]
    return "--trainer.logger=" + json.dumps(loggers, separators=(",", ":"))


def expand(
    experiment: Experiment,
    seeds: Sequence[int],
    runs_dir: str = "runs",
    cpu: bool = False,
    extra: Sequence[str] = (),
    project: str = "bnlightning",
) -> list[RunSpec]:
    """Every run of ``experiment``: the grid's combinations times ``seeds``.

    Args:
        experiment: the registry entry.
        seeds: one run per seed and grid point.
        runs_dir: the runs log under ``<runs_dir>/<experiment>/<run name>`` (relative to the runner's cwd).
        cpu: the CPU-sized variant (``cpu_overrides`` and ``cpu_grid``), logged as ``<experiment>-cpu``.
        extra: arguments appended to every run.
        project: the W&B project.

    Raises:
        ValueError: no seeds, or ``cpu`` for an experiment without a CPU-sized variant.

    Example:
        >>> from bnlightning.experiments.registry import EXPERIMENTS
        >>> [s.name for s in expand(EXPERIMENTS["vgg-lr"], [0], cpu=True)]
        ['none_lr0.1_s0', 'none_lr0.5_s0', 'batch_lr0.1_s0', 'batch_lr0.5_s0']
    """
    if not seeds:
        raise ValueError("give at least one seed")
    if cpu and not experiment.cpu_overrides:  # else --cpu would start the paper-scale run, CIFAR-10 download and all
        sized = ", ".join(n for n, e in EXPERIMENTS.items() if e.cpu_overrides)
        raise ValueError(f"{experiment.name} has no CPU-sized variant (--cpu); these have one: {sized}")
    name = experiment.name + ("-cpu" if cpu else "")
    grid = dict(experiment.cpu_grid if cpu and experiment.cpu_grid is not None else experiment.grid)
    grid[SEED] = tuple(seeds)
    grid = pin_overridden(grid, extra)
    keys = list(grid)
    specs = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        rname = run_name(values)
        args = [f"--config={config_path(c)}" for c in experiment.configs]
        fixed = list(experiment.overrides) + (list(experiment.cpu_overrides) if cpu else [])
        args += [f"--config={config_path(a[len('--config=') :])}" if a.startswith("--config=") else a for a in fixed]
        args += [f"--{k}={_value_text(v)}" for k, v in values.items()]
        args += [
            logger_override(name, rname, runs_dir, project),
            f"--trainer.default_root_dir={runs_dir}/{name}/{rname}",
        ]
        args += list(extra)
        specs.append(RunSpec(name, rname, Path(runs_dir) / name / rname, tuple(args)))
    return specs
