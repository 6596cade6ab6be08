"""What the benchmark scripts print and write: the machine line, tables, the JSON under ``runs/bench/``."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent

#: Where a script writes its JSON unless ``--out`` says otherwise: beside the training runs
#: (``runs/``, git-ignored, relative to the working directory), never into the sources.
RESULTS_DIR = Path("runs", "bench")


def cpu_model() -> str:
    """``lscpu``'s model name (falls back to ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: CPU model and cores, GPU, library versions, date."""
    import lightning

    info: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (
        f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads){gpu}; torch "
        f"{info['torch']}, lightning {info['lightning']}; {info['date']}"
    )


# --- output ----------------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, right-aligned numbers, one header rule."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def default_out(script: str) -> Path:
    """``runs/bench/<script>.json``; the folder is created when the file is written."""
    return RESULTS_DIR / f"{Path(script).stem}.json"


def begin(script: str, args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Apply ``--threads``, start the clock, print the machine line; return (machine info, start time)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = machine(args.device)
    info["clock"] = args.clock
    print(f"bench/{Path(script).name} on {machine_line(info)}; clock: {args.clock}")
    return info, started


def finish(
    script: str,
    argv: list[str] | None,
    args: argparse.Namespace,
    info: dict[str, Any],
    results: dict[str, Any],
    summary: str,
    started: float,
) -> dict[str, Any]:
    """Write the run's JSON (``--out`` or :func:`default_out`), print where, then the summary line."""
    elapsed = time.perf_counter() - started
    payload = {
        "script": f"bench/{Path(script).name}",
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": info,
        "settings": {
            k: (str(v) if isinstance(v, (torch.device, Path)) else v) for k, v in vars(args).items() if k != "timer"
        },
        **results,
        "summary": summary,
        "elapsed_s": elapsed,
    }
    out = write_json(args.out or default_out(script), payload)
    print(f"\n(wrote {out}; {elapsed:.0f} s)")
    print(summary)
    return payload
