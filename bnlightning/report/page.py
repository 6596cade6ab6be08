"""The report page: result tables plus the figures, as Markdown and self-contained HTML.

``report.md`` links the PNGs beside it (readable on GitHub); ``index.html`` embeds them
as base64 so the single file can be mailed or attached anywhere.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bnlightning.report.figures import Figure
from bnlightning.report.runs import Run, group_by, norm_order


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) >= 1e4 or abs(x) < 1e-3 else f"{x:.{digits}f}".rstrip("0").rstrip(".")


def _mean_std(values: Sequence[float | None]) -> str:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return "—"
    if len(xs) == 1:
        return _fmt(xs[0])
    return f"{_fmt(float(np.mean(xs)))} ± {_fmt(float(np.std(xs)))}"


def _divergence(runs: Sequence[Run]) -> str:
    steps = [r.diverged_at_step for r in runs if r.diverged_at_step is not None]
    if not steps:
        return f"0/{len(runs)}"
    return f"**{len(steps)}/{len(runs)}** (step {', '.join(str(s) for s in sorted(steps))})"


def summary_rows(runs: Sequence[Run]) -> list[list[str]]:
    """One row per setting: seeds, final/best accuracy (or loss), divergence."""
    rows: list[list[str]] = []
    settings = sorted(group_by(runs, "setting").items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], norm_order(kv[0][2])))
    for (model, dataset, norm, lr), rs in settings:
        seeds = ",".join(str(r.seed) for r in rs)
        rows.append(
            [
                model,
                dataset,
                norm,
                _fmt(lr),
                seeds,
                _mean_std([r.final("val/acc") for r in rs]),
                _mean_std([r.best("val/acc") for r in rs]),
                _mean_std([r.final("test/acc") for r in rs]),
                _mean_std([r.final("train/loss") for r in rs]),
                _divergence(rs),
            ]
        )
    return rows


SUMMARY_HEADER = ["model", "data", "norm", "lr", "seeds", "final val acc", "best val acc", "test acc", "final train loss", "diverged"]
RUN_HEADER = ["run", "norm", "lr", "seed", "steps", "final val acc", "final train loss", "diverged at step"]


def run_rows(runs: Sequence[Run], base: Path) -> list[list[str]]:
    rows = []
    for r in runs:
        try:
            name = os.path.relpath(r.path, base)
        except ValueError:  # other drive on Windows
            name = str(r.path)
        d = r.diverged_at_step
        rows.append([name, r.norm_label, _fmt(r.lr), str(r.seed), str(r.last_step), _fmt(r.final("val/acc")), _fmt(r.final("train/loss")), f"**{d}**" if d is not None else "—"])
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


INCOMPLETE_HEADER = ["run", "status", "norm", "lr", "seed", "steps logged"]


def incomplete_rows(runs: Sequence[Run], base: Path) -> list[list[str]]:
    """Runs that did not end on their own (interrupted, failed, killed): never averaged."""
    return [[_name(r, base), r.status, r.norm_label, _fmt(r.lr), str(r.seed), str(r.last_step)] for r in runs]


def _name(run: Run, base: Path) -> str:
    try:
        return os.path.relpath(run.path, base)
    except ValueError:  # other drive on Windows
        return str(run.path)


def write_markdown(runs: Sequence[Run], figures: Sequence[Figure], out: Path, title: str, incomplete: Sequence[Run] = ()) -> Path:
    """``report.md``: tables, then each figure (relative links); ``incomplete`` runs in a table of their own."""
    parts = [f"# {title}", "", f"{len(runs)} runs. Curves: mean over seeds with a min-max band; a cross marks a diverged run.", ""]
    parts += ["## Final results per setting", "", markdown_table(SUMMARY_HEADER, summary_rows(runs)), ""]
    parts += ["## Figures", ""]
    for fig in figures:
        parts += [f"### {fig.caption}", "", f"![{fig.caption}]({fig.path.name})", ""]
    parts += ["## Runs", "", markdown_table(RUN_HEADER, run_rows(runs, out)), ""]
    if incomplete:
        parts += ["## Incomplete runs (not in the tables or figures above)", "", markdown_table(INCOMPLETE_HEADER, incomplete_rows(incomplete, out)), ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        bold = text.startswith("**")
        text = html.escape(text.replace("**", ""))
        return f"<td class='bad'>{text}</td>" if bold else f"<td>{text}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(runs: Sequence[Run], figures: Sequence[Figure], out: Path, title: str, incomplete: Sequence[Run] = ()) -> Path:
    """``index.html``: the same content with the PNGs embedded, figures side by side."""
    cards = []
    for fig in figures:
        data = base64.b64encode(fig.path.read_bytes()).decode("ascii")
        cards.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(fig.caption)}'><figcaption>{html.escape(fig.caption)}</figcaption></figure>")
    style = (
        "body{font-family:sans-serif;margin:1.5em;max-width:1800px}"
        "table{border-collapse:collapse;font-size:13px;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:3px 7px}"
        ".bad{color:#b00;font-weight:bold}.grid{display:flex;flex-wrap:wrap;gap:12px}"
        "figure{margin:0;flex:1 1 560px;max-width:100%}img{max-width:100%}figcaption{font-size:12px;color:#444}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(runs)} runs. Curves: mean over seeds with a min-max band; a cross marks a diverged run.</p>"
        f"<h2>Final results per setting</h2>{_html_table(SUMMARY_HEADER, summary_rows(runs))}"
        f"<h2>Figures</h2><div class='grid'>{''.join(cards)}</div>"
        f"<h2>Runs</h2>{_html_table(RUN_HEADER, run_rows(runs, out))}"
        + (f"<h2>Incomplete runs (not in the tables or figures above)</h2>{_html_table(INCOMPLETE_HEADER, incomplete_rows(incomplete, out))}" if incomplete else "")
        + "</body></html>"
    )
    path = out / "index.html"
    path.write_text(page)
    return path
