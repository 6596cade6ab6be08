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

from typing import Any

import wandb_workspaces.reports.v2 as wr

from bnlightning import _private

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


def _line(title: str, y: list[str] | None = None, regex: str | None = None, log_y: bool = False) -> wr.LinePlot:
    """A line plot over the trainer's step, aggregated over seeds (mean, min-max band)."""
    return wr.LinePlot(
        title=title,
        x="trainer/global_step",
        y=y or [],
        metric_regex=regex,
        log_y=log_y or None,
        groupby_aggfunc="mean",
        groupby_rangefunc="minmax",
        layout=wr.Layout(w=8, h=6),
    )


def panel_sections() -> list[tuple[str, str, list[Any]]]:
    """(heading, explanation, panels) for each section of the report."""
    return [
        (
            "Training curves",
            "Train/validation accuracy and loss per normalization and learning rate (Santurkar et al. Fig. 1-2).",
            [
                _line("train accuracy", ["train/acc"]),
                _line("validation accuracy", ["val/acc"]),
                _line("train loss", ["train/loss"], log_y=True),
                wr.BarPlot(title="diverged at step (runs that diverged)", metrics=["diverged_at_step"], layout=wr.Layout(w=8, h=6)),
            ],
        ),
        (
            "Internal covariate shift",
            "||G - G'||_2, cos(G, G') and the relative change per layer (Def. 2.1, Fig. 3 and 5).",
            [
                _line("ICS ||G - G'||_2", regex="ics/l2/.*", log_y=True),
                _line("ICS cos(G, G')", regex="ics/cos/.*"),
                _line("ICS ||G - G'|| / ||G||", regex="ics/rel/.*", log_y=True),
            ],
        ),
        (
            "Loss landscape",
            "Loss along the gradient (min and max over step sizes), gradient predictiveness and effective beta-smoothness (Fig. 4).",
            [
                _line("loss landscape (min, max)", ["landscape/loss_min", "landscape/loss_max"], log_y=True),
                _line("gradient predictiveness", ["landscape/grad_l2_max"], log_y=True),
                _line("effective beta-smoothness", ["landscape/beta_eff"], log_y=True),
            ],
        ),
        (
            "Activations",
            "Quantiles 15/50/85 % of pre-activations per layer (Ioffe & Szegedy Fig. 1) and the saturated share.",
            [
                _line("activation quantiles", regex="act/.*/q(15|50|85)"),
                _line("saturated / dead units", regex="act/.*/(saturated|dead)"),
            ],
        ),
    ]


def build_report(
    entity: str,
    project: str,
    title: str = "bnlightning: how does BatchNorm help optimization?",
    groups: list[str] | None = None,
    link_runsets: bool = True,
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
    """
    if not entity or not project:
        raise ValueError("entity and project must both be non-empty")
    names = groups or [None]
    blocks: list[Any] = [
        wr.P(
            "Runs grouped by normalization and learning rate; lines are means over seeds with a min-max band. "
            f"Group keys: {', '.join(GROUP_KEYS)}; data set: config {DATASET_KEY} (substitute data sets are labelled as such)."
        )
    ]
    for heading, text, panels in panel_sections():
        blocks += [wr.H2(heading), wr.P(text)]
        runsets = [_runset(entity, project, name or "all runs", name, link_runsets) for name in names]
        blocks.append(wr.PanelGrid(runsets=runsets, panels=panels))
    return wr.Report(entity=entity, project=project, title=title[:128], description="Generated by `python -m bnlightning wandb-report`.", blocks=blocks)


def report_spec(entity: str, project: str, title: str = "bnlightning: how does BatchNorm help optimization?", groups: list[str] | None = None) -> dict[str, Any]:
    """The report's JSON spec built entirely offline (runsets left unlinked)."""
    report = build_report(entity, project, title, groups, link_runsets=False)
    spec = _private.report_viewspec(report)  # wandb-workspaces' own serialisation
    return {"entity": entity, "project": project, "title": report.title, "runsets_project": f"{entity}/{project}", "viewspec": spec}
