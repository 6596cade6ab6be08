"""Data modules (CIFAR-10, scikit-learn digits, the deep linear network's regression data)
and the on-device loader they share."""

from bnlightning.data.cifar10 import CIFAR10
from bnlightning.data.digits import Digits
from bnlightning.data.linear import LinearRegression
from bnlightning.data.loader import DeviceImageTransform, TensorLoader

__all__ = ["TensorLoader", "DeviceImageTransform", "CIFAR10", "Digits", "LinearRegression"]
