"""Which loss the callbacks measure, on modules written the way people write them.

- ``self.loss = nn.CrossEntropyLoss()`` (an ``nn.Module`` attribute: never a loss of the batch),
- Lightning's ``BoringModel`` (``loss(preds, labels=None)`` takes one argument but is no loss of a
  batch: its ``training_step`` is measured),
- a LitGPT-style ``training_step(self, batch)`` on a dict batch, with ``F.scaled_dot_product_attention``,
- Lightning's demo ``LightningTransformer`` and a ``torch.compile``d network, with ``HessianSpectrum``
  (double backward through attention and through a compiled module),

each with every measurement callback attached: training is bit-identical to training without
them, and every logged number equals the one logged with the loss given explicitly as ``loss_fn``
(and, for the tiny GPT, the top eigenvalue of its full Hessian). Then the rule's errors, one line
each, and the policy for a measurement that fails: the callback stops, training goes on.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos import LightningTransformer, Transformer
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from bnlightning.callbacks import (
    ActivationStats,
    GradientCurvature,
    HessianSpectrum,
    InternalCovariateShift,
    LossLandscape,
    MeanShift,
    ResidualVariance,
    SpectralDensity,
    resolve_loss,
)
from bnlightning.callbacks.functional._loss import loss_candidates
from tests.helpers import TRAINER_KW as QUIET_KW
from tests.helpers.callbacks import Recorder

OURS = ("ics", "landscape", "act", "meanshift", "hessian", "resvar")
TRAINER_KW: dict[str, Any] = {**QUIET_KW, "log_every_n_steps": 1}


def every_callback(residual: bool = False, **kw: Any) -> list[pl.Callback]:
    """Every measurement callback, measuring on every step (``ResidualVariance`` needs residual blocks)."""
    cbs = [
        InternalCovariateShift(every_n_steps=1, **kw),
        LossLandscape(every_n_steps=1, **kw),
        ActivationStats(every_n_steps=1, histogram=False, **kw),
        MeanShift(every_n_steps=1, **kw),
        HessianSpectrum(every_n_steps=1, max_iter=30, tol=1e-4, n_probes=2, **kw),
    ]
    return [*cbs, ResidualVariance(every_n_steps=1, **kw)] if residual else cbs


def fit(
    make: Callable[[], pl.LightningModule], batches: list[Any], callbacks: list[pl.Callback], steps: int = 2
) -> tuple[pl.LightningModule, Recorder]:
    torch.manual_seed(0)
    module = make()
    rec = Recorder()
    pl.Trainer(max_steps=steps, callbacks=callbacks, logger=rec, **TRAINER_KW).fit(
        module, DataLoader(batches, batch_size=None)
    )
    return module, rec


def check_against(
    make: Callable[[], pl.LightningModule],
    batches: list[Any],
    reference_loss: Callable[[nn.Module, Any], Tensor],
    residual: bool = False,
    extra: tuple[pl.Callback, ...] = (),
) -> tuple[list[pl.Callback], Recorder]:
    """Fit without callbacks, with every callback (the loss resolved; ``extra`` after them) and with
    every callback given ``reference_loss``: the same training, and the same numbers from both measured runs."""
    plain, plain_rec = fit(make, batches, [])
    cbs = every_callback(residual)
    measured, rec = fit(make, batches, [*cbs, *extra])
    _, ref = fit(make, batches, every_callback(residual, loss_fn=reference_loss))
    for (n, a), (_, b) in zip(plain.state_dict().items(), measured.state_dict().items()):
        assert torch.equal(a, b), n  # zero observer effect
    theirs = {s: {k: v for k, v in m.items() if k.split("/")[0] not in OURS} for s, m in rec.logged.items()}
    assert {s: m for s, m in theirs.items() if m} == plain_rec.logged  # the module's own logging untouched
    assert all(cb.failure is None for cb in cbs)
    for step in range(2):
        got = {k: v for k, v in rec.logged[step].items() if k.split("/")[0] in OURS}
        want = {k: v for k, v in ref.logged[step].items() if k.split("/")[0] in OURS}
        assert set(got) == set(want) and {k.split("/")[0] for k in got} >= {
            "ics",
            "landscape",
            "act",
            "meanshift",
            "hessian",
        }
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-6) or (math.isnan(v) and math.isnan(got[k])), (
                f"step {step} {k}"
            )
    return cbs, rec


# --- self.loss = nn.CrossEntropyLoss() --------------------------------------------------
class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(x) + self.shortcut(x)


class CriterionModule(pl.LightningModule):
    """The most common pattern: the criterion as an attribute named ``loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), Block(16), nn.Linear(16, 3))
        self.loss = nn.CrossEntropyLoss()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_a_criterion_attribute_named_loss_is_not_the_loss_of_the_batch() -> None:
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    cbs, _ = check_against(CriterionModule, batches, lambda m, b: F.cross_entropy(m.net(b[0]), b[1]), residual=True)
    assert {cb.measured_loss(None).name for cb in cbs} == {"CriterionModule.training_step(batch, 0)"}


# --- Lightning's BoringModel -----------------------------------------------------------------
def boring_loss(module: nn.Module, batch: Tensor) -> Tensor:
    out = module(batch)
    return F.mse_loss(out, torch.ones_like(out))


def test_boring_model_measures_its_training_step(caplog: pytest.LogCaptureFixture) -> None:
    """``BoringModel.loss(preds, labels=None)`` accepts one argument, but called on a batch it does not
    depend on the weights: the first-batch check moves on to ``training_step`` and says why."""
    batches = [torch.stack([RandomDataset(32, 4)[i] for i in range(4)]) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="bnlightning.callbacks"):
        cbs, _ = check_against(BoringModel, batches, boring_loss)
    assert {cb.measured_loss(None).name for cb in cbs} == {"BoringModel.training_step(batch, 0)"}
    assert "BoringModel.loss(batch) does not depend on the trainable parameters" in caplog.text
    assert [c.name for c in loss_candidates(BoringModel())] == [
        "BoringModel.loss(batch)",
        "BoringModel.training_step(batch, 0)",
    ]


# --- a LitGPT-style module: training_step(self, batch), attention, a dict batch ----------------
class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 7, d: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.wte = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx)
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.attn(self.ln(x)).split(c, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return self.lm_head(x + self.mlp(x))


class LitLLM(pl.LightningModule):
    """As LitGPT's Lightning examples write it: ``training_step(self, batch)`` on a dict batch."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyGPT()

    def training_step(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self.model(batch["input_ids"])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def gpt_loss(module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = module.model(batch["input_ids"])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1))


def full_hessian_top_eigenvalue(net: nn.Module, batch: dict[str, Tensor]) -> float:
    """The plain reference: the whole Hessian of the loss over every parameter, then ``eigvalsh``."""
    names, shapes = zip(*[(n, p.shape) for n, p in net.named_parameters()])
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss_of(w: Tensor) -> Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = w[i : i + s.numel()].view(s)
            i += s.numel()
        logits = torch.func.functional_call(net, params, (batch["input_ids"],))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1))

    with sdpa_kernel(SDPBackend.MATH):
        h = torch.autograd.functional.hessian(loss_of, flat)
    return float(torch.linalg.eigvalsh(h.double())[-1])


class Capture(pl.Callback):
    """W^t and the batch before each optimizer step."""

    def __init__(self) -> None:
        self.steps: dict[int, tuple[nn.Module, Any]] = {}
        self._batch: Any = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.steps[trainer.global_step] = (copy.deepcopy(pl_module.model), self._batch)


def test_litgpt_style_training_step_with_attention() -> None:
    g = torch.Generator().manual_seed(2)
    tokens = [torch.randint(0, 7, (3, 6), generator=g) for _ in range(2)]
    batches = [{"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()} for t in tokens]
    capture = Capture()
    cbs, rec = check_against(LitLLM, batches, gpt_loss, extra=(capture,))
    assert {cb.measured_loss(None).name for cb in cbs} == {"LitLLM.training_step(batch)"}
    for step, (net, batch) in capture.steps.items():
        assert rec.logged[step]["hessian/lambda_max"] == pytest.approx(
            full_hessian_top_eigenvalue(net, batch), rel=1e-3
        )


def test_gauges_differentiate_attention_twice_through_the_math_kernel() -> None:
    g = torch.Generator().manual_seed(4)
    tokens = [torch.randint(0, 7, (3, 6), generator=g) for _ in range(2)]
    batches = [{"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()} for t in tokens]
    curvature, density = (
        GradientCurvature(every_n_steps=1),
        SpectralDensity(every_n_steps=1, lanczos_steps=3, n_starts=1, norm_modes=["train"]),
    )
    _, rec = fit(LitLLM, batches, [curvature, density], steps=2)
    assert curvature.failure is None and density.failure is None and curvature.measurements == density.measurements == 2
    assert all(
        math.isfinite(rec.logged[s]["hessian/grad_curvature"]) and math.isfinite(rec.logged[s]["sld/train/lambda_max"])
        for s in (0, 1)
    )


# --- Lightning's demo Transformer ----------------------------------------------------------------
class DemoTransformer(LightningTransformer):
    """Lightning's demo module, its Transformer made small (as tests/helpers/zoo.py does) for CPU time."""

    def __init__(self) -> None:
        super().__init__(vocab_size=50)
        self.model = Transformer(vocab_size=50, ninp=16, nhead=2, nhid=24, nlayers=1)

    def prepare_data(self) -> None:
        """The demo downloads WikiText-2 here; this test feeds random tokens."""


def test_demo_transformer_with_hessian_spectrum() -> None:
    g = torch.Generator().manual_seed(3)
    tokens = [torch.randint(0, 50, (2, 7), generator=g) for _ in range(2)]
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    plain, _ = fit(DemoTransformer, batches, [])
    cbs = every_callback()
    measured, rec = fit(DemoTransformer, batches, cbs)
    assert all(cb.failure is None and cb.measurements == 2 for cb in cbs)
    for (n, a), (_, b) in zip(plain.state_dict().items(), measured.state_dict().items()):
        assert torch.equal(a, b), n
    for step in (0, 1):
        hessian = {k: v for k, v in rec.logged[step].items() if k.startswith("hessian/")}
        assert {"hessian/lambda_max", "hessian/trace", "hessian/sharpness_ratio"} <= set(hessian)
        assert all(math.isfinite(v) for v in hessian.values())


# --- a torch.compile'd network -------------------------------------------------------------------
class SmallNet(pl.LightningModule):
    """``self.net.compile()`` in place, as bnlightning's ``compile: true`` does. ``aot_eager`` is
    the cheapest backend with AOT autograd, whose compiled backward has no double backward (the
    default inductor backend fails the same way, measured by hand: it takes minutes to compile here)."""

    def __init__(self, compiled: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
        if compiled:
            self.net.compile(backend="aot_eager")

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_compiled_module_is_measured_as_the_same_function_uncompiled() -> None:
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    cbs = every_callback()
    _, rec = fit(lambda: SmallNet(compiled=True), batches, cbs)
    _, ref = fit(lambda: SmallNet(compiled=False), batches, every_callback())
    assert all(cb.failure is None for cb in cbs)
    assert {cb.measured_loss(None).name for cb in cbs} == {"SmallNet.loss(batch)"}
    for step in (0, 1):
        assert "hessian/lambda_max" in rec.logged[step]
        assert set(rec.logged[step]) == set(ref.logged[step])
        for k, v in ref.logged[step].items():
            assert rec.logged[step][k] == pytest.approx(v, rel=1e-4, abs=1e-6), f"step {step} {k}"


# --- the rule's errors, one line each ----------------------------------------------------------------
def test_constructor_refuses_a_criterion_and_a_bad_method_name_in_one_line() -> None:
    with pytest.raises(
        ValueError,
        match=(
            r"^loss_fn is an nn.Module \(CrossEntropyLoss\), a loss of \(predictions, targets\), "
            r"not of \(module, batch\)\. Pass loss_fn="
        ),
    ):
        LossLandscape(loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"^loss_method must be None .* got 'my loss'$"):
        HessianSpectrum(loss_method="my loss")


def test_an_unknown_loss_method_lists_the_accepted_ones() -> None:
    batches = [torch.randn(4, 32) for _ in range(2)]
    accepted = (
        r"loss_method accepts a method of BoringModel that takes one batch: loss, step, training_step\. "
        r"Or: Pass loss_fn="
    )
    with pytest.raises(AttributeError, match=rf"^BoringModel has no method 'objective'; {accepted}"):
        fit(BoringModel, batches, [LossLandscape(every_n_steps=1, loss_method="objective")])
    with pytest.raises(
        ValueError,
        match=(
            r"^CriterionModule\.loss is an nn.Module \(CrossEntropyLoss\).*accepts .*: training_step\. "
            r"Or: Pass loss_fn="
        ),
    ):
        fit(
            CriterionModule,
            [(torch.randn(4, 8), torch.randint(0, 3, (4,)))] * 2,
            [LossLandscape(every_n_steps=1, loss_method="loss")],
        )


def test_no_loss_of_the_batch_stops_the_fit_at_the_first_batch_before_any_step() -> None:
    def failing(module: nn.Module, batch: Any) -> Tensor:
        return module.net(batch[0]).sum(1)  # one loss per example, not a scalar

    def broken(module: nn.Module, batch: Any) -> Tensor:
        raise KeyError("input_ids")

    batches = [(torch.randn(4, 8), torch.randint(0, 3, (4,)))] * 2
    for loss_fn, message in (
        (failing, r"loss_fn .*failing returned a tensor of shape \(4,\)"),
        (broken, r"loss_fn .*broken raised KeyError: 'input_ids'"),
    ):
        seen: list[int] = []

        class Step(pl.Callback):
            def on_before_optimizer_step(
                self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
            ) -> None:
                seen.append(trainer.global_step)

        with pytest.raises(
            ValueError, match=rf"^ActivationStats: no loss to measure on CriterionModule: {message}.*\. Pass loss_fn="
        ) as err:
            fit(CriterionModule, batches, [ActivationStats(every_n_steps=5, loss_fn=loss_fn), Step()])
        assert not seen  # stopped before training went on
        if loss_fn is broken:
            assert isinstance(err.value.__cause__, KeyError)  # the user's traceback is kept


def test_resolution_rule_on_plain_modules() -> None:
    class WithLossMethod(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def loss(self, batch: Any) -> Tensor:
            return self.fc(batch).pow(2).mean()

    class WithCriterion(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)
            self.loss = nn.MSELoss()

    assert resolve_loss(WithLossMethod()).name == "WithLossMethod.loss(batch)"
    with pytest.raises(
        AttributeError,
        match=(
            r"^WithCriterion\.loss is an nn.Module \(MSELoss\).* "
            r"and no training_step to measure with\. Pass loss_fn="
        ),
    ):
        resolve_loss(WithCriterion())
    assert resolve_loss(CriterionModule()).name == "CriterionModule.training_step(batch, 0)"
    assert resolve_loss(LitLLM()).name == "LitLLM.training_step(batch)"
    assert resolve_loss(BoringModel(), loss_method="step").name == "BoringModel.step(batch)"
    explicit = resolve_loss(CriterionModule(), loss_fn=boring_loss)
    assert resolve_loss(CriterionModule(), loss_fn=explicit) is explicit  # resolved once, passed on as is


# --- a measurement that fails does not end the run -------------------------------------------------
def test_a_failing_measurement_turns_its_callback_off_and_training_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real failure the math kernel avoids (CPU's flash attention has no double backward), let through."""
    import bnlightning.callbacks.functional._harness as harness

    monkeypatch.setattr(harness, "math_attention", contextlib.nullcontext)
    g = torch.Generator().manual_seed(5)
    tokens = [torch.randint(0, 7, (3, 6), generator=g) for _ in range(3)]
    batches = [{"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()} for t in tokens]
    plain, _ = fit(LitLLM, batches, [], steps=3)
    hessian, landscape = HessianSpectrum(every_n_steps=1, max_iter=5, n_probes=0), LossLandscape(every_n_steps=1)
    curvature = GradientCurvature(every_n_steps=1)  # a gauge measured across the optimizer step
    with caplog.at_level(logging.WARNING, logger="bnlightning.callbacks"):
        measured, rec = fit(LitLLM, batches, [hessian, landscape, curvature], steps=3)
    for cb in (hessian, curvature):
        assert cb.failure is not None and cb.failure.startswith(
            "step 0: RuntimeError: derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward"
        )
        assert caplog.text.count(f"{type(cb).__name__} stopped measuring in this fit (training goes on)") == 1
        assert cb.measurements == 0
    assert landscape.measurements == 3
    assert sorted(rec.logged) == [0, 1, 2] and not any(k.startswith("hessian/") for m in rec.logged.values() for k in m)
    for (n, a), (_, b) in zip(plain.state_dict().items(), measured.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_bug_in_a_measurement_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import bnlightning.callbacks.hessian as hessian_callback

    def bug(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("a bug in a measurement keeps its traceback")

    monkeypatch.setattr(hessian_callback, "hessian_spectrum", bug)
    with pytest.raises(TypeError, match="keeps its traceback"):
        fit(CriterionModule, [(torch.randn(4, 8), torch.randint(0, 3, (4,)))] * 2, [HessianSpectrum(every_n_steps=1)])
