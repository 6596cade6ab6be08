"""CIFAR ResNet-20 (He et al. 2016, §4.2) with the normalization options of the VGG.

Each basic block is ``relu(branch(x) + shortcut(x))`` with the residual branch
``conv1, norm1, relu1, conv2, norm2`` (norm before the ReLU, as in the paper) and the
shortcut the identity, or a 1x1 conv (+ norm) where the shape changes (option B). The
submodules are named ``branch`` and ``shortcut`` so that ``ResidualVariance`` can compare
them (the article "Batch Normalization… or not?": "BN downscales the residual branch at initialisation").
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from bnlightning.models.base import BaseModule, InitKind, check_dropout
from bnlightning.models.norms import NORM_KINDS, NormKind, make_norm
from bnlightning.models.vgg import conv_layer


class BasicBlock(nn.Module):
    """``relu(gain * branch(x) + shortcut(x))``; ``gain`` is a learnable scalar (SkipInit) or 1."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, affine: bool, ws: bool, skipinit: bool) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            OrderedDict(
                conv1=conv_layer(cin, cout, ws, stride=stride),
                norm1=make_norm(norm, cout, dims=2, affine=affine),
                relu1=nn.ReLU(),
                conv2=conv_layer(cout, cout, ws),
                norm2=make_norm(norm, cout, dims=2, affine=affine),
            )
        )
        if stride != 1 or cin != cout:
            proj = nn.Conv2d(cin, cout, 1, stride=stride, bias=norm == "none")
            self.shortcut: nn.Module = nn.Sequential(
                OrderedDict(conv=proj, norm=make_norm(norm, cout, dims=2, affine=affine))
            )
        else:
            self.shortcut = nn.Identity()
        # SkipInit (De & Smith 2020): the branch starts switched off, as BN's downscaling would make it.
        self.gain = nn.Parameter(torch.zeros(())) if skipinit else None
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        b = self.branch(x)
        if self.gain is not None:
            b = b * self.gain
        return self.relu(b + self.shortcut(x))


def build_resnet(
    depth: int = 20,
    norm: str = "batch",
    norm_affine: bool = True,
    width: float = 1.0,
    in_channels: int = 3,
    num_classes: int = 10,
    weight_standardization: bool = False,
    skipinit: bool = False,
    dropout: float = 0.0,
) -> nn.Sequential:
    """``stem (conv, norm, relu), stage1..3 (n blocks each), pool, flatten, [drop], fc``; depth = 6n + 2.

    Raises:
        ValueError: a depth that is not 6n + 2, an unknown norm, a non-positive width.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
    if norm not in NORM_KINDS:
        raise ValueError(f"unknown norm {norm!r}; accepted: {', '.join(NORM_KINDS)}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    check_dropout(dropout)
    n = (depth - 2) // 6
    chans = [max(1, round(c * width)) for c in (16, 32, 64)]
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=conv_layer(in_channels, chans[0], weight_standardization),
        norm1=make_norm(norm, chans[0], dims=2, affine=norm_affine),
        relu1=nn.ReLU(),
    )
    cin = chans[0]
    for s, cout in enumerate(chans, 1):
        blocks = [
            BasicBlock(
                cin if i == 0 else cout,
                cout,
                2 if (i == 0 and s > 1) else 1,
                norm,
                norm_affine,
                weight_standardization,
                skipinit,
            )
            for i in range(n)
        ]
        layers[f"stage{s}"] = nn.Sequential(OrderedDict((f"block{i + 1}", b) for i, b in enumerate(blocks)))
        cin = cout
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    if dropout > 0:
        layers["drop"] = nn.Dropout(dropout)
    layers["fc"] = nn.Linear(cin, num_classes)
    return nn.Sequential(layers)


class ResNet(BaseModule):
    """CIFAR ResNet (default ResNet-20: 3 stages of 3 basic blocks, 16/32/64 channels).

    The architecture arguments are below; the training options (``loss``, ``init_gain``,
    ``optimizer``, ``lr_scheduler``, ``compile``, ``divergence_check_every_n_steps``) are
    keyword arguments of ``BaseModule``. ``init`` is declared again here only because its
    default differs (kaiming, He et al.'s choice for ResNets, instead of xavier_uniform).

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110).
        norm: none, batch, noisy_batch, l1, l2, linf, layer or group (as the VGG).
        norm_affine: learnable gamma/beta in the norm.
        init: xavier_uniform, kaiming (He et al.'s choice for ResNets) or default.
        width: channel multiplier (1.0 is the real ResNet-20; CPU runs use 0.25).
        weight_standardization: scaled WS convs (timm ``ScaledStdConv2d``): the normalizer-free
            variant, to train with ``bnlightning.normfree.AdaptiveGradientClipping``.
        skipinit: multiply each residual branch by a learnable scalar initialised to 0.
        dropout: dropout before the classifier, in [0, 1).
        in_channels: input channels.
        num_classes: classes (outputs of the last layer).
        **kwargs: the training options of ``BaseModule``.

    Raises:
        ValueError: bad depth, norm, width, dropout, init or gain (one line naming the value).

    Example::

        model = ResNet(depth=20, norm="batch")
    """

    def __init__(
        self,
        depth: int = 20,
        norm: NormKind = "batch",
        norm_affine: bool = True,
        init: InitKind = "kaiming",
        width: float = 1.0,
        weight_standardization: bool = False,
        skipinit: bool = False,
        dropout: float = 0.0,
        in_channels: int = 3,
        num_classes: int = 10,
        **kwargs: Any,
    ) -> None:
        net = build_resnet(
            depth=depth,
            norm=norm,
            norm_affine=norm_affine,
            width=width,
            in_channels=in_channels,
            num_classes=num_classes,
            weight_standardization=weight_standardization,
            skipinit=skipinit,
            dropout=dropout,
        )
        super().__init__(net=net, num_outputs=num_classes, init=init, **kwargs)
