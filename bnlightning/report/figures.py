"""The paper's figures drawn with matplotlib (Agg) from runs read off disk.

One set of figures per *family* (architecture on one data set). Inside a figure a
*setting* (normalization, learning rate) is one colour; its seeds are drawn as the mean
with a shaded min-max band. A diverged run ends early and gets a cross at its
divergence step, and the legend says how many seeds diverged.

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

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from bnlightning.report.runs import Run, aggregate, group_by, norm_order, short_layer

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
LR_STYLES = ["-", "--", ":", "-."]


@dataclass(frozen=True)
class Figure:
    """A written figure: its file and a one-line caption for the page."""

    path: Path
    caption: str
    family: tuple[str, str]


def slug(text: str, limit: int = 32) -> str:
    """A file-name-safe, length-capped form of ``text`` (data-set labels are long)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower())[:limit].strip("-")


def family_slug(family: tuple[str, str]) -> str:
    model, dataset = family
    return f"{slug(model)}__{slug(dataset)}"


def _settings(runs: Sequence[Run]) -> list[tuple[str, float, list[Run]]]:
    """(norm label, lr, runs) per setting, ordered by lr then standard/BN/noisy/..."""
    out = [(k[2], k[3], rs) for k, rs in group_by(runs, "setting").items()]
    return sorted(out, key=lambda t: (t[1], norm_order(t[0]), t[0]))


def _color(norm_label: str, i: int) -> str:
    return NORM_COLORS.get(norm_label.split(" @")[0], f"C{i % 10}")


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` logged points (train metrics are one batch each)."""
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def _band(ax: Axes, runs: Sequence[Run], metric: str, color: str, label: str, style: str = "-", smooth: int = 1) -> bool:
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


def _finish(fig: plt.Figure, out: Path, family: tuple[str, str], kind: str, title: str, caption: str, dpi: int) -> Figure:
    """Title (``{model}``/``{dataset}`` filled in), save as ``<family>_<kind>.png``, close."""
    model, dataset = family
    path = out / f"{family_slug(family)}_{kind}.png"
    # Wrap to the figure's width: titles carry the full data-set label, which is long.
    width_chars = max(40, int(fig.get_figwidth() * 13))
    fig.suptitle(textwrap.fill(title.format(model=model, dataset=dataset), width_chars), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Figure(path, caption.format(model=model, dataset=dataset), family)


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
    """Train/val accuracy and train loss over steps, one column per learning rate."""
    metrics = [m for m in ("train/acc", "val/acc", "train/loss", "val/loss") if any(r.series(m) is not None for r in runs)]
    if "train/acc" in metrics:
        metrics = [m for m in metrics if m != "val/loss"]  # accuracy tells the story; keep the figure small
    if not metrics:
        return None
    settings = _settings(runs)
    lrs = sorted({lr for _, lr, _ in settings})
    fig, axes = plt.subplots(len(metrics), len(lrs), figsize=(max(6.0, 3.6 * len(lrs) + 0.4), 2.5 * len(metrics)), squeeze=False)
    for col, lr in enumerate(lrs):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            for i, (norm, s_lr, rs) in enumerate(settings):
                if s_lr == lr:
                    _band(ax, rs, metric, _color(norm, i), norm, smooth=5 if metric.startswith("train/") else 1)
            ax.set_title(f"{metric}  (lr={lr:g})", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            if metric.endswith("loss"):
                _log_if_wide(ax)
            if row == 0:
                ax.legend(fontsize=7)
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
    """``||G - G'||_2`` (log), ``cos(G, G')`` and the relative change per layer."""
    layers = sorted({layer for r in runs for layer in r.layers("ics/l2/")}, key=lambda n: (len(n), n))
    if not layers:
        return None
    rows = [("ics/l2/", "||G - G'||_2", True), ("ics/cos/", "cos(G, G')", False), ("ics/rel/", "||G - G'|| / ||G||", False)]
    rows = [r for r in rows if any(run.series(r[0] + layers[0]) is not None for run in runs)]
    settings = _settings(runs)
    lrs = sorted({lr for _, lr, _ in settings})
    fig, axes = plt.subplots(len(rows), len(layers), figsize=(max(6.0, 3.6 * len(layers) + 0.4), 2.5 * len(rows)), squeeze=False)
    for col, layer in enumerate(layers):
        for row, (prefix, label, log) in enumerate(rows):
            ax = axes[row][col]
            for i, (norm, lr, rs) in enumerate(settings):
                _band(ax, rs, prefix + layer, _color(norm, i), f"{norm}, lr={lr:g}", LR_STYLES[lrs.index(lr) % len(LR_STYLES)])
            ax.set_title(f"{label} — {short_layer(layer)}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            if log:
                _log_y(ax)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
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
    if not any(r.series("landscape/beta_eff") is not None or r.series("landscape/loss_min") is not None for r in runs):
        return None
    settings = _settings(runs)
    lrs = sorted({lr for _, lr, _ in settings})
    fig, axes = plt.subplots(1, 3, figsize=(11.5, 3.0), squeeze=False)
    band_ax, grad_ax, beta_ax = axes[0]
    for i, (norm, lr, rs) in enumerate(settings):
        color, style, label = _color(norm, i), LR_STYLES[lrs.index(lr) % len(LR_STYLES)], f"{norm}, lr={lr:g}"
        lo, hi = aggregate(rs, "landscape/loss_min"), aggregate(rs, "landscape/loss_max")
        if lo is not None and hi is not None:
            steps = np.intersect1d(lo[0], hi[0])
            low = lo[1][np.isin(lo[0], steps)]
            high = hi[1][np.isin(hi[0], steps)]
            band_ax.fill_between(steps, low, high, color=color, alpha=0.35, lw=0, label=label)
            band_ax.plot(steps, high, style, color=color, lw=0.8)
        _band(grad_ax, rs, "landscape/grad_l2_max", color, label, style)
        _band(beta_ax, rs, "landscape/beta_eff", color, label, style)
    band_ax.set_title("loss landscape (min..max over step sizes)", fontsize=9)
    _log_if_wide(band_ax)
    grad_ax.set_title("gradient predictiveness max ||g - g'||", fontsize=9)
    beta_ax.set_title("effective beta-smoothness", fontsize=9)
    for ax in (grad_ax, beta_ax):
        _log_y(ax)
    for ax in axes[0]:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    band_ax.legend(fontsize=7)
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
    if not any(r.series("hessian/lambda_max") is not None for r in runs):
        return None
    settings = _settings(runs)
    lrs = sorted({lr for _, lr, _ in settings})
    fig, axes = plt.subplots(1, 3, figsize=(11.5, 3.0), squeeze=False)
    lam_ax, tr_ax, ratio_ax = axes[0]
    for i, (norm, lr, rs) in enumerate(settings):
        color, style, label = _color(norm, i), LR_STYLES[lrs.index(lr) % len(LR_STYLES)], f"{norm}, lr={lr:g}"
        _band(lam_ax, rs, "hessian/lambda_max", color, label, style)
        _band(tr_ax, rs, "hessian/trace", color, label, style)
        _band(ratio_ax, rs, "hessian/sharpness_ratio", color, label, style)
    ratio_ax.axhline(1.0, color="k", lw=0.8, ls=":", label="edge of stability")
    lam_ax.set_title("top Hessian eigenvalue lambda_max", fontsize=9)
    tr_ax.set_title("Hessian trace (Hutchinson)", fontsize=9)
    ratio_ax.set_title("lambda_max / (2(1+beta)/lr)", fontsize=9)
    for ax in axes[0]:
        _log_if_wide(ax)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    lam_ax.legend(fontsize=7)
    ratio_ax.legend(fontsize=7)
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
    """15/50/85 % quantiles of each measured layer's pre-activations, one row per setting."""
    layers = sorted({layer for r in runs for layer in r.layers("act/")}, key=lambda n: (len(n), n))
    if not layers:
        return None
    settings = _settings(runs)
    fig, axes = plt.subplots(len(settings), len(layers), figsize=(max(6.0, 3.3 * len(layers) + 0.4), 2.3 * len(settings)), squeeze=False, sharex=True)
    for row, (norm, lr, rs) in enumerate(settings):
        color = _color(norm, row)
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            for q, style in (("q15", ":"), ("q50", "-"), ("q85", ":")):
                _band(ax, rs, f"act/{layer}/{q}", color, q, style)
            ax.set_title(f"{short_layer(layer)} — {norm}, lr={lr:g}", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == len(settings) - 1:
                ax.set_xlabel("step", fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=6)
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
    for family, family_runs in group_by(runs, "family").items():
        for draw in FIGURES:
            fig = draw(family, family_runs, out, dpi)
            if fig is not None:
                written.append(fig)
    return written
