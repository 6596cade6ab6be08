"""AGC acts on the gradient the optimizer applies; linear lr scaling; BN's train-mode accuracy."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bnlightning.batchsize import (
    LinearLRScaling,
    TrainModeAccuracy,
    train_mode_accuracy,
)
from bnlightning.models import MLP, VGG
from bnlightning.normfree import AdaptiveGradientClipping, final_linear_layer

TRAINER_KW: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "accelerator": "cpu",
    "logger": False,
}


def reference_agc(w: Tensor, g: Tensor, lam: float, eps: float = 1e-3) -> Tensor:
    """AGC unit by unit with a Python loop (PROTOCOL §11): rows of a matrix, output channels of a conv."""
    if w.dim() <= 1:
        units = [(slice(None),)]
    else:
        units = [(i,) for i in range(w.shape[0])]
    out = g.clone()
    for u in units:
        wn = max(float(w[u].norm()), eps)
        gn = float(g[u].norm())
        if gn / wn > lam:
            out[u] = g[u] * (lam * wn / gn)
    return out


class Capture(pl.Callback):
    """Records the weights and gradients the optimizer is about to apply (after every other callback)."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}


def _data(model: nn.Module, n: int = 16, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g) if isinstance(model, VGG) else torch.randn(n, 12, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=batch_size)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_agc_clips_the_gradient_the_optimizer_applies(accumulate: int) -> None:
    torch.manual_seed(0)
    model = VGG(config="A", width=0.125, weight_standardization=True)
    plain = copy.deepcopy(model)
    lr, lam = 0.5, 0.01
    for m in (model, plain):
        m.optimizer_factory = lambda params: torch.optim.SGD(params, lr=lr)
    # Reference: the unclipped accumulated gradient of the same step, from a run without AGC.
    cap_plain = Capture()
    pl.Trainer(max_steps=1, callbacks=[cap_plain], accumulate_grad_batches=accumulate, **TRAINER_KW).fit(
        plain, _data(plain)
    )
    agc = AdaptiveGradientClipping(clip_factor=lam)
    pl.Trainer(max_steps=1, callbacks=[Capture(), agc], accumulate_grad_batches=accumulate, **TRAINER_KW).fit(
        model, _data(model)
    )
    assert agc.clipped_steps == 1
    clipped_any = False
    for name, p in model.named_parameters():
        w0, g = cap_plain.weights[name], cap_plain.grads[name]
        expected = g if name.startswith("net.fc.") else reference_agc(w0, g, lam)
        clipped_any |= not torch.allclose(expected, g)
        # The step the optimizer took is -lr times the AGC gradient: AGC ran last before it.
        torch.testing.assert_close(p.detach(), w0 - lr * expected, rtol=1e-5, atol=1e-7, msg=name)
    assert clipped_any


def test_agc_runs_before_the_other_callbacks_and_refuses_lightning_clipping() -> None:
    model = MLP(in_features=12, depth=2, width=16)
    cap, agc = Capture(), AdaptiveGradientClipping(clip_factor=1e-4, exclude=[])
    trainer = pl.Trainer(max_steps=1, callbacks=[cap, agc], **TRAINER_KW)
    trainer.fit(model, _data(model))
    assert trainer.callbacks[0] is agc
    for name, _ in model.named_parameters():  # every unit clipped, classifier included (exclude=[])
        assert torch.allclose(cap.grads[name], reference_agc(cap.weights[name], cap.grads[name], 1e-4), atol=1e-8), name
    with pytest.raises(MisconfigurationException, match="gradient_clip_val=1.0"):
        pl.Trainer(max_steps=1, callbacks=[AdaptiveGradientClipping()], gradient_clip_val=1.0, **TRAINER_KW).fit(
            model, _data(model)
        )
    with pytest.raises(ValueError, match="clip_factor must be a positive number, got 0"):
        AdaptiveGradientClipping(clip_factor=0)
    with pytest.raises(ValueError, match="exclude: unknown module 'nope'"):
        pl.Trainer(max_steps=1, callbacks=[AdaptiveGradientClipping(exclude=["nope"])], **TRAINER_KW).fit(
            model, _data(model)
        )


class HeadFirst(pl.LightningModule):
    """The classifier is registered before the body it follows: registration order misleads."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 10)
        self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_agc_leaves_the_last_linear_of_the_forward_pass_unclipped_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = HeadFirst()
    cap, agc = Capture(), AdaptiveGradientClipping(clip_factor=1e-4)
    with caplog.at_level("INFO"):
        pl.Trainer(max_steps=2, callbacks=[cap, agc], **TRAINER_KW).fit(model, _data(model))
    said = [r.getMessage() for r in caplog.records if "AdaptiveGradientClipping" in r.getMessage()]
    assert said == [
        (
            "AdaptiveGradientClipping: not clipping head.weight, head.bias "
            "(head: the last nn.Linear in the forward pass; `exclude=` to choose)."
        )
    ]
    for name, w in cap.weights.items():  # cap ran after AGC: every unit but the classifier's is within lambda
        g = cap.grads[name]
        units = [(w.flatten(), g.flatten())] if w.dim() <= 1 else list(zip(w, g))
        ratio = max(float(gu.norm()) / max(float(wu.norm()), 1e-3) for wu, gu in units)
        assert (ratio > 2e-4) if name.startswith("head.") else (ratio <= 1e-4 * (1 + 1e-5)), (name, ratio)
    assert not model.head._forward_hooks and not model.body[2]._forward_hooks  # the watch ended with the first step
    assert final_linear_layer(HeadFirst(), torch.randn(2, 12)) == "head"  # registration order would say body.2


def test_scaled_ws_conv_standardises_each_output_unit() -> None:
    torch.manual_seed(0)
    conv = VGG(config="A", width=0.125, weight_standardization=True).net.conv2
    x = torch.randn(4, conv.in_channels, 8, 8)
    w = conv.weight.detach()
    fan_in = w[0].numel()
    w_hat = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), unbiased=False, keepdim=True) * fan_in**0.5)
    expected = torch.nn.functional.conv2d(x, w_hat * conv.scale * fan_in**0.5, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-5)


def test_linear_lr_scaling_and_train_mode_accuracy() -> None:
    torch.manual_seed(0)
    model = MLP(in_features=12, depth=2, width=16, norm="batch")
    model.optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.4)
    trainer = pl.Trainer(
        max_steps=2, callbacks=[LinearLRScaling(reference_batch_size=32)], accumulate_grad_batches=2, **TRAINER_KW
    )
    trainer.fit(model, _data(model, n=32, batch_size=4))
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(0.4 * 4 * 2 / 32) and group["lr_batch_scale"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="reference_batch_size must be a positive integer, got 0"):
        LinearLRScaling(0)
    # Train-mode accuracy: chunks of 4 through BN with batch statistics; the module is left as it was.
    x, y = torch.randn(10, 12), torch.randint(0, 10, (10,))
    before = copy.deepcopy(model.state_dict())
    acc = train_mode_accuracy(model, x, y, batch_size=4)
    probe = copy.deepcopy(model).train()
    preds = torch.cat([probe(x[:4]).argmax(1), probe(x[4:8]).argmax(1), probe(x[8:]).argmax(1)])
    assert float(acc) == pytest.approx(float((preds == y).float().mean()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="batch_size must be a positive integer or null"):
        TrainModeAccuracy(batch_size=0)
