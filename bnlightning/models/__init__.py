"""LightningModules (VGG, MLP, ResNet) and the normalization layers they use."""

from bnlightning.models.base import BaseModule
from bnlightning.models.mlp import MLP
from bnlightning.models.norms import LpNorm, NoisyBatchNorm, make_norm
from bnlightning.models.resnet import ResNet
from bnlightning.models.vgg import VGG

__all__ = ["BaseModule", "LpNorm", "MLP", "NoisyBatchNorm", "ResNet", "VGG", "make_norm"]
