"""Figures a researcher can read: one legend, y labels with units, shared y-ranges, one colour
per setting across figures, and text that is readable where the page shows it.

The page (``index.html``) shows each figure at its physical size, 96 CSS px per inch, shrunk
only when the window is narrower. The check below computes, for every figure of a report, the
size its smallest text (the tick labels) has on a 1280 px wide window, from the figure's inch
size, its dpi and the ``width`` the page gives the image; the PNG's own pixel size is checked
against the same numbers. With headless Chromium installed, the page is also rendered and the
images' on-screen widths are read back from the browser.
"""

from __future__ import annotations

import html
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import matplotlib.colors
import numpy as np
import pytest

from bnlightning.report import figures as figures_module
from bnlightning.report.claims import draw_claims
from bnlightning.report.commands import report_main
from bnlightning.report.figures import MIN_FONT_PT, draw_all
from bnlightning.report.runs import load_runs
from tests.report.test_settings import write_run

#: A common laptop window, and the page's body margins (1.5em of 16 px, both sides).
WINDOW_PX, MARGINS_PX = 1280, 48
#: Smallest text (px on screen) we call readable.
MIN_TEXT_PX = 10.0


@pytest.fixture
def sweep_with_measures(tmp_path: Path) -> Path:
    """norm x batch x lr with ICS and landscape logged: every curve figure has something to draw."""
    root = tmp_path / "runs"
    for norm in ("none", "batch"):
        for batch in (8, 32, 128):
            for lr in (0.1, 0.5):
                for seed in (0, 1):
                    folder = write_run(
                        root / f"{norm}_b{batch}_lr{lr}_s{seed}",
                        seed=seed,
                        norm=norm,
                        batch=batch,
                        lr=lr,
                        steps=60,
                        val_acc=0.5 + 0.1 * seed,
                    )
                    _add_measures(folder, (1.0 if norm == "none" else 0.1) * (1 + seed))
    return root


def _add_measures(folder: Path, scale: float) -> None:
    """Append ICS and landscape columns to the run's metrics.csv (every 20 steps)."""
    lines = (folder / "metrics.csv").read_text().splitlines()
    extra = [
        "ics/l2/net.fc1",
        "ics/l2/net.fc2",
        "ics/cos/net.fc1",
        "ics/cos/net.fc2",
        "landscape/loss_min",
        "landscape/loss_max",
        "landscape/grad_l2_max",
        "landscape/beta_eff",
    ]
    header = lines[0] + "," + ",".join(extra)
    body = [line + "," * len(extra) for line in lines[1:]]
    width = len(lines[0].split(","))
    for step in (19, 39, 59):
        values = [scale * step, 2 * scale * step, 0.5, 0.4, 1.0, 1.0 + scale, scale, 10 * scale]
        body.append(",".join(["0", str(step)] + [""] * (width - 2) + [str(v) for v in values]))
    (folder / "metrics.csv").write_text("\n".join([header, *body]) + "\n")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _page_images(page: str) -> list[int]:
    """The ``width`` attribute of every image on the page, in order."""
    widths = re.findall(r"<img src='data:image/png;base64,[^']*' width='(\d+)'", page)
    assert len(widths) == page.count("<img "), "every figure gets a display width"
    return [int(w) for w in widths]


def test_page_text_is_readable_on_a_laptop_window(
    sweep_with_measures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[Any] = []
    real_finish = figures_module._finish

    def keep(*args: Any, **kwargs: Any) -> Any:
        fig = real_finish(*args, **kwargs)
        written.append(fig)
        return fig

    monkeypatch.setattr(figures_module, "_finish", keep)
    monkeypatch.setattr("bnlightning.report.claims._finish", keep)
    out = tmp_path / "out"
    assert report_main([str(sweep_with_measures), "--out", str(out), "--dpi", "70"]) == 0
    kinds = sorted(f.path.stem.rsplit("_", 1)[1] for f in written)
    assert kinds == ["accuracy", "ics", "landscape", "measures", "sweep"], kinds
    widths = _page_images((out / "index.html").read_text())
    assert len(widths) == len(written)
    for fig, css_width in zip(written, widths):
        w_in, h_in = fig.size_in
        px = _png_size(fig.path)
        assert abs(px[0] - w_in * fig.dpi) <= 1 and abs(px[1] - h_in * fig.dpi) <= 1, (fig.path.name, px)
        assert css_width == round(w_in * 96), "shown at its physical size"
        shown = min(css_width, WINDOW_PX - MARGINS_PX)
        text_px = fig.min_font_pt / 72 * fig.dpi * shown / (w_in * fig.dpi)
        assert fig.min_font_pt >= MIN_FONT_PT
        assert text_px >= MIN_TEXT_PX, f"{fig.path.name}: smallest text {text_px:.1f} px on a {WINDOW_PX} px window"


def _captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """matplotlib figures by kind, kept open past ``_finish`` (which closes them)."""
    figs: dict[str, Any] = {}
    real_close = figures_module.plt.close

    def close(fig: Any = None) -> None:
        if fig is not None and fig.axes:
            figs[f"{len(figs)}"] = fig
        else:
            real_close(fig)

    monkeypatch.setattr(figures_module.plt, "close", close)
    return figs


def _legend_colors(fig: Any) -> dict[str, str]:
    (legend,) = fig.legends
    return {
        t.get_text().split(" (")[0]: matplotlib.colors.to_hex(h.get_color())
        for t, h in zip(legend.get_texts(), legend.legend_handles)
        if hasattr(h, "get_color")
    }


def test_one_legend_units_shared_ranges_and_one_colour_per_setting(
    sweep_with_measures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figs = _captured(monkeypatch)
    runs = load_runs([sweep_with_measures])
    drawn = draw_all(runs, tmp_path / "out", dpi=30) + draw_claims(runs, tmp_path / "out", dpi=30)
    by_kind = {f.path.stem.rsplit("_", 1)[1]: figs[str(i)] for i, f in enumerate(drawn)}
    colours: dict[str, dict[str, str]] = {}
    for kind, fig in by_kind.items():
        assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes), f"{kind}: one legend per figure"
        for ax in fig.axes:
            if ax.get_lines() and ax.get_subplotspec().is_first_col():
                assert re.search(r"\(.+\)", ax.get_ylabel()), f"{kind}: y label with a unit, got {ax.get_ylabel()!r}"
        colours[kind] = _legend_colors(fig)
    # the six settings of each lr have one colour each, the same in every curve figure
    assert len(set(colours["accuracy"].values())) == 6
    for kind in ("ics", "landscape"):
        for label, colour in colours[kind].items():
            assert colours["accuracy"][label.rsplit(", lr=", 1)[0]] == colour, (kind, label)
    # side by side, one y-range: the lr columns of the training curves, the layers of an ICS row
    for kind in ("accuracy", "ics"):
        axes = np.array(by_kind[kind].axes).reshape(len(by_kind[kind].axes) // 2, 2)
        for row in axes:
            assert row[0].get_ylim() == row[1].get_ylim(), kind
    monkeypatch.undo()
    figures_module.plt.close("all")


@pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
    reason="headless Chromium is not installed",
)
def test_page_in_headless_chromium(sweep_with_measures: Path, tmp_path: Path) -> None:
    """The browser's own layout: every image as wide as its figure inches x 96 px (or the window),
    tick text >= 10 px."""
    out = tmp_path / "out"
    assert report_main([str(sweep_with_measures), "--out", str(out), "--dpi", "70"]) == 0
    page = (out / "index.html").read_text()
    probe = (
        "<script>document.body.setAttribute('data-widths', [...document.images]"
        ".map(i => i.getBoundingClientRect().width + 'x' + i.naturalWidth).join(' '))</script>"
    )
    (out / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--window-size={WINDOW_PX},900",
        "--virtual-time-budget=5000",
        "--dump-dom",
        (out / "probe.html").as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'data-widths="([^"]*)"', dom)
    assert found, dom[-2000:]
    shown = [tuple(float(v) for v in item.split("x")) for item in html.unescape(found.group(1)).split()]
    widths = _page_images(page)
    assert len(shown) == len(widths) > 0
    for (css, natural), attr in zip(shown, widths):
        assert css == pytest.approx(min(attr, WINDOW_PX - MARGINS_PX), abs=20), (css, attr)
        dpi = natural / (attr / 96)
        tick_px = MIN_FONT_PT / 72 * dpi * css / natural
        assert tick_px >= MIN_TEXT_PX, f"ticks {tick_px:.1f} px on screen"
