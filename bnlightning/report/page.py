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
from bnlightning.report.runs import Run, format_value, group_by, group_settings, setting_label, short_key, varying_keys


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


RESULT_HEADER = ["seeds", "final val acc", "best val acc", "test acc", "final train loss", "diverged"]


def _lr_text(run: Run) -> str:
    """The learning rate the run trained with; a scaled one names the configured one too."""
    ran, configured = run.lr_ran, run.lr
    if ran is not None and configured is not None and not math.isclose(ran, configured, rel_tol=1e-6):
        return f"{_fmt(ran)} (configured {_fmt(configured)})"
    return _fmt(ran)


def summary_table(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for one family: one row per setting (every key that differs), its seeds and results.

    When a rule scaled the learning rate (``LinearLRScaling``), an ``lr (ran)`` column shows the
    rate each setting trained with.
    """
    keys = varying_keys(runs)
    scaled = any(r.series("lr_scaled") is not None for r in runs)
    header = [short_key(k) for k in keys] + (["lr (ran)"] if scaled else []) + RESULT_HEADER
    if not keys:
        header = ["norm", *header]
    rows: list[list[str]] = []
    for rs in group_settings(runs, keys).values():
        cells = [format_value(k, rs[0].value(k)) for k in keys] or [rs[0].norm_label]
        if scaled:
            cells.append(", ".join(sorted({_fmt(r.lr_ran) for r in rs})))
        rows.append(
            cells
            + [
                ",".join(str(r.seed) for r in rs),
                _mean_std([r.final("val/acc") for r in rs]),
                _mean_std([r.best("val/acc") for r in rs]),
                _mean_std([r.final("test/acc") for r in rs]),
                _mean_std([r.final("train/loss") for r in rs]),
                _divergence(rs),
            ]
        )
    return header, rows


def summary_tables(runs: Sequence[Run]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(family title, header, rows)`` per family (model on data set)."""
    return [(f"{model} on {dataset}", *summary_table(rs)) for (model, dataset), rs in group_by(runs, "family").items()]


RUN_HEADER = ["run", "setting", "seed", "steps", "lr (ran)", "final val acc", "final train loss", "diverged at step"]


def run_rows(runs: Sequence[Run], base: Path) -> list[list[str]]:
    """One row per run: its setting (the keys that differ within its family), steps taken and the lr it ran with."""
    families = group_by(runs, "family")
    keys = {fam: varying_keys(rs) for fam, rs in families.items()}
    rows = []
    for fam, rs in families.items():
        for r in rs:
            d = r.diverged_at_step
            label = setting_label(r, keys[fam]) if keys[fam] else r.norm_label
            rows.append(
                [
                    _name(r, base),
                    label,
                    str(r.seed),
                    str(r.steps),
                    _lr_text(r),
                    _fmt(r.final("val/acc")),
                    _fmt(r.final("train/loss")),
                    f"**{d}**" if d is not None else "—",
                ]
            )
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


INCOMPLETE_HEADER = ["run", "status", "norm", "lr", "seed", "steps"]


def incomplete_rows(runs: Sequence[Run], base: Path) -> list[list[str]]:
    """Runs that did not end on their own (interrupted, failed, killed): never averaged."""
    return [[_name(r, base), r.status, r.norm_label, _lr_text(r), str(r.seed), str(r.steps)] for r in runs]


REPEAT_HEADER = ["run", "seed", "status", "steps", "final val acc", "counted instead"]


def repeat_rows(repeats: Sequence[Run], kept: Sequence[Run], base: Path) -> list[list[str]]:
    """Runs of a seed that was run again: the newer run counts, these are listed only."""
    newest = {r.repeat_id: r for r in kept}
    return [
        [
            _name(r, base),
            str(r.seed),
            r.status,
            str(r.steps),
            _fmt(r.final("val/acc")),
            _name(newest[r.repeat_id], base) if r.repeat_id in newest else "—",
        ]
        for r in repeats
    ]


def _name(run: Run, base: Path) -> str:
    try:
        return os.path.relpath(run.path, base)
    except ValueError:  # other drive on Windows
        return str(run.path)


INTRO = (
    "{n} runs. A setting is every config value that differs between the runs of a family but the seed; "
    "its seeds are averaged. Curves: mean over seeds with a min-max band; a cross marks a diverged run."
)
REPEATS_TITLE = "Repeated seeds (the same setting and seed run again: only the newest finished run counts)"
INCOMPLETE_TITLE = "Incomplete runs (not in the tables or figures above)"


def write_markdown(
    runs: Sequence[Run],
    figures: Sequence[Figure],
    out: Path,
    title: str,
    incomplete: Sequence[Run] = (),
    repeats: Sequence[Run] = (),
) -> Path:
    """``report.md``: tables, then each figure (relative links); ``incomplete`` runs and ``repeats`` in tables of their
    own."""
    parts = [f"# {title}", "", INTRO.format(n=len(runs)), "", "## Final results per setting", ""]
    for family, header, rows in summary_tables(runs):
        parts += [f"### {family}", "", markdown_table(header, rows), ""]
    parts += ["## Figures", ""]
    for fig in figures:
        parts += [f"### {fig.caption}", "", f"![{fig.caption}]({fig.path.name})", ""]
    parts += ["## Runs", "", markdown_table(RUN_HEADER, run_rows(runs, out)), ""]
    if repeats:
        parts += [f"## {REPEATS_TITLE}", "", markdown_table(REPEAT_HEADER, repeat_rows(repeats, runs, out)), ""]
    if incomplete:
        parts += [f"## {INCOMPLETE_TITLE}", "", markdown_table(INCOMPLETE_HEADER, incomplete_rows(incomplete, out)), ""]
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


#: CSS pixels per figure inch on the page: a figure shows at its physical size, so its text reads
#: at its point size (9 pt ticks = 12 px) whatever ``--dpi`` the PNG was drawn at.
CSS_PX_PER_INCH = 96


def _figure_card(fig: Figure) -> str:
    data = base64.b64encode(fig.path.read_bytes()).decode("ascii")
    width = round(fig.size_in[0] * CSS_PX_PER_INCH) if fig.size_in[0] else None
    size = f" width='{width}'" if width else ""
    caption = html.escape(fig.caption)
    return (
        f"<figure><img src='data:image/png;base64,{data}'{size} alt='{caption}'>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def write_html(
    runs: Sequence[Run],
    figures: Sequence[Figure],
    out: Path,
    title: str,
    incomplete: Sequence[Run] = (),
    repeats: Sequence[Run] = (),
) -> Path:
    """``index.html``: the same content with the PNGs embedded, each at its physical size (96 px per inch)."""
    style = (
        "body{font-family:sans-serif;margin:1.5em;max-width:1800px}"
        "table{border-collapse:collapse;font-size:13px;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:3px 7px}"
        ".bad{color:#b00;font-weight:bold}figure{margin:0 0 1.5em 0}"
        "img{max-width:100%;height:auto}figcaption{font-size:13px;color:#444}"
    )
    summaries = "".join(
        f"<h3>{html.escape(family)}</h3>{_html_table(header, rows)}" for family, header, rows in summary_tables(runs)
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(INTRO.format(n=len(runs)))}</p>"
        f"<h2>Final results per setting</h2>{summaries}"
        f"<h2>Figures</h2>{''.join(_figure_card(f) for f in figures)}"
        f"<h2>Runs</h2>{_html_table(RUN_HEADER, run_rows(runs, out))}"
        + (
            f"<h2>{html.escape(REPEATS_TITLE)}</h2>{_html_table(REPEAT_HEADER, repeat_rows(repeats, runs, out))}"
            if repeats
            else ""
        )
        + (
            f"<h2>{html.escape(INCOMPLETE_TITLE)}</h2>"
            f"{_html_table(INCOMPLETE_HEADER, incomplete_rows(incomplete, out))}"
            if incomplete
            else ""
        )
        + "</body></html>"
    )
    path = out / "index.html"
    path.write_text(page)
    return path
