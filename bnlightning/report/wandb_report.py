"""A W&B Report with the offline report's panels, built with wandb-workspaces.

Runs are grouped by normalization and learning rate through the config keys the CLI
logs (``cli.model.init_args.norm``, ``cli.model.init_args.optimizer.init_args.lr``);
each line is the mean over seeds with a min-max band, as in the offline figures.

Building is local: wandb-workspaces looks a runset's project up on the server only when
the runset names an entity and project, which :func:`build_report` does only when
``link_runsets=True`` (needed to save). :func:`report_spec` builds the same report with
unlinked runsets and returns its JSON spec, so tests and ``--dry-run`` need no network.
``Report.save()`` needs a W&B account and an API key.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import wandb_workspaces.reports.v2 as wr

from bnlightning import _private
from bnlightning.callbacks.functional.names import (
    ACT,
    HESSIAN,
    HESSIAN_SHARPNESS_RATIO,
    HESSIAN_TRACE,
    ICS_COS,
    ICS_L2,
    ICS_REL,
    LANDSCAPE_BETA_EFF,
    LANDSCAPE_GRAD_L2_MAX,
    LANDSCAPE_LOSS_MAX,
    LANDSCAPE_LOSS_MIN,
    MEANSHIFT,
    MEANSHIFT_MAJORITY_SHARE,
    RESVAR,
)

#: Config keys (as the CLI logs them under ``cli``) that define a setting.
NORM_KEY = "cli.model.init_args.norm"
LR_KEY = "cli.model.init_args.optimizer.init_args.lr"
SEED_KEY = "cli.seed_everything"
DATASET_KEY = "cli.dataset_name"
GROUP_KEYS = [NORM_KEY, LR_KEY]


def _runset(entity: str, project: str, name: str, group: str | None, link: bool) -> wr.Runset:
    """Runs of the project (optionally one W&B group = one experiment), grouped by norm and lr."""
    return wr.Runset(
        entity=entity if link else "",
        project=project if link else "",
        name=name,
        filters=f"Group = '{group}'" if group else "",
        groupby=[f"config.{k}" for k in GROUP_KEYS],
    )


#: The x axis of every curve, and its title.
STEP = "trainer/global_step"
STEP_TITLE = "optimizer step"

#: Layers per panel when a per-layer metric is split by layer (a panel per group of layers).
LAYERS_PER_PANEL = 4

#: Per-layer metric families: key prefix -> the part of the key after ``<prefix>/<layer>/`` (None:
#: the key is ``<prefix>/<layer>``). Used to find layer names in logged keys and to build panels.
LAYER_FAMILIES: dict[str, str | None] = {
    ICS_L2: None,
    ICS_COS: None,
    ICS_REL: None,
    ACT: "q15",
    MEANSHIFT: "cos",
    RESVAR: "ratio",
}


def _line(
    title: str, y: list[Any] | None = None, regex: str | None = None, log_y: bool = False, y_title: str = ""
) -> wr.LinePlot:
    """A line plot over the trainer's step, aggregated over seeds (mean, min-max band), axes titled."""
    return wr.LinePlot(
        title=title,
        x=STEP,
        y=y or [],
        metric_regex=regex,
        log_y=log_y or None,
        title_x=STEP_TITLE,
        title_y=y_title or title,
        groupby_aggfunc="mean",
        groupby_rangefunc="minmax",
        layout=wr.Layout(w=8, h=6),
    )


def layer_groups(layers: Sequence[str], size: int = LAYERS_PER_PANEL) -> list[list[str]]:
    """``layers`` in forward order, cut into groups of at most ``size`` (one panel each).

    >>> layer_groups(["net.fc1", "net.fc2", "net.fc3"], size=2)
    [['net.fc1', 'net.fc2'], ['net.fc3']]
    """
    if size < 1:
        raise ValueError(f"layers per panel: got {size}; expected a positive integer")
    return [list(layers[i : i + size]) for i in range(0, len(layers), size)]


def layers_in(keys: Iterable[str]) -> dict[str, list[str]]:
    """The layer names found in logged metric keys, per family of :data:`LAYER_FAMILIES`, in first-seen order.

    >>> layers_in(["ics/l2/net.fc9", "ics/l2/net.fc17", "act/net.fc2/q15", "act/net.fc2/q50", "train/loss"])["ics/l2"]
    ['net.fc9', 'net.fc17']
    """
    found: dict[str, list[str]] = {family: [] for family in LAYER_FAMILIES}
    for key in keys:
        for family, leaf in LAYER_FAMILIES.items():
            rest = key[len(family) + 1 :] if key.startswith(family + "/") else None
            if rest is None:
                continue
            layer = rest if leaf is None else (rest[: -len(leaf) - 1] if rest.endswith("/" + leaf) else None)
            if layer and layer not in found[family]:
                found[family].append(layer)
    return found


def _per_layer(
    title: str, family: str, pattern: str, layers: Sequence[str] | None, log_y: bool, y_title: str
) -> list[wr.LinePlot]:
    """One panel per group of layers (``<family>/<layer>`` keys), or one regex panel over all layers when none are
    known.

    ``pattern`` is the key after ``<family>/<layer>``: ``""`` or e.g. ``"/q(15|50|85)"``.
    """
    if not layers:
        return [_line(title, regex=f"{re.escape(family)}/.*{pattern}", log_y=log_y, y_title=y_title)]
    panels = []
    for group in layer_groups(layers):
        names = "|".join(re.escape(layer) for layer in group)
        span = group[0] if len(group) == 1 else f"{group[0]} … {group[-1]}"
        panels.append(
            _line(f"{title}: {span}", regex=f"{re.escape(family)}/({names}){pattern}$", log_y=log_y, y_title=y_title)
        )
    return panels


Section = tuple[str, str, list[Any]]


def panel_sections(layers: Mapping[str, Sequence[str]] | None = None) -> list[Section]:
    """(heading, explanation, panels) for each section of the report.

    Args:
        layers: layer names per family of :data:`LAYER_FAMILIES` (see :func:`layers_in`); a family
            with layers gets one panel per group of :data:`LAYERS_PER_PANEL` layers, one without a
            single panel matching every layer.
    """
    known = dict(layers or {})
    return [
        _training_section(),
        _ics_section(known),
        _landscape_section(),
        _activations_section(known),
        _hessian_section(),
        _meanshift_section(known),
        _residual_section(known),
    ]


def _training_section() -> Section:
    return (
        "Training curves",
        "Train/validation accuracy and loss per normalization and learning rate (Santurkar et al. Fig. 1-2).",
        [
            _line("train accuracy", ["train/acc"], y_title="accuracy (fraction)"),
            _line("validation accuracy", ["val/acc"], y_title="accuracy (fraction)"),
            _line("train loss", ["train/loss"], log_y=True, y_title="training loss (log)"),
            wr.BarPlot(
                title="diverged at step (runs that diverged)",
                metrics=["diverged_at_step"],
                title_x="optimizer step of the first non-finite loss",
                layout=wr.Layout(w=8, h=6),
            ),
        ],
    )


def _ics_section(known: Mapping[str, Sequence[str]]) -> Section:
    return (
        "Internal covariate shift",
        "||G - G'||_2, cos(G, G') and the relative change per layer (Def. 2.1, Fig. 3 and 5), "
        "one panel per group of layers.",
        [
            *_per_layer("ICS ||G - G'||_2", ICS_L2, "", known.get(ICS_L2), True, "||G - G'||_2 (log)"),
            *_per_layer("ICS cos(G, G')", ICS_COS, "", known.get(ICS_COS), False, "cos(G, G') (1 = no shift)"),
            *_per_layer("ICS ||G - G'|| / ||G||", ICS_REL, "", known.get(ICS_REL), True, "||G - G'|| / ||G|| (log)"),
        ],
    )


def _landscape_section() -> Section:
    return (
        "Loss landscape",
        "Loss along the gradient (min and max over step sizes), gradient predictiveness and effective "
        "beta-smoothness (Fig. 4).",
        [
            _line(
                "loss landscape (min, max)",
                [LANDSCAPE_LOSS_MIN, LANDSCAPE_LOSS_MAX],
                log_y=True,
                y_title="loss along -g (log)",
            ),
            _line(
                "gradient predictiveness",
                [LANDSCAPE_GRAD_L2_MAX],
                log_y=True,
                y_title="max_s ||g - g(w - s g)||_2 (log)",
            ),
            _line("effective beta-smoothness", [LANDSCAPE_BETA_EFF], log_y=True, y_title="beta_eff (log)"),
        ],
    )


def _activations_section(known: Mapping[str, Sequence[str]]) -> Section:
    return (
        "Activations",
        "Quantiles 15/50/85 % of pre-activations per layer (Ioffe & Szegedy Fig. 1), one panel per group of "
        "layers, and the saturated share.",
        [
            *_per_layer("activation quantiles", ACT, "/q(15|50|85)", known.get(ACT), False, "pre-activation quantile"),
            _line("saturated / dead units", regex=f"{ACT}/.*/(saturated|dead)", y_title="share of units"),
        ],
    )


def _hessian_section() -> Section:
    return (
        "Curvature (Hessian)",
        "Top eigenvalues and trace of the training-loss Hessian on the measured batch, and "
        "lambda_max / (2(1+beta)/eta): 1 is the edge of stability (Cohen et al. 2021).",
        [
            _line("Hessian top eigenvalues", regex=rf"{HESSIAN}/(lambda_max|eig_\d+)", y_title="eigenvalue of H"),
            _line("Hessian trace", [HESSIAN_TRACE], y_title="tr(H) (Hutchinson)"),
            _line("sharpness ratio", [HESSIAN_SHARPNESS_RATIO], y_title="lambda_max / (2(1+beta)/eta)"),
        ],
    )


def _meanshift_section(known: Mapping[str, Sequence[str]]) -> Section:
    return (
        "Mean shift",
        "Mean pairwise cosine of examples' activations per layer (1 = every example looks alike) and the "
        "share of examples given the majority class.",
        [
            *_per_layer("mean shift cos", MEANSHIFT, "/cos", known.get(MEANSHIFT), False, "mean cos(A_a, A_b)"),
            _line("majority-class share", [MEANSHIFT_MAJORITY_SHARE], y_title="share of examples"),
        ],
    )


def _residual_section(known: Mapping[str, Sequence[str]]) -> Section:
    return (
        "Residual branches",
        "var(branch) / var(skip) per residual block (De & Smith 2020): below 1 the block is close to the identity.",
        [
            *_per_layer(
                "residual branch / skip variance",
                RESVAR,
                "/ratio",
                known.get(RESVAR),
                True,
                "var(branch) / var(skip) (log)",
            )
        ],
    )


def build_report(
    entity: str,
    project: str,
    title: str = "bnlightning: how does BatchNorm help optimization?",
    groups: list[str] | None = None,
    link_runsets: bool = True,
    layers: Mapping[str, Sequence[str]] | None = None,
) -> wr.Report:
    """The report object; nothing is sent until ``.save()``.

    Args:
        entity: W&B entity (user or team) that owns the project.
        project: W&B project holding the runs.
        title: report title.
        groups: W&B run groups (one per experiment, e.g. ``vgg-lr``) to show as separate
            runsets; None shows every run of the project in one runset.
        link_runsets: give runsets the entity/project (required to save; triggers a
            server lookup when the spec is built).
        layers: layer names per per-layer metric family (:func:`layers_in` of the logged keys,
            e.g. from local runs with :func:`layers_of_runs`): one panel per group of layers.
    """
    if not entity or not project:
        raise ValueError("entity and project must both be non-empty")
    names: list[str | None] = list(groups) if groups else [None]
    blocks: list[Any] = [
        wr.P(
            "Runs grouped by normalization and learning rate; lines are means over seeds with a min-max band. "
            f"Group keys: {', '.join(GROUP_KEYS)}; data set: config {DATASET_KEY} (substitute data sets are labelled "
            "as such)."
        )
    ]
    for heading, text, panels in panel_sections(layers):
        blocks += [wr.H2(heading), wr.P(text)]
        runsets = [_runset(entity, project, name or "all runs", name, link_runsets) for name in names]
        blocks.append(wr.PanelGrid(runsets=runsets, panels=panels))
    return wr.Report(
        entity=entity,
        project=project,
        title=title[:128],
        description="Generated by `python -m bnlightning wandb-report`.",
        blocks=blocks,
    )


def report_spec(
    entity: str,
    project: str,
    title: str = "bnlightning: how does BatchNorm help optimization?",
    groups: list[str] | None = None,
    layers: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The report's JSON spec built entirely offline (runsets left unlinked)."""
    report = build_report(entity, project, title, groups, link_runsets=False, layers=layers)
    spec = _private.report_viewspec(report)  # wandb-workspaces' own serialisation
    return {
        "entity": entity,
        "project": project,
        "title": report.title,
        "runsets_project": f"{entity}/{project}",
        "viewspec": spec,
    }


def layers_of_runs(folders: Sequence[str | Path]) -> dict[str, list[str]]:
    """:func:`layers_in` of the metric names in every ``metrics.csv`` header under ``folders`` (local CSV logs)."""
    keys: list[str] = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("metrics.csv")):
            with path.open(newline="") as f:
                keys += next(csv.reader(f), [])
    return layers_in(keys)
