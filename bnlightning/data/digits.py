"""scikit-learn's bundled handwritten digits: real data that needs no download.

1,797 grey-scale 8x8 images of the digits 0-9 (UCI "Optical Recognition of Handwritten
Digits", test part), shipped inside scikit-learn. Small enough that an MLP with and
without BatchNorm trains in seconds on a laptop CPU: the quickstart data set, and the
offline stand-in for MNIST in the Ioffe & Szegedy-style sigmoid MLP. It is *not* CIFAR-10;
``dataset_name`` says which variant was used so figures and logs cannot be mistaken.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bnlightning.data._common import DataModuleBase, Split, check_positive_int, filled

__all__ = ["DigitsDataModule"]


class DigitsDataModule(DataModuleBase):
    """The 8x8 digits, as flat standardised vectors (MLP) or as resized images (VGG).

    * ``image_size=None``: ``(N, 64)`` float vectors, each feature standardised with the
      training split's mean and std (constant pixels keep std 1).
    * ``image_size=S``: ``(N, C, S, S)`` images, pixel values / 16 resized bilinearly,
      then standardised with the training split's pixel mean and std; ``rgb`` repeats the
      grey channel to 3 (so CIFAR-shaped networks run unchanged with ``S = 32``).

    Split: a stratified ``val_fraction`` of the images (fixed by ``seed``) is the
    validation set; the test loader returns the same validation split (there is no third
    split; say so when reporting). Labels are int64 in 0..9.

    Data paths: the tensors are tiny (under 8 MB even at 32x32 RGB), so by default
    (``on_device=None``) they always sit on the trainer's device behind a
    :class:`~bnlightning.data.loader.TensorLoader`; ``on_device=False`` uses a plain
    ``DataLoader`` over a ``TensorDataset`` instead.

    Args:
        batch_size: training batch size (per process under DDP). Ioffe & Szegedy: 60.
        eval_batch_size: validation/test batch size.
        image_size: ``None`` for 64-feature vectors, or the side of the resized images.
        rgb: repeat the channel to 3 (images only).
        val_fraction: share of the images held out, in (0, 1).
        seed: split and shuffling seed.
        on_device: see above.

    Raises:
        ValueError: a non-positive batch size or image size, ``val_fraction`` outside
            (0, 1), or ``rgb`` without ``image_size``.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 60,
        eval_batch_size: int = 512,
        image_size: int | None = None,
        rgb: bool = False,
        val_fraction: float = 0.2,
        seed: int = 0,
        on_device: bool | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_positive_int("eval_batch_size", eval_batch_size)
        check_positive_int("image_size", image_size, allow_none=True)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
        if rgb and image_size is None:
            raise ValueError("rgb: true needs image_size (flat 64-feature vectors have no channels)")
        self.save_hyperparameters()
        self.batch_size, self.eval_batch_size, self.seed, self.on_device_arg = (
            batch_size,
            eval_batch_size,
            seed,
            on_device,
        )
        self.image_size, self.rgb, self.val_fraction = image_size, rgb, float(val_fraction)
        self.train_x: torch.Tensor | None = None
        self.train_y: torch.Tensor | None = None
        self.val_x: torch.Tensor | None = None
        self.val_y: torch.Tensor | None = None
        self.on_device: bool | None = None

    @property
    def dataset_name(self) -> str:  # type: ignore[override]  # a class attribute in the base, computed here
        s = self.image_size
        if s is None:
            return "sklearn digits (8x8, 64 standardised features)"
        return f"sklearn digits resized to {s}x{s}{' RGB' if self.rgb else ''} (substitute, not CIFAR-10)"

    @property
    def input_shape(self) -> tuple[int, ...]:
        s = self.image_size
        return (64,) if s is None else (3 if self.rgb else 1, s, s)

    def load_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(train_x, train_y, val_x, val_y) on the CPU, split and standardised."""
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        idx_train, idx_val = train_test_split(
            torch.arange(len(d.target)).numpy(),
            test_size=self.val_fraction,
            stratify=d.target,
            random_state=self.seed,
        )
        x = torch.as_tensor(d.data, dtype=torch.float32)  # (N, 64), values 0..16
        y = torch.as_tensor(d.target, dtype=torch.int64)
        s = self.image_size
        if s is None:
            mean = x[idx_train].mean(0)
            std = x[idx_train].std(0)
            std = torch.where(std > 1e-6, std, torch.ones_like(std))
        else:
            x = (x / 16.0).view(-1, 1, 8, 8)
            if s != 8:
                x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
            mean = x[idx_train].mean()
            std = x[idx_train].std()
            if self.rgb:
                x = x.repeat(1, 3, 1, 1)
        x = ((x - mean) / std).contiguous()
        it, iv = torch.as_tensor(idx_train), torch.as_tensor(idx_val)
        return x[it], y[it], x[iv], y[iv]

    def setup(self, stage: str | None = None) -> None:
        self.on_device = self.use_on_device(self.on_device_arg, default_on_cpu=True)
        if self.train_x is None:
            dev = self.device if self.on_device else torch.device("cpu")
            self.train_x, self.train_y, self.val_x, self.val_y = (t.to(dev) for t in self.load_tensors())
        self.check_train_batch_size(stage)

    def _split_data(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        return filled(self.train_x, self.train_y) if split == "train" else filled(self.val_x, self.val_y)
