"""The one loader factory (``DataModuleBase._dataloader``) and the data modules' old names.

The reference loaders below are the per-module branches the factory replaced, written out: the
factory must hand out the same batches in the same order (same seeds, same draws from torch's
global RNG), on both paths, for every split.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bnlightning.data import CIFAR10DataModule, DigitsDataModule, LinearRegressionDataModule, TensorLoader
from bnlightning.data.fake import make_fake_cifar10


def _batches(loader: Iterable, epochs: int = 2) -> list[list[torch.Tensor]]:
    """Every batch of ``epochs`` epochs; torch's global RNG seeded first, as the DataLoader path draws from it."""
    torch.manual_seed(1234)
    out = []
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        out += [[t.clone() for t in batch] for batch in loader]
    out.append([torch.randint(0, 2**30, (4,))])  # the global RNG left in the same state
    return out


def _assert_same_batches(got: Iterable, expected: Iterable) -> None:
    a, b = _batches(got), _batches(expected)
    assert len(a) == len(b) and len(a) > 2
    for x, y in zip(a, b):
        assert len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y))


def _tensor_reference(
    dm: Any, x: torch.Tensor, y: torch.Tensor, batch_size: int, train: bool, **kw: Any
) -> TensorLoader:
    return TensorLoader(x, y, batch_size=batch_size, shuffle=train, drop_last=train, seed=dm.hparams.seed, **kw)


def _dataloader_reference(dataset: Any, batch_size: int, train: bool, seed: int, **kw: Any) -> DataLoader:
    if train:  # the training split's order comes from a seeded generator, the others' draw nothing for it
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
            **kw,
        )
    return DataLoader(dataset, batch_size=batch_size, **kw)


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("kw", [{}, {"image_size": 16, "rgb": True, "seed": 3}], ids=["flat", "images"])
def test_digits_loaders_are_the_old_ones(on_device: bool, kw: dict) -> None:
    dm = DigitsDataModule(batch_size=50, eval_batch_size=100, on_device=on_device, **kw)
    dm.setup("fit")
    for split, (x, y), bs in (
        ("train", (dm.train_x, dm.train_y), 50),
        ("val", (dm.val_x, dm.val_y), 100),
        ("test", (dm.val_x, dm.val_y), 100),
    ):
        train = split == "train"
        ref = (
            _tensor_reference(dm, x, y, bs, train)
            if on_device
            else _dataloader_reference(TensorDataset(x, y), bs, train, dm.hparams.seed)
        )
        _assert_same_batches(getattr(dm, f"{split}_dataloader")(), ref)


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("batch_size", [None, 64], ids=["full", "mini"])
def test_linear_regression_loaders_are_the_old_ones(on_device: bool, batch_size: int | None) -> None:
    dm = LinearRegressionDataModule(
        num_samples=300, batch_size=batch_size, on_device=on_device, steps_per_epoch=3, noise=0.1, seed=2
    )
    dm.setup("fit")
    full = batch_size is None
    bs = 300 if full else batch_size
    if on_device:
        ref = _tensor_reference(dm, dm.train_x, dm.train_y, bs, not full, repeat=3 if full else 1)
    else:  # the old full-batch DataLoader: in order, a (never used) seeded generator all the same
        ref = DataLoader(
            TensorDataset(dm.train_x, dm.train_y),
            batch_size=bs,
            shuffle=not full,
            drop_last=not full,
            generator=torch.Generator().manual_seed(2),
        )
    _assert_same_batches(dm.train_dataloader(), ref)
    assert len(_batches(dm.train_dataloader(), epochs=1)) - 1 == (3 if full and on_device else 1 if full else 300 // 64)
    for split in ("val", "test"):
        ref = (
            _tensor_reference(dm, dm.val_x, dm.val_y, 1000, False)
            if on_device
            else _dataloader_reference(TensorDataset(dm.val_x, dm.val_y), 1000, False, 2)
        )
        _assert_same_batches(getattr(dm, f"{split}_dataloader")(), ref)


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("augment", [False, True])
def test_cifar_loaders_are_the_old_ones(tmp_path: Path, on_device: bool, augment: bool) -> None:
    make_fake_cifar10(tmp_path, n_train=60, n_test=25, seed=1)
    dm = CIFAR10DataModule(
        root=str(tmp_path),
        download=False,
        verify_checksums=False,
        num_workers=0,
        batch_size=16,
        eval_batch_size=10,
        on_device=on_device,
        augment=augment,
        seed=5,
    )
    dm.setup("fit")
    for split in ("train", "val", "test"):
        train = split == "train"
        bs = 16 if train else 10
        if on_device:
            x, y = (dm.train_x, dm.train_y) if train else (dm.test_x, dm.test_y)
            ref = _tensor_reference(dm, x, y, bs, train, transform=dm.device_transform(train=train))
        else:
            ref = _dataloader_reference(dm.train_set if train else dm.test_set, bs, train, 5, **dm._loader_kwargs())
        _assert_same_batches(getattr(dm, f"{split}_dataloader")(), ref)


def test_factory_sets_up_on_first_use_and_refuses_an_unknown_split() -> None:
    dm = LinearRegressionDataModule(num_samples=40, batch_size=8)
    assert dm.on_device is None
    assert len(dm.val_dataloader()) == 1 and dm.on_device is True  # setup ran on demand
    with pytest.raises(ValueError, match="unknown split 'training'; accepted: train, val, test"):
        dm._dataloader("training")
