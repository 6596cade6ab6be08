"""Batches from tensors that already live on the training device (airbench-style).

A ``torch.utils.data.DataLoader`` over a small, fully-in-memory data set spends most of
its time in Python: per-sample ``__getitem__``, collation, worker processes, a host to
device copy per batch. :class:`TensorLoader` skips all of it: the whole data set sits on
the device (uint8 images for CIFAR-10, 150 MB), each epoch draws one ``torch.randperm``,
and a batch is one indexing operation plus an optional on-device transform
(:class:`DeviceImageTransform`: per-sample random crop and flip, then float conversion
and normalisation).

Determinism and resuming
------------------------
Nothing here touches torch's global RNG. The permutation of epoch ``e`` comes from a CPU
``torch.Generator`` seeded by ``(seed, e)`` (so CPU and GPU runs see the same order) and
the augmentation of batch ``b`` of epoch ``e`` from a device generator seeded by
``(seed, e, b)``. The loader's position is therefore two integers, ``(epoch, batches
already yielded in this epoch)``, which :meth:`TensorLoader.state_dict` returns.

Lightning 2.6 saves them in every checkpoint: ``FitLoop.on_save_checkpoint`` stores
``CombinedLoader._state_dicts()``, i.e. ``state_dict()`` of every train loader that
satisfies the ``_Stateful`` protocol (has ``state_dict``/``load_state_dict``), under
``loops.fit_loop.state_dict.combined_loader``. On ``Trainer.fit(ckpt_path=...)``,
``FitLoop.setup_data`` calls ``load_state_dict`` *before* ``iter()``, and the epoch loop
does not call ``iter()`` again for the resumed epoch, so the first batch after resuming is
exactly the next one. Lightning also calls ``iter()`` once on every train loader before
that (``_check_dataloader_iterable``); our ``__iter__`` is a lazy generator, so an
iterator that is never advanced changes nothing. Lightning tells samplers the epoch
through ``dataloader.sampler.set_epoch(epoch)``; :attr:`TensorLoader.sampler` forwards it,
so the loader's epoch follows the trainer's even with ``limit_train_batches``.

Distributed training
--------------------
Lightning injects a ``DistributedSampler`` only into ``DataLoader`` objects; this loader
shards itself. Every rank draws the same permutation; rank ``r`` takes
``perm[r::world_size]``. With ``drop_last`` the permutation is first cut to a multiple of
``world_size`` (the few left-over samples change each epoch); without it, it is padded
by wrapping around, like ``DistributedSampler``, so every rank has the same number of
batches (a collective never waits on a rank that ran out). ``batch_size`` is per rank.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["TensorLoader", "DeviceImageTransform", "mix_seed"]

_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix64 finaliser over a running hash).

    Used so that (seed, epoch) and (seed, epoch, batch) give unrelated random streams
    without any generator state to carry across checkpoints.
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK63


class DeviceImageTransform:
    """Per-batch image augmentation and normalisation on the tensors' device.

    Takes a uint8 batch ``(B, C, H, W)`` and returns float32 ``(B, C, H, W)``: each sample
    gets its own random crop (the image padded by ``crop_padding`` pixels on every side,
    then a random ``H x W`` window, as ``torchvision.transforms.RandomCrop(H, padding)``)
    and its own random horizontal flip (probability 1/2), then ``x / 255`` and
    ``(x - mean) / std`` per channel, in the same float operations as torchvision's
    ``ToTensor`` + ``Normalize`` so both data paths give identical tensors.

    The crop is a single gather: the padded image is never materialised; indices that fall
    in the border are reflected (``pad_mode="reflect"``, airbench) or point at zero
    (``"zeros"``, torchvision's default ``padding_mode="constant"``).

    Args:
        mean: per-channel mean in [0, 1] units (``None``: no normalisation, only ``/255``).
        std: per-channel standard deviation in [0, 1] units.
        crop_padding: pixels of padding for the random crop; 0 disables cropping.
        pad_mode: ``"reflect"`` or ``"zeros"``.
        flip: random horizontal flips.

    Example:
        >>> t = DeviceImageTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_padding=4, flip=True)
        >>> x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
        >>> t(x, torch.Generator().manual_seed(0)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_padding: int = 0,
        pad_mode: Literal["reflect", "zeros"] = "reflect",
        flip: bool = False,
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if pad_mode not in ("reflect", "zeros"):
            raise ValueError(f"unknown pad_mode {pad_mode!r}; accepted: reflect, zeros")
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        self.crop_padding = int(crop_padding)
        self.pad_mode = pad_mode
        self.flip = bool(flip)
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def _mean_std(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._stats:
            assert self.mean is not None and self.std is not None
            m = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            s = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self._stats[device] = (m, s)
        return self._stats[device]

    def augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Random crop + flip of each sample of ``x`` (any dtype), on ``x.device``.

        Crop offsets and flips only decide, per sample, which source row feeds each output
        row and which source column each output column (a flip reverses the columns), so
        the whole augmentation is one ``gather`` over the flattened images.
        """
        b, c, h, w = x.shape
        dev = x.device
        p = self.crop_padding
        rows = torch.arange(h, device=dev).expand(b, h)
        cols = torch.arange(w, device=dev).expand(b, w)
        valid = None
        if p > 0:
            dy = torch.randint(0, 2 * p + 1, (b, 1), device=dev, generator=generator)
            dx = torch.randint(0, 2 * p + 1, (b, 1), device=dev, generator=generator)
            rows = rows + dy - p  # (B, H) rows of the unpadded image, may fall in the border
            cols = cols + dx - p  # (B, W)
            if self.pad_mode == "reflect":
                rows = rows.abs()
                rows = torch.where(rows > h - 1, 2 * (h - 1) - rows, rows)
                cols = cols.abs()
                cols = torch.where(cols > w - 1, 2 * (w - 1) - cols, cols)
            else:
                valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
                rows = rows.clamp(0, h - 1)
                cols = cols.clamp(0, w - 1)
        if self.flip:
            do = torch.rand(b, device=dev, generator=generator) < 0.5
            cols = torch.where(do[:, None], cols.flip(-1), cols)
            if valid is not None:
                valid = torch.where(do[:, None, None], valid.flip(-1), valid)
        idx = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        out = x.reshape(b, c, h * w).gather(2, idx).view(b, c, h, w)
        if valid is not None:
            out = out * valid[:, None].to(out.dtype)
        return out

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 -> float32 ``x / 255``, then ``(x - mean) / std`` (torchvision's order of operations)."""
        x = x.to(torch.float32).div(255) if x.dtype == torch.uint8 else x.to(torch.float32)
        if self.mean is not None:
            m, s = self._mean_std(x.device)
            x = x.sub(m).div(s)
        return x

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.augments:
            x = self.augment(x, generator)
        return self.normalize(x)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mean={self.mean}, std={self.std}, crop_padding={self.crop_padding}, "
            f"pad_mode={self.pad_mode!r}, flip={self.flip})"
        )


class _EpochSetter:
    """What Lightning's ``_set_sampler_epoch`` finds as ``loader.sampler``: forwards ``set_epoch``."""

    def __init__(self, loader: TensorLoader) -> None:
        self._loader = loader

    def set_epoch(self, epoch: int) -> None:
        self._loader.set_epoch(epoch)


class TensorLoader:
    """An iterable of batches ``(t1[idx], t2[idx], ...)`` over tensors resident on a device.

    Args:
        *tensors: tensors with the same first dimension, ideally already on the training
            device; batches are returned on their devices, so Lightning's host-to-device
            transfer becomes a no-op.
        batch_size: samples per batch (per rank under DDP).
        shuffle: a new random order every epoch (``randperm``); otherwise in order.
        drop_last: drop the last incomplete batch (default for training).
        seed: base seed of the permutation and of the transform's randomness.
        transform: ``transform(x, generator) -> x`` applied to the *first* tensor of each
            batch, e.g. :class:`DeviceImageTransform`; ``generator`` is a generator on the
            first tensor's device, seeded by ``(seed, epoch, batch index)``.
        rank: this process's rank; ``world_size``: the number of processes. Each rank
            takes a disjoint slice of the same permutation, all with the same length.
        repeat: passes over the data per epoch (each with its own permutation). Useful for
            full-batch training, where one pass is one step and Lightning's per-epoch work
            (validation, epoch hooks) would otherwise run every step.

    Raises:
        ValueError: for tensors of different lengths or on different devices, an empty
            data set, non-positive ``batch_size``/``repeat``, or a bad ``rank``/``world_size``.

    Example:
        >>> x, y = torch.randn(10, 3), torch.arange(10)
        >>> loader = TensorLoader(x, y, batch_size=4, seed=0)
        >>> len(loader), [b[1].shape[0] for b in loader]
        (2, [4, 4])
    """

    def __init__(
        self,
        *tensors: Tensor,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        transform: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
        rank: int = 0,
        world_size: int = 1,
        repeat: int = 1,
    ) -> None:
        if not tensors:
            raise ValueError("TensorLoader needs at least one tensor")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"tensors differ in length: {[t.shape[0] for t in tensors]}")
        if n == 0:
            raise ValueError("TensorLoader got an empty data set")
        if any(t.device != tensors[0].device for t in tensors):
            raise ValueError(f"tensors are on different devices: {[str(t.device) for t in tensors]}")
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if int(world_size) <= 0 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if int(repeat) <= 0:
            raise ValueError(f"repeat must be a positive integer, got {repeat}")
        self.tensors = tensors
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.transform = transform
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.repeat = int(repeat)
        self.num_samples = n
        if self.drop_last:
            self.samples_per_rank = n // self.world_size
            self.batches_per_pass = self.samples_per_rank // self.batch_size
        else:
            self.samples_per_rank = math.ceil(n / self.world_size)
            self.batches_per_pass = math.ceil(self.samples_per_rank / self.batch_size)
        if self.batches_per_pass == 0:
            raise ValueError(
                f"no batches: {n} samples over {self.world_size} rank(s) give {self.samples_per_rank} per rank, fewer "
                f"than batch_size={self.batch_size} with drop_last=True"
            )
        # position: the epoch being (or about to be) iterated, and batches yielded in it
        self.epoch = 0
        self.batches_yielded = 0
        self._fresh = True  # the next iterator continues (epoch, batches_yielded) instead of starting a new epoch
        self.sampler = _EpochSetter(self)  # Lightning calls loader.sampler.set_epoch(e) every epoch
        self.batch_sampler = None  # so Lightning's shuffle detection reads `sampler` and finds no RandomSampler
        self._aug_gen: torch.Generator | None = None

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def __len__(self) -> int:
        return self.batches_per_pass * self.repeat

    def set_epoch(self, epoch: int) -> None:
        """Make the next iterator start epoch ``epoch`` (a no-op if the loader is already in it)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_yielded = 0
            self._fresh = True

    def permutation(self, epoch: int, pass_index: int = 0) -> Tensor:
        """This rank's sample indices (on the data's device) for one pass of an epoch."""
        n = self.num_samples
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, pass_index))
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        total = self.samples_per_rank * self.world_size
        if total < n:
            perm = perm[:total]
        elif total > n:  # pad by wrapping around (DistributedSampler's behaviour without drop_last)
            perm = torch.cat([perm, perm[: total - n]])
        return perm[self.rank :: self.world_size].to(self.device, non_blocking=True)

    def _generator(self, epoch: int, batch: int) -> torch.Generator:
        if self._aug_gen is None:
            self._aug_gen = torch.Generator(device=self.device)
        return self._aug_gen.manual_seed(mix_seed(self.seed, epoch, batch, 0xA06))

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # a generator: nothing happens until the first next(), so Lightning's probing iter() is harmless
        return self._iterate()

    def _iterate(self) -> Iterator[tuple[Tensor, ...]]:
        if self._fresh:
            self._fresh = False
        else:
            self.epoch += 1
            self.batches_yielded = 0
        epoch, start = self.epoch, self.batches_yielded
        bpp, bs = self.batches_per_pass, self.batch_size
        for p in range(start // bpp, self.repeat):
            idx = self.permutation(epoch, p)
            for b in range(start - p * bpp if p == start // bpp else 0, bpp):
                i = idx[b * bs : (b + 1) * bs]
                batch = [t[i] for t in self.tensors]
                k = p * bpp + b
                if self.transform is not None:
                    batch[0] = self.transform(batch[0], self._generator(epoch, k))
                self.batches_yielded = k + 1
                yield tuple(batch)

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch and batches already yielded in it (plus what they are relative to)."""
        return {
            "epoch": self.epoch,
            "batches_yielded": self.batches_yielded,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "repeat": self.repeat,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next iterator continue at the saved position.

        A position saved at the end of an epoch resumes at the start of the next one. If the
        data set, batch size, world size, repeat or seed changed, the position has no meaning:
        the loader warns and restarts the saved epoch from its first batch.
        """
        self.epoch = int(state_dict["epoch"])
        self.batches_yielded = int(state_dict["batches_yielded"])
        self._fresh = True
        mine = self.state_dict()
        changed = [
            k
            for k in ("num_samples", "batch_size", "world_size", "repeat", "seed")
            if k in state_dict and state_dict[k] != mine[k]
        ]
        if changed:
            warnings.warn(
                "TensorLoader: the checkpoint's data position was saved with different "
                + ", ".join(f"{k} ({state_dict[k]} then, {mine[k]} now)" for k in changed)
                + f"; restarting epoch {self.epoch} from its first batch",
                stacklevel=2,
            )
            self.batches_yielded = 0
        if self.batches_yielded >= len(self):
            self.epoch += 1
            self.batches_yielded = 0

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        return (
            f"TensorLoader({shapes}, device={self.device}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, rank={self.rank}/{self.world_size}, len={len(self)})"
        )
