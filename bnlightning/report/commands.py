"""``python -m bnlightning report`` and ``python -m bnlightning wandb-report``.

Both take ``argv`` (without the subcommand name) and return 0; bad input is one
``error:`` line on stderr and exit status 2, with no traceback (set
``BNLIGHTNING_DEBUG=1`` to see it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

REPORT_EPILOG = """\
Finds every run folder (metrics.csv + config.yaml, as written by the CSVLogger) under
RUN_DIRS and groups the runs of each model and data set by every config value that
differs between them but the seed (norm, lr, batch size, init gain ...), seeds as repeats
(a seed run twice counts once: the newest finished run). Writes one PNG per figure plus
report.md and a self-contained index.html into --out. A run folder whose files cannot be
read is skipped with a warning naming the file.

example:
  python -m bnlightning report runs/vgg-lr runs/dln --out reports/paper
"""

WANDB_EPILOG = """\
Builds a W&B Report (wandb-workspaces) with the same panels as `report`, runs grouped
by config cli.model.init_args.norm and cli.model.init_args.optimizer.init_args.lr.
--dry-run builds the spec offline and prints it (or writes it with --spec-out);
without it the report is saved, which needs a W&B account and API key (wandb login).

example:
  python -m bnlightning wandb-report --entity my-team --project bnlightning --group vgg-lr --dry-run
"""


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: ``error: ...`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _guard(body: Callable[[], int]) -> int:
    """Turn expected user errors into one line and exit status 2."""
    try:
        return body()
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError) as err:
        if os.environ.get("BNLIGHTNING_DEBUG"):
            raise
        text = " ".join((str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)).split())
        print(f"error: {text or type(err).__name__}", file=sys.stderr)
        raise SystemExit(2) from None


def report_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m bnlightning report",
        description="Draw the paper's figures from local run logs.",
        epilog=REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIRS", help="run folders or folders to search recursively")
    p.add_argument("--out", required=True, help="output folder for the PNGs, report.md and index.html")
    p.add_argument("--title", default="bnlightning report", help="page title")
    p.add_argument("--dpi", type=int, default=90, help="PNG resolution (default 90: small files)")
    return p


def report_main(argv: Sequence[str]) -> int:
    """Entry point of ``python -m bnlightning report``."""
    args = report_parser().parse_args(list(argv))

    def body() -> int:
        # Imported here so `--help` and argument errors stay fast (matplotlib is slow to load).
        from bnlightning.report.figures import draw_all
        from bnlightning.report.page import write_html, write_markdown
        from bnlightning.report.runs import drop_repeated_seeds, load_runs, split_runs

        if args.dpi < 20 or args.dpi > 600:
            raise ValueError(f"--dpi must be between 20 and 600, got {args.dpi}")
        runs, incomplete = split_runs(load_runs(args.run_dirs))
        runs, repeats = drop_repeated_seeds(runs)
        if not runs:
            raise FileNotFoundError(
                f"no finished run under {' '.join(args.run_dirs)} ({len(incomplete)} incomplete: resume them with "
                "--ckpt_path last)"
            )
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out} exists and is not a folder")
        figures = draw_all(runs, out, args.dpi)
        # Sweeps over keys beyond (norm, lr) -- the other claims about BatchNorm: their own figures and claims.md.
        from bnlightning.report.claims import draw_claims, write_claims_markdown

        figures += draw_claims(runs, out, args.dpi)
        write_claims_markdown(runs, out)
        md = write_markdown(runs, figures, out, args.title, incomplete, repeats)
        page = write_html(runs, figures, out, args.title, incomplete, repeats)
        diverged = [r for r in runs if r.diverged_at_step is not None]
        extra = f"; {len(incomplete)} incomplete runs listed apart, not averaged" if incomplete else ""
        extra += f"; {len(repeats)} repeated seeds listed apart, not counted twice" if repeats else ""
        print(
            f"bnlightning report: {len(runs)} runs ({len(diverged)} diverged){extra}, {len(figures)} figures "
            f"-> {md}, {page}"
        )
        return 0

    return _guard(body)


def wandb_report_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m bnlightning wandb-report",
        description="Build a W&B Report comparing normalizations and learning rates.",
        epilog=WANDB_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--entity", required=True, help="W&B entity (user or team)")
    p.add_argument("--project", required=True, help="W&B project holding the runs")
    p.add_argument(
        "--title",
        default="bnlightning: how does BatchNorm help optimization?",
        help="report title (max 128 characters)",
    )
    p.add_argument(
        "--group",
        action="append",
        default=None,
        help="W&B run group (experiment name) to show as its own runset; repeatable; default: all runs",
    )
    p.add_argument("--dry-run", action="store_true", help="build the spec offline and print it instead of saving")
    p.add_argument(
        "--spec-out", default=None, help="with --dry-run: write the spec JSON to this file instead of stdout"
    )
    p.add_argument("--draft", action="store_true", help="save as a draft")
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="DIR",
        help=(
            "local run folders whose metrics.csv names the measured layers: one panel per group of layers (default: "
            "runs/ if present)"
        ),
    )
    return p


def _report_layers(runs: list[str] | None) -> dict[str, list[str]]:
    """The measured layers named in local runs' logs (``--runs``, default ``runs/`` when it exists)."""
    from bnlightning.report.wandb_report import layers_of_runs

    folders = runs if runs is not None else [d for d in ("runs",) if Path(d).is_dir()]
    missing = [d for d in folders if not Path(d).is_dir()]
    if missing:
        raise ValueError(f"--runs {missing[0]}: no such folder")
    return layers_of_runs(folders)


def wandb_report_main(argv: Sequence[str]) -> int:
    """Entry point of ``python -m bnlightning wandb-report``."""
    args = wandb_report_parser().parse_args(list(argv))

    def body() -> int:
        from bnlightning.report.wandb_report import build_report, report_spec

        if len(args.title) > 128:
            raise ValueError(f"--title is {len(args.title)} characters; W&B allows at most 128")
        if args.spec_out and not args.dry_run:
            raise ValueError("--spec-out only goes with --dry-run")
        layers = _report_layers(args.runs)
        if args.dry_run:
            spec: dict[str, Any] = report_spec(args.entity, args.project, args.title, args.group, layers)
            text = json.dumps(spec, indent=1)
            if args.spec_out:
                Path(args.spec_out).write_text(text)
                print(
                    f"bnlightning wandb-report: spec written to {args.spec_out} (not saved; run without --dry-run to "
                    "save)"
                )
            else:
                print(text)
            return 0
        from bnlightning.loggers import wandb_credentials_found

        if not wandb_credentials_found():
            raise ValueError(
                "saving a W&B report needs a W&B account: run `wandb login` (or set WANDB_API_KEY), or use --dry-run"
            )
        report = build_report(args.entity, args.project, args.title, args.group, link_runsets=True, layers=layers)
        try:
            report.save(draft=args.draft)
        except Exception as err:
            raise ValueError(f"saving the W&B report failed ({type(err).__name__}: {err})") from None
        print(f"bnlightning wandb-report: saved {report.url}")
        return 0

    return _guard(body)
