"""Models nobody here wrote, wrapped the way a user would, for the callback tests.

Each entry gives a LightningModule that has **no** ``loss`` method (the callbacks fall back to its
``training_step``, or to a ``loss_fn`` import path), the network inside it (``.net``) for the
plain references, the reference loss on that network, a batch maker and the layers to measure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
import torchvision
from lightning.pytorch.demos.lstm import SimpleLSTM
from lightning.pytorch.demos.transformer import Transformer
from torch import Tensor, nn
from torch.nn import functional as F


class Classifier(pl.LightningModule):
    """A typical user module: a torchvision net, cross-entropy, a logged loss and a torchmetrics accuracy."""

    def __init__(self, net: nn.Module, optimizer: Callable[[Any], torch.optim.Optimizer]) -> None:
        super().__init__()
        self.net, self.make_optimizer = net, optimizer
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.acc(logits, y)
        self.log("train_loss", loss)
        self.log("train_acc", self.acc)
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


def classifier_loss(net: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(net(x), y)


class LanguageModel(pl.LightningModule):
    """Lightning's demo Transformer, as ``LightningTransformer`` uses it (``training_step`` only)."""

    def __init__(self, net: nn.Module, optimizer: Callable[[Any], torch.optim.Optimizer]) -> None:
        super().__init__()
        self.net, self.make_optimizer = net, optimizer

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return lm_loss(self.net, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


def lm_loss(net: nn.Module, batch: Any) -> Tensor:
    inputs, target = batch
    return F.nll_loss(net(inputs, target), target.view(-1))


class Recurrent(pl.LightningModule):
    """Lightning's demo LSTM, its loss given to the callbacks as an import path (``loss_fn``)."""

    def __init__(self, net: nn.Module, optimizer: Callable[[Any], torch.optim.Optimizer]) -> None:
        super().__init__()
        self.net, self.make_optimizer = net, optimizer

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return lstm_loss(self.net, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


def lstm_loss(net: nn.Module, batch: Any) -> Tensor:
    inputs, target = batch
    out, _ = net(inputs, net.init_hidden(inputs.size(0)))
    return F.nll_loss(out, target.view(-1))


def lstm_module_loss(module: Recurrent, batch: Any) -> Tensor:
    """The ``loss_fn`` the LSTM case names by import path: ``tests.helpers.zoo:lstm_module_loss``."""
    return lstm_loss(module.net, batch)


class SharedBlocks(nn.Module):
    """ALBERT-style sharing: one block registered three times (``nn.ModuleList([block] * 3)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 16)
        block = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU())
        self.blocks = nn.ModuleList([block] * 3)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def tied_transformer() -> nn.Module:
    net = Transformer(vocab_size=50, ninp=16, nhead=2, nhid=24, nlayers=1, dropout=0.1)
    net.decoder.weight = net.embedding.weight  # weight tying, as language models do
    return net


@dataclass
class Case:
    """One foreign model: how to build it, its reference loss, a batch, the layers to measure."""

    build: Callable[[Callable[[Any], torch.optim.Optimizer]], pl.LightningModule]
    loss: Callable[[nn.Module, Any], Tensor]
    batch: Callable[[torch.Generator], Any]
    layers: list[str]
    loss_fn: str | None = None


def _images(g: torch.Generator, n: int = 4) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _tokens(g: torch.Generator, n: int = 4, t: int = 6) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, 50, (n, t + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


CASES: dict[str, Case] = {
    "transformer_tied": Case(
        lambda opt: LanguageModel(tied_transformer(), opt),
        lm_loss,
        _tokens,
        [
            "net.transformer.encoder.layers.0.linear1",
            "net.transformer.decoder.layers.0.self_attn.out_proj",
            "net.decoder",
        ],
    ),
    "transformer": Case(
        lambda opt: LanguageModel(Transformer(vocab_size=50, ninp=16, nhead=2, nhid=24, nlayers=1, dropout=0.1), opt),
        lm_loss,
        _tokens,
        [
            "net.transformer.encoder.layers.0.self_attn.out_proj",
            "net.transformer.decoder.layers.0.linear2",
            "net.decoder",
        ],
    ),
    "resnet18": Case(
        lambda opt: Classifier(torchvision.models.resnet18(num_classes=10), opt),
        classifier_loss,
        _images,
        ["net.conv1", "net.layer2.0.downsample.0", "net.fc"],
    ),
    "mobilenet_v3_small": Case(
        lambda opt: Classifier(torchvision.models.mobilenet_v3_small(num_classes=10), opt),
        classifier_loss,
        _images,
        ["net.features.1.block.0.0", "net.features.1.block.1.fc1", "net.features.4.block.1.0", "net.classifier.3"],
    ),
    "shared_blocks": Case(
        lambda opt: Classifier(SharedBlocks(), opt),
        classifier_loss,
        lambda g: (torch.randn(8, 12, generator=g), torch.randint(0, 10, (8,), generator=g)),
        ["net.stem", "net.blocks.0.0", "net.head"],
    ),
    "lstm": Case(
        lambda opt: Recurrent(SimpleLSTM(vocab_size=50, ninp=12, nhid=12, nlayers=2, dropout=0.1), opt),
        lstm_loss,
        _tokens,
        ["net.decoder"],
        loss_fn="tests.helpers.zoo:lstm_module_loss",
    ),
}
