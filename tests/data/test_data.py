"""Data modules: CIFAR-10 read from generated files through the real code path, digits, linear regression."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from bnlightning.data import CIFAR10DataModule, DigitsDataModule, LinearRegressionDataModule, TensorLoader
from bnlightning.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, CIFAR10Dataset
from bnlightning.data.fake import make_fake_cifar10


@pytest.fixture
def fake_cifar(tmp_path: Path) -> Path:
    make_fake_cifar10(tmp_path, n_train=60, n_test=25, seed=1)
    return tmp_path


def _dm(root: Path, **kw) -> CIFAR10DataModule:
    kw = {"download": False, "verify_checksums": False, "num_workers": 0, **kw}
    return CIFAR10DataModule(root=str(root), **kw)


def _first(loader):
    return next(iter(loader))


# ---- CIFAR-10 ------------------------------------------------------------------------------


@pytest.mark.parametrize("on_device", [True, False])
def test_cifar_reads_generated_files(fake_cifar: Path, on_device: bool) -> None:
    dm = _dm(fake_cifar, batch_size=16, eval_batch_size=10, on_device=on_device)
    dm.setup("fit")
    assert dm.dataset_name == "CIFAR-10"
    train = dm.train_dataloader()
    assert isinstance(train, TensorLoader) == on_device
    assert len(train) == 60 // 16
    x, y = _first(train)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == (16,)
    ys = torch.cat([b[1] for b in dm.val_dataloader()])
    assert ys.tolist() == [i % 10 for i in range(25)]  # the test split, in file order


def test_cifar_pixels_match_the_file_layout(fake_cifar: Path) -> None:
    with open(fake_cifar / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    dm = _dm(fake_cifar, on_device=True)
    dm.setup("fit")
    # row i of the file: 1024 red, 1024 green, 1024 blue values, row-major
    assert torch.equal(dm.train_x[0], torch.from_numpy(raw["data"][0].reshape(3, 32, 32)))
    assert dm.train_y[: len(raw["labels"])].tolist() == raw["labels"]


@pytest.mark.parametrize("normalize", [True, False])
def test_both_paths_give_the_same_tensors(fake_cifar: Path, normalize: bool) -> None:
    a, b = _dm(fake_cifar, on_device=True, normalize=normalize), _dm(fake_cifar, on_device=False, normalize=normalize)
    a.setup("test")
    b.setup("test")
    xa, ya = _first(a.test_dataloader())
    xb, yb = _first(b.test_dataloader())
    assert torch.equal(ya, yb)
    torch.testing.assert_close(xa, xb, rtol=0, atol=1e-6)
    if normalize:  # and it is the CIFAR-10 normalisation
        raw = torch.from_numpy(b.test_set.data[0]).permute(2, 0, 1).float() / 255
        ref = (raw - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
        torch.testing.assert_close(xa[0], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("on_device", [True, False])
def test_augmentation_on_both_paths(fake_cifar: Path, on_device: bool) -> None:
    dm = _dm(fake_cifar, on_device=on_device, augment=True, normalize=False, batch_size=20)
    dm.setup("fit")
    x, _ = _first(dm.train_dataloader())
    assert x.shape == (20, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    plain = _dm(fake_cifar, on_device=on_device, normalize=False)
    plain.setup("fit")
    # the augmented loader must differ from the plain images for most samples
    if on_device:
        dm2 = _dm(fake_cifar, on_device=True, augment=False, normalize=False, batch_size=20)
        dm2.setup("fit")
        xp, _ = _first(dm2.train_dataloader())  # same seed: same permutation, no augmentation
        changed = [not torch.equal(a, b) for a, b in zip(x, xp)]
        assert sum(changed) > 10


def test_on_device_train_loader_covers_every_image(fake_cifar: Path) -> None:
    dm = _dm(fake_cifar, on_device=True, batch_size=7)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.transform = None  # look at the raw uint8 images
    seen = torch.cat([x for x, _ in loader]).flatten(1)
    ref = dm.train_x.flatten(1)
    # each yielded image is a distinct training image (60 // 7 * 7 = 56 of 60)
    match = (seen[:, None, :] == ref[None, :, :]).all(-1)
    assert match.sum(1).eq(1).all() and match.sum(0).le(1).all() and int(match.sum()) == 56


def test_missing_dataset_is_one_clear_error(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and str(tmp_path / "nowhere") in msg and "download: true" in msg
    assert "\n" not in msg


def test_incomplete_dataset_names_the_missing_file(fake_cifar: Path) -> None:
    os.remove(fake_cifar / "cifar-10-batches-py" / "data_batch_4")
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        _dm(fake_cifar).setup("fit")


def test_truncated_batch_file_is_detected(fake_cifar: Path) -> None:
    path = fake_cifar / "cifar-10-batches-py" / "data_batch_3"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"data_batch_3.*corrupted or truncated"):
        _dm(fake_cifar).setup("fit")


def test_wrong_shape_batch_file_is_detected(fake_cifar: Path) -> None:
    path = fake_cifar / "cifar-10-batches-py" / "test_batch"
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((5, 100), np.uint8), "labels": [0] * 5}, f, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch.*uint8 \(N, 3072\)"):
        _dm(fake_cifar).setup("test")


def test_pickled_code_is_refused(fake_cifar: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    with open(fake_cifar / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(ValueError, match=r"data_batch_2.*refusing to load"):
        _dm(fake_cifar).setup("fit")


def test_checksums_verified_by_default(fake_cifar: Path) -> None:
    # generated files are not the official release: the default loader must say so, not load them
    with pytest.raises(ValueError, match=r"data_batch_1' fails its checksum.*verify_checksums: false"):
        CIFAR10DataModule(root=str(fake_cifar), download=False).setup("fit")
    assert CIFAR10Dataset.is_present(fake_cifar)


def test_download_is_skipped_when_files_are_present(fake_cifar: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(CIFAR10Dataset, "fetch", classmethod(no_network))
    dm = _dm(fake_cifar, download=True)
    dm.prepare_data()
    dm.setup("fit")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": -1}, "eval_batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"pad_mode": "wrap"}, "pad_mode"),
    ],
)
def test_cifar_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(**kw)


def test_cifar_under_trainer_picks_device_and_path(fake_cifar: Path) -> None:
    dm = _dm(fake_cifar, batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=1)
    trainer.strategy.connect(torch.nn.Linear(1, 1))  # only to give the datamodule a trainer
    dm.trainer = trainer
    dm.setup("fit")
    assert dm.on_device is False  # CPU trainer, on_device=None: DataLoader path
    assert dm.device.type == "cpu"


# ---- digits ----------------------------------------------------------------------------------


def test_digits_flat() -> None:
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    assert dm.train_x.shape == (1437, 64) and dm.val_x.shape == (360, 64)
    assert dm.train_y.dtype == torch.int64 and set(dm.train_y.tolist()) == set(range(10))
    assert set(dm.val_y.tolist()) == set(range(10))
    torch.testing.assert_close(dm.train_x.mean(0), torch.zeros(64), atol=1e-4, rtol=0)
    assert "8x8" in dm.dataset_name
    x, y = _first(dm.train_dataloader())
    assert x.shape == (60, 64) and y.shape == (60,)
    xt, yt = _first(dm.test_dataloader())
    assert torch.equal(yt, dm.val_y)  # test loader = the validation split
    # stratified: class shares in the validation split match the whole set to within a sample
    counts = torch.bincount(dm.val_y, minlength=10).float()
    full = torch.bincount(torch.cat([dm.train_y, dm.val_y]), minlength=10).float() * 0.2
    assert (counts - full).abs().max() <= 1.0


def test_digits_images_and_determinism() -> None:
    a, b, c = (
        DigitsDataModule(image_size=32, rgb=True, seed=1),
        DigitsDataModule(image_size=32, rgb=True, seed=1),
        DigitsDataModule(image_size=32, seed=2),
    )
    for d in (a, b, c):
        d.setup("fit")
    assert a.train_x.shape == (1437, 3, 32, 32) and c.train_x.shape == (1437, 1, 32, 32)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert not torch.equal(a.val_y, c.val_y)
    assert "substitute, not CIFAR-10" in a.dataset_name and "RGB" in a.dataset_name
    ba = [y.tolist() for _, y in a.train_dataloader()]
    bb = [y.tolist() for _, y in b.train_dataloader()]
    assert ba == bb


def test_digits_dataloader_path() -> None:
    dm = DigitsDataModule(on_device=False, batch_size=100)
    dm.setup("fit")
    x, y = _first(dm.train_dataloader())
    assert x.shape == (100, 64) and not isinstance(dm.train_dataloader(), TensorLoader)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0}, "val_fraction"),
        ({"image_size": -8}, "image_size"),
        ({"rgb": True}, "rgb"),
    ],
)
def test_digits_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kw)


# ---- linear regression --------------------------------------------------------------------------


def test_linear_regression_full_batch() -> None:
    dm = LinearRegressionDataModule(seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 1
    x, y = _first(loader)
    assert x.shape == (1000, 10) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ dm.A.T)
    assert torch.equal(x, dm.train_x)  # full batch, in order, every step
    xv, yv = _first(dm.val_dataloader())
    assert xv.shape == (1000, 10) and not torch.allclose(xv, x)
    torch.testing.assert_close(yv, xv @ dm.A.T)
    assert "linear regression" in dm.dataset_name


def test_linear_regression_determinism_noise_minibatch() -> None:
    a, b, c = LinearRegressionDataModule(seed=1), LinearRegressionDataModule(seed=1), LinearRegressionDataModule(seed=2)
    for d in (a, b, c):
        d.setup()
    assert torch.equal(a.A, b.A) and torch.equal(a.train_x, b.train_x) and not torch.equal(a.A, c.A)
    n = LinearRegressionDataModule(seed=1, noise=0.1, batch_size=100)
    n.setup()
    assert torch.equal(n.A, a.A)
    resid = n.train_y - n.train_x @ n.A.T
    assert 0.08 < float(resid.std()) < 0.12
    assert len(n.train_dataloader()) == 10
    r = LinearRegressionDataModule(steps_per_epoch=5)
    r.setup()
    assert len(r.train_dataloader()) == 5


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"dim": 0}, "dim"),
        ({"batch_size": 0}, "batch_size"),
        ({"noise": -1.0}, "noise"),
        ({"batch_size": 2000}, "larger than num_samples"),
    ],
)
def test_linear_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinearRegressionDataModule(**kw)


def test_datamodules_in_a_trainer(tmp_path: Path) -> None:
    class M(pl.LightningModule):
        def __init__(self, d_in: int, d_out: int) -> None:
            super().__init__()
            self.f = torch.nn.Linear(d_in, d_out)

        def training_step(self, batch, i):
            x, y = batch
            out = self.f(x)
            return torch.nn.functional.cross_entropy(out, y) if y.dtype == torch.int64 else (out - y).pow(2).mean()

        def validation_step(self, batch, i):
            return self.training_step(batch, i)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    for dm, model in ((DigitsDataModule(), M(64, 10)), (LinearRegressionDataModule(steps_per_epoch=3), M(10, 10))):
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            max_steps=4,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(model, datamodule=dm)
        assert trainer.global_step == 4 and isinstance(trainer.train_dataloader, TensorLoader)


def test_conftest_fixture(fake_cifar10: Path) -> None:
    dm = _dm(fake_cifar10, on_device=True)
    dm.setup("fit")
    assert dm.train_x.shape == (100, 3, 32, 32) and dm.test_x.shape == (40, 3, 32, 32)
