"""The experiment registry: every experiment of PROTOCOL §7 (and past it) as data.

Each :class:`Experiment` names its configs, a grid of CLI keys and the claim it tests.
It is the one source of truth: ``runs.expand`` turns it into ``fit`` commands and
``sweeps.write_sweep`` generates ``configs/sweeps/<name>.yaml`` from it (a test keeps
every sweep file equal to its entry). Config paths are written ``configs/...`` as in a
checkout; ``configs.config_path`` finds them in the installed package otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The CLI keys the grids sweep (LightningCLI dotted names).
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

#: The deep linear network is a regression: no accuracy, its sweeps minimise the training loss.
TRAIN_LOSS = ("train/loss", "minimize")

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


#: CPU-sized MLP for the other claims about BatchNorm: Ioffe & Szegedy's 3x100 MLP on the 8x8 digits.
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


#: AdamW instead of the paper's SGD (the grid sets its lr): β = (0.9, 0.999), decoupled weight decay 0.01.
#: Its stability threshold for λmax(P⁻¹H) is (2 + 2β₁)/(η(1 − β₁)) = 38/η (Cohen et al. 2022).
ADAMW: tuple[str, ...] = (
    "--model.init_args.optimizer=torch.optim.AdamW",
    "--model.init_args.optimizer.init_args.weight_decay=0.01",
)


@dataclass(frozen=True)
class Experiment:
    """A reproducible comparison: configs, a grid of CLI keys, a claim of the paper.

    Args:
        name: experiment name (also the run folder, the W&B group and the sweep file's name).
        claim: the result of the paper it reproduces (shown by ``list``).
        configs: YAML files given to ``fit --config``, in order (later ones override).
        grid: CLI key -> values; every combination is a setting.
        overrides: extra CLI arguments for every run.
        cpu_overrides: extra CLI arguments for the CPU-sized variant (appended after ``overrides``);
            empty when the experiment has no CPU-sized variant.
        cpu_grid: replaces ``grid`` in the CPU-sized variant (e.g. fewer learning rates).
        sweep_metric: ``(metric, goal)`` of its W&B sweep (``goal`` is ``maximize`` or ``minimize``).

    Example:
        >>> e = EXPERIMENTS["vgg-lr"]
        >>> e.grid[LR], bool(e.cpu_overrides), e.sweep_metric
        ((0.1, 0.5), True, ('val/acc', 'maximize'))
    """

    name: str
    claim: str
    configs: tuple[str, ...]
    grid: Mapping[str, tuple[Any, ...]]
    overrides: tuple[str, ...] = ()
    cpu_overrides: tuple[str, ...] = ()
    cpu_grid: Mapping[str, tuple[Any, ...]] | None = None
    sweep_metric: tuple[str, str] = ("val/acc", "maximize")


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        Experiment(
            "vgg-lr",
            "Fig. 1 / §1: VGG standard vs BN at lr 0.1 and 0.5 (standard stays at chance at 0.5; BN ~80-83 % test)",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch"), LR: (0.1, 0.5)},
            cpu_overrides=CPU_VGG,
        ),
        Experiment(
            "vgg-noisy",
            "Fig. 2: noisy BN trains about as well as BN; both beat standard",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch", "noisy_batch"), LR: (0.1,)},
            cpu_overrides=CPU_VGG,
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
            # At the paper's eta = 0.1 (PROTOCOL §6, configs/vgg_l*.yaml); robustness to eta is lr-range's question.
            {NORM: ("none", "batch", "l1", "l2", "linf"), LR: (0.1,)},
            cpu_overrides=CPU_VGG,
        ),
        Experiment(
            "vgg-partial-bn",
            "Seed 004: VGG-A with a single BatchNorm after conv 4 vs none, lr 0.01",
            ("configs/vgg_a_bn4.yaml",),
            {NORM: ("none", "batch"), LR: (0.01,)},
        ),
        Experiment(
            "dln",
            "Fig. 5 / 4: deep linear network — with BN G and G' are almost uncorrelated (ICS layers 9 and 17), "
            "landscape far smoother",
            ("configs/dln.yaml", "configs/experiments/measure_dln.yaml"),
            {NORM: ("none", "batch"), LR: (1e-6, 1e-7)},
            cpu_overrides=(
                "--trainer.max_steps=1000",
                "--trainer.accelerator=cpu",
                "--config=configs/experiments/measure_dln_cpu.yaml",
            ),
            cpu_grid={NORM: ("none", "batch"), LR: (1e-6,)},
            sweep_metric=TRAIN_LOSS,
        ),
        Experiment(
            "mlp-sigmoid",
            "Ioffe & Szegedy Fig. 1: BN reaches the baseline's accuracy in far fewer steps, stable activation "
            "quantiles, larger lr tolerated",
            ("configs/mlp_sigmoid.yaml", "configs/experiments/measure_activations.yaml"),
            {NORM: ("none", "batch", "noisy_batch"), LR: (0.1, 0.5, 2.0)},
            cpu_overrides=(
                "--trainer.max_steps=600",
                "--trainer.accelerator=cpu",
                "--trainer.log_every_n_steps=10",
                "--config=configs/experiments/measure_activations_cpu.yaml",
            ),
            cpu_grid={NORM: ("none", "batch", "noisy_batch"), LR: (0.1, 1.0)},
        ),
        Experiment(
            "dln-curvature",
            "§9 (beyond the paper): does BN lower the curvature, as the beta-smoothness argument predicts? lambda_max "
            "and trace over training, DLN",
            ("configs/dln.yaml", "configs/experiments/measure_curvature_dln.yaml"),
            {NORM: ("none", "batch"), LR: (1e-6,)},
            cpu_overrides=("--trainer.max_steps=1000", "--trainer.accelerator=cpu"),
            sweep_metric=TRAIN_LOSS,
        ),
        Experiment(
            "vgg-curvature",
            "§9 (beyond the paper): lambda_max and Hessian trace over training, VGG standard vs BN",
            ("configs/vgg.yaml", "configs/experiments/measure_curvature.yaml"),
            {NORM: ("none", "batch"), LR: (0.1,)},
            cpu_overrides=(*CPU_VGG, "--config=configs/experiments/measure_curvature_cpu.yaml"),
        ),
        Experiment(
            "dln-eos",
            "Cohen et al. 2021: full-batch gradient descent drives lambda_max up to the stability limit 2/lr "
            "(sharpness ratio 1), standard vs BN",
            ("configs/dln.yaml", "configs/experiments/measure_curvature_dln.yaml"),
            {NORM: ("none", "batch"), LR: (1e-6, 3e-6, 1e-5)},
            cpu_overrides=("--trainer.max_steps=1000", "--trainer.accelerator=cpu"),
            sweep_metric=TRAIN_LOSS,
        ),
        # --- the other claims about BatchNorm (docs/reproduction-cpu.md, "Other claims") ---
        Experiment(
            "bn-batch-size",
            "Claim 1 [seeds 000, 003]: BN degrades at small batches, LayerNorm/GroupNorm do not (lr = lr_128 * B/128, "
            "same epochs; BN train- vs eval-mode accuracy)",
            ("configs/vgg.yaml", "configs/experiments/batch_size.yaml"),
            {NORM: ("none", "batch", "group", "layer"), BATCH: (2, 4, 8, 16, 32, 128)},
            overrides=("--trainer.max_steps=-1", "--trainer.max_epochs=40"),
            cpu_overrides=(
                *CPU_MLP,
                "--model.init_args.activation=relu",
                "--model.init_args.optimizer.init_args.lr=0.8",
                "--trainer.max_steps=-1",
                "--trainer.max_epochs=4",
            ),
            cpu_grid={NORM: ("none", "batch", "group", "layer"), BATCH: (2, 8, 32, 128)},
        ),
        Experiment(
            "lr-range",
            "Claim 3 [all seeds]: BN trains at higher learning rates: the largest lr that trains, accuracy vs lr "
            "(extends vgg-lr)",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch"), LR: (0.01, 0.03, 0.1, 0.3, 1.0, 2.0)},
            cpu_overrides=CPU_VGG,
            # CPU: eta 0.01 dropped (no verdict needs it) to keep all eight claims under 40 CPU-minutes
            cpu_grid={NORM: ("none", "batch"), LR: (0.1, 1.0, 2.0)},
        ),
        Experiment(
            "mean-shift",
            "Claim 6 [the article Batch Normalization… or not?]: at initialisation, without BN, examples' activations "
            "align with depth and one label wins; BN and scaled WS prevent it",
            ("configs/vgg.yaml", "configs/experiments/meanshift.yaml"),
            {NORM: ("none", "batch"), WS: (False, True)},
            cpu_overrides=(
                *CPU_VGG,
                "--model.init_args.config=D",
                "--trainer.max_steps=1",
                "--trainer.log_every_n_steps=1",
                "--trainer.limit_val_batches=0",
            ),
        ),
        Experiment(
            "init-gain",
            "Claim 2 [seeds 000, 001; Ioffe & Szegedy]: with BN one can be less careful about initialisation (weight "
            "gain 0.1-10)",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch"), GAIN: (0.1, 0.3, 1.0, 3.0, 10.0), INIT: ("xavier_uniform", "kaiming")},
            cpu_overrides=(*CPU_MLP, "--trainer.max_steps=600"),
            cpu_grid={NORM: ("none", "batch"), GAIN: (0.1, 1.0, 10.0)},
        ),
        Experiment(
            "bn-placement",
            "Claim 4 [seeds 001, 002]: BN before vs after the activation, affine on/off: accuracy, ICS and landscape "
            "side by side",
            ("configs/mlp_sigmoid.yaml", "configs/experiments/measure_placement.yaml"),
            {NORM: ("none", "batch"), POSITION: ("before", "after"), AFFINE: (True, False)},
            cpu_overrides=("--trainer.accelerator=cpu", "--trainer.max_steps=600", "--trainer.log_every_n_steps=10"),
            # CPU: the four BN variants only; the standard network at the same settings is init-gain's gain=1 run.
            cpu_grid={NORM: ("batch",), POSITION: ("before", "after"), AFFINE: (True, False)},
        ),
        Experiment(
            "bn-regularizer",
            "Claim 5 [seeds 002, 003; Ioffe & Szegedy]: BN regularises: none / dropout / BN / BN + dropout, "
            "train-validation gap",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch"), DROPOUT: (0.0, 0.5)},
            cpu_overrides=(*CPU_MLP, "--trainer.max_steps=2000", "--model.init_args.optimizer.init_args.lr=0.5"),
        ),
        Experiment(
            "normfree",
            "Claim 7 [the article Batch Normalization… or not?]: plain and BN VGG across learning rates, the baselines "
            "of the normalizer-free VGG (run with normfree-nf)",
            ("configs/vgg.yaml",),
            {NORM: ("none", "batch"), LR: (0.03, 0.1, 0.3, 1.0)},
            # No CPU variant: at CPU size these baselines are lr-range's runs at eta 0.1 and 1 (the
            # same commands, the same numbers), so claim 7 on CPU reads lr-range-cpu's folder.
        ),
        Experiment(
            "normfree-nf",
            "Claim 7 [the article Batch Normalization… or not?]: VGG without BN but with scaled weight standardisation "
            "+ AGC trains like BN across learning rates",
            ("configs/vgg.yaml", "configs/experiments/normfree.yaml"),
            {LR: (0.03, 0.1, 0.3, 1.0)},
            overrides=(f"--{NORM}=none", f"--{WS}=true"),
            cpu_overrides=CPU_VGG,
            cpu_grid={LR: (0.1, 1.0)},
        ),
        Experiment(
            "resnet-residual",
            "Claim 8 [the article Batch Normalization… or not?]: at initialisation BN downscales each residual branch "
            "relative to the skip path (ResNet-20 and -110)",
            ("configs/resnet20.yaml", "configs/experiments/measure_residual.yaml"),
            {NORM: ("none", "batch"), DEPTH: (20, 110)},
            cpu_overrides=(
                *CPU_RESNET,
                "--trainer.max_steps=1",
                "--trainer.log_every_n_steps=1",
                "--trainer.limit_val_batches=0",
            ),
        ),
        Experiment(
            "resnet",
            "Claim 8 [the article Batch Normalization… or not?]: ResNet-20 with and without BN across learning rates "
            "(the baselines of resnet-nf)",
            ("configs/resnet20.yaml",),
            {NORM: ("none", "batch"), LR: (0.03, 0.1, 0.3, 1.0)},
            cpu_overrides=CPU_RESNET,
            cpu_grid={NORM: ("none", "batch"), LR: (0.1,)},
        ),
        Experiment(
            "resnet-nf",
            "Claims 7 + 8 [the article Batch Normalization… or not?]: normalizer-free ResNet-20 (scaled WS + SkipInit "
            "+ AGC) trains like the BN ResNet",
            ("configs/resnet20.yaml", "configs/experiments/normfree.yaml"),
            {LR: (0.03, 0.1, 0.3, 1.0)},
            overrides=(f"--{NORM}=none", f"--{WS}=true", "--model.init_args.skipinit=true"),
            cpu_overrides=CPU_RESNET,
            cpu_grid={LR: (0.1,)},
        ),
        # --- beyond the paper: the stability gauges of PROTOCOL §12 (docs/reproduction-cpu.md, "Stability gauges") ---
        Experiment(
            "gauges-sgd",
            "§12 (beyond the paper): gradient-direction curvature vs 2/eta, ||dL/dy|| at the norm outputs (Thm 4.1), "
            "effective lr, SLQ density; VGG standard vs BN, SGD",
            ("configs/vgg.yaml", "configs/experiments/measure_gauges.yaml"),
            {NORM: ("none", "batch"), LR: (0.1,)},
            cpu_overrides=(*CPU_VGG, "--config=configs/experiments/measure_gauges_cpu.yaml"),
        ),
        Experiment(
            "gauges-adamw",
            "§12 (beyond the paper): the same gauges under AdamW; preconditioned sharpness lambda_max(P^-1 H) vs "
            "38/eta (Cohen et al. 2022)",
            ("configs/vgg.yaml", "configs/experiments/measure_gauges.yaml"),
            {NORM: ("none", "batch"), LR: (0.001,)},
            overrides=ADAMW,
            cpu_overrides=(*CPU_VGG, "--config=configs/experiments/measure_gauges_cpu.yaml"),
        ),
        Experiment(
            "gauges-mlp-sgd",
            "§12 (beyond the paper): the stability gauges on the sigmoid MLP, standard vs BN, SGD",
            ("configs/mlp_sigmoid.yaml", "configs/experiments/measure_gauges.yaml"),
            {NORM: ("none", "batch"), LR: (0.1,)},
            cpu_overrides=(
                "--trainer.accelerator=cpu",
                "--trainer.log_every_n_steps=10",
                "--config=configs/experiments/measure_gauges_mlp_cpu.yaml",
            ),
        ),
        Experiment(
            "gauges-mlp-adamw",
            "§12 (beyond the paper): the stability gauges on the sigmoid MLP, standard vs BN, AdamW (preconditioned "
            "sharpness)",
            ("configs/mlp_sigmoid.yaml", "configs/experiments/measure_gauges.yaml"),
            {NORM: ("none", "batch"), LR: (0.001,)},
            overrides=ADAMW,
            cpu_overrides=(
                "--trainer.accelerator=cpu",
                "--trainer.log_every_n_steps=10",
                "--config=configs/experiments/measure_gauges_mlp_cpu.yaml",
            ),
        ),
    ]
}
