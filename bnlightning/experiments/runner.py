"""Run an experiment's ``fit`` processes here, one after another: skip, resume, stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnlightning.console import VERBOSE_ENV
from bnlightning.experiments.runs import RunSpec


def run_state(spec: RunSpec, cwd: Path | None = None) -> tuple[str, bool]:
    """``(status from run.json or "new", whether it has a checkpoint)`` of ``spec``'s folder.

    Args:
        spec: the run.
        cwd: the folder a relative ``spec.log_dir`` is under (default: the current directory).
    """
    from bnlightning.runstate import read_status

    folder = spec.log_dir if spec.log_dir.is_absolute() else (cwd or Path.cwd()) / spec.log_dir
    ckpts = folder / "checkpoints"
    has_ckpt = ckpts.is_dir() and any(ckpts.glob("*.ckpt"))
    return str(read_status(folder).get("status", "new")), has_ckpt


def run_all(
    specs: Sequence[RunSpec],
    cwd: Path | None = None,
    quiet: bool = False,
    verbose: bool = False,
    progress: bool | None = None,
) -> list[tuple[RunSpec, str]]:
    """Run ``specs`` one after another; returns each run's outcome.

    Outcomes: ``ok`` (completed), ``diverged`` (a result, not a failure: its
    ``diverged_at_step`` is in metrics.csv), ``skipped`` (finished by an earlier
    invocation), ``interrupted`` (SIGTERM/SIGUSR1: checkpoint saved; the next invocation
    resumes it with ``--ckpt_path last``) or ``failed``. A SIGTERM to this runner is passed
    on to the running ``fit`` (which saves and stops) and no further run starts.

    Args:
        specs: the runs, in order.
        cwd: where the ``fit`` processes run and their relative ``runs/`` folders go
            (default: the current directory, never the installed package).
        quiet: no progress bar, only one line per run.
        verbose: stream every ``fit``'s own output (its progress bars, other libraries' lines)
            to the terminal instead of ``<runs-dir>/<experiment>/<run>.out``.
        progress: show one progress bar over the runs still to do, with an ETA (default: when
            stderr is a terminal, unless ``quiet`` or ``verbose``).

    Each run's output goes to ``<runs-dir>/<experiment>/<run>.out`` (unless ``verbose``); the
    terminal gets one line per run.
    """
    cwd = Path.cwd() if cwd is None else Path(cwd)
    results: list[tuple[RunSpec, str]] = []
    stop: list[int] = []
    child: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: Any) -> None:
        stop.append(signum)
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    old = signal.signal(signal.SIGTERM, forward) if threading.current_thread() is threading.main_thread() else None
    to_do = sum(run_state(spec, cwd)[0] not in ("completed", "diverged") for spec in specs)
    bar = _progress_bar(to_do, enabled=progress if progress is not None else (False if quiet or verbose else None))
    env = {**os.environ, VERBOSE_ENV: "1"} if verbose else None
    try:
        for i, spec in enumerate(specs, 1):
            tag = f"[{i}/{len(specs)}] {spec.experiment}/{spec.name}"
            status, has_ckpt = run_state(spec, cwd)
            if status in ("completed", "diverged") or stop:
                outcome = "skipped" if not stop else "not started"
                bar.write(
                    f"{tag}: {outcome}" + (f" (already {status})" if not stop else " (runner stopped by a signal)")
                )
                results.append((spec, outcome))
                continue
            bar.write(f"{tag} ..." + (f" (resuming the {status} run)" if has_ckpt else ""))
            bar.set_description(f"{spec.experiment}/{spec.name}")
            start = time.monotonic()
            returncode, log_path = _fit(spec, cwd, has_ckpt, verbose, env, child)
            outcome = _outcome(returncode, run_state(spec, cwd)[0])
            text = {
                "ok": "ok",
                "diverged": "ok (diverged: a result)",
                "interrupted": "INTERRUPTED (checkpoint saved; run the same command again to resume)",
            }.get(outcome, f"FAILED (exit {returncode}; output in {log_path})")
            bar.write(f"{tag}: {text} in {time.monotonic() - start:.0f}s")
            bar.update()
            results.append((spec, outcome))
    finally:
        bar.close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return results


def _fit(
    spec: RunSpec,
    cwd: Path,
    resume: bool,
    verbose: bool,
    env: dict[str, str] | None,
    child: list[subprocess.Popen[bytes]],
) -> tuple[int, Path]:
    """Run one ``fit`` process to its end (``--ckpt_path=last`` when ``resume``); returns its exit code
    and its output file. ``child`` holds the process while it runs, so a signal can be forwarded to it."""
    command = spec.command() + (["--ckpt_path=last"] if resume else [])
    log = spec.log_dir.parent / f"{spec.name}.out"
    log_path = (cwd / log) if not log.is_absolute() else log
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a" if resume else "w") as out:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=None if verbose else out,
            stderr=None if verbose else subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        child[:] = [proc]
        returncode = proc.wait()
        child.clear()
    return returncode, log_path


def _die_with_parent(parent: int) -> Any:
    """A ``preexec_fn`` that makes the child receive SIGTERM when this runner dies, however it dies.

    Linux's ``prctl(PR_SET_PDEATHSIG)``: a runner killed with SIGKILL cannot forward
    anything, so the kernel does it, and the ``fit`` saves a checkpoint and stops instead
    of training on as an orphan that a re-run would then "resume" beside. Elsewhere: None.
    """
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the runner died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class _Lines:
    """The progress bar's interface without a bar: lines to stdout, as they happen."""

    def write(self, line: str) -> None:
        print(line, flush=True)

    def set_description(self, text: str) -> None:
        pass

    def update(self) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool | None) -> Any:
    """One tqdm bar over the runs to do (the ETA is the mean time per finished run), on stderr.

    ``enabled=None`` shows it only when stderr is a terminal (a log file gets the lines alone).
    The per-run lines go above the bar, to stdout.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _Lines()
    from tqdm import tqdm

    bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, smoothing=0)
    bar.write = lambda line: tqdm.write(line, file=sys.stdout)
    return bar


def _outcome(returncode: int, status: str) -> str:
    """A run's outcome from its exit status and the status it recorded."""
    if returncode == 0 and status in ("completed", "diverged"):
        return "ok" if status == "completed" else "diverged"
    if status == "interrupted" or returncode in (-signal.SIGTERM, 128 + signal.SIGTERM, 128 + signal.SIGUSR1):
        return "interrupted"
    return "failed"
