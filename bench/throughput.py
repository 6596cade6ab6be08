"""Training images/s: bnlightning (``Trainer.fit``) against a hand-written PyTorch loop.

Both sides train the same model object (VGG-11-BN, ``VGG(config="A", norm="batch")``,
reset to the same initial weights before every run) with SGD (lr 0.1) on the same
uint8 CIFAR-shaped tensors, drawn by the same on-device loader (``TensorLoader`` with
the CIFAR-10 normalisation), at the same precision (Lightning's ``precision=`` against
``torch.autocast`` with the same dtype). The Lightning side is what users get from the
configs: the module's per-step logging and torchmetrics accuracy, divergence tracking,
``log_every_n_steps=50`` with a CSV logger; only the progress bar and model summary are
off. The hand loop does forward, cross-entropy, ``zero_grad``, backward, ``step`` and
reads its loss every 50 steps.

Each repeat runs both sides back to back, in alternating order; a run first trains
``--warmup`` untimed steps, then ``--steps`` timed ones (clocks read after a device
sync). The table gives median images/s of each side and the median of the per-repeat
ratios. A second table compares the two CIFAR-10 data paths of ``bnlightning.data.CIFAR10DataModule``
(``on_device: false`` = torchvision ``DataLoader`` with workers; ``on_device: true`` =
``TensorLoader``) on a CIFAR-format folder of random images: the loader alone and a
Lightning training run fed by it.

Quick mode (``--quick``): width 0.125 (channels / 8), batch 64, fp32 only (bf16 autocast
on a CPU is several times slower than fp32 and says nothing about a GPU), 4 timed steps
after 1 warm-up step, 3 repeats; within 90 s on a shared 2-core CPU (docs/benchmarks.md).

Example::

    python bench/throughput.py --quick
    python bench/throughput.py --device cuda --precisions 32-true,bf16-mixed --channels-last
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli
import _fixtures
import _report
import _timing

from bnlightning.data.fake import make_fake_cifar10

QUICK = {"width": 0.125, "batch_sizes": [64], "precisions": ["32-true"], "steps": 4, "warmup": 1, "repeats": 3}
FULL = {
    "width": 1.0,
    "batch_sizes": [128, 512],
    "precisions": ["32-true", "bf16-mixed"],
    "steps": 100,
    "warmup": 5,
    "repeats": 5,
}


def parse_args(argv: list[str] | None = None) -> Any:
    p = _cli.bench_parser("bench/throughput.py", __doc__, QUICK, FULL)
    p.add_argument("--batch-sizes", type=_cli.int_list, default=None, help="comma-separated, e.g. 128,512")
    p.add_argument(
        "--precisions", type=_cli.precision_list, default=None, help="comma-separated: 32-true, bf16-mixed, 16-mixed"
    )
    p.add_argument("--steps", type=_cli.positive_int, default=None, help="timed steps per run")
    p.add_argument("--warmup", type=_cli.nonnegative_int, default=None, help="untimed steps before the timed ones")
    p.add_argument("--repeats", type=_cli.positive_int, default=None, help="runs of each side per configuration")
    p.add_argument("--width", type=_cli.positive_float, default=None, help="VGG channel multiplier (1.0 = real VGG-11)")
    p.add_argument(
        "--channels-last", action="store_true", help="VGG(channels_last=True): NHWC convs (faster on recent GPUs)"
    )
    p.add_argument("--compile", action="store_true", help="VGG(compile=True): torch.compile the network for both sides")
    p.add_argument("--no-data-path", action="store_true", help="skip the DataLoader vs on-device comparison")
    p.add_argument(
        "--num-workers",
        type=_cli.nonnegative_int,
        default=2,
        help="DataLoader workers of the DataLoader path (CIFAR10DataModule's default: 2)",
    )
    args = p.parse_args(argv)
    args.device = _cli.resolve_device(p, args.device)
    args.timer = _timing.make_clock(p, args.clock, args.device)
    _cli.check_precisions(p, args.precisions, args.device)
    if args.clock == "cpu" and not args.no_data_path and args.num_workers > 0:
        p.error("argument --clock: cpu time misses DataLoader workers; add --no-data-path or --num-workers 0")
    return args


# --- the two sides -----------------------------------------------------------------------------
class WindowTimer(Callback):
    """Reads ``clock`` (after a device sync) after step ``warmup`` and after step ``warmup + steps``."""

    def __init__(self, clock: _timing.Clock, warmup: int, steps: int) -> None:
        self.clock, self.warmup, self.steps = clock, warmup, steps
        self.t0: float | None = None
        self.t1: float | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.warmup == 0:
            self.t0 = self.clock.now()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        done = trainer.global_step  # optimizer steps finished so far
        if done == self.warmup and self.t0 is None:
            self.t0 = self.clock.now()
        elif done == self.warmup + self.steps:
            self.t1 = self.clock.now()

    @property
    def seconds(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("the timed window was not reached; is the loader shorter than warmup + steps?")
        return self.t1 - self.t0


def lightning_run(
    model: Any, train_loader: Any, clock: _timing.Clock, precision: str, warmup: int, steps: int, datamodule: Any = None
) -> float:
    """Seconds of ``steps`` timed steps of ``Trainer.fit`` (after ``warmup`` untimed ones) on ``clock.device``."""
    import lightning.pytorch as pl

    timer = WindowTimer(clock, warmup, steps)
    with tempfile.TemporaryDirectory() as root, _fixtures.quiet_lightning():
        trainer = pl.Trainer(
            callbacks=[timer], **_fixtures.trainer_kwargs(clock.device, precision, warmup + steps, root)
        )
        if datamodule is not None:
            trainer.fit(model, datamodule=datamodule)
        else:
            trainer.fit(model, train_dataloaders=train_loader)
    return timer.seconds


def hand_run(model: Any, train_loader: Any, clock: _timing.Clock, precision: str, warmup: int, steps: int) -> float:
    """The same training written by hand: seconds of ``steps`` timed steps after ``warmup``."""
    device = clock.device
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = iter(train_loader)
    t0 = clock.now() if warmup == 0 else 0.0
    for k in range(warmup + steps):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _fixtures.autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (k + 1) % 50 == 0:
            float(loss)  # a loop that prints its loss every 50 steps (the configs' log interval)
        if k + 1 == warmup:
            t0 = clock.now()
    return clock.now() - t0


# --- the comparisons ---------------------------------------------------------------------------
def bench_parity(args: Any, model: Any, init: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """bnlightning vs the hand loop for every (batch size, precision)."""
    rows = []
    for bs in args.batch_sizes:
        x, y = _fixtures.synthetic_cifar((args.warmup + args.steps + 1) * bs, args.device, args.seed)
        for precision in args.precisions:
            secs: dict[str, list[float]] = {"bnlightning": [], "hand": []}
            for r in range(args.repeats):
                for side in _timing.alternate(["bnlightning", "hand"], r):
                    model.load_state_dict(init)  # same starting weights (and BN statistics) for every run
                    loader = _fixtures.tensor_loader(x, y, bs, seed=args.seed)
                    run = lightning_run if side == "bnlightning" else hand_run
                    secs[side].append(run(model, loader, args.timer, precision, args.warmup, args.steps))
                    print(
                        f"  batch {bs} {precision} repeat {r + 1}/{args.repeats} {side}: "
                        f"{args.steps * bs / secs[side][-1]:,.1f} images/s",
                        flush=True,
                    )
            ips = {k: [args.steps * bs / s for s in v] for k, v in secs.items()}
            ratios = [a / b for a, b in zip(ips["bnlightning"], ips["hand"])]
            rows.append(
                {
                    "batch_size": bs,
                    "precision": precision,
                    "bnlightning_images_per_s": _timing.median(ips["bnlightning"]),
                    "hand_images_per_s": _timing.median(ips["hand"]),
                    "ratio": _timing.median(ratios),
                    "ratios": ratios,
                    "bnlightning_runs": ips["bnlightning"],
                    "hand_runs": ips["hand"],
                    "noise_pct": max(_timing.spread(ips["bnlightning"]), _timing.spread(ips["hand"])),
                }
            )
        del x, y
    return rows


def loader_only(loader: Any, clock: _timing.Clock, warmup: int, batches: int) -> float:
    """images/s of drawing ``batches`` batches (moved to ``clock.device``, as Lightning does) after ``warmup``."""
    device = clock.device
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = clock.now()
    n = 0
    for _ in range(batches):
        x, y = next(it)
        x = x.to(device, non_blocking=True)
        n += x.shape[0]
    sync_t = clock.now()
    del it  # stops DataLoader workers
    return n / (sync_t - t0)


def bench_data_paths(args: Any, model: Any, init: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """``CIFAR10DataModule(on_device=False)`` (DataLoader) vs ``CIFAR10DataModule(on_device=True)`` (TensorLoader)."""
    from bnlightning.data import CIFAR10DataModule

    bs, precision = args.batch_sizes[0], args.precisions[0]
    n_batches = args.warmup + args.steps + 1  # one more than trained, so the epoch (and validation) never ends
    loader_batches = max(args.steps, 20)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        make_fake_cifar10(root, n_train=max(n_batches, loader_batches + 6) * bs, n_test=bs, seed=args.seed)

        def module(on_device: bool) -> Any:
            return CIFAR10DataModule(
                root=root,
                download=False,
                batch_size=bs,
                eval_batch_size=bs,
                on_device=on_device,
                num_workers=args.num_workers,
                seed=args.seed,
                verify_checksums=False,
            )

        paths = {"DataLoader": False, "on-device": True}
        loader_ips: dict[str, list[float]] = {k: [] for k in paths}
        train_ips: dict[str, list[float]] = {k: [] for k in paths}
        for r in range(args.repeats):
            for name in _timing.alternate(list(paths), r):
                loader = _standalone_loader(module(paths[name]), args.device)
                loader_ips[name].append(loader_only(loader, args.timer, 5, loader_batches))
                del loader
                model.load_state_dict(init)
                secs = lightning_run(
                    model, None, args.timer, precision, args.warmup, args.steps, datamodule=module(paths[name])
                )
                train_ips[name].append(args.steps * bs / secs)
                print(
                    f"  data path {name} repeat {r + 1}/{args.repeats}: loader {loader_ips[name][-1]:,.0f} images/s, "
                    f"training {train_ips[name][-1]:,.1f} images/s",
                    flush=True,
                )
    for kind, ips in (("loader only", loader_ips), ("training", train_ips)):
        ratios = [a / b for a, b in zip(ips["on-device"], ips["DataLoader"])]
        rows.append(
            {
                "what": kind,
                "batch_size": bs,
                "precision": precision if kind == "training" else "-",
                "dataloader_images_per_s": _timing.median(ips["DataLoader"]),
                "on_device_images_per_s": _timing.median(ips["on-device"]),
                "ratio": _timing.median(ratios),
                "ratios": ratios,
            }
        )
    return rows


def _standalone_loader(dm: Any, device: torch.device) -> Any:
    """The data module's training loader outside a Trainer, on ``device`` (as ``setup`` would place it)."""
    from bnlightning.data.cifar10 import CIFAR10Dataset, _to_tensors

    if dm.hparams.on_device:  # what CIFAR10DataModule.setup + train_dataloader build, with the data on `device`
        x, y = _to_tensors(CIFAR10Dataset(dm.root, train=True, verify_checksums=False), device)
        return dm.tensor_loader(
            x, y, batch_size=dm.hparams.batch_size, train=True, transform=dm.device_transform(train=True)
        )
    dm.setup("fit")
    return dm.train_dataloader()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info, started = _report.begin(__file__, args)
    print(
        f"VGG-11-BN width {args.width}, batch sizes {args.batch_sizes}, {args.precisions}, "
        f"{args.steps} timed steps after {args.warmup}, {args.repeats} repeats"
        f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}",
        flush=True,
    )
    model = _fixtures.make_vgg(args.width, args.channels_last, args.compile, args.seed).to(args.device)
    if args.compile:
        model.configure_model()  # compile once, before either side runs, so both use the compiled net
    init = copy.deepcopy(model.state_dict())

    parity = bench_parity(args, model, init)
    data = [] if args.no_data_path else bench_data_paths(args, model, init)

    print()
    print(
        _report.format_table(
            ["batch", "precision", "bnlightning img/s", "hand loop img/s", "ratio", "noise ±%"],
            [
                [
                    r["batch_size"],
                    r["precision"],
                    r["bnlightning_images_per_s"],
                    r["hand_images_per_s"],
                    r["ratio"],
                    r["noise_pct"],
                ]
                for r in parity
            ],
        )
    )
    if data:
        print()
        print(
            _report.format_table(
                ["data path", "batch", "precision", "DataLoader img/s", "on-device img/s", "ratio"],
                [
                    [
                        r["what"],
                        r["batch_size"],
                        r["precision"],
                        r["dataloader_images_per_s"],
                        r["on_device_images_per_s"],
                        r["ratio"],
                    ]
                    for r in data
                ],
            )
        )
    worst_row = min(parity, key=lambda r: r["ratio"])
    worst, noise = worst_row["ratio"], worst_row["ratio"] * worst_row["noise_pct"] / 100
    target = 0.95
    summary = (
        f"bnlightning / hand loop images/s: worst {worst:.3f}x ± {noise:.3f} (target >= {target}: "
        f"{_timing.verdict(worst, target, noise)})"
    )
    if data:
        summary += f"; on-device / DataLoader: {data[1]['ratio']:.2f}x training, {data[0]['ratio']:.1f}x loader only"
    results = {"parity": parity, "data_paths": data, "worst_ratio": worst, "target_ratio": target}
    return _report.finish(__file__, argv, args, info, results, summary, started)


if __name__ == "__main__":
    main()
