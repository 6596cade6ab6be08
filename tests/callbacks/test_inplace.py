"""What a forward hook reads is the value at hook time, even when a later in-place op rewrites it.

References: a plain forward of a copy of the network in training mode, with hooks that ``clone()``
what they see (the last call of a module wins, as in the callbacks), and the statistics written
as plain loops or ``torch`` one-liners.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from bnlightning.callbacks import ActivationStats, MeanShift, ResidualVariance
from tests.callbacks.test_meanshift import reference_cos, reference_majority
from tests.helpers import TRAINER_KW
from tests.helpers.callbacks import Recorder


class InplaceBlock(nn.Module):
    """``out = branch(x); out += shortcut(x); relu_(out)``: the branch output is rewritten twice."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width))
        self.shortcut = nn.Sequential(nn.Linear(width, width))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        out += self.shortcut(x)
        return self.relu(out)


class InplaceNet(pl.LightningModule):
    """Linear -> BatchNorm -> in-place ReLU -> residual block with ``out +=`` -> classifier.

    ``training_step`` calls ``self.net(x)``, as the docs' own example does (not ``self(x)``).
    """

    def __init__(self, width: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential()
        self.net.add_module("fc", nn.Linear(5, width))
        self.net.add_module("bn", nn.BatchNorm1d(width))
        self.net.add_module("relu", nn.ReLU(inplace=True))
        self.net.add_module("block", InplaceBlock(width))
        self.net.add_module("head", nn.Linear(width, classes))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ResNetClassifier(pl.LightningModule):
    """torchvision's ResNet-18 (in-place ReLUs, ``out += identity``) as a user would wrap it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=10)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(model: pl.LightningModule, callback: pl.Callback, batch: tuple[Tensor, Tensor]) -> dict[str, float]:
    """One measured step on ``batch``; returns what the loggers got."""
    rec = Recorder()
    data = DataLoader(TensorDataset(*batch), batch_size=len(batch[0]))
    pl.Trainer(max_steps=1, callbacks=[callback], logger=rec, log_every_n_steps=1, **TRAINER_KW).fit(model, data)
    return rec.logged[0]


def _reference_reads(net: nn.Module, x: Tensor, taps: dict[str, str]) -> dict[str, Tensor]:
    """name -> a clone of the (first) input ('input') or the output ('output') of that submodule, last call."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name, where in taps.items():
        m = net.get_submodule(name)
        if where == "input":
            handles.append(
                m.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].detach().clone()))
            )
        else:
            handles.append(
                m.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o.detach().clone()))
            )
    net = net.train()
    with torch.no_grad():
        seen["\x00out"] = net(x).detach().clone()
    for h in handles:
        h.remove()
    return seen


def _close(a: float, b: float, tol: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def _batch(seed: int = 0, n: int = 8) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g) + 1.0, torch.randint(0, 4, (n,), generator=g)


def test_activation_stats_read_the_pre_activation_before_an_inplace_relu() -> None:
    torch.manual_seed(0)
    model = InplaceNet()
    ref = _reference_reads(copy.deepcopy(model.net), _batch()[0], {"relu": "input", "block.relu": "input"})
    logged = _fit(
        model, ActivationStats(layers=["net.relu", "net.block.relu"], every_n_steps=1, histogram=False), _batch()
    )
    for name in ("relu", "block.relu"):
        x = ref[name]
        assert x.min() < 0  # a pre-activation: the ReLU has not run yet
        assert _close(logged[f"act/net.{name}/mean"], float(x.mean())), name
        assert _close(logged[f"act/net.{name}/std"], float(x.std(correction=0))), name
        assert _close(logged[f"act/net.{name}/q15"], float(torch.quantile(x.flatten(), 0.15))), name
        assert _close(logged[f"act/net.{name}/dead"], float((x <= 0).all(0).float().mean())), name


def test_mean_shift_reads_a_norm_output_before_an_inplace_relu_and_finds_the_logits_of_self_net() -> None:
    torch.manual_seed(0)
    model = InplaceNet()
    ref = _reference_reads(copy.deepcopy(model.net), _batch()[0], {"bn": "output", "block.branch": "output"})
    logged = _fit(model, MeanShift(layers=["net.bn", "net.block.branch"], every_n_steps=1), _batch())
    for name in ("bn", "block.branch"):
        a = ref[name]
        assert _close(logged[f"meanshift/net.{name}/cos"], reference_cos(a), 1e-4), name
        channel_means = [float(a[:, c].double().mean()) for c in range(a.shape[1])]
        assert _close(logged[f"meanshift/net.{name}/channel_mean"], sum(channel_means) / len(channel_means), 1e-4), name
    # training_step calls self.net(x), not self(x): the logits are still found (the last module output).
    assert logged["meanshift/majority_share"] == reference_majority(ref["\x00out"])


def test_residual_variance_reads_the_branch_before_out_plus_equals() -> None:
    torch.manual_seed(0)
    model = InplaceNet()
    ref = _reference_reads(
        copy.deepcopy(model.net), _batch()[0], {"block.branch": "output", "block.shortcut": "output"}
    )
    logged = _fit(model, ResidualVariance(every_n_steps=1), _batch())
    vb = float(ref["block.branch"].double().var(unbiased=False))
    vs = float(ref["block.shortcut"].double().var(unbiased=False))
    assert _close(logged["resvar/net.block/branch"], vb) and _close(logged["resvar/net.block/skip"], vs)
    assert _close(logged["resvar/net.block/ratio"], vb / vs)


def test_torchvision_resnet18_pre_activations_are_centred() -> None:
    """BN in training mode with beta = 0 feeds every ReLU: the first one's input has mean 0 and q15 < 0."""
    torch.manual_seed(0)
    model = ResNetClassifier()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
    layers = ["relu", "layer1.0.relu", "layer4.1.relu"]
    ref = _reference_reads(copy.deepcopy(model.net), batch[0], dict.fromkeys(layers, "input"))
    logged = _fit(model, ActivationStats(layers=[f"net.{n}" for n in layers], every_n_steps=1, histogram=False), batch)
    assert abs(logged["act/net.relu/mean"]) < 1e-5 and logged["act/net.relu/q15"] < -0.5
    for name in layers:  # a block's ReLU runs twice: the last call (after `out += identity`) is read
        x = ref[name]
        assert _close(logged[f"act/net.{name}/mean"], float(x.mean()), 1e-4), name
        assert _close(logged[f"act/net.{name}/q15"], float(torch.quantile(x.flatten(), 0.15)), 1e-4), name


class Sequence(pl.LightningModule):
    """A per-token classifier: every module output is (N, T, C), so there are no (N, classes) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_mean_shift_says_once_why_majority_share_is_absent() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 5, generator=g), torch.randint(0, 4, (8, 3), generator=g)
    rec = Recorder()
    trainer = pl.Trainer(
        max_steps=2, callbacks=[MeanShift(every_n_steps=1)], logger=rec, log_every_n_steps=1, **TRAINER_KW
    )
    with pytest.warns(UserWarning, match="majority_share is not logged: no module of Sequence returned") as caught:
        trainer.fit(Sequence(), DataLoader(TensorDataset(x, y), batch_size=4))
    assert sum("majority_share" in str(w.message) for w in caught) == 1
    assert sorted(rec.logged) == [0, 1] and all(
        "meanshift/net.1/cos" in v and "meanshift/majority_share" not in v for v in rec.logged.values()
    )
