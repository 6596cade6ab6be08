"""Figures of the stability gauges (PROTOCOL §12), one per gauge, per family of runs.

- ``curvature``: gᵀHg/‖g‖² and uᵀHu/‖u‖² over steps; ``hessian/sharpness_ratio`` (λmax over 2(1+β)/η
  for SGD, λmax(P⁻¹H) over (2+2β₁)/(η(1−β₁)) for Adam/AdamW); the quadratic model's predicted loss
  change against the actual one.
- ``gradact``: ‖∂L/∂y‖ per normalization layer output (or the same position without one) over depth,
  and BN's ‖∂L/∂x‖ beside Thm 4.1's bound.
- ``efflr``: η/‖W‖² and the angular step ∠(W^t, W^{t+1}) of the scale-invariant weights over steps.
- ``sld``: the Hessian's spectral density (stochastic Lanczos quadrature) at the last measurement, BN on
  batch statistics (solid) and on running statistics (dashed).

Runs of one family (model, dataset) are told apart by normalization, optimizer and learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnlightning.callbacks.functional.names import (
    EFFLR,
    GRADACT,
    HESSIAN_ACTUAL_CHANGE,
    HESSIAN_GRAD_CURVATURE,
    HESSIAN_PREDICTED_CHANGE,
    HESSIAN_SHARPNESS_RATIO,
    HESSIAN_UPDATE_CURVATURE,
    efflr_key,
    gradact_key,
    sld_key,
)
from bnlightning.report.figures import Figure, _band, _finish, plt
from bnlightning.report.page import markdown_table
from bnlightning.report.runs import Run, group_by, layer_order, short_layer

__all__ = ["draw_gauges", "gauges_table"]


def optimizer_name(run: Run) -> str:
    return str(run.flat_config.get("model.init_args.optimizer.class_path", "?")).rsplit(".", 1)[-1]


def gauge_label(run: Run) -> str:
    return (
        f"{run.norm_label}, {optimizer_name(run)} η={run.lr:g}"
        if run.lr is not None
        else f"{run.norm_label}, {optimizer_name(run)}"
    )


def _settings(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    groups: dict[str, list[Run]] = {}
    for r in sorted(runs, key=lambda r: (optimizer_name(r), r.norm != "none")):
        groups.setdefault(gauge_label(r), []).append(r)
    return list(groups.items())


def _style(ax: Any, xlabel: str, ylabel: str, log: bool = False) -> None:
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if log:
        ax.set_yscale("log")


def curvature_gauges_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    if not any(r.series(HESSIAN_GRAD_CURVATURE) is not None for r in runs):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.6))
    for i, (label, rs) in enumerate(_settings(runs)):
        color = f"C{i % 10}"
        _band(axes[0], rs, HESSIAN_GRAD_CURVATURE, color, label + " gᵀHg/‖g‖²")
        _band(axes[0], rs, HESSIAN_UPDATE_CURVATURE, color, "uᵀHu/‖u‖²", style="--")
        _band(axes[1], rs, HESSIAN_SHARPNESS_RATIO, color, label, style="o-")
        for r in rs:
            p, a = r.series(HESSIAN_PREDICTED_CHANGE), r.series(HESSIAN_ACTUAL_CHANGE)
            if p is not None and a is not None:
                n = min(len(p[1]), len(a[1]))
                axes[2].scatter(a[1][:n], p[1][:n], s=12, color=color, label=label if r is rs[0] else None)
    axes[1].axhline(1.0, color="k", lw=0.7, ls=":")
    lims = axes[2].get_xlim()
    axes[2].plot(lims, lims, "k:", lw=0.7)
    for set_scale in (axes[2].set_xscale, axes[2].set_yscale):  # a failed quadratic model is off by decades
        set_scale("symlog", linthresh=1e-3)
    _style(axes[0], "step", "curvature along g (solid) and u (dashed)", log=True)
    _style(axes[1], "step", "λmax / stability threshold", log=True)
    _style(axes[2], "actual L(W+u) − L(W)", "predicted gᵀu + ½uᵀHu")
    axes[0].legend(fontsize=6)
    axes[2].legend(fontsize=6)
    return _finish(
        fig, out, family, "gauges_curvature",
        "Curvature along the gradient and the real step; sharpness ratio (SGD: λmax·η/(2(1+β)); AdamW: "
        "λmax(P⁻¹H)·η(1−β₁)/(2+2β₁)) — {model} on {dataset}",
        "Gradient-direction curvature and sharpness ratio (PROTOCOL §12) — {model} on {dataset}",
        dpi,
    )  # fmt: skip


def _layers(runs: Sequence[Run]) -> list[str]:
    return sorted(
        {
            n.split("/")[1]
            for r in runs
            for n in r.metrics
            if n.startswith(f"{GRADACT}/") and n.endswith("/norm") and not n.endswith("input_norm")
        },
        key=layer_order,
    )


def _mean_of(run: Run, metric: str) -> float:
    s = run.series(metric)
    if s is None or not len(s[1]):
        return float("nan")
    v = s[1][np.isfinite(s[1])]
    return float(v.mean()) if len(v) else float("nan")


def gradact_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    if not _layers(runs):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
    for i, (label, rs) in enumerate(_settings(runs)):
        own = _layers(rs)
        depth = np.arange(1, len(own) + 1)
        norms = np.nanmean([[_mean_of(r, gradact_key(n, "norm")) for n in own] for r in rs], 0)
        axes[0].plot(depth, norms, "o-", color=f"C{i % 10}", label=label, ms=3)
        if any(gradact_key(own[0], "bound") in r.metrics for r in rs):
            inp = np.nanmean([[_mean_of(r, gradact_key(n, "input_norm")) for n in own] for r in rs], 0)
            bound = np.nanmean([[_mean_of(r, gradact_key(n, "bound")) for n in own] for r in rs], 0)
            axes[1].plot(depth, inp, "o-", color=f"C{i % 10}", label=label + " ‖∂L/∂x‖", ms=3)
            axes[1].plot(depth, bound, "x--", color=f"C{i % 10}", label="Thm 4.1 bound", ms=5)
    _style(
        axes[0], "normalization layer (or its position), input to output", "‖∂L/∂y‖, mean over measurements", log=True
    )
    _style(axes[1], "BN layer, input to output", "‖∂L/∂x‖ at BN's input and its bound", log=True)
    for ax in axes:
        ax.legend(fontsize=6)
    return _finish(
        fig, out, family, "gauges_gradact",
        "Activation gradients at the normalization layers' outputs (Santurkar et al. Thm 4.1) — {model} on {dataset}",
        "‖∂L/∂y‖ per layer, BN vs none (PROTOCOL §12) — {model} on {dataset}",
        dpi,
    )  # fmt: skip


def efflr_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    layers = sorted({n.split("/")[1] for r in runs for n in r.metrics if n.startswith(f"{EFFLR}/")}, key=layer_order)
    if not layers:
        return None
    picks = list(dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]]))
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
    for i, (label, rs) in enumerate(_settings(runs)):
        for layer, style in zip(picks, ("-", "--", ":")):
            _band(axes[0], rs, efflr_key(layer, "lr"), f"C{i % 10}", f"{label} {short_layer(layer)}", style=style)
            _band(axes[1], rs, efflr_key(layer, "angle"), f"C{i % 10}", f"{label} {short_layer(layer)}", style=style)
    _style(axes[0], "step", "η / ‖W‖²", log=True)
    _style(axes[1], "step", "∠(W^t, W^{t+1}) [rad]", log=True)
    axes[0].legend(fontsize=5)
    return _finish(
        fig, out, family, "gauges_efflr",
        "Effective learning rate of the weights feeding a norm (first, middle, last) — {model} on {dataset}",
        "Effective learning rate η/‖W‖² and angular step (PROTOCOL §12) — {model} on {dataset}",
        dpi,
    )  # fmt: skip


def sld_nodes(run: Run, mode: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Ritz values and weights of the last SLQ measurement in ``mode`` (``train`` or ``running``)."""
    nodes, weights = [], []
    i = 0
    while (n := run.series(sld_key(mode, f"node_{i}"))) is not None and (
        w := run.series(sld_key(mode, f"weight_{i}"))
    ) is not None:
        nodes.append(n[1][-1])
        weights.append(w[1][-1])
        i += 1
    return (np.array(nodes), np.array(weights)) if nodes else None


def sld_figure(family: tuple[str, str], runs: Sequence[Run], out: Path, dpi: int = 90) -> Figure | None:
    if not any(sld_nodes(r, "train") is not None for r in runs):
        return None
    settings = _settings(runs)
    fig, axes = plt.subplots(1, len(settings), figsize=(3.4 * len(settings), 3.4), squeeze=False)
    for ax, (label, rs) in zip(axes[0], settings):
        run = rs[0]  # one seed: the density of one run, not an average
        for mode, style in (("train", "-"), ("running", "--")):
            got = sld_nodes(run, mode)
            if got is None:
                continue
            nodes, weights = got
            span = max(float(np.abs(nodes).max()), 1e-12)
            sigma = span / 100
            grid = np.linspace(nodes.min() - 5 * sigma, nodes.max() + 5 * sigma, 800)
            dens = (weights[None, :] * np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2)).sum(1)
            n_starts = max(float(weights.sum()), 1e-12)
            dens = dens / (n_starts * sigma * np.sqrt(2 * np.pi))
            hvps = run.final(sld_key(mode, "hvps"))
            ax.plot(
                grid,
                np.maximum(dens, 1e-12),
                style,
                label=f"norms on {'batch' if mode == 'train' else 'running'} statistics"
                + (f" ({hvps:.0f} HVPs)" if hvps else ""),
                lw=1.2,
            )
        _style(ax, "eigenvalue λ", "density (σ = 1% of max |λ|)", log=True)
        ax.set_ylim(bottom=1e-6)
        ax.set_title(label, fontsize=8)
        ax.legend(fontsize=6)
    return _finish(
        fig, out, family, "gauges_sld",
        "Hessian spectral density by stochastic Lanczos quadrature at the last step (Ghorbani et al. 2019) — {model} "
        "on {dataset}",
        "Hessian eigenvalue density, batch vs running statistics (PROTOCOL §12) — {model} on {dataset}",
        dpi,
    )  # fmt: skip


def draw_gauges(runs: Sequence[Run], out: Path, dpi: int = 90) -> list[Figure]:
    """Every gauge figure a family has data for."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for family, family_runs in group_by(runs, "family").items():
        for draw in (curvature_gauges_figure, gradact_figure, efflr_figure, sld_figure):
            fig = draw(family, family_runs, out, dpi)
            if fig is not None:
                written.append(fig)
    return written


def gauges_table(runs: Sequence[Run]) -> str:
    """One row per setting: the gauges' medians over the measurements (the numbers the verdicts quote)."""
    header = [
        "setting",
        "seeds",
        "gᵀHg/‖g‖²",
        "uᵀHu/‖u‖²",
        "sharpness ratio",
        "predicted / actual Δloss",
        "‖∂L/∂y‖ first … last",
        "η/‖W‖² last",
        "angle last",
        "λmax train / running (SLQ)",
    ]
    rows = []
    for label, rs in _settings(runs):
        r = rs[0]

        def med(metric: str, run: Run = r) -> float:
            s = run.series(metric)
            return float(np.nanmedian(s[1])) if s is not None and len(s[1]) else float("nan")

        layers = _layers([r])
        eff = sorted({n.split("/")[1] for n in r.metrics if n.startswith(f"{EFFLR}/")}, key=layer_order)
        predicted, actual = r.series(HESSIAN_PREDICTED_CHANGE), r.series(HESSIAN_ACTUAL_CHANGE)
        ratio = np.nanmedian(predicted[1] / actual[1]) if predicted is not None and actual is not None else float("nan")
        grads = (
            " … ".join(f"{_mean_of(r, gradact_key(layer, 'norm')):.3g}" for layer in (layers[0], layers[-1]))
            if layers
            else "—"
        )
        rows.append(
            [label, ",".join(str(x.seed) for x in rs)]
            + [f"{med(m):.3g}" for m in (HESSIAN_GRAD_CURVATURE, HESSIAN_UPDATE_CURVATURE, HESSIAN_SHARPNESS_RATIO)]
            + [f"{ratio:.3g}", grads]
            + (
                [f"{med(efflr_key(eff[-1], 'lr')):.3g}", f"{med(efflr_key(eff[-1], 'angle')):.3g}"]
                if eff
                else ["—", "—"]
            )
            + [
                " / ".join(
                    f"{r.final(sld_key(mode, 'lambda_max')) or float('nan'):.3g}" for mode in ("train", "running")
                )
            ]
        )
    return markdown_table(header, rows)
