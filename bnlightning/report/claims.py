"""Figures and tables for sweeps beyond (norm, lr): the other claims about BatchNorm.

The paper figures (``figures.py``) group runs by (norm, lr). The claims sweep other keys too
(batch size, init gain, BN position and affine, dropout, weight standardisation, callbacks),
so here runs are grouped by their whole *setting* (``Run.setting``, defined in
``bnlightning.settings``) and named by the keys that differ between the runs of a family
(:func:`~bnlightning.report.runs.varying_keys`); seeds are the repeats. Per family:

- ``sweep``: final validation accuracy (mean over seeds, min-max bar) against the first
  numeric swept key with at least three values (batch size, init gain, lr), one line per
  combination of the other keys; a second panel shows BN's train-mode validation accuracy
  when it was logged (``val/acc_train_mode``), else the final training loss. Without such a
  key, a bar chart per setting with the train-validation accuracy gap beside it.
- ``meanshift``: per-layer ``meanshift/<layer>/cos`` and channel mean over depth.
- ``residual``: per-block var(branch) / var(skip) over depth (``resvar/<block>/ratio``).
- ``measures``: ICS (``ics/rel/<layer>``) and landscape (``landscape/beta_eff``,
  ``grad_l2_max``) over steps, one line per setting, when a key beyond (norm, lr) is swept.

``claims.md`` holds one table row per setting with seeds, mean ± std and min-max.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnlightning.callbacks.functional.names import (
    EFFLR,
    GRADACT,
    ICS_COS,
    ICS_REL,
    LANDSCAPE_BETA_EFF,
    LANDSCAPE_GRAD_L2_MAX,
    MEANSHIFT,
    MEANSHIFT_MAJORITY_SHARE,
    RESVAR,
    ics_key,
    meanshift_key,
    resvar_key,
)
from bnlightning.report.figures import (
    STYLE,
    Figure,
    _band,
    _finish,
    _log_y,
    combo_colors,
    family_settings,
    plt,
    subplots,
    y_label,
)
from bnlightning.report.page import markdown_table
from bnlightning.report.runs import (
    Run,
    format_value,
    group_by,
    group_settings,
    layer_order,
    setting_label,
    short_key,
    short_layer,
    varying_keys,
)

__all__ = ["claim_rows", "draw_claims", "setting_label", "varying_keys", "write_claims_markdown"]

#: Numeric keys that make a good x axis, in order of preference.
X_KEYS = (
    "data.init_args.batch_size",
    "model.init_args.init_gain",
    "model.init_args.optimizer.init_args.lr",
    "model.init_args.dropout",
)


def _mean_last(run: Run, metric: str, n: int = 5) -> float | None:
    """Mean of the last ``n`` logged values (train metrics are one batch each)."""
    s = run.series(metric)
    if s is None or not len(s[1]):
        return None
    v = s[1][-n:]
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def run_results(run: Run) -> dict[str, float | None]:
    """The numbers a claim table shows for one run."""
    val = run.final("val/acc")
    train = _mean_last(run, "train/acc")
    out: dict[str, float | None] = {
        "val acc": val,
        "val acc (BN train mode)": run.final("val/acc_train_mode"),
        "train acc (last 5 logs)": train,
        "train - val acc": train - val if train is not None and val is not None else None,
        "final train loss": _mean_last(run, "train/loss", 1),
    }
    for prefix in (f"{ICS_COS}/", f"{ICS_REL}/"):
        for layer in run.layers(prefix):
            s = run.series(prefix + layer)
            out[f"median {prefix}{short_layer(layer)}"] = (
                float(np.nanmedian(s[1])) if s is not None and len(s[1]) else None
            )
    for metric in (LANDSCAPE_BETA_EFF, LANDSCAPE_GRAD_L2_MAX):
        s = run.series(metric)
        if s is not None and len(s[1]):
            out[f"median {metric}"] = float(np.nanmedian(s[1]))
    return out


def _stats(values: Sequence[float | None]) -> tuple[float, float, float, float] | None:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None
    return float(np.mean(xs)), float(np.std(xs)), min(xs), max(xs)


def _fmt(st: tuple[float, float, float, float] | None) -> str:
    if st is None:
        return "—"
    mean, std, lo, hi = st
    return f"{mean:.3g} ± {std:.2g} [{lo:.3g}, {hi:.3g}]"


def claim_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the claims table of one family: one row per setting."""
    keys = varying_keys(runs)
    groups = group_settings(runs, keys)
    results = {id(r): run_results(r) for r in runs}
    columns: list[str] = []
    for r in runs:
        for c, v in results[id(r)].items():
            if v is not None and c not in columns:
                columns.append(c)
    header = [short_key(k) for k in keys] + ["seeds"] + [f"{c} (mean ± std [min, max])" for c in columns] + ["diverged"]
    rows = []
    for rs in groups.values():
        seeds = ",".join(str(r.seed) for r in sorted(rs, key=lambda r: r.seed if r.seed is not None else -1))
        diverged = sum(r.diverged_at_step is not None for r in rs)
        rows.append(
            [format_value(k, rs[0].value(k)) for k in keys]
            + [seeds]
            + [_fmt(_stats([results[id(r)].get(c) for r in rs])) for c in columns]
            + [f"{diverged}/{len(rs)}"]
        )
    return header, rows


def _x_key(runs: Sequence[Run], keys: Sequence[str]) -> str | None:
    for k in X_KEYS:
        if k in keys:
            values = {r.value(k) for r in runs}
            if len(values) >= 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return k
    return None


def sweep_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    """Final accuracy against the swept key (or per setting), mean over seeds with a min-max bar."""
    keys = varying_keys(runs)
    if not keys or not any(r.final("val/acc") is not None for r in runs):
        return None
    x_key = _x_key(runs, keys)
    if x_key is None:
        return _bar_figure(family, runs, keys, out, dpi)
    others = [k for k in keys if k != x_key]
    second = "val/acc_train_mode" if any(r.final("val/acc_train_mode") is not None for r in runs) else "train/loss"
    fig, axes = subplots(1, 2, 5.0, 3.4)
    axes = axes[0]
    colors = combo_colors(runs, others)  # the norms keep their colours of the training curves
    for key, rs in group_settings(runs, others).items():
        label, color = setting_label(rs[0], others) if others else rs[0].norm_label, colors[key]
        for ax, metric in zip(axes, ("val/acc", second)):
            pts = []
            for group in group_settings(rs, [x_key]).values():
                st = _stats([r.final(metric) if metric != "train/loss" else _mean_last(r, metric, 1) for r in group])
                if st is not None:
                    pts.append((float(group[0].value(x_key)), *st, sum(r.diverged_at_step is not None for r in group)))
            if not pts:
                continue
            xs, means, _, los, his, div = (np.array(c) for c in zip(*pts))
            ax.errorbar(
                xs, means, yerr=[means - los, his - means], fmt="o-", color=color, label=label, capsize=3, lw=1.3, ms=4
            )
            for x, m, d in zip(xs, means, div):
                if d:
                    ax.plot([x], [m], "x", color=color, ms=10, mew=2)
    axes[0].set_ylabel("final val accuracy (fraction)")
    axes[1].set_ylabel(
        "final val accuracy, BN in\ntrain mode (fraction)"
        if second == "val/acc_train_mode"
        else f"final {y_label('train/loss', runs)}"
    )
    if second == "train/loss":
        axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2 if x_key == "data.init_args.batch_size" else 10)
        ax.set_xlabel(short_key(x_key))
        ax.grid(alpha=0.3)
    return _finish(
        fig,
        out,
        family,
        "sweep",
        f"{{model}} on {{dataset}}: final accuracy vs {short_key(x_key)}; mean over seeds, bar = min-max, x = a seed "
        "diverged",
        f"Accuracy vs {short_key(x_key)} — {{model}} on {{dataset}}",
        dpi,
    )


def _bar_figure(
    family: tuple[str, str], runs: Sequence[Run], keys: Sequence[str], out: Path, dpi: int
) -> Figure | None:
    groups = group_settings(runs, keys)
    labels = [setting_label(rs[0], keys).replace(", ", "\n") for rs in groups.values()]
    # Side by side up to three settings; beyond, one panel per row so the tick labels fit.
    stacked = len(groups) > 3
    fig, axes = (
        subplots(2, 1, max(8.0, 1.7 * len(groups)), 3.5)
        if stacked
        else subplots(1, 2, max(4.0, 1.6 * len(groups)), 3.8)
    )
    colors = {id(s.runs[0]): s.color for s in family_settings(runs)}  # each setting's colour in the curve figures
    panels = (
        ("val acc", "final val accuracy", "val accuracy (fraction)"),
        ("train - val acc", "train acc (last 5 logs) - val acc", "accuracy gap (fraction)"),
    )
    for ax, (metric, title, ylabel) in zip(axes.flat, panels):
        sts = [_stats([run_results(r)[metric] for r in rs]) for rs in groups.values()]
        xs = np.arange(len(sts))
        means = np.array([s[0] if s else np.nan for s in sts])
        lo = np.array([s[0] - s[2] if s else 0 for s in sts])
        hi = np.array([s[3] - s[0] if s else 0 for s in sts])
        ax.bar(
            xs,
            means,
            yerr=[lo, hi],
            color=[colors.get(id(rs[0]), "C0") for rs in groups.values()],
            capsize=4,
            alpha=0.8,
        )
        for x, rs in zip(xs, groups.values()):
            diverged = sum(r.diverged_at_step is not None for r in rs)
            if diverged:  # a diverged run's accuracy is chance: say why the bar is low
                ax.annotate(
                    f"{diverged}/{len(rs)} diverged",
                    (x, 0),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    color="k",
                )
        ax.set_xticks(xs, labels)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    return _finish(
        fig,
        out,
        family,
        "sweep",
        "{model} on {dataset}: final accuracy per setting; mean over seeds, bar = min-max",
        "Accuracy per setting — {model} on {dataset}",
        dpi,
    )


def meanshift_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    """Mean cosine between examples and per-channel mean, per layer over depth, at the first measurement."""
    layers = sorted(
        {n.split("/")[1] for r in runs for n in r.metrics if n.startswith(f"{MEANSHIFT}/") and n.endswith("/cos")},
        key=layer_order,
    )
    if not layers:
        return None
    fig, axes = subplots(1, 2, 5.0, 3.4)
    axes = axes[0]
    for s in family_settings(runs):
        share = _stats([_first(r, MEANSHIFT_MAJORITY_SHARE) for r in s.runs])
        label = s.full_label + (f" (majority {share[0]:.2f})" if share else "")
        for ax, stat in zip(axes, ("cos", "channel_mean")):
            _over_depth(ax, s.runs, [meanshift_key(layer, stat) for layer in layers], s.color, label)
    axes[0].set_ylabel("mean cos(A_a, A_b), a != b\n(-1 to 1)")
    axes[1].set_ylabel("mean over channels of the\nchannel mean (activation value)")
    for ax in axes:
        ax.set_xlabel(f"layer ({short_layer(layers[0])} ... {short_layer(layers[-1])})")
        ax.grid(alpha=0.3)
    return _finish(
        fig,
        out,
        family,
        "meanshift",
        "Mean shift at initialisation (PROTOCOL §10) — {model} on {dataset}; mean over seeds, band = min-max",
        "Mean shift over depth at initialisation — {model} on {dataset}",
        dpi,
    )


def residual_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    """var(branch) / var(skip) per residual block over depth, at the first measurement (claim 8)."""
    blocks = sorted(
        {n.split("/")[1] for r in runs for n in r.metrics if n.startswith(f"{RESVAR}/") and n.endswith("/ratio")},
        key=layer_order,
    )
    if not blocks:
        return None
    fig, axes = subplots(1, 1, 7.0, 3.4)
    ax = axes[0][0]
    for s in family_settings(runs):
        own = [b for b in blocks if any(r.series(resvar_key(b, "ratio")) is not None for r in s.runs)]
        _over_depth(ax, s.runs, [resvar_key(b, "ratio") for b in own], s.color, s.full_label)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("residual block (input to output)")
    ax.set_ylabel("var(branch) / var(skip) (ratio)")
    ax.grid(alpha=0.3)
    return _finish(
        fig,
        out,
        family,
        "residual",
        "Residual branch vs skip path at initialisation — {model} on {dataset}; mean over seeds, band = min-max",
        "Residual branch / skip variance at initialisation — {model} on {dataset}",
        dpi,
    )


#: Keys the paper figures (``figures.py``) already separate runs by.
PAPER_KEYS = ("model.init_args.norm", "model.init_args.optimizer.init_args.lr")


def measures_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    """ICS and landscape over training, one line per setting (claim 4: BN position x affine).

    The paper figures show ICS per layer and the landscape in figures of their own; this one
    puts the relative ICS and the landscape of every setting side by side, for sweeps beyond
    (norm, lr) (BN before / after the activation, affine on / off). Drawn only when a family
    logged ``ics/rel/`` or ``landscape/`` metrics and sweeps such a key.
    """
    keys = varying_keys(runs)
    layers = sorted({layer for r in runs for layer in r.layers(f"{ICS_REL}/")}, key=layer_order)
    panels = [(ics_key("rel", layer), f"ICS — {short_layer(layer)}") for layer in layers]
    landscape = (
        (LANDSCAPE_BETA_EFF, "effective beta-smoothness"),
        (LANDSCAPE_GRAD_L2_MAX, "gradient predictiveness max ||g - g'||"),
    )
    panels += [(m, t) for m, t in landscape if any(r.series(m) is not None for r in runs)]
    if not panels or all(k in PAPER_KEYS for k in keys):
        return None
    fig, axes = subplots(1, len(panels), 3.6, 3.4)
    for s in family_settings(runs):
        for ax, (metric, _) in zip(axes[0], panels):
            _band(ax, s.runs, metric, s.color, s.full_label, s.style)  # mean over seeds, min-max band
    for ax, (metric, title) in zip(axes[0], panels):
        _log_y(ax)  # ICS spans decades between settings (standard 1e-3, BN after 0.4)
        ax.set_title(title)
        ax.set_ylabel(y_label(f"{ICS_REL}/" if metric.startswith(f"{ICS_REL}/") else metric, runs))
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    return _finish(
        fig,
        out,
        family,
        "measures",
        "ICS and loss landscape per setting — {model} on {dataset}; mean over seeds, band = min-max",
        "ICS and landscape per setting — {model} on {dataset}",
        dpi,
    )


def _first(run: Run, metric: str) -> float | None:
    s = run.series(metric)
    return float(s[1][0]) if s is not None and len(s[1]) else None


def _over_depth(ax: Any, runs: Sequence[Run], metrics: Sequence[str], color: str, label: str) -> None:
    """The first logged value of each metric (one per layer or block, input to output): mean over seeds, min-max
    band."""
    vals = np.array([[np.nan if (v := _first(r, m)) is None else v for m in metrics] for r in runs])
    depth = np.arange(1, len(metrics) + 1)
    ax.plot(depth, np.nanmean(vals, 0), "o-", color=color, label=label, ms=3, lw=1.3)
    if len(runs) > 1:
        ax.fill_between(depth, np.nanmin(vals, 0), np.nanmax(vals, 0), color=color, alpha=0.2, lw=0)


def draw_claims(runs: Sequence[Run], out: Path, dpi: int = 90) -> list[Figure]:
    """The claims figures every family has data for."""
    from bnlightning.report.gauges import draw_gauges  # it reads this module's helpers

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with plt.rc_context(STYLE):
        for family, family_runs in group_by(runs, "family").items():
            for draw in (sweep_figure, measures_figure, meanshift_figure, residual_figure):
                fig = draw(family, family_runs, out, dpi)
                if fig is not None:
                    written.append(fig)
        written += draw_gauges(runs, out, dpi)
    return written


def write_claims_markdown(runs: Sequence[Run], out: Path) -> Path:
    """``claims.md``: per family, one row per setting (every swept key, seeds, mean ± std [min, max])."""
    parts = ["# Results per setting (every swept key; seeds are repeats)", ""]
    for (model, dataset), rs in group_by(runs, "family").items():
        header, rows = claim_rows(rs)
        parts += [f"## {model} on {dataset}", "", markdown_table(header, rows), ""]
        if any(r.series(MEANSHIFT_MAJORITY_SHARE) is not None for r in rs):
            parts += [_meanshift_table(rs), ""]
        if any(n.startswith(f"{RESVAR}/") for r in rs for n in r.metrics):
            parts += [_residual_table(rs), ""]
        if any(n.startswith((f"{GRADACT}/", f"{EFFLR}/")) for r in rs for n in r.metrics):
            from bnlightning.report.gauges import gauges_table

            parts += ["Stability gauges (PROTOCOL §12): medians over the measurements", "", gauges_table(rs), ""]
    path = out / "claims.md"
    path.write_text("\n".join(parts))
    return path


def _meanshift_table(runs: Sequence[Run]) -> str:
    """First, middle and last measured layer of each setting (settings may differ in depth)."""
    keys = varying_keys(runs)
    header = [short_key(k) for k in keys] + [
        "seeds",
        "layers",
        "cos first",
        "cos middle",
        "cos last",
        "channel mean last",
        "majority share",
    ]
    rows = []
    for rs in group_settings(runs, keys).values():
        own = sorted(
            {n.split("/")[1] for r in rs for n in r.metrics if n.startswith(f"{MEANSHIFT}/") and n.endswith("/cos")},
            key=layer_order,
        )
        if not own:
            continue
        picks = [own[0], own[len(own) // 2], own[-1]]
        rows.append(
            [format_value(k, rs[0].value(k)) for k in keys]
            + [",".join(str(r.seed) for r in rs), f"{short_layer(own[0])} … {short_layer(own[-1])} ({len(own)})"]
            + [_fmt(_stats([_first(r, meanshift_key(n, "cos")) for r in rs])) for n in picks]
            + [
                _fmt(_stats([_first(r, meanshift_key(own[-1], "channel_mean")) for r in rs])),
                _fmt(_stats([_first(r, MEANSHIFT_MAJORITY_SHARE) for r in rs])),
            ]
        )
    return markdown_table(header, rows)


def _residual_table(runs: Sequence[Run]) -> str:
    blocks = sorted(
        {n.split("/")[1] for r in runs for n in r.metrics if n.startswith(f"{RESVAR}/") and n.endswith("/ratio")},
        key=layer_order,
    )
    keys = varying_keys(runs)
    header = [short_key(k) for k in keys] + ["seeds", "blocks", "ratio first block", "ratio last block", "median ratio"]
    rows = []
    for rs in group_settings(runs, keys).values():
        own = [b for b in blocks if any(r.series(resvar_key(b, "ratio")) is not None for r in rs)]
        if not own:
            continue
        med = [float(np.nanmedian([_first(r, resvar_key(b, "ratio")) or np.nan for b in own])) for r in rs]
        rows.append(
            [format_value(k, rs[0].value(k)) for k in keys]
            + [",".join(str(r.seed) for r in rs), str(len(own))]
            + [_fmt(_stats([_first(r, resvar_key(b, "ratio")) for r in rs])) for b in (own[0], own[-1])]
            + [_fmt(_stats(med))]
        )
    return markdown_table(header, rows)
