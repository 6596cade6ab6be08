"""The paper's figures drawn with matplotlib (Agg) from runs read off disk.

One set of figures per *family* (architecture on one data set). Inside a family a
*setting* (every config key that differs between its runs but the seed: norm, batch size,
init gain ...; see ``runs.py``) keeps one colour in every figure (norms their paper colours);
the learning rate gets the line style, or its own column. Seeds are drawn as the mean with a
shaded min-max band. A diverged run ends early and gets a cross at its divergence step, and
the legend says how many seeds diverged.

Every figure has one legend (below its panels), y-axis labels with units, one y-range
where panels compare the same quantity side by side (the learning-rate columns, the layers
of one row), at most :data:`MAX_WIDTH_IN` inches wide, with text of at least
:data:`MIN_FONT_PT` points: the page shows it at 96 CSS px per inch, so ticks read at 12 px.

Figures (each only when the runs logged its metrics):

- ``accuracy``: train/val accuracy and train loss per learning rate (Santurkar Fig. 1-2,
  Ioffe & Szegedy Fig. 1a);
- ``ics``: ``||G - G'||`` and ``cos(G, G')`` per layer (Fig. 3 and 5);
- ``landscape``: loss band, gradient predictiveness, beta_eff (Fig. 4);
- ``activations``: 15/50/85 % quantiles of pre-activations per layer (Ioffe & Szegedy Fig. 1b-c).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.text import Text

from bnlightning.callbacks.functional.names import (
    ACT,
    HESSIAN_LAMBDA_MAX,
    HESSIAN_SHARPNESS_RATIO,
    HESSIAN_TRACE,
    ICS_COS,
    ICS_L2,
    ICS_REL,
    LANDSCAPE_BETA_EFF,
    LANDSCAPE_GRAD_L2_MAX,
    LANDSCAPE_LOSS,
    LANDSCAPE_LOSS_MAX,
    LANDSCAPE_LOSS_MIN,
    act_key,
)
from bnlightning.report.runs import (
    LR_KEY,
    NORM_KEY,
    Run,
    aggregate,
    group_by,
    group_settings,
    setting_label,
    short_layer,
    varying_keys,
)

NORM_COLORS: dict[str, str] = {
    "standard": "tab:blue",
    "BN": "tab:orange",
    "noisy BN": "tab:green",
    "l1 norm": "tab:red",
    "l2 norm": "tab:purple",
    "linf norm": "tab:brown",
    "LayerNorm": "tab:pink",
    "GroupNorm": "tab:olive",
}
LR_STYLES = ["-", "--", "-.", ":"]


#: Text sizes (points) of every figure: at the page's display size (the figure's inches at
#: 96 CSS px per inch, see ``page.py``) tick labels are 12 px, never below ``MIN_FONT_PT``.
STYLE: dict[Any, Any] = {
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 11,
}
MIN_FONT_PT = 9.0
#: Widest figure (inches): wider ones would be shrunk on a 1280 px screen until their text is unreadable.
MAX_WIDTH_IN = 13.0


@dataclass(frozen=True)
class Figure:
    """A written figure: its file, a one-line caption for the page, and what sets its text size on screen.

    ``size_in`` and ``dpi`` give the PNG's pixel size; ``min_font_pt`` is the smallest text in it
    (tick labels), so text on the page is ``min_font_pt / 72 * 96`` CSS px at the figure's
    natural display width (``size_in[0] * 96`` px).
    """

    path: Path
    caption: str
    family: tuple[str, str]
    size_in: tuple[float, float] = (0.0, 0.0)
    dpi: int = 0
    min_font_pt: float = 0.0


@dataclass(frozen=True)
class Setting:
    """One setting of a family as the figures draw it: its runs (the seeds), label, colour and line style.

    ``label`` names the keys that differ within the family except the learning rate, which
    gets the line style (and its own column in the training-curve figure); ``color`` is the
    same for this setting in every figure of the family.
    """

    runs: list[Run]
    label: str
    lr: float
    color: str
    style: str

    @property
    def full_label(self) -> str:
        return f"{self.label}, lr={self.lr:g}" if np.isfinite(self.lr) else self.label


def slug(text: str, limit: int = 32) -> str:
    """A file-name-safe, length-capped form of ``text`` (data-set labels are long)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower())[:limit].strip("-")


def family_slug(family: tuple[str, str]) -> str:
    model, dataset = family
    return f"{slug(model)}__{slug(dataset)}"


def combo_colors(runs: Sequence[Run], keys: Sequence[str]) -> dict[tuple[str, ...], str]:
    """One colour per combination of ``keys``' values: norms keep their paper colours, else a palette in setting
    order."""
    groups = group_settings(runs, keys)
    if all(k == NORM_KEY for k in keys):
        return {
            k: NORM_COLORS.get(rs[0].norm_label.split(" @")[0], f"C{i % 10}")
            for i, (k, rs) in enumerate(groups.items())
        }
    cmap = "tab10" if len(groups) <= 10 else "tab20"
    colors = plt.get_cmap(cmap).colors  # type: ignore[attr-defined]  # tab10/tab20 are ListedColormaps
    return {k: matplotlib.colors.to_hex(colors[i % len(colors)]) for i, k in enumerate(groups)}


def family_settings(runs: Sequence[Run]) -> list[Setting]:
    """The settings of one family (everything but the seed differs), ordered by lr, then norm and the other keys."""
    keys = varying_keys(runs)
    color_keys = [k for k in keys if k != LR_KEY]
    colors = combo_colors(runs, color_keys)
    lrs = sorted({r.lr if r.lr is not None else np.nan for r in runs})
    out = []
    for rs in group_settings(runs, keys).values():
        combo = tuple(repr(rs[0].value(k)) for k in color_keys) if color_keys else ("",)
        lr = rs[0].lr if rs[0].lr is not None else np.nan
        label = setting_label(rs[0], color_keys) if color_keys else rs[0].norm_label
        style = LR_STYLES[lrs.index(lr) % len(LR_STYLES)] if lr in lrs else "-"
        out.append(Setting(rs, label, lr, colors[combo], style))
    order = sorted(range(len(out)), key=lambda i: (out[i].lr if np.isfinite(out[i].lr) else 0.0, i))
    return [out[i] for i in order]


def loss_label(runs: Sequence[Run]) -> str:
    """The y-axis label of a loss, with its unit (from the model's ``loss`` setting)."""
    kinds = {str(r.model_args.get("loss", "cross_entropy")) for r in runs}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    return {
        "cross_entropy": "loss (cross-entropy, nats)",
        "mse": "loss (mean squared error)",
        "sum_squared": "loss (sum of squared errors)",
    }.get(kind, "loss")


#: y-axis labels with units, by metric (``{loss}`` is filled with :func:`loss_label`).
Y_LABELS = {
    "train/acc": "train accuracy (fraction)",
    "val/acc": "val accuracy (fraction)",
    "train/loss": "train {loss}",
    "val/loss": "val {loss}",
    f"{ICS_L2}/": "||G - G'||_2 (gradient norm)",
    f"{ICS_COS}/": "cos(G, G') (-1 to 1)",
    f"{ICS_REL}/": "||G - G'|| / ||G|| (ratio)",
    LANDSCAPE_LOSS: "{loss}",
    LANDSCAPE_GRAD_L2_MAX: "max ||g - g'||_2 (gradient norm)",
    LANDSCAPE_BETA_EFF: "beta_eff (loss / weight^2)",
    HESSIAN_LAMBDA_MAX: "lambda_max (loss / weight^2)",
    HESSIAN_TRACE: "trace (loss / weight^2)",
    HESSIAN_SHARPNESS_RATIO: "lambda_max * lr / (2(1+beta)) (ratio)",
    ACT: "pre-activation value",
}


def y_label(metric: str, runs: Sequence[Run]) -> str:
    return Y_LABELS.get(metric, metric).format(loss=loss_label(runs))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` logged points (train metrics are one batch each)."""
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def _band(
    ax: Axes, runs: Sequence[Run], metric: str, color: str, label: str, style: str = "-", smooth: int = 1
) -> bool:
    """Mean over seeds with a min-max band; crosses where seeds diverged. False if nothing to draw."""
    agg = aggregate(runs, metric)
    if agg is None:
        return False
    steps, mean, lo, hi = agg
    mean, lo, hi = _smooth(mean, smooth), _smooth(lo, smooth), _smooth(hi, smooth)
    diverged = [r for r in runs if r.diverged_at_step is not None]
    if diverged:
        label += f" ({len(diverged)}/{len(runs)} diverged)"
    ax.plot(steps, mean, style, color=color, label=label, lw=1.4)
    if len(runs) > 1:
        ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
    for r in diverged:
        s = r.series(metric)
        if s is None:
            continue
        finite = np.isfinite(s[1])
        y = s[1][finite][-1] if finite.any() else np.nanmax(hi)
        ax.plot([float(r.diverged_at_step or 0)], [y], "x", color=color, ms=9, mew=2)
    return True


def subplots(nrows: int, ncols: int, panel_w: float, panel_h: float, **kwargs: Any) -> tuple[plt.Figure, np.ndarray]:
    """A grid of panels at most :data:`MAX_WIDTH_IN` wide (always a 2-d array of axes)."""
    width = min(MAX_WIDTH_IN, max(6.0, panel_w * ncols + 0.4))
    return plt.subplots(nrows, ncols, figsize=(width, panel_h * nrows), squeeze=False, **kwargs)


def _one_legend(fig: plt.Figure) -> float:
    """Gather every panel's legend entries into one legend below the panels; returns its height in inches."""
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if not label.startswith("_"):
                handles.setdefault(label, h)
        if (legend := ax.get_legend()) is not None:
            legend.remove()
    if not handles:
        return 0.0
    longest = max(len(label) for label in handles)
    ncol = max(1, min(len(handles), int(fig.get_figwidth() * 72 / (longest * 5.2 + 40))))
    legend = fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, frameon=False)
    fig.canvas.draw()
    return legend.get_window_extent().height / fig.dpi + 0.1


def _finish(
    fig: plt.Figure, out: Path, family: tuple[str, str], kind: str, title: str, caption: str, dpi: int
) -> Figure:
    """One legend, readable text, title (``{model}``/``{dataset}`` filled in); save as ``<family>_<kind>.png``,
    close."""
    model, dataset = family
    path = out / f"{family_slug(family)}_{kind}.png"
    for ax in fig.axes:
        ax.tick_params(labelsize=STYLE["xtick.labelsize"])
    # Wrap to the figure's width: titles carry the full data-set label, which is long.
    width_chars = max(40, int(fig.get_figwidth() * 11))
    fig.suptitle(textwrap.fill(title.format(model=model, dataset=dataset), width_chars))
    legend_h = _one_legend(fig)
    fig.set_figheight(fig.get_figheight() + legend_h)
    fig.tight_layout(rect=(0, legend_h / fig.get_figheight(), 1, 1))
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    for t in texts:
        t.set_fontsize(max(t.get_fontsize(), MIN_FONT_PT))
    size = (float(fig.get_figwidth()), float(fig.get_figheight()))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Figure(
        path,
        caption.format(model=model, dataset=dataset),
        family,
        size,
        dpi,
        min(float(t.get_fontsize()) for t in texts),
    )


def _positive(ax: Axes) -> np.ndarray:
    ys = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [np.array([])])
    return ys[np.isfinite(ys) & (ys > 0)]


def _log_y(ax: Axes) -> None:
    """Log scale where the paper uses it, unless nothing is positive (a first layer's ICS is exactly 0)."""
    if len(_positive(ax)):
        ax.set_yscale("log")


def _log_if_wide(ax: Axes) -> None:
    """Log scale when positive data spans more than two decades (the DLN's loss does)."""
    ys = _positive(ax)
    if len(ys) and ys.max() / ys.min() > 100:
        ax.set_yscale("log")


def accuracy_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    """Train/val accuracy and train loss over steps, one column per (configured) learning rate, one y-range per row."""
    metrics = [
        m for m in ("train/acc", "val/acc", "train/loss", "val/loss") if any(r.series(m) is not None for r in runs)
    ]
    if "train/acc" in metrics:
        metrics = [m for m in metrics if m != "val/loss"]  # accuracy tells the story; keep the figure small
    if not metrics:
        return None
    settings = family_settings(runs)
    lrs = sorted({s.lr for s in settings})
    scaled = any(r.series("lr_scaled") is not None for r in runs)
    fig, axes = subplots(len(metrics), len(lrs), 3.6, 2.6, sharey="row")
    for col, lr in enumerate(lrs):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            for s in settings:
                if s.lr == lr or not np.isfinite(lr):
                    _band(ax, s.runs, metric, s.color, s.label, smooth=5 if metric.startswith("train/") else 1)
            if row == 0:
                ax.set_title(f"configured lr={lr:g}, scaled per run" if scaled else f"lr={lr:g}")
            if col == 0:
                ax.set_ylabel(y_label(metric, runs))
            if row == len(metrics) - 1:
                ax.set_xlabel("training step")
            if metric.endswith("loss"):
                _log_if_wide(ax)
    return _finish(
        fig,
        out,
        family,
        "accuracy",
        "{model} on {dataset}: mean over seeds, min-max band; x = diverged (train curves smoothed over 5 points)",
        "Training curves — {model} on {dataset}",
        dpi,
    )


def ics_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    """``||G - G'||_2`` (log), ``cos(G, G')`` and the relative change per layer, one y-range per row."""
    layers = sorted({layer for r in runs for layer in r.layers(f"{ICS_L2}/")}, key=lambda n: (len(n), n))
    if not layers:
        return None
    rows = [(f"{ICS_L2}/", True), (f"{ICS_COS}/", False), (f"{ICS_REL}/", False)]
    rows = [r for r in rows if any(run.series(r[0] + layers[0]) is not None for run in runs)]
    settings = family_settings(runs)
    fig, axes = subplots(len(rows), len(layers), 3.6, 2.6, sharey="row")
    for col, layer in enumerate(layers):
        for row, (prefix, log) in enumerate(rows):
            ax = axes[row][col]
            for s in settings:
                _band(ax, s.runs, prefix + layer, s.color, s.full_label, s.style)
            if row == 0:
                ax.set_title(short_layer(layer))
            if col == 0:
                ax.set_ylabel(y_label(prefix, runs))
            if row == len(rows) - 1:
                ax.set_xlabel("training step")
            if log:
                _log_y(ax)
    return _finish(
        fig,
        out,
        family,
        "ics",
        "Internal covariate shift (Santurkar et al. Def. 2.1) — {model} on {dataset}",
        "Internal covariate shift per layer — {model} on {dataset}",
        dpi,
    )


def landscape_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    """Loss band along the gradient, gradient predictiveness and beta_eff over steps."""
    if not any(r.series(LANDSCAPE_BETA_EFF) is not None or r.series(LANDSCAPE_LOSS_MIN) is not None for r in runs):
        return None
    fig, axes = subplots(1, 3, 4.2, 3.2)
    band_ax, grad_ax, beta_ax = axes[0]
    for s in family_settings(runs):
        lo, hi = aggregate(s.runs, LANDSCAPE_LOSS_MIN), aggregate(s.runs, LANDSCAPE_LOSS_MAX)
        if lo is not None and hi is not None:
            steps = np.intersect1d(lo[0], hi[0])
            low = lo[1][np.isin(lo[0], steps)]
            high = hi[1][np.isin(hi[0], steps)]
            band_ax.fill_between(steps, low, high, color=s.color, alpha=0.35, lw=0)
            band_ax.plot(steps, high, s.style, color=s.color, lw=0.8, label=s.full_label)
        _band(grad_ax, s.runs, LANDSCAPE_GRAD_L2_MAX, s.color, s.full_label, s.style)
        _band(beta_ax, s.runs, LANDSCAPE_BETA_EFF, s.color, s.full_label, s.style)
    band_ax.set_title("loss along the gradient\n(min..max over step sizes)")
    _log_if_wide(band_ax)
    grad_ax.set_title("gradient predictiveness")
    beta_ax.set_title("effective beta-smoothness")
    for ax, metric in (
        (band_ax, LANDSCAPE_LOSS),
        (grad_ax, LANDSCAPE_GRAD_L2_MAX),
        (beta_ax, LANDSCAPE_BETA_EFF),
    ):
        ax.set_ylabel(y_label(metric, runs))
        ax.set_xlabel("training step")
    for ax in (grad_ax, beta_ax):
        _log_y(ax)
    return _finish(
        fig,
        out,
        family,
        "landscape",
        "Loss landscape along the gradient (Santurkar et al. Fig. 4) — {model} on {dataset}",
        "Loss landscape, gradient predictiveness, beta_eff — {model} on {dataset}",
        dpi,
    )


def curvature_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    """Top Hessian eigenvalue, Hessian trace and sharpness ratio (lambda_max / stability limit) over steps."""
    if not any(r.series(HESSIAN_LAMBDA_MAX) is not None for r in runs):
        return None
    fig, axes = subplots(1, 3, 4.2, 3.2)
    lam_ax, tr_ax, ratio_ax = axes[0]
    for s in family_settings(runs):
        _band(lam_ax, s.runs, HESSIAN_LAMBDA_MAX, s.color, s.full_label, s.style)
        _band(tr_ax, s.runs, HESSIAN_TRACE, s.color, s.full_label, s.style)
        _band(ratio_ax, s.runs, HESSIAN_SHARPNESS_RATIO, s.color, s.full_label, s.style)
    ratio_ax.axhline(1.0, color="k", lw=0.8, ls=":", label="edge of stability")
    lam_ax.set_title("top Hessian eigenvalue")
    tr_ax.set_title("Hessian trace (Hutchinson)")
    ratio_ax.set_title("sharpness / stability limit")
    for ax, metric in ((lam_ax, HESSIAN_LAMBDA_MAX), (tr_ax, HESSIAN_TRACE), (ratio_ax, HESSIAN_SHARPNESS_RATIO)):
        _log_if_wide(ax)
        ax.set_ylabel(y_label(metric, runs))
        ax.set_xlabel("training step")
    return _finish(
        fig,
        out,
        family,
        "curvature",
        "Curvature of the training loss (Hessian, PROTOCOL §9) — {model} on {dataset}",
        "Top Hessian eigenvalue, trace and sharpness ratio — {model} on {dataset}",
        dpi,
    )


def activations_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    """15/50/85 % quantiles of each measured layer's pre-activations, one row per setting, one y-range per layer."""
    layers = sorted({layer for r in runs for layer in r.layers(f"{ACT}/")}, key=lambda n: (len(n), n))
    if not layers:
        return None
    settings = family_settings(runs)
    fig, axes = subplots(len(settings), len(layers), 3.3, 2.3, sharex=True, sharey="col")
    for row, s in enumerate(settings):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            for q, style in (("q15", ":"), ("q50", "-"), ("q85", ":")):
                _band(ax, s.runs, act_key(layer, q), s.color, "15 / 85 % quantile" if q != "q50" else "median", style)
            ax.set_title(f"{short_layer(layer)} — {s.full_label}")
            if col == 0:
                ax.set_ylabel(y_label(ACT, runs))
            if row == len(settings) - 1:
                ax.set_xlabel("training step")
    return _finish(
        fig,
        out,
        family,
        "activations",
        "Pre-activation quantiles 15/50/85 % (Ioffe & Szegedy Fig. 1) — {model} on {dataset}",
        "Activation quantiles — {model} on {dataset}",
        dpi,
    )


FIGURES = (accuracy_figure, ics_figure, landscape_figure, activations_figure, curvature_figure)


def draw_all(runs: Sequence[Run], out: Path, dpi: int = 90) -> list[Figure]:
    """Every figure the runs have data for, one set per family; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Figure] = []
    with plt.rc_context(STYLE):
        for family, family_runs in group_by(runs, "family").items():
            for draw in FIGURES:
                fig = draw(family, family_runs, out, dpi)
                if fig is not None:
                    written.append(fig)
    return written
