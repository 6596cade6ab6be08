"""What the measurement callbacks cost: throughput, time per measurement, peak memory.

Three measurements, all on VGG-11-BN (``VGG(config="A", norm="batch")``; ``--config D``: VGG-16) trained by
``Trainer.fit`` on uint8 CIFAR-shaped tensors through the on-device loader:

1. **Throughput** with ``InternalCovariateShift``, ``LossLandscape`` and
   ``ActivationStats`` all at their default ``every_n_steps`` (100) against no callback,
   alternating, ``--repeats`` times; timed windows are whole multiples of the interval,
   so each holds the same number of measurements as a long run would per step.
2. **Cost of one measurement** of each callback alone, in units of one training step of
   the *same run*: the callback measures every ``--probe-every`` steps; the clock is read
   (after a device sync) around every step and around the callback's measured
   ``on_before_optimizer_step``; cost = median measurement time / median time of the
   steps without a measurement. ``predicted overhead`` = sum of costs / ``every_n_steps``.
3. **Peak memory** of one measurement against one training step, as the peak of
   allocated tensor memory *above what was allocated when the window began* (weights,
   gradients, the batch are resident in both). On CUDA: ``torch.cuda.max_memory_allocated``
   after ``reset_peak_memory_stats``. On the CPU: process RSS is too coarse (glibc keeps
   freed pages, and a fresh process's RSS is dominated by the libraries), so every tensor
   allocation and free is recorded with ``torch.profiler`` (``profile_memory=True``) and
   the peak of their running sum is taken within each window, marked with
   ``record_function``. The training-step window is ``on_train_batch_start`` to
   ``on_train_batch_end`` (forward, backward, optimizer step) of a step without a measurement.

Quick mode (``--quick``): width 0.0625, batch 16, 20 timed steps with the callbacks every
20 steps (1 measurement of each per run; the overhead it prints is therefore ~5x that at
the default interval of 100) x 2 repeats for (1); the same network, 2 measurements per
callback for (2) and (3); within 90 s on a shared 2-core CPU (docs/benchmarks.md).

Example::

    python bench/overhead.py --quick
    python bench/overhead.py --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli
import _fixtures
import _report
import _timing

VGG_DEPTH = {"A": 11, "B": 13, "D": 16, "E": 19}
CALLBACKS = ("InternalCovariateShift", "LossLandscape", "ActivationStats")
QUICK = {
    "width": 0.0625,
    "batch_size": 16,
    "steps": 20,
    "warmup": 1,
    "repeats": 2,
    "every_n_steps": 20,
    "probe_width": 0.0625,
    "probe_batch_size": 16,
    "probe_measurements": 2,
}
FULL = {
    "width": 0.25,
    "batch_size": 128,
    "steps": 300,
    "warmup": 5,
    "repeats": 3,
    "every_n_steps": 100,
    "probe_width": 1.0,
    "probe_batch_size": 128,
    "probe_measurements": 5,
}


def parse_args(argv: list[str] | None = None) -> Any:
    p = _cli.bench_parser("bench/overhead.py", __doc__, QUICK, FULL)
    p.add_argument(
        "--precision", type=_cli.precision_list, default=["32-true"], help="one of 32-true, bf16-mixed, 16-mixed"
    )
    p.add_argument(
        "--width", type=_cli.positive_float, default=None, help="VGG channel multiplier of the throughput runs (1)"
    )
    p.add_argument("--batch-size", type=_cli.positive_int, default=None, help="batch size of the throughput runs (1)")
    p.add_argument(
        "--steps",
        type=_cli.positive_int,
        default=None,
        help="timed steps per throughput run; a multiple of --every-n-steps",
    )
    p.add_argument("--warmup", type=_cli.nonnegative_int, default=None, help="untimed steps before the timed ones")
    p.add_argument("--repeats", type=_cli.positive_int, default=None, help="throughput runs of each side")
    p.add_argument(
        "--every-n-steps",
        type=_cli.positive_int,
        default=None,
        help="callback interval of the throughput runs (callbacks' default: 100)",
    )
    p.add_argument(
        "--probe-width",
        type=_cli.positive_float,
        default=None,
        help="VGG channel multiplier of the cost/memory runs (2, 3)",
    )
    p.add_argument(
        "--probe-batch-size", type=_cli.positive_int, default=None, help="batch size of the cost/memory runs"
    )
    p.add_argument(
        "--probe-measurements", type=_cli.positive_int, default=None, help="timed measurements per callback (2)"
    )
    p.add_argument(
        "--probe-every", type=_cli.positive_int, default=2, help="measure every this many steps in the cost runs (2)"
    )
    p.add_argument("--channels-last", action="store_true", help="VGG(channels_last=True)")
    p.add_argument(
        "--config",
        choices=["A", "B", "D", "E"],
        default="A",
        help="VGG config of every run: A = VGG-11 (default), D = VGG-16",
    )
    args = p.parse_args(argv)
    if len(args.precision) != 1:
        p.error("argument --precision: give one precision")
    args.precision = args.precision[0]
    if args.steps % args.every_n_steps:
        p.error(f"argument --steps: must be a multiple of --every-n-steps ({args.every_n_steps}), got {args.steps}")
    if args.probe_every < 2:
        p.error("argument --probe-every: must be >= 2 (steps without a measurement give the unit)")
    args.device = _cli.resolve_device(p, args.device)
    args.timer = _timing.make_clock(p, args.clock, args.device)
    _cli.check_precisions(p, [args.precision], args.device)
    return args


def make_callbacks(names: list[str] | tuple[str, ...], every_n_steps: int) -> list[Any]:
    import bnlightning.callbacks as cbs

    return [getattr(cbs, name)(every_n_steps=every_n_steps) for name in names]


# --- memory probes ---------------------------------------------------------------------------
class MemoryWindows:
    """Peak tensor memory above the start of named windows (CUDA allocator or torch.profiler on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda: dict[str, list[int]] = {}
        self._base = 0
        self._prof: Any = None
        self._ranges: list[Any] = []

    def __enter__(self) -> MemoryWindows:
        if self.device.type == "cpu":
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)

    def open(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            rf = torch.profiler.record_function(f"bench/{name}")
            rf.__enter__()
            self._ranges.append(rf)

    def close(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda.setdefault(name, []).append(torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self._ranges.pop().__exit__(None, None, None)

    def peaks(self) -> dict[str, list[int]]:
        """name -> the peak (bytes above the window's start) of every window with that name."""
        if self.device.type == "cuda":
            return self.cuda
        from torch._C._profiler import _EventType

        allocs: list[tuple[int, int]] = []
        windows: list[tuple[str, int, int]] = []

        def walk(node: Any) -> None:
            kind = node.typed[0]
            if kind == _EventType.Allocation:
                allocs.append((node.start_time_ns, node.typed[1].alloc_size))
            elif kind == _EventType.TorchOp and node.name.startswith("bench/"):
                windows.append((node.name[len("bench/") :], node.start_time_ns, node.end_time_ns))
            for child in node.children:
                walk(child)

        for root in self._prof.profiler.kineto_results.experimental_event_tree():
            walk(root)
        allocs.sort()
        out: dict[str, list[int]] = {}
        for name, start, end in windows:
            level = peak = 0
            for t, size in allocs:
                if t < start:
                    continue
                if t > end:
                    break
                level += size
                peak = max(peak, level)
            out.setdefault(name, []).append(peak)
        return out


# --- instrumentation --------------------------------------------------------------------------
class StepClock(Callback):
    """Per-step wall time (device-synced) and whether a callback measured in that step."""

    def __init__(self, clock: _timing.Clock, measurers: list[Any], memory: MemoryWindows | None = None) -> None:
        self.clock, self.measurers, self.memory = clock, measurers, memory
        self.steps: list[tuple[float, bool]] = []
        self._t0 = 0.0
        self._measured = False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._measured = any(cb.is_measurement_step(trainer.global_step) for cb in self.measurers)
        if self.memory is not None and not self._measured:
            self.memory.open("step")
        self._t0 = self.clock.now()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps.append((self.clock.now() - self._t0, self._measured))
        if self.memory is not None and not self._measured:
            self.memory.close("step")


def time_measurements(cb: Any, clock: _timing.Clock, memory: MemoryWindows | None = None) -> list[float]:
    """Wrap ``cb``'s measuring hooks: returns the list its measurements' durations are appended to.

    Most callbacks measure inside ``on_before_optimizer_step``. The two-phase ones (any callback with an
    ``_after_step``: ``InternalCovariateShift`` with ``update_from="trainer"``, ``GradientCurvature``,
    ``EffectiveLearningRate``) only copy W^t there and measure in the optimizer's step post-hook, once
    W^(t+1) exists: both parts count, as one measurement.
    """
    durations: list[float] = []
    name = type(cb).__name__
    original = cb.on_before_optimizer_step
    # ICS's update_from="measured" has the post-hook method but measures in one phase
    after_step = getattr(cb, "_after_step", None) if getattr(cb, "update_from", "trainer") == "trainer" else None
    carried = [0.0]  # the W^t copy's time, added to the post-hook's measurement

    def timed_hook(trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if cb._batch is None or not cb.is_measurement_step(trainer.global_step):
            return original(trainer, pl_module, optimizer)
        if memory is not None:
            memory.open(name)
        t0 = clock.now()
        original(trainer, pl_module, optimizer)
        if after_step is not None:
            carried[0] = clock.now() - t0
            return  # the measurement itself runs after the optimizer step
        durations.append(clock.now() - t0)
        if memory is not None:
            memory.close(name)

    def timed_after_step() -> None:
        assert after_step is not None, "installed only for a callback that has one"
        if cb._pending is None:
            return after_step()
        t0 = clock.now()
        after_step()
        durations.append(carried[0] + clock.now() - t0)
        if memory is not None:
            memory.close(name)

    cb.on_before_optimizer_step = timed_hook  # Lightning looks hooks up on the instance
    if after_step is not None:
        cb._after_step = timed_after_step  # the post-hook calls self._after_step at step time
    return durations


def fit(model: Any, loader: Any, args: Any, max_steps: int, callbacks: list[Any]) -> None:
    import lightning.pytorch as pl

    with tempfile.TemporaryDirectory() as root, _fixtures.quiet_lightning():
        trainer = pl.Trainer(
            callbacks=callbacks, **_fixtures.trainer_kwargs(args.device, args.precision, max_steps, root)
        )
        trainer.fit(model, train_dataloaders=loader)


# --- the three measurements -------------------------------------------------------------------
def bench_throughput(args: Any) -> dict[str, Any]:
    """(1) all callbacks at ``every_n_steps`` vs none, alternating."""
    from throughput import WindowTimer

    model = _fixtures.make_vgg(args.width, args.channels_last, seed=args.seed, config=args.config).to(args.device)
    init = copy.deepcopy(model.state_dict())
    bs = args.batch_size
    x, y = _fixtures.synthetic_cifar((args.warmup + args.steps + 1) * bs, args.device, args.seed)
    ips: dict[str, list[float]] = {"none": [], "all three": []}
    for r in range(args.repeats):
        for side in _timing.alternate(list(ips), r):
            model.load_state_dict(init)
            timer = WindowTimer(args.timer, args.warmup, args.steps)
            cbs = make_callbacks(CALLBACKS, args.every_n_steps) if side == "all three" else []
            fit(model, _fixtures.tensor_loader(x, y, bs, args.seed), args, args.warmup + args.steps, [timer, *cbs])
            ips[side].append(args.steps * bs / timer.seconds)
            n = sum(cb.measurements for cb in cbs)
            print(
                f"  throughput repeat {r + 1}/{args.repeats}, callbacks {side}: {ips[side][-1]:,.1f} images/s ({n} "
                "measurements)",
                flush=True,
            )
    ratios = [a / b for a, b in zip(ips["all three"], ips["none"])]
    return {
        "width": args.width,
        "batch_size": bs,
        "steps": args.steps,
        "every_n_steps": args.every_n_steps,
        "none_images_per_s": _timing.median(ips["none"]),
        "callbacks_images_per_s": _timing.median(ips["all three"]),
        "none_runs": ips["none"],
        "callbacks_runs": ips["all three"],
        "ratios": ratios,
        "overhead_pct": 100.0 * (1.0 - _timing.median(ratios)),
    }


def bench_costs(args: Any) -> list[dict[str, Any]]:
    """(2) and (3): per callback, one measurement's time in step units and its peak memory vs a step's."""
    model = _fixtures.make_vgg(args.probe_width, args.channels_last, seed=args.seed, config=args.config).to(args.device)
    init = copy.deepcopy(model.state_dict())
    bs, every = args.probe_batch_size, args.probe_every
    # warm-up steps, then `probe_measurements` measurements `every` steps apart
    steps = every * (args.probe_measurements + 1)
    x, y = _fixtures.synthetic_cifar((steps + 1) * bs, args.device, args.seed)
    rows = []
    for name in CALLBACKS:
        model.load_state_dict(init)
        (cb,) = make_callbacks([name], every)
        durations = time_measurements(cb, args.timer)
        clock = StepClock(args.timer, [cb])
        fit(model, _fixtures.tensor_loader(x, y, bs, args.seed), args, steps, [clock, cb])
        durations = durations[1:] or durations  # the first measurement pays one-time set-up (vmap tracing, hooks)
        plain = [t for t, measured in clock.steps[1:] if not measured]  # skip the first step (allocator warm-up)

        # memory: a separate short run, so the profiler's own cost stays out of the timings above
        model.load_state_dict(init)
        (cb_mem,) = make_callbacks([name], every)
        memory = MemoryWindows(args.device)
        time_measurements(cb_mem, args.timer, memory)
        with memory:
            fit(
                model,
                _fixtures.tensor_loader(x, y, bs, args.seed),
                args,
                2 * every,
                [StepClock(args.timer, [cb_mem], memory), cb_mem],
            )
        peaks = memory.peaks()
        step_peak = max(peaks.get("step", [0])[1:] or peaks.get("step", [0]))  # skip the first step (warm-up)
        measure_peak = max(peaks.get(name, [0]))
        row = {
            "callback": name,
            "probe_width": args.probe_width,
            "batch_size": bs,
            "step_s": _timing.median(plain),
            "measurement_s": _timing.median(durations),
            "cost_in_steps": _timing.median(durations) / _timing.median(plain),
            "measurement_runs_s": durations,
            "step_runs_s": plain,
            "step_peak_bytes": step_peak,
            "measurement_peak_bytes": measure_peak,
            "memory_ratio": measure_peak / step_peak if step_peak else float("nan"),
        }
        rows.append(row)
        print(
            f"  {name}: one measurement = {row['cost_in_steps']:.2f} steps ({row['measurement_s'] * 1e3:.0f} ms vs "
            f"{row['step_s'] * 1e3:.0f} ms); peak {measure_peak / 2**20:.1f} MiB vs step {step_peak / 2**20:.1f} MiB",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info, started = _report.begin(__file__, args)
    print(
        f"VGG-{VGG_DEPTH[args.config]}-BN {args.precision}; throughput: width {args.width}, batch {args.batch_size}, "
        f"{args.steps} steps, {args.repeats} repeats; cost/memory: width {args.probe_width}, "
        f"batch {args.probe_batch_size}",
        flush=True,
    )
    costs = bench_costs(args)
    thr = bench_throughput(args)
    predicted = 100.0 * sum(r["cost_in_steps"] for r in costs) / args.every_n_steps
    mem_worst = max(r["memory_ratio"] for r in costs)

    print()
    print(
        _report.format_table(
            [
                "callback",
                "ms/measurement",
                "ms/step",
                "cost (steps)",
                f"overhead @{args.every_n_steps}",
                "peak MiB",
                "step MiB",
                "mem ratio",
            ],
            [
                [
                    r["callback"],
                    r["measurement_s"] * 1e3,
                    r["step_s"] * 1e3,
                    r["cost_in_steps"],
                    f"{100 * r['cost_in_steps'] / args.every_n_steps:.1f}%",
                    r["measurement_peak_bytes"] / 2**20,
                    r["step_peak_bytes"] / 2**20,
                    r["memory_ratio"],
                ]
                for r in costs
            ]
            + [
                [
                    "all three (predicted)",
                    "",
                    "",
                    sum(r["cost_in_steps"] for r in costs),
                    f"{predicted:.1f}%",
                    "",
                    "",
                    "",
                ],
                [f"all three (measured, width {thr['width']})", "", "", "", f"{thr['overhead_pct']:.1f}%", "", "", ""],
            ],
        )
    )
    target_t, target_m = 10.0, 3.0
    noise = 100.0 * (max(thr["ratios"]) - min(thr["ratios"])) / 2  # percentage points, the repeats' half range
    summary = (
        f"callbacks at every_n_steps={args.every_n_steps}: overhead {thr['overhead_pct']:.1f}% measured, "
        f"{predicted:.1f}% predicted ± {noise:.1f} (target <= {target_t:.0f}% measured: "
        f"{_timing.verdict(thr['overhead_pct'], target_t, noise, higher_is_better=False)}); "
        f"worst measurement/step peak memory {mem_worst:.2f}x (target <= {target_m:.0f}x: "
        f"{'met' if mem_worst <= target_m else 'missed'})"
    )
    results = {
        "memory_method": "cuda max_memory_allocated"
        if args.device.type == "cuda"
        else "torch.profiler profile_memory (tensor allocations)",
        "costs": costs,
        "throughput": thr,
        "predicted_overhead_pct": predicted,
        "worst_memory_ratio": mem_worst,
    }
    return _report.finish(__file__, argv, args, info, results, summary, started)


if __name__ == "__main__":
    main()
