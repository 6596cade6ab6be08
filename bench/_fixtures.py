"""Model, data and Trainer set-up shared by the benchmark scripts, built the way the package builds them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

#: The VGG configurations ``bnlightning.models.VGG`` builds ("A" = VGG-11, "D" = VGG-16).
VggConfig = Literal["A", "B", "D", "E"]


def synthetic_cifar(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random CIFAR-shaped images, uint8 ``(n, 3, 32, 32)``, and int64 labels, on ``device``.

    uint8, like the on-device CIFAR-10 path keeps the real data set (normalised per batch).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def tensor_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> Any:
    """The on-device training loader of ``bnlightning.data.CIFAR10DataModule`` (``augment: false``), over ``x, y``.

    Built by the data module itself (its ``train_dataloader`` on tensors already in
    place), so the benchmark draws batches exactly as training does.
    """
    from bnlightning.data import CIFAR10DataModule

    dm = CIFAR10DataModule(batch_size=batch_size, seed=seed, on_device=True, download=False)
    dm.train_x, dm.train_y, dm.on_device = x, y, True
    return dm.train_dataloader()


def make_vgg(
    width: float, channels_last: bool = False, compile: bool = False, seed: int = 0, config: VggConfig = "A"
) -> Any:
    """VGG-BN (``VGG(config=config, norm="batch")``; "A" = VGG-11, "D" = VGG-16), seeded, with the paper's optimizer
    (SGD, lr 0.1)."""
    from bnlightning.models import VGG

    torch.manual_seed(seed)
    return VGG(config=config, norm="batch", width=width, channels_last=channels_last, compile=compile)


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
