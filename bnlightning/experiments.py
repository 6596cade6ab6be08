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
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

#: The repository root (configs are referenced relative to it).
REPO = Path(__file__).resolve().parents[1]

NORM = "model.init_args.norm"
LR = "model.init_args.optimizer.init_args.lr"
SEED = "seed_everything"
BATCH = "data.init_args.batch_size"
GAIN = "model.init_args.init_gain"
INIT = "model.init_args.init"
POSITION = "model.init_args.norm_position"
AFFINE = "model.init_args.norm_affine"
DROPOUT = "model.init_args.dropout"
WS = "model.init_args.weight_standardization"
DEPTH = "model.init_args.depth"

#: CPU-sized VGG: the digits substitute, VGG-A at 1/8 width, a few hundred steps.
CPU_VGG: tuple[str, ...] = (
    "--config=configs/experiments/digits32.yaml",
    "--model.init_args.config=A",
    "--model.init_args.width=0.125",
    "--trainer.accelerator=cpu",
    "--trainer.max_steps=150",
    "--trainer.log_every_n_steps=10",
    "--trainer.val_check_interval=50",
    "--trainer.check_val_every_n_epoch=null",
)


#: CPU-sized MLP for the claims of issue 12: Ioffe & Szegedy's 3x100 MLP on the 8x8 digits.
CPU_MLP: tuple[str, ...] = (
    "--config=configs/mlp_sigmoid.yaml",
    "--trainer.accelerator=cpu",
    "--trainer.log_every_n_steps=10",
)

#: CPU-sized ResNet-20: 1/4 width on the digits substitute.
CPU_RESNET: tuple[str, ...] = (
    "--config=configs/experiments/digits32.yaml",
    "--model.init_args.width=0.25",
    "--trainer.accelerator=cpu",
    "--trainer.max_steps=150",
    "--trainer.log_every_n_steps=10",
    "--trainer.val_check_interval=50",
    "--trainer.check_val_every_n_epoch=null",
)


@dataclass(frozen=True)
class Experiment:
    """A reproducible comparison: configs, a grid of CLI keys, a claim of the paper.

    Args:
        name: experiment name (also the run folder and the W&B group).
        claim: the result of the paper it reproduces (shown by ``list``).
        configs: YAML files given to ``fit --config``, in order (later ones override).
        grid: CLI key -> values; every combination is a setting.
        overrides: extra CLI arguments for every run.
        cpu: extra CLI arguments for the CPU-sized variant (appended after ``overrides``).
        cpu_grid: replaces ``grid`` in the CPU-sized variant (e.g. fewer learning rates).
    """

    name: str
    claim: str
    configs: tuple[str, ...]
    grid: Mapping[str, tuple[Any, ...]]
    overrides: tuple[str, ...] = ()
    cpu: tuple[str, ...] = ()
    cpu_grid: Mapping[str, tuple[Any, ...]] | None = None


@dataclass(frozen=True)
class RunSpec:
    """One ``fit`` process: its name, the folder it logs into, and its argument list."""

    experiment: str
    name: str
    log_dir: Path
    args: tuple[str, ...] = field(repr=False)

    def command(self, python: str = sys.executable) -> list[str]:
        return [python, "-m", "bnlightning", "fit", *self.args]

    def shell(self) -> str:
        """The command as one copy-pasteable shell line (``python`` from PATH)."""
        return shlex.join(self.command("python"))


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        Experiment(
            "vgg-lr",
            "Fig. 1 / §1: VGG standard vs BN at lr 0.1 and 0.5 (standard stays at chance at 0.5; BN ~80-83 % test)",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch"), LR: (0.1, 0.5)},
            cpu=CPU_VGG,
        ),
        Experiment(
            "vgg-noisy",
            "Fig. 2: noisy BN trains about as well as BN; both beat standard",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch", "noisy_batch"), LR: (0.1,)},
            cpu=CPU_VGG,
        ),
        Experiment(
            "vgg-ics",
            "Fig. 3: ICS on VGG layers 5 and 10 is not reduced by BN (||G-G'|| similar or larger, cos lower)",
            ("configs/vgg.yaml", "configs/experiments/measure_vgg_ics.yaml"),
            {NORM: ("none", "batch"), LR: (0.1, 0.01)},
        ),
        Experiment(
            "vgg-landscape",
            "Fig. 4: with BN the loss band is narrow, gradients ~2 orders more predictive, beta_eff flatter",
            ("configs/vgg.yaml", "configs/experiments/measure_vgg_landscape.yaml"),
            {NORM: ("none", "batch"), LR: (0.1,)},
        ),
        Experiment(
            "vgg-lp",
            "§3.3: l1, l2 and linf normalizations train as well as BN",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch", "l1", "l2", "linf"), LR: (0.1,)},
            cpu=CPU_VGG,
        ),
        Experiment(
            "vgg-partial-bn",
            "Seed 004: VGG-A with a single BatchNorm after conv 4 vs none, lr 0.01",
            ("configs/vgg_a_bn4.yaml",),
            {NORM: ("none", "batch"), LR: (0.01,)},
        ),
        Experiment(
            "dln",
            "Fig. 5 / 4: deep linear network — with BN G and G' are almost uncorrelated (ICS layers 9 and 17), landscape far smoother",
            ("configs/dln.yaml", "configs/experiments/measure_dln.yaml"),
            {NORM: ("none", "batch"), LR: (1e-6, 1e-7)},
            cpu=("--trainer.max_steps=1000", "--trainer.accelerator=cpu", "--config=configs/experiments/measure_dln_cpu.yaml"),
            cpu_grid={NORM: ("none", "batch"), LR: (1e-6,)},
        ),
        Experiment(
            "mlp-sigmoid",
            "Ioffe & Szegedy Fig. 1: BN reaches the baseline's accuracy in far fewer steps, stable activation quantiles, larger lr tolerated",
            ("configs/mlp_sigmoid.yaml", "configs/experiments/measure_activations.yaml"),
            {NORM: ("none", "batch", "noisy_batch"), LR: (0.1, 0.5, 2.0)},
            cpu=("--trainer.max_steps=600", "--trainer.accelerator=cpu", "--trainer.log_every_n_steps=10", "--config=configs/experiments/measure_activations_cpu.yaml"),
            cpu_grid={NORM: ("none", "batch", "noisy_batch"), LR: (0.1, 1.0)},
        ),
        Experiment(
            "dln-curvature",
            "§9 (beyond the paper): does BN lower the curvature, as the beta-smoothness argument predicts? lambda_max and trace over training, DLN",
            ("configs/dln.yaml", "configs/experiments/measure_curvature_dln.yaml"),
            {NORM: ("none", "batch"), LR: (1e-6,)},
            cpu=("--trainer.max_steps=1000", "--trainer.accelerator=cpu"),
        ),
        Experiment(
            "vgg-curvature",
            "§9 (beyond the paper): lambda_max and Hessian trace over training, VGG standard vs BN",
            ("configs/vgg.yaml", "configs/experiments/measure_curvature.yaml"),
            {NORM: ("none", "batch"), LR: (0.1,)},
            cpu=(*CPU_VGG, "--config=configs/experiments/measure_curvature_cpu.yaml"),
        ),
        Experiment(
            "dln-eos",
            "Cohen et al. 2021: full-batch gradient descent drives lambda_max up to the stability limit 2/lr (sharpness ratio 1), standard vs BN",
            ("configs/dln.yaml", "configs/experiments/measure_curvature_dln.yaml"),
            {NORM: ("none", "batch"), LR: (1e-6, 3e-6, 1e-5)},
            cpu=("--trainer.max_steps=1000", "--trainer.accelerator=cpu"),
        ),
        # --- issue 12: the other claims about BatchNorm (docs/reproduction-cpu.md, "Other claims") ---
        Experiment(
            "bn-batch-size",
            "Claim 1 [seeds 000, 003]: BN degrades at small batches, LayerNorm/GroupNorm do not (lr = lr_128 * B/128, same epochs; BN train- vs eval-mode accuracy)",
            ("configs/vgg.yaml", "configs/experiments/batch_size.yaml"),
            {NORM: ("none", "batch", "group", "layer"), BATCH: (2, 4, 8, 16, 32, 128)},
            overrides=("--trainer.max_steps=-1", "--trainer.max_epochs=40"),
            cpu=(*CPU_MLP, "--model.init_args.activation=relu", "--model.init_args.optimizer.init_args.lr=0.8", "--trainer.max_steps=-1", "--trainer.max_epochs=4"),
            cpu_grid={NORM: ("none", "batch", "group", "layer"), BATCH: (2, 8, 32, 128)},
        ),
        Experiment(
            "lr-range",
            "Claim 3 [all seeds]: BN trains at higher learning rates: the largest lr that trains, accuracy vs lr (extends vgg-lr)",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch"), LR: (0.01, 0.03, 0.1, 0.3, 1.0, 2.0)},
            cpu=CPU_VGG,
            cpu_grid={NORM: ("none", "batch"), LR: (0.01, 0.1, 1.0, 2.0)},
        ),
        Experiment(
            "mean-shift",
            "Claim 6 [seed 003]: at initialisation, without BN, examples' activations align with depth and one label wins; BN and scaled WS prevent it",
            ("configs/vgg.yaml", "configs/experiments/meanshift.yaml"),
            {NORM: ("none", "batch"), WS: (False, True)},
            cpu=(*CPU_VGG, "--model.init_args.config=D", "--trainer.max_steps=1", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0"),
        ),
        Experiment(
            "init-gain",
            "Claim 2 [seeds 000, 001; Ioffe & Szegedy]: with BN one can be less careful about initialisation (weight gain 0.1-10)",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch"), GAIN: (0.1, 0.3, 1.0, 3.0, 10.0), INIT: ("xavier_uniform", "kaiming")},
            cpu=(*CPU_MLP, "--trainer.max_steps=600"),
            cpu_grid={NORM: ("none", "batch"), GAIN: (0.1, 1.0, 10.0)},
        ),
        Experiment(
            "bn-placement",
            "Claim 4 [seeds 001, 002]: BN before vs after the activation, affine on/off: accuracy, ICS and landscape side by side",
            ("configs/mlp_sigmoid.yaml", "configs/experiments/measure_placement.yaml"),
            {NORM: ("none", "batch"), POSITION: ("before", "after"), AFFINE: (True, False)},
            cpu=("--trainer.accelerator=cpu", "--trainer.max_steps=600", "--trainer.log_every_n_steps=10"),
            # CPU: the four BN variants only; the standard network at the same settings is init-gain's gain=1 run.
            cpu_grid={NORM: ("batch",), POSITION: ("before", "after"), AFFINE: (True, False)},
        ),
        Experiment(
            "bn-regularizer",
            "Claim 5 [seeds 002, 003; Ioffe & Szegedy]: BN regularises: none / dropout / BN / BN + dropout, train-validation gap",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch"), DROPOUT: (0.0, 0.5)},
            cpu=(*CPU_MLP, "--trainer.max_steps=2000", "--model.init_args.optimizer.init_args.lr=0.5"),
        ),
        Experiment(
            "normfree",
            "Claim 7 [seed 003]: plain and BN VGG across learning rates, the baselines of the normalizer-free VGG (run with normfree-nf)",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch"), LR: (0.03, 0.1, 0.3, 1.0)},
            cpu=CPU_VGG,
            cpu_grid={NORM: ("none", "batch"), LR: (0.1, 1.0)},
        ),
        Experiment(
            "normfree-nf",
            "Claim 7 [seed 003]: VGG without BN but with scaled weight standardisation + AGC trains like BN across learning rates",
            ("configs/vgg.yaml", "configs/experiments/normfree.yaml"),
            {LR: (0.03, 0.1, 0.3, 1.0)},
            overrides=(f"--{NORM}=none", f"--{WS}=true"),
            cpu=CPU_VGG,
            cpu_grid={LR: (0.1, 1.0)},
        ),
        Experiment(
            "resnet-residual",
            "Claim 8 [seed 003]: at initialisation BN downscales each residual branch relative to the skip path (ResNet-20 and -110)",
            ("configs/resnet20.yaml", "configs/experiments/measure_residual.yaml"),
            {NORM: ("none", "batch"), DEPTH: (20, 110)},
            cpu=(*CPU_RESNET, "--trainer.max_steps=1", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0"),
        ),
        Experiment(
            "resnet",
            "Claim 8 [seed 003]: ResNet-20 with and without BN across learning rates (the baselines of resnet-nf)",
            ("configs/resnet20.yaml",),
            {NORM: ("none", "batch"), LR: (0.03, 0.1, 0.3, 1.0)},
            cpu=CPU_RESNET,
            cpu_grid={NORM: ("none", "batch"), LR: (0.1,)},
        ),
        Experiment(
            "resnet-nf",
            "Claims 7 + 8 [seed 003]: normalizer-free ResNet-20 (scaled WS + SkipInit + AGC) trains like the BN ResNet",
            ("configs/resnet20.yaml", "configs/experiments/normfree.yaml"),
            {LR: (0.03, 0.1, 0.3, 1.0)},
            overrides=(f"--{NORM}=none", f"--{WS}=true", "--model.init_args.skipinit=true"),
            cpu=CPU_RESNET,
            cpu_grid={LR: (0.1,)},
        ),
    ]
}


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


def logger_override(experiment: str, name: str, runs_dir: str, project: str, csv_class: str | None = None) -> str:
    """``--trainer.logger=[CSV, W&B]`` naming this run: replaces the config's logger list.

    A list given on the command line replaces the YAML's list (jsonargparse), so both
    loggers are restated: the CSV log the report reads and the W&B run, grouped by
    experiment.
    """
    csv_class = csv_class or _csv_logger_class()
    loggers = [
        {"class_path": csv_class, "init_args": {"save_dir": runs_dir, "name": experiment, "version": name}},
        {"class_path": "bnlightning.loggers.WandbLogger", "init_args": {"project": project, "save_dir": runs_dir, "group": experiment, "name": name, "tags": [experiment]}},
    ]
    return "--trainer.logger=" + json.dumps(loggers, separators=(",", ":"))


def _csv_logger_class() -> str:
    """The project's resuming CSVLogger when present, else Lightning's."""
    try:
        from bnlightning import loggers

        if hasattr(loggers, "CSVLogger"):
            return "bnlightning.loggers.CSVLogger"
    except ImportError:  # pragma: no cover - the package always has loggers
        pass
    return "lightning.pytorch.loggers.CSVLogger"


def _config_path(path: str) -> str:
    """``path`` as given when it exists from here (short commands), else under the repository."""
    return path if Path(path).exists() else str(REPO / path)


def expand(
    experiment: Experiment,
    seeds: Sequence[int],
    runs_dir: str = "runs",
    cpu: bool = False,
    extra: Sequence[str] = (),
    project: str = "bnlightning",
) -> list[RunSpec]:
    """Every run of ``experiment``: the grid's combinations times ``seeds``."""
    if not seeds:
        raise ValueError("give at least one seed")
    name = experiment.name + ("-cpu" if cpu else "")
    grid = dict(experiment.cpu_grid if cpu and experiment.cpu_grid is not None else experiment.grid)
    grid[SEED] = tuple(seeds)
    keys = list(grid)
    specs = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        rname = run_name(values)
        args = [f"--config={_config_path(c)}" for c in experiment.configs]
        fixed = list(experiment.overrides) + (list(experiment.cpu) if cpu else [])
        args += [f"--config={_config_path(a[len('--config='):])}" if a.startswith("--config=") else a for a in fixed]
        args += [f"--{k}={_value_text(v)}" for k, v in values.items()]
        args += [logger_override(name, rname, runs_dir, project), f"--trainer.default_root_dir={runs_dir}/{name}/{rname}"]
        args += list(extra)
        specs.append(RunSpec(name, rname, Path(runs_dir) / name / rname, tuple(args)))
    return specs


def run_state(spec: RunSpec, cwd: Path = REPO) -> tuple[str, bool]:
    """``(status from run.json or "new", whether it has a checkpoint)`` of ``spec``'s folder."""
    from bnlightning.runstate import read_status

    folder = spec.log_dir if spec.log_dir.is_absolute() else cwd / spec.log_dir
    ckpts = folder / "checkpoints"
    has_ckpt = ckpts.is_dir() and any(ckpts.glob("*.ckpt"))
    return str(read_status(folder).get("status", "new")), has_ckpt


def run_all(specs: Sequence[RunSpec], cwd: Path = REPO, quiet: bool = False) -> list[tuple[RunSpec, str]]:
    """Run ``specs`` one after another; returns each run's outcome.

    Outcomes: ``ok`` (completed), ``diverged`` (a result, not a failure: its
    ``diverged_at_step`` is in metrics.csv), ``skipped`` (finished by an earlier
    invocation), ``interrupted`` (SIGTERM/SIGUSR1: checkpoint saved; the next invocation
    resumes it with ``--ckpt_path last``) or ``failed``. A SIGTERM to this runner is passed
    on to the running ``fit`` (which saves and stops) and no further run starts.
    """
    results: list[tuple[RunSpec, str]] = []
    stop: list[int] = []
    child: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: Any) -> None:
        stop.append(signum)
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    old = signal.signal(signal.SIGTERM, forward) if threading.current_thread() is threading.main_thread() else None
    try:
        for i, spec in enumerate(specs, 1):
            tag = f"[{i}/{len(specs)}] {spec.experiment}/{spec.name}"
            status, has_ckpt = run_state(spec, cwd)
            if status in ("completed", "diverged") or stop:
                outcome = "skipped" if not stop else "not started"
                print(f"{tag}: {outcome}" + (f" (already {status})" if not stop else " (runner stopped by a signal)"), flush=True)
                results.append((spec, outcome))
                continue
            command = spec.command() + (["--ckpt_path=last"] if has_ckpt else [])
            print(f"{tag} ..." + (f" (resuming the {status} run)" if has_ckpt else ""), flush=True)
            start = time.monotonic()
            log = spec.log_dir.parent / f"{spec.name}.out"
            log_path = (cwd / log) if not log.is_absolute() else log
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a" if has_ckpt else "w") as out:
                proc = subprocess.Popen(command, cwd=cwd, stdout=out if quiet else None, stderr=subprocess.STDOUT if quiet else None)
                child[:] = [proc]
                returncode = proc.wait()
                child.clear()
            outcome = _outcome(returncode, run_state(spec, cwd)[0])
            text = {
                "ok": "ok",
                "diverged": "ok (diverged: a result)",
                "interrupted": "INTERRUPTED (checkpoint saved; run the same command again to resume)",
            }.get(outcome, f"FAILED (exit {returncode}; output in {log_path})")
            print(f"{tag}: {text} in {time.monotonic() - start:.0f}s", flush=True)
            results.append((spec, outcome))
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return results


def _outcome(returncode: int, status: str) -> str:
    """A run's outcome from its exit status and the status it recorded."""
    if returncode == 0 and status in ("completed", "diverged"):
        return "ok" if status == "completed" else "diverged"
    if status == "interrupted" or returncode in (-signal.SIGTERM, 128 + signal.SIGTERM, 128 + signal.SIGUSR1):
        return "interrupted"
    return "failed"


# --- W&B sweeps -----------------------------------------------------------------------
#: Experiments whose sweep YAML is generated from this registry (``write_sweep``) and kept equal to it by a test.
GENERATED_SWEEPS: tuple[str, ...] = (
    "bn-batch-size", "lr-range", "mean-shift", "init-gain", "bn-placement", "bn-regularizer", "normfree", "normfree-nf",
    "resnet-residual", "resnet", "resnet-nf",
)


def sweep_config(experiment: Experiment, seeds: Sequence[int] = (0, 1, 2)) -> dict[str, Any]:
    """The W&B grid sweep of ``experiment`` (paper scale): its grid plus the seeds, same configs and overrides."""
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
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": parameters,
        "command": command,
    }


def write_sweep(name: str, folder: str | os.PathLike[str] = REPO / "configs" / "sweeps") -> Path:
    """Write ``configs/sweeps/<name>.yaml`` from the registry (the file is generated; edit the registry).

    Example::

        python -c "from bnlightning.experiments import write_sweep; write_sweep('bn-batch-size')"
    """
    import yaml

    e = EXPERIMENTS[name]
    header = (
        f"# W&B sweep, GENERATED from bnlightning/experiments.py (write_sweep({name!r})); a test keeps them equal.\n"
        f"# {e.claim}\n"
        f"#   wandb sweep configs/sweeps/{name}.yaml && wandb agent ENTITY/PROJECT/SWEEP_ID\n"
        f"# or locally: python -m bnlightning.experiments sweep configs/sweeps/{name}.yaml --run\n"
    )
    path = Path(folder) / f"{name}.yaml"
    path.write_text(header + yaml.safe_dump(sweep_config(e), sort_keys=False, width=200))
    return path


SWEEP_METHODS = ("grid", "random", "bayes")


def load_sweep(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a sweep YAML with wandb's own loader and check it; returns the config dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the YAML is not a valid sweep for ``wandb sweep`` (one line saying why).
    """
    path = Path(path)
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
        import sweeps as wandb_sweeps  # type: ignore[import-not-found]

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
        elif not any(c in ("${args}", "${args_no_hyphens}", "${args_json}", "${args_no_boolean_flags}") for c in command):
            problems.append("command must contain ${args} so the agent can pass the parameters")
    return problems


def _sweep_base_args(config: Mapping[str, Any]) -> list[str]:
    """The fixed part of the sweep's command after ``bnlightning fit`` (its --config files...)."""
    command = [str(c) for c in config.get("command") or []]
    if "fit" not in command:
        raise ValueError("the sweep's command must run `python -m bnlightning fit ...`")
    tail = [c for c in command[command.index("fit") + 1 :] if not (c.startswith("${") and c.endswith("}"))]
    # Config paths are relative to the repository root, where the agent runs.
    return [_config_path(c) if i and tail[i - 1] == "--config" else c for i, c in enumerate(tail)]


def expand_sweep(
    config: Mapping[str, Any], runs_dir: str = "runs", extra: Sequence[str] = (), name: str | None = None, project: str = "bnlightning"
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
        raise ValueError(f"only grid sweeps expand locally; this one is {config.get('method')!r} (use `wandb sweep` + `wandb agent`)")
    sweep_name = name or str(config.get("name") or "sweep")
    base = _sweep_base_args(config)
    params = config["parameters"]
    keys = list(params)
    choices = [params[k]["values"] if "values" in params[k] else [params[k]["value"]] for k in keys]
    specs = []
    for combo in itertools.product(*choices):
        values = dict(zip(keys, combo))
        agent_args = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]
        rname = run_name(values)
        args = base + agent_args + [logger_override(sweep_name, rname, runs_dir, project), f"--trainer.default_root_dir={runs_dir}/{sweep_name}/{rname}"] + list(extra)
        specs.append(RunSpec(sweep_name, rname, Path(runs_dir) / sweep_name / rname, tuple(args)))
    return specs


# --- command line ---------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bnlightning.experiments", description=__doc__.split("\n\n")[0], epilog="Arguments after `--` are appended to every fit command.")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the experiments and the claims they reproduce")
    for action, text in (("show", "print the fit commands, one per line"), ("run", "run the fit commands here, one after another")):
        q = sub.add_parser(action, help=text)
        q.add_argument("names", nargs="+", metavar="EXPERIMENT", help=f"one or more of: {', '.join(EXPERIMENTS)}")
        q.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; with --cpu 0 1)")
        q.add_argument("--cpu", action="store_true", help="the CPU-sized variant (fewer steps; VGG on the digits substitute)")
        q.add_argument("--runs-dir", default="runs", help="where runs log (default runs/)")
        q.add_argument("--project", default="bnlightning", help="W&B project")
        if action == "run":
            q.add_argument("--quiet", action="store_true", help="send each run's output to <runs-dir>/<experiment>/<run>.out")
    q = sub.add_parser("sweep", help="expand a W&B grid sweep YAML into local runs (no W&B server needed)")
    q.add_argument("file", help="sweep YAML, e.g. configs/sweeps/vgg-lr.yaml")
    q.add_argument("--run", action="store_true", help="run the commands (default: print them)")
    q.add_argument("--runs-dir", default="runs")
    q.add_argument("--project", default="bnlightning")
    q.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (1 if any run failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    args = _parser().parse_args(argv)
    try:
        if args.action == "list":
            for e in EXPERIMENTS.values():
                n = len(list(itertools.product(*e.grid.values())))
                print(f"{e.name:16s} {n} settings x seeds   {e.claim}")
            return 0
        if args.action == "sweep":
            specs = expand_sweep(load_sweep(args.file), args.runs_dir, extra, project=args.project)
            run, quiet = args.run, args.quiet
        else:
            unknown = [n for n in args.names if n not in EXPERIMENTS]
            if unknown:
                raise ValueError(f"unknown experiment {unknown[0]!r}; known: {', '.join(EXPERIMENTS)}")
            seeds = args.seeds if args.seeds is not None else ([0, 1] if args.cpu else [0, 1, 2])
            specs = [s for n in args.names for s in expand(EXPERIMENTS[n], seeds, args.runs_dir, args.cpu, extra, args.project)]
            run, quiet = args.action == "run", getattr(args, "quiet", False)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if not run:
        try:
            for spec in specs:
                print(spec.shell())
        except BrokenPipeError:  # `... | head`: the reader left, nothing is wrong
            sys.stderr.close()
        return 0
    results = run_all(specs, Path.cwd(), quiet)
    done = [s.name for s, o in results if o in ("ok", "diverged", "skipped")]
    interrupted = [s.name for s, o in results if o in ("interrupted", "not started")]
    failed = [s.name for s, o in results if o == "failed"]
    line = f"done: {len(done)}/{len(results)} runs finished"
    line += f"; interrupted (run again to resume): {', '.join(interrupted)}" if interrupted else ""
    line += f"; failed: {', '.join(failed)}" if failed else ""
    print(line)
    return 1 if failed or interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
