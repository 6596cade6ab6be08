"""Helpers shared by the benchmark scripts in ``bench/``: arguments, clocks, data, tables.

Every script in this folder measures the two sides of a ratio in one process, alternating
their order between repeats (so a slow spell of a shared machine hits both sides), and
reports medians. Clocks are read only after :func:`sync` so that asynchronous CUDA work
is counted where it happens. Results are printed as one table plus a summary line and
written as JSON beside the script (``bench/<name>.json``, git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch

BENCH_DIR = Path(__file__).resolve().parent
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


# --- arguments ---------------------------------------------------------------------------
class BenchParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one ``error: ...`` line (exit 2), like ``bnlightning``'s CLI."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def bench_parser(prog: str, doc: str | None, quick: dict[str, Any], full: dict[str, Any]) -> BenchParser:
    """A script's parser, its description naming what ``--quick`` and the full mode run; with the common options."""
    modes = " Quick mode: " + " ".join(f"{k}={v}" for k, v in quick.items()) + "; full (default): " + " ".join(f"{k}={v}" for k, v in full.items()) + "."
    parser = BenchParser(prog=prog, description=(doc or "").split("\n\n")[0] + modes)
    add_common_args(parser)
    return parser


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, else one clear message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "a non-negative integer")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers, e.g. ``128,512``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    return [positive_int(p) for p in parts]


def precision_list(text: str) -> list[str]:
    """argparse type: comma-separated Lightning precisions (``32-true``, ``bf16-mixed``, ``16-mixed``)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PRECISIONS]
    if not parts or bad:
        raise argparse.ArgumentTypeError(f"unknown precision {bad[0] if bad else text!r}; accepted: {', '.join(PRECISIONS)}")
    return parts


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every bench script has: device, threads, seed, output file, quick mode."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the model and the synthetic data")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path (default: bench/<script>.json)")
    parser.add_argument("--quick", action="store_true", help="a small run (see the description) to check the ratios fast")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (default) or this process's CPU time (steadier on a shared CPU; use with --threads 1)")


def resolve_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``torch.device`` for ``--device``, or one ``error:`` line if it does not exist here."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        parser.error(f"argument --device: {err}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("argument --device: CUDA is not available on this machine (torch sees no GPU)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {name} does not exist ({torch.cuda.device_count()} GPU(s))")
    elif device.type != "cpu":
        parser.error(f"argument --device: only cpu and cuda are supported, got {name!r}")
    return device


def check_precisions(parser: argparse.ArgumentParser, precisions: Sequence[str], device: torch.device) -> None:
    """fp16 autocast on CPU is not a configuration anyone trains with: refuse it clearly."""
    if device.type == "cpu" and "16-mixed" in precisions:
        parser.error("argument --precisions: 16-mixed needs a GPU; use 32-true or bf16-mixed on the CPU")


# --- clocks and statistics -----------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` so the next clock reading includes it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: The clock every script reads; ``--clock cpu`` swaps in ``time.process_time`` (see :func:`set_clock`).
CLOCK: Callable[[], float] = time.perf_counter


def set_clock(parser: argparse.ArgumentParser, name: str, device: torch.device) -> None:
    """``wall`` (default) or ``cpu``: CPU seconds of this process, all its threads.

    On a shared machine, wall time includes the time other jobs held the cores; the CPU
    time this process used is far less sensitive to that (best with ``--threads 1``, so no
    thread spins waiting for a preempted sibling). It does not count DataLoader worker
    processes, so it is refused for the data-path comparison, and it means nothing for GPU work.
    """
    global CLOCK
    if name == "cpu" and device.type != "cpu":
        parser.error("argument --clock: cpu time only measures CPU training; use --clock wall on a GPU")
    CLOCK = time.process_time if name == "cpu" else time.perf_counter


def now(device: torch.device) -> float:
    """The benchmark clock (:data:`CLOCK`, wall time by default) after :func:`sync`."""
    sync(device)
    return CLOCK()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """Half the range relative to the median, in percent: a plain noise indicator."""
    if len(values) < 2:
        return 0.0
    m = median(values)
    return 100.0 * (max(values) - min(values)) / 2 / m if m else float("nan")


def alternate(names: Sequence[str], repeat: int) -> list[str]:
    """The run order of repeat ``repeat``: ``names`` forwards on even repeats, backwards on odd ones."""
    return list(names) if repeat % 2 == 0 else list(reversed(names))


# --- machine -------------------------------------------------------------------------------
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
        f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads){gpu}; "
        f"torch {info['torch']}, lightning {info['lightning']}; {info['date']}"
    )


# --- data and model ------------------------------------------------------------------------
def synthetic_cifar(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random CIFAR-shaped images, uint8 ``(n, 3, 32, 32)``, and int64 labels, on ``device``.

    uint8, like the on-device CIFAR-10 path keeps the real data set (normalised per batch).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def cifar_transform() -> Any:
    """The CIFAR-10 data module's training transform with ``augment: false`` (the configs' setting)."""
    from bnlightning.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD
    from bnlightning.data.loader import DeviceImageTransform

    return DeviceImageTransform(CIFAR10_MEAN, CIFAR10_STD)


def tensor_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> Any:
    """The on-device training loader exactly as ``bnlightning.data.CIFAR10`` builds it."""
    from bnlightning.data.loader import TensorLoader

    return TensorLoader(x, y, batch_size=batch_size, shuffle=True, drop_last=True, seed=seed, transform=cifar_transform())


def make_vgg(width: float, channels_last: bool = False, compile: bool = False, seed: int = 0) -> Any:
    """VGG-11-BN (``VGG(config="A", norm="batch")``), seeded, with the paper's optimizer (SGD, lr 0.1)."""
    from bnlightning.models import VGG

    torch.manual_seed(seed)
    return VGG(config="A", norm="batch", width=width, channels_last=channels_last, compile=compile)


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context Lightning's ``MixedPrecision`` plugin enters for ``precision``."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


def trainer_kwargs(device: torch.device, precision: str, max_steps: int, root: str | os.PathLike) -> dict[str, Any]:
    """``lightning.pytorch.Trainer`` arguments as the experiment configs set them.

    Kept from the configs: ``log_every_n_steps=50``, a ``CSVLogger`` (the configs' local
    logger; W&B is offline-only here and would measure disk writes), the default
    checkpointing (it saves after the timed window). Switched off, as fair for any
    benchmark: the progress bar (a terminal redraw per step) and the model summary.
    No validation loader is passed, so no validation runs inside the timed window.
    """
    from lightning.pytorch.loggers import CSVLogger

    accelerator = "gpu" if device.type == "cuda" else "cpu"
    devices = [device.index] if device.type == "cuda" else 1
    return {
        "accelerator": accelerator,
        "devices": devices,
        "precision": precision,
        "max_steps": max_steps,
        "max_epochs": -1,
        "log_every_n_steps": 50,
        "logger": CSVLogger(os.fspath(root), name="bench"),
        "default_root_dir": os.fspath(root),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners (GPU available, TPU, ...) and its expected warnings."""
    import logging
    import warnings

    names = ["lightning.pytorch", "lightning.fabric", "lightning"]
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*is not a multiple of Trainer.*")
            warnings.filterwarnings("ignore", message=".*Checkpoint directory.*")
            warnings.filterwarnings("ignore", message=".*val_dataloader.*")
            warnings.filterwarnings("ignore", message=".*hardware accelerator.*")
            warnings.filterwarnings("ignore", message=".*number of training batches.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*torch.compile.*")
            yield
    finally:
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)


# --- output --------------------------------------------------------------------------------
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
    return BENCH_DIR / f"{Path(script).stem}.json"


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds ``fn()`` takes (clocks read after a device sync) and its result."""
    t0 = now(device)
    out = fn()
    return now(device) - t0, out


def write_cifar_folder(root: str | os.PathLike, n_train: int, n_test: int = 100, seed: int = 0) -> Path:
    """A CIFAR-10-format folder of random images (``root/cifar-10-batches-py``), for the DataLoader path.

    The real on-disk format (pickled dicts of uint8 ``(N, 3072)`` rows and label lists), so
    ``bnlightning.data.CIFAR10(root, verify_checksums=False)`` reads it like the real data
    set. Random pixels cost the data path exactly what real ones do.
    """
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    for name, n in [*((f"data_batch_{i + 1}", s) for i, s in enumerate(sizes)), ("test_batch", n_test)]:
        entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), "labels": [int(i % 10) for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f, protocol=2)
    return folder


def begin(script: str, args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Apply ``--threads``, start the clock, print the machine line; return (machine info, start time)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = machine(args.device)
    info["clock"] = args.clock
    print(f"bench/{Path(script).name} on {machine_line(info)}; clock: {args.clock}")
    return info, started


def finish(script: str, argv: list[str] | None, args: argparse.Namespace, info: dict[str, Any], results: dict[str, Any], summary: str, started: float) -> dict[str, Any]:
    """Write the run's JSON (``--out`` or beside the script), print where, then the summary line."""
    elapsed = time.perf_counter() - started
    payload = {
        "script": f"bench/{Path(script).name}", "argv": sys.argv[1:] if argv is None else argv, "machine": info,
        "settings": {k: (str(v) if isinstance(v, (torch.device, Path)) else v) for k, v in vars(args).items()},
        **results, "summary": summary, "elapsed_s": elapsed,
    }
    out = write_json(args.out or default_out(script), payload)
    print(f"\n(wrote {out}; {elapsed:.0f} s)")
    print(summary)
    return payload
