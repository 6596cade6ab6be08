"""TensorLoader and DeviceImageTransform: coverage, determinism, sharding, augmentation, resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from bnlightning.data.loader import DeviceImageTransform, TensorLoader


def _indices(loader: TensorLoader) -> list[int]:
    return [int(i) for _, idx in loader for i in idx]


def test_every_index_once_per_epoch_and_reshuffled() -> None:
    n = 103
    loader = TensorLoader(torch.randn(n, 2), torch.arange(n), batch_size=10, drop_last=False, seed=3)
    assert len(loader) == 11
    e0, e1 = _indices(loader), _indices(loader)
    assert sorted(e0) == list(range(n)) and sorted(e1) == list(range(n))
    assert e0 != e1  # a new permutation each epoch
    drop = TensorLoader(torch.arange(n), batch_size=10, drop_last=True, seed=3)
    seen = [int(i) for (b,) in drop for i in b]
    assert len(drop) == 10 and len(seen) == 100 and len(set(seen)) == 100


def test_deterministic_and_global_rng_untouched() -> None:
    x = torch.arange(50)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = [b[0].tolist() for b in TensorLoader(x, batch_size=7, seed=5)]
    assert torch.equal(torch.get_rng_state(), before)
    b = [b[0].tolist() for b in TensorLoader(x, batch_size=7, seed=5)]
    c = [b[0].tolist() for b in TensorLoader(x, batch_size=7, seed=6)]
    assert a == b and a != c


def test_set_epoch_and_probe_iter_are_harmless() -> None:
    x = torch.arange(40)
    ref = TensorLoader(x, batch_size=8, seed=1)
    epochs = [_indices_plain(ref) for _ in range(3)]
    loader = TensorLoader(x, batch_size=8, seed=1)
    iter(loader)  # Lightning probes iterability with iter(); an unadvanced iterator changes nothing
    loader.set_epoch(2)
    assert _indices_plain(loader) == epochs[2]
    loader.set_epoch(0)
    assert _indices_plain(loader) == epochs[0]
    assert _indices_plain(loader) == epochs[1]  # no set_epoch: the next iterator is the next epoch


def _indices_plain(loader: TensorLoader) -> list[int]:
    return [int(i) for (b,) in loader for i in b]


@pytest.mark.parametrize("drop_last", [True, False])
def test_ddp_sharding_is_disjoint_and_equal_length(drop_last: bool) -> None:
    n, world = 103, 3
    x = torch.arange(n)
    loaders = [
        TensorLoader(x, batch_size=8, seed=2, drop_last=drop_last, rank=r, world_size=world) for r in range(world)
    ]
    assert len({len(ld) for ld in loaders}) == 1
    shards = [_indices_plain(ld) for ld in loaders]
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(flat) == len(set(flat))  # disjoint
        assert all(len(s) == len(loaders[0]) * 8 for s in shards)
    else:
        assert set(flat) == set(range(n))  # everything covered; the pad repeats a few samples
        assert len(flat) == 35 * world
    # every rank took its slice of one permutation: interleaving them restores it
    full = TensorLoader(x, batch_size=n, seed=2, drop_last=False).permutation(0)
    per_rank = [ld.permutation(0) for ld in loaders]
    m = min(len(p) for p in per_rank)
    interleaved = torch.stack([p[:m] for p in per_rank], 1).flatten()
    k = min(len(interleaved), len(full))
    assert torch.equal(interleaved[:k], full[:k])


def test_state_dict_resumes_at_the_next_batch() -> None:
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(64)
    t = DeviceImageTransform((0.5,) * 3, (0.2,) * 3, crop_padding=2, flip=True)

    def make() -> TensorLoader:
        return TensorLoader(x, y, batch_size=10, seed=4, transform=t)

    ref = make()
    seq = [b for _ in range(3) for b in ref]  # 3 epochs x 6 batches
    run = make()
    got = [b for b in run]  # epoch 0
    it = iter(run)
    got += [next(it) for _ in range(2)]  # 2 batches into epoch 1: "crash" here
    state = run.state_dict()
    assert state["epoch"] == 1 and state["batches_yielded"] == 2
    resumed = make()
    resumed.load_state_dict(state)
    got += [b for b in resumed] + [b for b in resumed]
    assert len(got) == len(seq)
    for (gx, gy), (sx, sy) in zip(got, seq):
        assert torch.equal(gy, sy) and torch.equal(gx, sx)
    end = make()
    end.load_state_dict({**ref.state_dict(), "epoch": 0, "batches_yielded": 6})  # saved at an epoch's end
    assert torch.equal(next(iter(end))[1], seq[6][1])


def test_repeat_passes() -> None:
    loader = TensorLoader(torch.arange(10), batch_size=10, shuffle=False, repeat=4)
    assert len(loader) == 4 and all(torch.equal(b, torch.arange(10)) for (b,) in loader)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(torch.zeros(4), batch_size=0)
    with pytest.raises(ValueError, match="differ in length"):
        TensorLoader(torch.zeros(4), torch.zeros(5), batch_size=2)
    with pytest.raises(ValueError, match="rank"):
        TensorLoader(torch.zeros(4), batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no batches"):
        TensorLoader(torch.zeros(4), batch_size=8)


# ---- the transform ---------------------------------------------------------------------------


def test_crop_flip_per_sample_matches_padded_reference() -> None:
    torch.manual_seed(0)
    b = 64
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(b, -1, -1, -1).contiguous()
    for mode, pad_mode in (("reflect", "reflect"), ("zeros", "constant")):
        t = DeviceImageTransform(crop_padding=4, pad_mode=mode, flip=True)
        out = t.augment(img, torch.Generator().manual_seed(1))
        assert out.dtype == torch.uint8 and out.shape == img.shape
        # the same image gets different crops/flips across the batch
        assert len({o.numpy().tobytes() for o in out}) > b // 2
        # every output is a 32x32 window of the padded image, possibly flipped
        padded = torch.nn.functional.pad(img[:1].float(), (4, 4, 4, 4), mode=pad_mode)[0]
        windows = {
            padded[:, i : i + 32, j : j + 32].to(torch.uint8).numpy().tobytes() for i in range(9) for j in range(9)
        }
        windows |= {
            padded[:, i : i + 32, j : j + 32].flip(-1).to(torch.uint8).numpy().tobytes()
            for i in range(9)
            for j in range(9)
        }
        assert all(o.numpy().tobytes() in windows for o in out)


def test_flip_only_and_identity() -> None:
    x = torch.randint(0, 256, (200, 3, 4, 4), dtype=torch.uint8)
    out = DeviceImageTransform(flip=True).augment(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) and not torch.equal(o, xi) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped | kept).all()) and 60 < int(flipped.sum()) < 140
    plain = DeviceImageTransform()(x)
    assert plain.dtype == torch.float32 and torch.equal(plain, x.float() / 255)


# ---- Lightning: a mid-epoch checkpoint resumes at the exact next batch --------------------------


class _Recorder(pl.LightningModule):
    def __init__(self, loader_factory) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3 * 4 * 4, 1)
        self.loader_factory = loader_factory
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(torch.cat([y.float(), x.flatten()]))
        return self.layer(x.flatten(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return self.loader_factory()


def _trainer(tmp_path, max_steps: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )


@pytest.mark.parametrize("stop_at", [9, 12])  # 9: mid-epoch 1 of 6-batch epochs; 12: an epoch's end
def test_lightning_resume_mid_epoch(tmp_path, stop_at: int) -> None:
    x = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    y = torch.arange(50)
    t = DeviceImageTransform((0.5,) * 3, (0.25,) * 3, crop_padding=1, flip=True)

    def factory():
        return TensorLoader(x, y, batch_size=8, seed=7, transform=t)

    total = 20
    ref = _Recorder(factory)
    _trainer(tmp_path / "ref", total).fit(ref)
    assert len(ref.seen) == total

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=stop_at, save_top_k=-1)
    first = _Recorder(factory)
    _trainer(tmp_path / "a", stop_at, [ckpt]).fit(first)
    path = next((tmp_path / "ck").glob(f"*step={stop_at}.ckpt"))
    saved = torch.load(path, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert saved[0]["batches_yielded"] == (stop_at - 6 * (stop_at // 6)) or saved[0]["batches_yielded"] == 6
    second = _Recorder(factory)
    _trainer(tmp_path / "b", total).fit(second, ckpt_path=path)
    got = first.seen + second.seen
    assert len(got) == total
    for i, (g, r) in enumerate(zip(got, ref.seen)):
        assert torch.equal(g, r), f"batch {i} differs after resuming at step {stop_at}"
