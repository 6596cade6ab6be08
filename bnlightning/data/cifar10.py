"""CIFAR-10 as a LightningDataModule, with a DataLoader path and an on-device path.

The files are torchvision's: ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch,
batches.meta}``, fetched by torchvision's downloader (its URL and archive checksum) when
``download`` is true. The batch files are Python pickles by format. We read them only
from the directory you name, with checksums verified against the official release by
default, and through an unpickler that accepts nothing but the dicts, lists, strings,
numbers and numpy arrays the format contains (any other object in a file is refused, so a
tampered file cannot run code).

Splits: train = the 50,000 training images; validation and test = the 10,000 CIFAR test
images (the paper reports test accuracy, and has no separate validation set).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from typing import Any, Literal

import numpy as np
import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_info

from bnlightning.data._common import DataModuleBase, Split, check_nonnegative_int, check_positive_int, filled
from bnlightning.data.loader import DeviceImageTransform
from bnlightning.errors import BadFileError, MissingFileError, RunError

__all__ = ["CIFAR10DataModule", "CIFAR10Dataset", "CIFAR10_MEAN", "CIFAR10_STD"]

#: Per-channel mean and standard deviation of the CIFAR-10 training images, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell raw bytes
}


class _CIFARUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is an error."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the CIFAR-10 format")


def _md5(path: str) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_batch(path: str) -> dict[str, Any]:
    """One batch file as a dict with str keys, or a ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        entry = _CIFARUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise BadFileError(
            f"CIFAR-10 file '{path}' is corrupted or truncated ({type(e).__name__}: {e}); delete the folder and "
            "download it again"
        ) from None
    if not isinstance(entry, dict):
        raise BadFileError(f"CIFAR-10 file '{path}' is corrupted: expected a dict, found {type(entry).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


class CIFAR10Dataset(torchvision.datasets.CIFAR10):
    """torchvision's ``CIFAR10`` with clear errors, verified checksums and a restricted unpickler.

    Keeps torchvision's file layout, download URL/checksums, ``__getitem__`` (PIL image +
    transform) and attributes (``data`` as ``(N, 32, 32, 3)`` uint8, ``targets``,
    ``classes``); replaces only the loading.

    Args:
        root: folder that holds ``cifar-10-batches-py``.
        train: the training split (else the test split).
        transform: applied to each PIL image.
        verify_checksums: compare every file's md5 with the official release (torchvision's
            list). Turn off for a CIFAR-format folder you made yourself (the test suite's
            generator); the files' structure is checked either way.

    Raises:
        MissingFileError: a file of the data set is missing (names the folder); a ``FileNotFoundError``.
        BadFileError: a file fails its checksum, is truncated/corrupted or has the wrong shape; a ``ValueError``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        train: bool = True,
        transform: Any = None,
        verify_checksums: bool = True,
    ) -> None:
        torchvision.datasets.VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        self.verify_checksums = verify_checksums
        self.check_files(self.root, verify_checksums)
        folder = os.path.join(self.root, self.base_folder)
        data, targets = [], []
        for file_name, _ in self.train_list if train else self.test_list:
            path = os.path.join(folder, file_name)
            entry = _read_batch(path)
            x = entry.get("data")
            y = entry.get("labels", entry.get("fine_labels"))
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
                desc = f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}".strip()
                raise BadFileError(
                    f"CIFAR-10 file '{path}' is corrupted: 'data' should be uint8 (N, 3072), found {desc}"
                )
            if y is None or len(y) != x.shape[0]:
                raise BadFileError(
                    f"CIFAR-10 file '{path}' is corrupted: {x.shape[0]} images but {'no' if y is None else len(y)} "
                    "labels"
                )
            y = np.asarray(y, dtype=np.int64)
            if y.size and (y.min() < 0 or y.max() > 9):
                raise BadFileError(f"CIFAR-10 file '{path}' is corrupted: labels outside 0..9")
            data.append(x)
            targets.append(y)
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC, as torchvision
        self.targets = np.concatenate(targets).tolist()
        meta = _read_batch(os.path.join(folder, self.meta["filename"]))
        self.classes = list(meta.get(self.meta["key"], [str(i) for i in range(10)]))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    @classmethod
    def files(cls) -> list[tuple[str, str]]:
        """(file name, official md5) of every file of the data set."""
        return [tuple(x) for x in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]

    @classmethod
    def is_present(cls, root: str | os.PathLike) -> bool:
        folder = os.path.join(os.fspath(root), cls.base_folder)
        return all(os.path.isfile(os.path.join(folder, f)) for f, _ in cls.files())

    @classmethod
    def check_files(cls, root: str | os.PathLike, verify_checksums: bool = True) -> None:
        """Raise one clear error if a file is missing or (with checksums) not the official one."""
        folder = os.path.abspath(os.path.join(os.path.expanduser(os.fspath(root)), cls.base_folder))
        missing = [f for f, _ in cls.files() if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            what = "not found" if len(missing) == len(cls.files()) else f"incomplete (missing {', '.join(missing)})"
            raise MissingFileError(
                f"CIFAR-10 {what} under '{folder}'; set download: true, or point root at the folder that contains "
                f"{cls.base_folder}/"
            )
        if verify_checksums:
            for f, md5 in cls.files():
                path = os.path.join(folder, f)
                if _md5(path) != md5:
                    raise BadFileError(
                        f"CIFAR-10 file '{path}' fails its checksum (corrupted, truncated or not the official "
                        "release); delete the folder and download again, or set verify_checksums: false "
                        "for a CIFAR-format folder you generated"
                    )

    def _check_integrity(self) -> bool:  # used by torchvision's download(): present and (if asked) verified
        try:
            self.check_files(self.root, self.verify_checksums)
        except (FileNotFoundError, ValueError):
            return False
        return True

    @classmethod
    def fetch(cls, root: str | os.PathLike) -> None:
        """Download and extract the official archive (torchvision's URL and md5)."""
        torchvision.datasets.utils.download_and_extract_archive(
            cls.url, os.fspath(root), filename=cls.filename, md5=cls.tgz_md5
        )


class CIFAR10DataModule(DataModuleBase):
    """CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test images, 32x32 RGB, 10 classes.

    Two interchangeable data paths, giving the same tensors for the same image:

    * **on-device** (default on CUDA): the training set sits on the device as uint8
      ``(N, 3, 32, 32)``; a :class:`~bnlightning.data.loader.TensorLoader` shuffles with
      ``randperm``, and :class:`~bnlightning.data.loader.DeviceImageTransform` crops/flips
      each sample (if ``augment``) and normalises once per batch, on the device. No
      worker processes; exact mid-epoch resume from checkpoints; sharded by rank itself
      under DDP.
    * **DataLoader** (default elsewhere): torchvision's dataset with
      ``RandomCrop``/``RandomHorizontalFlip`` (if ``augment``), ``ToTensor`` and
      ``Normalize`` in ``num_workers`` worker processes. Lightning adds the
      ``DistributedSampler`` under DDP. Mid-epoch resume restarts the epoch.

    Validation and test both use the CIFAR-10 test split.

    Args:
        root: folder that holds (or will hold) ``cifar-10-batches-py``.
        download: fetch the data set with torchvision's downloader if it is missing.
        batch_size: training batch size (per process under DDP). Paper: 128.
        eval_batch_size: validation/test batch size.
        augment: random crop (``crop_padding`` pixels) and horizontal flip. Paper: off.
        normalize: subtract the CIFAR-10 channel mean and divide by its std (else only /255).
        on_device: ``True`` on-device path, ``False`` DataLoader path, ``None`` on-device
            iff the trainer's device is CUDA.
        num_workers: DataLoader worker processes (DataLoader path only).
        seed: shuffling and augmentation seed (the on-device path never touches torch's
            global RNG; the DataLoader path uses a generator seeded with it).
        crop_padding: padding of the random crop when ``augment`` (airbench and most
            CIFAR recipes: 4; airbench's fastest variants use 2).
        pad_mode: ``reflect`` (airbench) or ``zeros`` (torchvision's default).
        verify_checksums: check the files against the official md5 sums; set false for a
            CIFAR-format folder you generated (e.g. ``python -m bnlightning.data.fake``).

    Raises:
        ValueError: a bad argument, or a corrupted/truncated/non-official file.
        FileNotFoundError: the data set is missing and ``download`` is false.

    Example (YAML)::

        data:
          class_path: bnlightning.data.CIFAR10DataModule
          init_args: {root: data/cifar10, batch_size: 128, augment: false}
    """

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        augment: bool = False,
        normalize: bool = True,
        on_device: bool | None = None,
        num_workers: int = 2,
        seed: int = 0,
        crop_padding: int = 4,
        pad_mode: Literal["reflect", "zeros"] = "reflect",
        verify_checksums: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_positive_int("eval_batch_size", eval_batch_size)
        check_nonnegative_int("num_workers", num_workers)
        check_nonnegative_int("crop_padding", crop_padding)
        if pad_mode not in ("reflect", "zeros"):
            raise ValueError(f"unknown pad_mode {pad_mode!r}; accepted: reflect, zeros")
        self.save_hyperparameters()
        self.root = root
        self.download, self.batch_size, self.eval_batch_size, self.seed = download, batch_size, eval_batch_size, seed
        self.augment, self.normalize, self.on_device_arg, self.num_workers = augment, normalize, on_device, num_workers
        self.crop_padding, self.pad_mode, self.verify_checksums = crop_padding, pad_mode, verify_checksums
        self.train_x: torch.Tensor | None = None  # on-device path: uint8 (N, 3, 32, 32)
        self.train_y: torch.Tensor | None = None
        self.test_x: torch.Tensor | None = None
        self.test_y: torch.Tensor | None = None
        self.train_set: CIFAR10Dataset | None = None  # DataLoader path
        self.test_set: CIFAR10Dataset | None = None
        self.on_device: bool | None = None

    dataset_name = "CIFAR-10"
    num_classes = 10

    @property
    def mean_std(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        return (CIFAR10_MEAN, CIFAR10_STD) if self.normalize else (None, None)

    # ---- transforms, one definition per path -------------------------------------------
    def device_transform(self, train: bool) -> DeviceImageTransform:
        mean, std = self.mean_std
        aug = train and self.augment
        return DeviceImageTransform(
            mean, std, crop_padding=self.crop_padding if aug else 0, pad_mode=self.pad_mode, flip=aug
        )

    def torchvision_transform(self, train: bool) -> Any:
        from torchvision import transforms as T

        ts: list[Any] = []
        if train and self.augment:
            if self.crop_padding > 0:
                mode = "reflect" if self.pad_mode == "reflect" else "constant"
                ts.append(T.RandomCrop(32, padding=self.crop_padding, padding_mode=mode))
            ts.append(T.RandomHorizontalFlip())
        ts.append(T.ToTensor())
        mean, std = self.mean_std
        if mean is not None:
            ts.append(T.Normalize(mean, std))
        return T.Compose(ts)

    # ---- Lightning hooks -----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download on one process per node if asked and the files are missing."""
        if self.download and not CIFAR10Dataset.is_present(self.root):
            rank_zero_info(f"CIFAR-10: downloading to '{os.path.abspath(self.root)}'")
            try:
                CIFAR10Dataset.fetch(self.root)
            except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError on bad md5
                folder = os.path.join(os.path.abspath(self.root), CIFAR10Dataset.base_folder)
                reason = " ".join(str(getattr(err, "reason", None) or err).split())[:200]
                raise RunError(
                    f"CIFAR-10 download failed ({reason}); without internet, copy the extracted "
                    f"{CIFAR10Dataset.filename} "
                    f"from {CIFAR10Dataset.url} so that {folder} holds data_batch_1..5, test_batch and batches.meta, "
                    "or point --data.init_args.root at the folder that contains cifar-10-batches-py/"
                ) from None

    def _dataset(self, train: bool, transform: Any = None) -> CIFAR10Dataset:
        return CIFAR10Dataset(self.root, train=train, transform=transform, verify_checksums=self.verify_checksums)

    def setup(self, stage: str | None = None) -> None:
        self.on_device = self.use_on_device(self.on_device_arg, default_on_cpu=False)
        need_train = stage in (None, "fit")
        if self.on_device:
            dev = self.device
            if need_train and self.train_x is None:
                ds = self._dataset(train=True)
                self.train_x, self.train_y = _to_tensors(ds, dev)
            if self.test_x is None:
                ds = self._dataset(train=False)
                self.test_x, self.test_y = _to_tensors(ds, dev)
        else:
            if need_train and self.train_set is None:
                self.train_set = self._dataset(train=True, transform=self.torchvision_transform(train=True))
            if self.test_set is None:
                self.test_set = self._dataset(train=False, transform=self.torchvision_transform(train=False))
        self.check_train_batch_size(stage)

    def _loader_kwargs(self) -> dict[str, Any]:
        w = self.num_workers
        return {
            "num_workers": w,
            "persistent_workers": w > 0,
            "pin_memory": self.device.type == "cuda",
        }

    def _split_data(self, split: Split) -> tuple[torch.Tensor, torch.Tensor] | CIFAR10Dataset:
        train = split == "train"
        if self.on_device:
            return filled(self.train_x, self.train_y) if train else filled(self.test_x, self.test_y)
        dataset = self.train_set if train else self.test_set
        if dataset is None:
            raise RuntimeError("the data module's datasets are not set up yet (setup() builds them)")
        return dataset

    def _loader_options(self, split: Split) -> dict[str, Any]:
        if self.on_device:
            return {"transform": self.device_transform(train=split == "train")}
        return self._loader_kwargs()


def _to_tensors(ds: CIFAR10Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    return x.to(device), y.to(device)
