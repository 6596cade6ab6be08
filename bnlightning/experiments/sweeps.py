"""W&B sweeps: generated from the registry, checked like ``wandb sweep``, expanded into local runs."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnlightning.experiments.configs import config_path
from bnlightning.experiments.registry import EXPERIMENTS, SEED, Experiment
from bnlightning.experiments.runs import RunSpec, logger_override, pin_overridden, run_name


def sweep_config(experiment: Experiment, seeds: Sequence[int] = (0, 1, 2)) -> dict[str, Any]:
    """The W&B grid sweep of ``experiment`` (paper scale): its grid plus the seeds, same configs and overrides.

    Example:
        >>> from bnlightning.experiments.registry import EXPERIMENTS
        >>> config = sweep_config(EXPERIMENTS["dln"])
        >>> config["metric"], config["parameters"]["seed_everything"]
        ({'name': 'train/loss', 'goal': 'minimize'}, {'values': [0, 1, 2]})
    """
    command = ["${env}", "${interpreter}", "-m", "bnlightning", "fit"]
    for c in experiment.configs:
        command += ["--config", c]
    command += [*experiment.overrides, "${args}"]
    parameters = {k: {"values": list(v)} for k, v in experiment.grid.items()}
    parameters[SEED] = {"values": list(seeds)}
    return {
        "name": experiment.name,
        "program": "bnlightning/__main__.py",
        "method": "grid",
        "metric": {"name": experiment.sweep_metric[0], "goal": experiment.sweep_metric[1]},
        "parameters": parameters,
        "command": command,
    }


def sweep_text(name: str) -> str:
    """The text of ``configs/sweeps/<name>.yaml``: a header saying how to use it, then :func:`sweep_config`.

    Raises:
        KeyError: ``name`` is not in the registry.
    """
    import yaml

    e = EXPERIMENTS[name]
    header = (
        "# W&B sweep GENERATED from the registry (bnlightning/experiments/registry.py); a test keeps them equal.\n"
        "# Edit the registry, then regenerate from the repository root:\n"
        '#   python -c "from bnlightning.experiments import write_sweeps; write_sweeps()"\n'
        f"# {e.claim}\n"
        f"#   wandb sweep configs/sweeps/{name}.yaml && wandb agent ENTITY/PROJECT/SWEEP_ID   (from the repository "
        "root)\n"
        f"# or locally: python -m bnlightning.experiments sweep configs/sweeps/{name}.yaml --run\n"
    )
    return header + yaml.safe_dump(sweep_config(e), sort_keys=False, width=200)


def write_sweep(name: str, folder: str | os.PathLike[str] = "configs/sweeps") -> Path:
    """Write ``<folder>/<name>.yaml`` from the registry (the file is generated; edit the registry).

    Args:
        name: a registry entry.
        folder: where to write (default ``configs/sweeps`` under the cwd: run it from the repository root).

    Raises:
        KeyError: ``name`` is not in the registry.

    Example::

        python -c "from bnlightning.experiments import write_sweep; write_sweep('bn-batch-size')"
    """
    path = Path(folder) / f"{name}.yaml"
    path.write_text(sweep_text(name))
    return path


def write_sweeps(folder: str | os.PathLike[str] = "configs/sweeps") -> list[Path]:
    """Write every registry entry's sweep file into ``folder`` (see :func:`write_sweep`)."""
    return [write_sweep(name, folder) for name in EXPERIMENTS]


SWEEP_METHODS = ("grid", "random", "bayes")


def load_sweep(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a sweep YAML with wandb's own loader and check it; returns the config dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the YAML is not a valid sweep for ``wandb sweep`` (one line saying why).
    """
    path = Path(config_path(str(path)))  # configs/sweeps/... from any directory: the shipped copy
    if not path.is_file():
        raise FileNotFoundError(f"no such sweep file: {path}")
    from wandb.sdk.launch.sweeps.utils import load_sweep_config

    config = load_sweep_config(str(path))  # what `wandb sweep FILE` itself calls
    if config is None:
        raise ValueError(f"{path}: wandb could not load this sweep file (see the message above)")
    problems = sweep_problems(config)
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems)}")
    return config


def sweep_problems(config: Mapping[str, Any]) -> list[str]:
    """Schema problems ``wandb sweep`` would reject, plus project-specific ones.

    Uses wandb's ``sweeps`` schema validator when installed (``wandb[sweeps]``); the
    checks below hold either way.
    """
    problems: list[str] = []
    try:  # the exact validator `wandb sweep --controller` uses; optional extra
        import sweeps as wandb_sweeps

        problems += list(wandb_sweeps.schema_violations_from_proposed_config(dict(config)))
    except ImportError:
        pass
    method = config.get("method")
    if method not in SWEEP_METHODS:
        problems.append(f"method must be one of {', '.join(SWEEP_METHODS)}, got {method!r}")
    params = config.get("parameters")
    if not isinstance(params, dict) or not params:
        problems.append("parameters must be a non-empty mapping")
        params = {}
    for key, spec in params.items():
        if not isinstance(spec, dict):
            problems.append(f"parameter {key}: expected a mapping with values/value/min+max")
        elif method == "grid" and not ("values" in spec or "value" in spec):
            problems.append(f"parameter {key}: a grid sweep needs 'values' or 'value'")
        elif "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
            problems.append(f"parameter {key}: 'values' must be a non-empty list")
        elif not ({"values", "value", "distribution", "min", "max"} & set(spec)):
            problems.append(f"parameter {key}: needs values, value, or a distribution with min/max")
    metric = config.get("metric")
    if method == "bayes" and not (isinstance(metric, dict) and metric.get("name")):
        problems.append("a bayes sweep needs metric.name")
    if isinstance(metric, dict) and metric.get("goal") not in (None, "minimize", "maximize"):
        problems.append(f"metric.goal must be minimize or maximize, got {metric.get('goal')!r}")
    command = config.get("command")
    if command is not None:
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            problems.append("command must be a list of strings")
        elif not any(
            c in ("${args}", "${args_no_hyphens}", "${args_json}", "${args_no_boolean_flags}") for c in command
        ):
            problems.append("command must contain ${args} so the agent can pass the parameters")
    return problems


def _sweep_base_args(config: Mapping[str, Any]) -> list[str]:
    """The fixed part of the sweep's command after ``bnlightning fit`` (its --config files...)."""
    command = [str(c) for c in config.get("command") or []]
    if "fit" not in command:
        raise ValueError("the sweep's command must run `python -m bnlightning fit ...`")
    tail = [c for c in command[command.index("fit") + 1 :] if not (c.startswith("${") and c.endswith("}"))]
    # Config paths are relative to the repository root, where the agent runs; elsewhere the shipped copies.
    return [config_path(c) if i and tail[i - 1] == "--config" else c for i, c in enumerate(tail)]


def expand_sweep(
    config: Mapping[str, Any],
    runs_dir: str = "runs",
    extra: Sequence[str] = (),
    name: str | None = None,
    project: str = "bnlightning",
) -> list[RunSpec]:
    """The grid of a sweep as local runs, with the arguments the W&B agent would pass.

    The agent turns each parameter into ``--key=value`` (wandb's
    ``create_sweep_command_args``, called here too) and substitutes it for ``${args}``;
    local runs additionally get a logger naming them, so they land in
    ``<runs_dir>/<sweep name>/<run name>``.

    Raises:
        ValueError: not a grid sweep (random/bayes need W&B's scheduler) or no fit command.
    """
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    if config.get("method") != "grid":
        raise ValueError(
            f"only grid sweeps expand locally; this one is {config.get('method')!r} (use `wandb sweep` + `wandb agent`)"
        )
    sweep_name = name or str(config.get("name") or "sweep")
    base = _sweep_base_args(config)
    params = config["parameters"]
    keys = list(params)
    grid = pin_overridden(
        {k: params[k]["values"] if "values" in params[k] else [params[k]["value"]] for k in keys}, extra
    )
    choices = [grid[k] for k in keys]
    specs = []
    for combo in itertools.product(*choices):
        values = dict(zip(keys, combo))
        agent_args = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]
        rname = run_name(values)
        args = (
            base
            + agent_args
            + [
                logger_override(sweep_name, rname, runs_dir, project),
                f"--trainer.default_root_dir={runs_dir}/{sweep_name}/{rname}",
            ]
            + list(extra)
        )
        specs.append(RunSpec(sweep_name, rname, Path(runs_dir) / sweep_name / rname, tuple(args)))
    return specs
