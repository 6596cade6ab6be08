"""``MeanShift``: how alike different examples look inside the network (PROTOCOL §10).

Brock et al. (2021) and the article "Batch Normalization… or not?": without normalization, ReLU outputs have a positive mean
per channel, the shift grows with depth, and every example's hidden representation points
the same way, until the network predicts one label for every input at initialisation.
BatchNorm removes the per-channel mean at every layer; scaled weight standardisation
removes it from the weights instead.

``mean_shift`` is the pure function; ``MeanShift`` the callback that applies it to the
outputs of chosen layers during one side-effect-free measurement pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from bnlightning.callbacks.activations import ModuleLayersCallback
from bnlightning.callbacks.functional import capture_forward
from bnlightning.callbacks.functional._loss import LossFn

__all__ = ["MeanShift", "majority_share", "mean_shift", "pairwise_cosine_mean"]


def pairwise_cosine_mean(a: Tensor) -> Tensor:
    """Mean of ``cos(A_a, A_b)`` over ordered pairs of different examples ``a != b``.

    Each example's activations are flattened to one vector. An all-zero vector (a ReLU
    layer that is silent for that example) has cosine 0 with every other vector.

    Args:
        a: activations, batch first, at least 2 examples: (N, ...).

    Raises:
        ValueError: fewer than 2 examples (no pair to compare).

    Example::

        pairwise_cosine_mean(torch.ones(4, 3))  # tensor(1.)
    """
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"mean shift needs at least 2 examples in the batch, got {n}")
    x = a.detach().reshape(n, -1).double()  # float64: the sum of N^2 cosines must not lose the small ones
    norms = x.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, x / norms.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
    # sum_{a != b} cos = ||sum_a u_a||^2 - sum_a ||u_a||^2: O(N F) instead of the N x N Gram matrix.
    total = unit.sum(0).pow(2).sum() - unit.pow(2).sum()
    return (total / (n * (n - 1))).to(a.dtype if a.is_floating_point() else torch.float32)


def mean_shift(activations: Mapping[str, Tensor], logits: Tensor | None = None) -> dict[str, Tensor]:
    """Mean-shift statistics of captured activations and the predictions (PROTOCOL §10).

    Per layer ``<name>`` with output ``A`` (N, C) or (N, C, H, W):

    - ``meanshift/<name>/cos``: mean over pairs of different examples of ``cos(A_a, A_b)``
      (0: unrelated directions; 1: every example looks alike);
    - ``meanshift/<name>/channel_mean``: the mean over channels of each channel's mean over
      the batch (and pixels) -- positive for ReLU outputs without normalization.

    With ``logits`` (N, classes): ``meanshift/majority_share``, the share of examples given
    the most frequent predicted label (1: the same label for every example).

    Args:
        activations: layer name -> its output on one batch (batch first, same batch for all).
        logits: the network's outputs on that batch, or None.

    Raises:
        ValueError: a tensor with fewer than 2 examples or fewer than 2 dimensions.

    Example::

        stats = mean_shift({"relu1": torch.relu(torch.randn(8, 16))}, logits=torch.randn(8, 10))
    """
    out: dict[str, Tensor] = {}
    for name, a in activations.items():
        if a.dim() < 2:
            raise ValueError(f"activations of {name!r} must be batch first with features, got shape {tuple(a.shape)}")
        out[f"meanshift/{name}/cos"] = pairwise_cosine_mean(a)
        dims = [0, *range(2, a.dim())]  # batch and pixels: one mean per channel
        out[f"meanshift/{name}/channel_mean"] = a.detach().float().mean(dims).mean()
    if logits is not None:
        out["meanshift/majority_share"] = majority_share(logits)
    return out


def majority_share(logits: Tensor) -> Tensor:
    """Share of the examples given the most frequent predicted label (``argmax`` over classes).

    Raises:
        ValueError: ``logits`` is not (N, classes) with N >= 1.
    """
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise ValueError(f"logits must be (N, classes), got shape {tuple(logits.shape)}")
    counts = torch.bincount(logits.detach().argmax(1), minlength=logits.shape[1])
    return counts.max().float() / logits.shape[0]


def _looks_like_logits(x: Tensor) -> bool:
    return x.dim() == 2 and x.is_floating_point() and x.shape[0] >= 1 and x.shape[1] >= 2


class MeanShift(ModuleLayersCallback):
    r"""Log the mean shift of chosen layers' outputs and the majority-prediction share.

    What is read: the *output* of each selected module (default: every activation module,
    i.e. the ReLU outputs, or in a network without any every Conv/Linear output), and for
    ``meanshift/majority_share`` the logits: the LightningModule's own output when its
    ``forward`` runs in the loss and returns (N, classes), else the output of the last module
    call in the pass that returned an (N, classes) floating tensor (a ``training_step`` that
    calls ``self.net(x)``: the net's output). Without either, the share is not logged and a
    warning says why, once. The statistics are computed inside the hooks, when each output is
    produced, so an in-place op later in the pass (``nn.ReLU(inplace=True)`` after a norm,
    ``out += identity``) cannot change them; a module called several times in the pass is read
    at its last call.

    When: as ``ActivationStats`` -- forward hooks live only around the callback's own
    float32, no-grad ``measurement_forward`` of ``loss_method(batch)`` on the measured step's
    training batch (pre-step weights, training mode, buffers cloned, RNG rewound), so
    training is untouched. ``every_n_steps=1`` with ``max_steps=1`` measures the network at
    initialisation, which is where that article's claim lives.

    Logged metrics: see ``mean_shift``.

    Args:
        layers: module names relative to the LightningModule (default: see above).
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        loss_fn: ``(module, batch) -> scalar loss`` or its import path (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).
        max_overhead: ``None``, or the fraction in (0, 1) of training time this callback's measurements may
            take: it then times them and skips scheduled steps to stay within it (shared fairly with the
            other budgeted callbacks; ``every_n_steps`` is the densest spacing) and logs ``meanshift/cost_steps``.
        schedule: ``"fixed"`` (every ``every_n_steps`` steps) or ``"log"`` (about 10 steps per decade:
            1, 2, 3, 4, 6, 7, 8, 10, 13, 16, 20, ..., 100, 126, ...).

    Raises:
        ValueError: bad arguments; at setup an unknown layer name (the valid ones are listed).
        MisconfigurationException: at setup, manual optimization or an unsupported strategy.
        AttributeError: at setup, no ``loss_fn``, ``loss_method`` or ``training_step`` to measure with.

    Example::

        trainer = Trainer(max_steps=1, callbacks=[MeanShift(every_n_steps=1)])
    """

    metric_prefix = "meanshift"

    def __init__(
        self,
        layers: list[str] | None = None,
        every_n_steps: int = 100,
        loss_fn: LossFn | str | None = None,
        loss_method: str | None = None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__(layers, every_n_steps, loss_fn, loss_method, max_overhead, schedule)
        self._said_no_logits = False

    @override
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any) -> dict[str, Tensor]:
        layers = set(self._layers)
        taps: dict[str, Any] = {name: (pl_module.get_submodule(name), "output") for name in self._layers}
        # Logits candidates: every module's output (the LightningModule's own is "\x00"); see _logits.
        taps.update({f"\x00{n}": (m, "output") for n, m in pl_module.named_modules()})
        shares: dict[str, Tensor] = {}

        def read(name: str, x: Tensor) -> dict[str, Tensor] | None:
            # Everything is computed here, at hook time: an in-place op (a ReLU(inplace=True) after a
            # norm, `out += identity`) may rewrite x later in the pass.
            if name in layers:
                return mean_shift({name: x})
            if _looks_like_logits(x):
                shares.pop(name, None)
                shares[name] = majority_share(x)  # re-inserted: the last key is the last call to finish
            return None

        seen = capture_forward(pl_module, batch, taps, read=read, loss_fn=self.measured_loss(pl_module))
        metrics = {key: value for name in self._layers if seen.get(name) for key, value in seen[name].items()}
        share = self._logits(shares, pl_module)
        if share is not None:
            metrics["meanshift/majority_share"] = share
        return metrics

    def _logits(self, shares: dict[str, Tensor], pl_module: pl.LightningModule) -> Tensor | None:
        """The majority share of the LightningModule's own (N, classes) output when its ``forward`` ran,
        else of the last module call in the pass that returned one (``training_step`` calling
        ``self.net(x)``: the net's output); else None, said once."""
        if "\x00" in shares:
            return shares["\x00"]
        if shares:
            return shares[next(reversed(shares))]
        if not self._said_no_logits:
            self._said_no_logits = True
            rank_zero_warn(
                f"MeanShift: meanshift/majority_share is not logged: no module of {type(pl_module).__name__} returned "
                f"(N, classes) logits in the measured pass (a tuple, a dict or a sequence model's (N, T, V) output is not read)."
            )
        return None

    @override
    def charts(self) -> dict[str, list[str]]:
        return {"meanshift_cos": [f"meanshift/{name}/cos" for name in self._layers]}
