"""What every bnlightning data module shares: argument checks, device and rank lookup."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from bnlightning.data.loader import TensorLoader


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


class DataModuleBase(pl.LightningDataModule):
    """Device, rank and loader choice, read from the attached trainer."""

    dataset_name: str = "?"

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
        return TensorLoader(*tensors, batch_size=batch_size, seed=self.hparams.seed, rank=rank, world_size=world, **kwargs)

    def _eval_loader(self) -> Any:
        raise NotImplementedError

    def val_dataloader(self) -> Any:
        return self._eval_loader()

    def test_dataloader(self) -> Any:
        return self._eval_loader()
