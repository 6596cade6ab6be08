"""A ``torch.profiler`` trace of a few training steps, for a benchmark figure that missed its target.

Trains VGG-BN (``--config A`` = VGG-11, ``D`` = VGG-16) with ``Trainer.fit`` on the on-device
loader, exactly as ``bench/throughput.py`` does, and profiles ``--steps`` steps after
``--warmup`` untimed ones. With ``--callbacks`` the measurement callbacks are attached and
measure on every profiled step, so the trace shows what one measurement spends its time on.
Writes a Chrome trace (``trace.json.gz``, open it in Perfetto or ``chrome://tracing``) and the
operator table sorted by device time (``ops.txt``) into ``--trace-dir``.

Example::

    python bench/profile_steps.py --device cuda --precision bf16-mixed --trace-dir /tmp/prof
    python bench/profile_steps.py --device cuda --config D --callbacks --trace-dir /tmp/prof-cb
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli
import _fixtures

MEASUREMENTS = ("InternalCovariateShift", "LossLandscape", "ActivationStats", "HessianSpectrum")


class _Profile(Callback):
    """Starts the profiler after ``warmup`` steps and steps it once per training batch."""

    def __init__(self, prof: Any, warmup: int) -> None:
        self.prof, self.warmup = prof, warmup

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step >= self.warmup:
            self.prof.step()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/profile_steps.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N (default: cuda)")
    p.add_argument(
        "--precision", type=_cli.precision_list, default=["bf16-mixed"], help="one of 32-true, bf16-mixed, 16-mixed"
    )
    p.add_argument(
        "--config", choices=["A", "B", "D", "E"], default="A", help="VGG config: A = VGG-11 (default), D = VGG-16"
    )
    p.add_argument("--width", type=_cli.positive_float, default=1.0, help="VGG channel multiplier (1.0)")
    p.add_argument("--batch-size", type=_cli.positive_int, default=128)
    p.add_argument("--steps", type=_cli.positive_int, default=5, help="profiled steps (5)")
    p.add_argument("--warmup", type=_cli.nonnegative_int, default=10, help="untimed steps first (10)")
    p.add_argument("--callbacks", action="store_true", help=f"attach {', '.join(MEASUREMENTS)}, measuring every step")
    p.add_argument("--trace-dir", type=Path, required=True, help="folder for trace.json.gz and ops.txt")
    args = p.parse_args(argv)
    args.device = _cli.resolve_device(p, args.device)
    args.precision = args.precision[0]
    return args


def measurement_callbacks() -> list[Callback]:
    from bnlightning import callbacks

    return [getattr(callbacks, name)(every_n_steps=1) for name in MEASUREMENTS]


def main(argv: list[str] | None = None) -> Path:
    import lightning.pytorch as pl

    args = parse_args(argv)
    args.trace_dir.mkdir(parents=True, exist_ok=True)
    model = _fixtures.make_vgg(args.width, config=args.config).to(args.device)
    x, y = _fixtures.synthetic_cifar(args.batch_size * (args.warmup + args.steps + 2), args.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=args.steps, repeat=1)
    with (
        tempfile.TemporaryDirectory() as root,
        torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=False) as prof,
    ):
        kwargs = _fixtures.trainer_kwargs(args.device, args.precision, args.warmup + args.steps + 1, root)
        callbacks = [_Profile(prof, args.warmup), *(measurement_callbacks() if args.callbacks else [])]
        trainer = pl.Trainer(**kwargs, callbacks=callbacks, enable_checkpointing=False)
        trainer.fit(model, _fixtures.tensor_loader(x, y, args.batch_size))
    sort = "self_cuda_time_total" if args.device.type == "cuda" else "self_cpu_time_total"
    (args.trace_dir / "ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    raw = args.trace_dir / "trace.json"
    prof.export_chrome_trace(str(raw))
    with raw.open("rb") as src, gzip.open(args.trace_dir / "trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    print(
        f"profile of {args.steps} steps ({'with' if args.callbacks else 'without'} measurements): {args.trace_dir}",
        flush=True,
    )
    return args.trace_dir


if __name__ == "__main__":
    main()
