"""CIFAR-style VGG (configurations A/B/D/E) with every normalization the paper compares."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Literal

import torch
from torch import nn

from bnlightning.models.base import BaseModule, NormPosition, check_dropout, check_norm_options
from bnlightning.models.norms import NormKind, make_norm

# Channels per conv layer, "M" for a 2x2 max-pool (Simonyan & Zisserman, Table 1).
VGG_CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


#: gamma of Brock et al. (2021) for ReLU: 1 / sqrt(E[relu(z)^2] - E[relu(z)]^2) = sqrt(2 / (1 - 1/pi)).
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


def conv_layer(in_channels: int, out_channels: int, weight_standardization: bool = False, stride: int = 1) -> nn.Conv2d:
    """A 3x3 conv, plain or with scaled weight standardisation (PROTOCOL §11).

    Scaled WS uses timm's maintained ``ScaledStdConv2d``: per output unit
    ``W_hat = gain * gamma * (W - mean(W)) / (std(W) * sqrt(fan_in))`` with a learnable
    ``gain`` (initialised to 1) and ``gamma = RELU_GAMMA``, so that a ReLU network keeps unit
    variance at initialisation without any normalization layer (Brock et al. 2021).
    """
    if not weight_standardization:
        return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
    from timm.layers import ScaledStdConv2d  # imported only when asked for: timm is slow to import

    return ScaledStdConv2d(in_channels, out_channels, 3, stride=stride, padding=1, gamma=RELU_GAMMA)


def build_vgg(
    config: str,
    norm: str,
    norm_position: str = "before",
    norm_affine: bool = True,
    norm_layers: list[int] | None = None,
    in_channels: int = 3,
    num_classes: int = 10,
    width: float = 1.0,
    weight_standardization: bool = False,
    dropout: float = 0.0,
) -> nn.Sequential:
    """A flat ``nn.Sequential`` named ``conv1, norm1, relu1, pool1, ..., flatten, fc``.

    Conv layers are numbered from 1 as in the paper ("layer 5" is ``conv5``);
    ``norm_layers`` holds 0-based indices into the conv layers (``[3]`` puts the only
    norm after ``conv4``). ``width`` scales every channel count (for small test nets).
    ``weight_standardization`` builds every conv as timm's ``ScaledStdConv2d`` (see
    ``conv_layer``); ``dropout > 0`` adds ``drop`` (``nn.Dropout``) before the classifier.
    """
    if config not in VGG_CONFIGS:
        raise ValueError(f"unknown VGG config {config!r}; accepted: {', '.join(VGG_CONFIGS)}")
    if norm_position not in ("before", "after"):
        raise ValueError(f"unknown norm_position {norm_position!r}; accepted: before, after")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    check_dropout(dropout)
    spec = VGG_CONFIGS[config]
    num_convs = sum(1 for v in spec if v != "M")
    with_norm = set(check_norm_options(norm, norm_layers, num_convs, "conv"))
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels, conv_i, pool_i = in_channels, 0, 0
    for v in spec:
        if v == "M":
            pool_i += 1
            layers[f"pool{pool_i}"] = nn.MaxPool2d(2)
            continue
        out = max(1, round(int(v) * width))
        conv_i += 1
        layers[f"conv{conv_i}"] = conv_layer(channels, out, weight_standardization)
        has_norm = norm != "none" and (conv_i - 1) in with_norm
        if has_norm and norm_position == "before":
            layers[f"norm{conv_i}"] = make_norm(norm, out, dims=2, affine=norm_affine)
        layers[f"relu{conv_i}"] = nn.ReLU()
        if has_norm and norm_position == "after":
            layers[f"norm{conv_i}"] = make_norm(norm, out, dims=2, affine=norm_affine)
        channels = out
    layers["flatten"] = nn.Flatten()
    if dropout > 0:
        layers["drop"] = nn.Dropout(dropout)
    layers["fc"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)


class VGG(BaseModule):
    """VGG for 32x32 images with a 512 -> 10 head (PROTOCOL §6).

    The architecture arguments are below; the training options (``loss``, ``init``,
    ``init_gain``, ``optimizer``, ``lr_scheduler``, ``compile``,
    ``divergence_check_every_n_steps``) are keyword arguments of ``BaseModule``.

    Args:
        config: A, B, D or E (VGG-11/13/16/19).
        norm: none, batch, noisy_batch, l1, l2, linf, layer or group.
        norm_position: the norm ``before`` (paper) or ``after`` the ReLU.
        norm_affine: learnable gamma/beta in the norm.
        norm_layers: 0-based conv indices that get a norm (default: all).
        in_channels: input channels.
        num_classes: classes (outputs of the last layer).
        width: channel multiplier (1.0 is the real VGG; tests use small values).
        channels_last: keep conv weights and inputs in channels-last memory format.
        weight_standardization: scaled weight standardisation in every conv (normalizer-free
            VGG, Brock et al. 2021; pair it with ``bnlightning.normfree.AdaptiveGradientClipping``).
        dropout: dropout probability before the classifier, in [0, 1) (0: none).
        **kwargs: the training options of ``BaseModule``.

    Example::

        model = VGG(config="A", norm="batch", optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    """

    def __init__(
        self,
        config: Literal["A", "B", "D", "E"] = "A",
        norm: NormKind = "none",
        norm_position: NormPosition = "before",
        norm_affine: bool = True,
        norm_layers: list[int] | None = None,
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1.0,
        channels_last: bool = False,
        weight_standardization: bool = False,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        net = build_vgg(
            config=config,
            norm=norm,
            norm_position=norm_position,
            norm_affine=norm_affine,
            norm_layers=norm_layers,
            in_channels=in_channels,
            num_classes=num_classes,
            width=width,
            weight_standardization=weight_standardization,
            dropout=dropout,
        )
        super().__init__(net=net, num_outputs=num_classes, **kwargs)
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: Any) -> Any:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)
