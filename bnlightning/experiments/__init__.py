"""One command per experiment of PROTOCOL §7, and W&B sweeps run locally.

Modules, each named for what it holds:

- ``registry``: :class:`Experiment`, the ``EXPERIMENTS`` dict (the one source of truth)
  and the CLI keys its grids sweep (``NORM``, ``LR``, ...);
- ``runs``: :class:`RunSpec`, run names, :func:`expand` (an experiment's ``fit`` commands)
  and the logger override naming each run;
- ``runner``: :func:`run_all` (run here, skip finished runs, resume interrupted ones) and
  :func:`run_state`;
- ``sweeps``: the W&B sweep files generated from the registry, loaded, checked and
  expanded into local runs;
- ``configs``: where the YAML configs are (the cwd, the installed package, a checkout);
- ``cli``: ``python -m bnlightning.experiments list | show | run | sweep``.

Example:
    >>> from bnlightning.experiments import EXPERIMENTS, expand
    >>> len(expand(EXPERIMENTS["vgg-lr"], seeds=[0, 1, 2]))
    12
"""

from bnlightning.experiments.cli import main
from bnlightning.experiments.configs import config_path, configs_root
from bnlightning.experiments.registry import (
    AFFINE,
    BATCH,
    CPU_MLP,
    CPU_RESNET,
    CPU_VGG,
    DEPTH,
    DROPOUT,
    EXPERIMENTS,
    GAIN,
    INIT,
    LR,
    NORM,
    POSITION,
    SEED,
    TRAIN_LOSS,
    WS,
    Experiment,
)
from bnlightning.experiments.runner import run_all, run_state
from bnlightning.experiments.runs import RunSpec, expand, logger_override, run_name
from bnlightning.experiments.sweeps import (
    SWEEP_METHODS,
    expand_sweep,
    load_sweep,
    sweep_config,
    sweep_problems,
    sweep_text,
    write_sweep,
    write_sweeps,
)

__all__ = [
    "AFFINE",
    "BATCH",
    "CPU_MLP",
    "CPU_RESNET",
    "CPU_VGG",
    "DEPTH",
    "DROPOUT",
    "EXPERIMENTS",
    "GAIN",
    "INIT",
    "LR",
    "NORM",
    "POSITION",
    "SEED",
    "SWEEP_METHODS",
    "TRAIN_LOSS",
    "WS",
    "Experiment",
    "RunSpec",
    "config_path",
    "configs_root",
    "expand",
    "expand_sweep",
    "load_sweep",
    "logger_override",
    "main",
    "run_all",
    "run_name",
    "run_state",
    "sweep_config",
    "sweep_problems",
    "sweep_text",
    "write_sweep",
    "write_sweeps",
]
