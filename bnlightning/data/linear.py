"""The deep linear network's synthetic regression data (Santurkar et al. 2018, Fig. 5).

x ~ N(0, I_dim), y = A x (+ optional Gaussian noise), with A a fixed dim x dim matrix of
i.i.d. N(0, 1) entries; A and the samples are fixed by ``seed``. The paper trains on
1,000 samples with full-batch gradient descent.
"""

from __future__ import annotations

from typing import Any

import torch

from bnlightning.data._common import DataModuleBase, Split, check_positive_int, filled
from bnlightning.data.loader import mix_seed

__all__ = ["LinearRegressionDataModule"]


class LinearRegressionDataModule(DataModuleBase):
    """Synthetic linear regression: ``(x, y)`` float32 batches of shape ``(B, dim)``.

    The validation (and test) set is a fresh 1,000 samples from the same A (no noise
    added, so the validation loss measures the error in recovering A).

    Args:
        num_samples: training samples (paper: 1,000).
        dim: input and output dimension (paper: 10).
        seed: fixes A, the training and the validation samples, and shuffling.
        batch_size: ``None`` for full batch (every step sees all ``num_samples``; paper),
            or a mini-batch size (shuffled, last incomplete batch dropped).
        noise: standard deviation of Gaussian noise added to the training targets.
        on_device: the data is tiny, so by default (``None``) it sits on the trainer's
            device behind a :class:`~bnlightning.data.loader.TensorLoader`;
            ``False`` uses a ``DataLoader`` over a ``TensorDataset``.
        steps_per_epoch: full-batch steps that make one Lightning epoch (on-device path,
            full batch only). One epoch of full-batch training is a single step, so the
            paper's 10,000 steps would be 10,000 epochs, each with its own epoch hooks and
            validation run; a larger value (e.g. 100) makes that work 100x rarer.

    Raises:
        ValueError: a non-positive ``num_samples``, ``dim``, ``batch_size`` or
            ``steps_per_epoch``, or negative ``noise``.
    """

    num_val_samples = 1000

    def __init__(
        self,
        num_samples: int = 1000,
        dim: int = 10,
        seed: int = 0,
        batch_size: int | None = None,
        noise: float = 0.0,
        on_device: bool | None = None,
        steps_per_epoch: int = 1,
    ) -> None:
        super().__init__()
        check_positive_int("num_samples", num_samples)
        check_positive_int("dim", dim)
        check_positive_int("batch_size", batch_size, allow_none=True)
        check_positive_int("steps_per_epoch", steps_per_epoch)
        if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
            raise ValueError(f"noise must be a non-negative number, got {noise!r}")
        if batch_size is not None and batch_size > num_samples:
            raise ValueError(f"batch_size ({batch_size}) is larger than num_samples ({num_samples})")
        self.save_hyperparameters()
        self.num_samples, self.dim, self.seed, self.noise = num_samples, dim, seed, float(noise)
        self.batch_size, self.eval_batch_size, self.steps_per_epoch = batch_size, self.num_val_samples, steps_per_epoch
        self.on_device_arg = on_device
        self.A: torch.Tensor | None = None
        self.train_x: torch.Tensor | None = None
        self.train_y: torch.Tensor | None = None
        self.val_x: torch.Tensor | None = None
        self.val_y: torch.Tensor | None = None
        self.on_device: bool | None = None

    @property
    def dataset_name(self) -> str:  # type: ignore[override]  # a class attribute in the base, computed here
        h = self
        noise = f", noise std {h.noise:g}" if h.noise else ""
        return f"synthetic linear regression y = A x (dim {h.dim}, {h.num_samples} samples{noise}, seed {h.seed})"

    def make_tensors(self) -> dict[str, torch.Tensor]:
        """A, train and validation tensors on the CPU; the same for the same arguments."""
        h = self
        g = torch.Generator().manual_seed(mix_seed(h.seed, 0x11AEA))
        A = torch.randn(h.dim, h.dim, generator=g)
        x = torch.randn(h.num_samples, h.dim, generator=g)
        y = x @ A.T
        if h.noise:
            y = y + h.noise * torch.randn(y.shape, generator=g)
        gv = torch.Generator().manual_seed(mix_seed(h.seed, 0x7A1))
        xv = torch.randn(self.num_val_samples, h.dim, generator=gv)
        return {"A": A, "train_x": x, "train_y": y, "val_x": xv, "val_y": xv @ A.T}

    def setup(self, stage: str | None = None) -> None:
        self.on_device = self.use_on_device(self.on_device_arg, default_on_cpu=True)
        if self.A is None:
            dev = self.device if self.on_device else torch.device("cpu")
            t = {k: v.to(dev) for k, v in self.make_tensors().items()}
            self.A, self.train_x, self.train_y, self.val_x, self.val_y = (
                t["A"],
                t["train_x"],
                t["train_y"],
                t["val_x"],
                t["val_y"],
            )
        self.check_train_batch_size(stage)

    def _split_data(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        return filled(self.train_x, self.train_y) if split == "train" else filled(self.val_x, self.val_y)

    def _batch_size(self, split: Split) -> int:
        if split != "train":
            return self.num_val_samples
        if self.batch_size is None:  # full batch: this rank's whole share
            return -(-self.num_samples // self.rank_and_world_size[1])
        return self.batch_size

    def _shuffle(self, split: Split) -> bool:
        return split == "train" and self.batch_size is not None

    def _loader_options(self, split: Split) -> dict[str, Any]:
        # One Lightning epoch of full-batch training = steps_per_epoch passes (on-device path only).
        if split == "train" and self.on_device and self.batch_size is None:
            return {"repeat": self.steps_per_epoch}
        return {}
