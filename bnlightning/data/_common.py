"""What every bnlightning data module shares: argument checks, device and rank lookup, and the
one loader factory (on-device :class:`TensorLoader` or ``DataLoader``) behind every split."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from bnlightning.data.loader import TensorLoader

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
# The Lightning stage whose setup() a split needs when a loader is asked for before setup ran.
_STAGE = {"train": "fit", "val": "validate", "test": "test"}


def check_positive_int(name: str, value: object, allow_none: bool = False) -> None:
    """Raise one clear ``ValueError`` unless ``value`` is a positive int (or ``None`` if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        accepted = "a positive integer" + (" or null" if allow_none else "")
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def check_nonnegative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def filled(x: torch.Tensor | None, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a split that ``setup()`` has filled; a loader asked for before that is a bug."""
    if x is None or y is None:
        raise RuntimeError("the data module's tensors are not set up yet (setup() fills them)")
    return x, y


class DataModuleBase(pl.LightningDataModule):
    """Device, rank and loader choice, read from the attached trainer."""

    dataset_name: str = "?"
    # Set by every subclass's __init__ from its arguments (also saved as hyperparameters).
    seed: int
    batch_size: int | None
    eval_batch_size: int
    on_device_arg: bool | None  # the user's choice; ``on_device`` below is the path setup() took

    @property
    def device(self) -> torch.device:
        """The trainer's root device when attached, else the CPU."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            try:
                return trainer.strategy.root_device
            except Exception:  # strategy not set up yet
                pass
        return torch.device("cpu")

    @property
    def rank_and_world_size(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def use_on_device(self, on_device: bool | None, default_on_cpu: bool) -> bool:
        """``on_device`` if set; otherwise True on CUDA and ``default_on_cpu`` elsewhere."""
        if on_device is not None:
            return bool(on_device)
        return self.device.type == "cuda" or default_on_cpu

    def tensor_loader(self, *tensors: torch.Tensor, batch_size: int, train: bool, **kwargs: Any) -> TensorLoader:
        """A :class:`TensorLoader` for this process: shuffled, dropping the last partial
        batch and seeded when ``train``; sharded by the trainer's rank either way."""
        rank, world = self.rank_and_world_size
        kwargs.setdefault("shuffle", train)
        kwargs.setdefault("drop_last", train)
        return TensorLoader(*tensors, batch_size=batch_size, seed=self.seed, rank=rank, world_size=world, **kwargs)

    # ---- the loader factory: each data module only says what a split holds -------------------
    on_device: bool | None = None  # set by the module's setup(): which of the two paths is in use

    def check_train_batch_size(self, stage: str | None) -> None:
        """Fail at ``setup`` under a trainer when ``batch_size`` exceeds this process's training samples.

        The training loader drops the last partial batch, so such a batch size gives no step
        at all (and, on the on-device path, a traceback when the loader is built).

        Raises:
            ValueError: ``batch_size`` above the training samples per process.
        """
        if stage not in (None, "fit") or not self._shuffle("train") or getattr(self, "trainer", None) is None:
            # no training; a loader that keeps its last partial batch (full-batch training); or no
            # trainer (the data inspected directly, no training loader built)
            return
        data = self._split_data("train")
        n = (
            int(data[0].shape[0]) if isinstance(data, (tuple, list)) else len(cast(Sized, data))
        )  # map-style datasets have a length
        _, world = self.rank_and_world_size
        per_process = n // world
        batch_size = self._batch_size("train")
        if batch_size > per_process:
            shared = f" over {world} processes" if world > 1 else ""
            raise ValueError(
                f"batch_size: got {batch_size}; accepted: at most {per_process}, the training samples per process "
                f"({n}{shared}); "
                f"the last partial batch is dropped, so a larger batch gives no training step"
            )

    def _split_data(self, split: Split) -> Sequence[torch.Tensor] | Dataset:
        """What ``split`` holds: its tensors (on the device on the on-device path), or on the
        ``DataLoader`` path a ``Dataset`` (tensors are wrapped in a ``TensorDataset``)."""
        raise NotImplementedError

    def _batch_size(self, split: Split) -> int:
        """Samples per batch: ``batch_size`` for training, ``eval_batch_size`` otherwise."""
        batch_size = self.batch_size if split == "train" else self.eval_batch_size
        assert batch_size is not None, "a module with full-batch training overrides _batch_size"
        return batch_size

    def _shuffle(self, split: Split) -> bool:
        """Shuffle (and drop the last partial batch): the training split only."""
        return split == "train"

    def _loader_options(self, split: Split) -> dict[str, Any]:
        """Extra keyword arguments of this split's loader on the path in use (a transform for
        :class:`TensorLoader`, worker settings for ``DataLoader``)."""
        return {}

    def _dataloader(self, split: Split) -> TensorLoader | DataLoader:
        """The loader of ``split`` on the path ``setup`` chose.

        On-device: a :class:`TensorLoader` over the split's tensors, seeded by ``seed`` and sharded
        by rank. Otherwise a ``DataLoader``; the training split gets a generator seeded by ``seed``
        (so its order never draws from torch's global RNG), the others none, as before.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Raises:
            ValueError: an unknown split (a bug in the caller, not user input).

        Example:
            >>> from bnlightning.data import LinearRegressionDataModule
            >>> dm = LinearRegressionDataModule(num_samples=8, dim=2, batch_size=4)
            >>> [tuple(x.shape) for x, _ in dm._dataloader("train")]
            [(4, 2), (4, 2)]
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
        if self.on_device is None:
            self.setup(_STAGE[split])
        data, batch_size, shuffle = self._split_data(split), self._batch_size(split), self._shuffle(split)
        options = self._loader_options(split)
        if self.on_device:
            assert not isinstance(data, Dataset), "the on-device path holds tensors"
            return self.tensor_loader(*data, batch_size=batch_size, train=shuffle, **options)
        dataset = data if isinstance(data, Dataset) else TensorDataset(*data)
        if split == "train":
            options["generator"] = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, **options)

    def train_dataloader(self) -> TensorLoader | DataLoader:
        return self._dataloader("train")

    def val_dataloader(self) -> TensorLoader | DataLoader:
        return self._dataloader("val")

    def test_dataloader(self) -> TensorLoader | DataLoader:
        return self._dataloader("test")
