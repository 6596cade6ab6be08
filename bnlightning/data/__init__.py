"""Data modules (CIFAR-10, scikit-learn digits, the deep linear network's regression data)
and the on-device loader they share."""

from bnlightning.data.cifar10 import CIFAR10DataModule
from bnlightning.data.digits import DigitsDataModule
from bnlightning.data.linear import LinearRegressionDataModule
from bnlightning.data.loader import DeviceImageTransform, TensorLoader

__all__ = [
    "TensorLoader",
    "DeviceImageTransform",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "LinearRegressionDataModule",
]
