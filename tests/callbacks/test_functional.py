"""The pure measurement functions against naive references (PROTOCOL §1–3)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bnlightning.callbacks import (
    activation_stats,
    internal_covariate_shift,
    loss_landscape,
    observer_guard,
    optimizer_update,
    resolve_loss,
    sgd_update,
)
from tests.helpers.callbacks import assert_same, batch_for, dln, mlp, naive_ics, naive_landscape, snapshot, vgg

CASES = {
    "mlp_bn": (lambda: mlp("batch"), 0.1),
    "mlp_noisy_bn": (lambda: mlp("noisy_batch"), 0.1),
    "mlp_plain": (lambda: mlp("none"), 0.1),
    "dln_bn": (lambda: dln("batch"), 1e-3),
    "dln_plain": (lambda: dln("none"), 1e-3),
    "vgg_bn": (lambda: vgg("batch"), 0.1),
    "vgg_noisy_bn": (lambda: vgg("noisy_batch"), 0.1),
}


def _close(got: dict, want: dict, rtol: float = 2e-3, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for k in want:
        g, w = got[k].double(), want[k].double()
        assert torch.allclose(g, w, rtol=rtol, atol=atol), f"{k}: got {g.item():.8g}, reference {w.item():.8g}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["vmap", "loop", "prefix"])
def test_ics_matches_naive_reference(case: str, mode: str) -> None:
    if mode == "vmap" and case.startswith("vgg"):
        pytest.skip("VGG's auto mode is prefix; vmap over convs is covered by test_ics_vmap_on_vgg")
    torch.manual_seed(0)
    build, lr = CASES[case]
    model = build().train()
    batch = batch_for(model, n=8 if case.startswith("vgg") else 16)
    torch.manual_seed(1)
    want, norms = naive_ics(model, batch, lr)
    got = internal_covariate_shift(model, batch, sgd_update(lr), mode=mode)
    assert got.keys() == want.keys()
    for layer, norm_g in norms.items():
        # ||G - G'|| is a difference of nearby float32 gradients: its error is on the scale of ||G||.
        for kind, tol in (("l2", 1e-5 * norm_g), ("rel", 1e-5), ("cos", 1e-5)):
            k = f"ics/{kind}/{layer}"
            g, w = got[k].double(), want[k].double()
            assert abs(g - w) <= 2e-3 * abs(w) + tol, f"{k}: got {g.item():.8g}, reference {w.item():.8g}"


def test_ics_vmap_on_vgg() -> None:
    torch.manual_seed(0)
    model = vgg("batch").train()
    batch = batch_for(model, n=4)
    loop = internal_covariate_shift(
        model, batch, sgd_update(0.1), layers=["net.conv2", "net.conv5", "net.fc"], mode="loop"
    )
    batched = internal_covariate_shift(
        model, batch, sgd_update(0.1), layers=["net.conv2", "net.conv5", "net.fc"], mode="vmap", chunk_size=2
    )
    _close(batched, loop, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["vgg_bn", "vgg_noisy_bn", "mlp_noisy_bn", "dln_bn"])
def test_ics_prefix_reuses_the_updated_prefix_and_equals_the_loop(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """mode="prefix" runs one full pass for G (+ one for the last layer) and suffixes only; same numbers as the loop."""
    from bnlightning.callbacks.functional._harness import LossHarness

    torch.manual_seed(0)
    build, lr = CASES[case]
    model = build().train()
    batch = batch_for(model, n=8)
    loop = internal_covariate_shift(model, batch, sgd_update(lr), mode="loop")
    full_passes = []
    original = LossHarness.gradient
    monkeypatch.setattr(
        LossHarness,
        "gradient",
        lambda self, names, *a, **k: full_passes.append(names) or original(self, names, *a, **k),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the prefix applies everywhere here: no fallback warning
        got = internal_covariate_shift(model, batch, sgd_update(lr), mode="prefix")
    assert len(full_passes) == 1  # G only; every G' came from the prefix pass or a suffix
    _close(got, loop, rtol=1e-6, atol=1e-9)
    if case.startswith("vgg"):
        assert internal_covariate_shift(model, batch, sgd_update(lr)).keys() == loop.keys()  # auto = prefix for convs


class _Peek(nn.Module):
    """Adds a function of *another* module's weight: an input that depends on a later layer."""

    def __init__(self, other: nn.Linear) -> None:
        super().__init__()
        self.other = [other]  # not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.other[0].weight.sum()


class _Odd(nn.Module):
    """A Sequential with in-place ReLU, dropout, a head outside it and a weight read before its layer runs."""

    def __init__(self) -> None:
        super().__init__()
        c = nn.Linear(12, 12)
        self.seq = nn.Sequential(
            nn.Linear(6, 12),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(12, 12),
            nn.Tanh(),
            _Peek(c),
            c,
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(12, 3)

    def loss(self, batch):
        x, y = batch
        h = self.seq(x * 2)
        return nn.functional.cross_entropy(self.head(nn.functional.dropout(h, 0.2)), y)


def test_ics_prefix_falls_back_where_it_is_not_exact() -> None:
    """A layer whose input depends on its own (later) weight gets a full pass; the rest uses suffixes; all equal the
    loop."""
    torch.manual_seed(0)
    model = _Odd().train()
    batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    rng = torch.get_rng_state()
    loop = internal_covariate_shift(model, batch, sgd_update(0.3), mode="loop")
    with pytest.warns(UserWarning, match="1 of 2 layers"):
        got = internal_covariate_shift(model, batch, sgd_update(0.3), mode="prefix")
    _close(got, loop, rtol=1e-6, atol=1e-9)
    assert torch.equal(rng, torch.get_rng_state())
    # the dependency matters: without the fallback, seq.6 would get a different G'
    assert got["ics/l2/seq.6"] > 0 and got["ics/l2/seq.3"] > 0


def test_ics_prefix_applies_a_users_input_pre_hook_once() -> None:
    """The prefix engine resumes at a child from its cached input: cached before the user's pre-hook, which then runs
    once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).train()
    model[2].register_forward_pre_hook(lambda m, args: (args[0] * 2.0 + 0.5,))
    batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))

    def loss_fn(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(module(batch[0]), batch[1])

    loop = internal_covariate_shift(model, batch, sgd_update(0.3), mode="loop", loss_fn=loss_fn)
    got = internal_covariate_shift(model, batch, sgd_update(0.3), mode="prefix", loss_fn=loss_fn)
    _close(got, loop, rtol=1e-6, atol=1e-9)
    assert got["ics/l2/2"] > 0


def test_ics_first_layer_is_exactly_unshifted_and_layers_follow_forward_order() -> None:
    torch.manual_seed(0)
    model = mlp("batch").train()
    batch = batch_for(model)
    out = internal_covariate_shift(model, batch, sgd_update(0.1), layers=["net.fc3", "net.fc1"])
    assert out["ics/l2/net.fc1"].item() == 0.0
    assert (
        internal_covariate_shift(model, batch, sgd_update(0.1), layers=["net.fc3", "net.fc1"], mode="prefix") == out
    )  # nothing runs before fc1
    assert out["ics/cos/net.fc1"].item() == pytest.approx(1.0, abs=1e-6)
    assert out["ics/l2/net.fc3"].item() > 0


def test_ics_unknown_layer_lists_valid_names() -> None:
    model = mlp("batch")
    with pytest.raises(ValueError, match=r"unknown layer 'net\.fc9'.*net\.fc1"):
        internal_covariate_shift(model, batch_for(model), sgd_update(0.1), layers=["net.fc9"])


OPTIMIZERS = {
    "sgd_wd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "nesterov_groups": lambda p: torch.optim.SGD(
        [{"params": p[:3], "lr": 0.05}, {"params": p[3:]}], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True, amsgrad=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2, decoupled_weight_decay=True, weight_decay=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_optimizer_update_is_the_real_step_bit_for_bit(opt_name: str) -> None:
    """The one-parameter copies give exactly what the real optimizer does to a copy (state built up)."""
    torch.manual_seed(0)
    model = mlp("batch")
    factory = OPTIMIZERS[opt_name]
    opt = factory(list(model.parameters()))
    batch = batch_for(model)
    for _ in range(2):  # non-empty state
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    opt.zero_grad()
    model.loss(batch).backward()
    before = snapshot(model, opt)
    weights = {n: p.detach() for n, p in model.named_parameters() if n.endswith("weight")}
    grads = {n: p.grad for n, p in model.named_parameters()}
    got = optimizer_update(opt, model, weights, grads)
    assert_same(before, snapshot(model, opt))
    twin_model = copy.deepcopy(model)
    for n, p in twin_model.named_parameters():
        p.grad = grads[n].clone()
    twin_opt = factory(list(twin_model.parameters()))
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin_opt.step()
    for n in weights:
        assert torch.equal(got[n], twin_model.get_parameter(n)), n


def test_optimizer_update_refuses_closure_optimizers_in_one_line() -> None:
    model = mlp("none")
    with pytest.raises(TypeError, match="LBFGS re-evaluates the loss"):
        optimizer_update(torch.optim.LBFGS(model.parameters()), model, {}, {})


@pytest.mark.parametrize("case", ["mlp_bn", "mlp_noisy_bn", "dln_bn", "vgg_bn", "vgg_noisy_bn"])
def test_landscape_matches_naive_reference(case: str) -> None:
    torch.manual_seed(0)
    build, lr = CASES[case]
    model = build().train()
    batch = batch_for(model, n=8)
    steps = [0.5 * lr, lr, 2 * lr, 4 * lr]
    torch.manual_seed(1)
    want = naive_landscape(model, batch, steps)
    for mode in ("vmap", "loop") if not case.startswith("vgg") else ("loop",):
        got = loss_landscape(model, batch, steps, mode=mode)
        _close(got, want, rtol=1e-3, atol=1e-5)


def test_landscape_rejects_bad_steps_and_propagates_nan() -> None:
    model = mlp("batch")
    batch = batch_for(model)
    for bad in ([0.1, 0.0], [-1.0], [], [float("inf")]):
        with pytest.raises(ValueError, match="step"):
            loss_landscape(model, batch, bad)
    x, y = batch
    x = x.clone()
    x[0, 0] = float("nan")
    out = loss_landscape(model, (x, y), [0.1])
    assert all(torch.isnan(v) for v in out.values())
    ics = internal_covariate_shift(model, (x, y), sgd_update(0.1))
    assert all(torch.isnan(v) for v in ics.values())


def test_activation_stats_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, 3, 3, generator=g) * 2
    x[:, 0] = -x[:, 0].abs()  # a channel never positive
    out = activation_stats(x, "relu")
    ref = np.quantile(x.numpy().ravel(), [0.15, 0.5, 0.85])
    assert np.allclose([out["q15"], out["q50"], out["q85"]], ref, rtol=1e-5, atol=1e-6)
    assert out["mean"].item() == pytest.approx(float(x.numpy().mean()), abs=1e-5)
    assert out["std"].item() == pytest.approx(float(x.numpy().std()), rel=1e-5)
    units = x.flatten(1)
    dead = sum(1 for j in range(units.shape[1]) if not any(units[i, j] > 0 for i in range(units.shape[0])))
    assert out["dead"].item() == pytest.approx(dead / units.shape[1])
    assert dead >= 9
    sat = activation_stats(x, "saturating", saturation_threshold=2.0)
    assert sat["saturated"].item() == pytest.approx(float((np.abs(x.numpy()) > 2).mean()))
    other = activation_stats(x, "other")
    assert set(other) == {"q15", "q50", "q85", "mean", "std"}
    assert set(activation_stats(x, "none")) == set(other)  # the old name of "other" still works
    with pytest.raises(ValueError, match="accepted: saturating, relu, other"):
        activation_stats(x, "dead")


def test_activation_kind_names_every_activation() -> None:
    from torch import nn

    from bnlightning.callbacks.functional import activation_kind

    assert [activation_kind(m) for m in (nn.Sigmoid(), nn.ReLU(), nn.GELU(), nn.Linear(2, 2))] == [
        "saturating",
        "relu",
        "other",
        "",
    ]


@pytest.mark.parametrize("case", ["mlp_noisy_bn", "vgg_bn", "dln_bn"])
def test_functions_leave_no_trace(case: str) -> None:
    """Running stats, parameters, .grad, modes and RNG states are untouched (even without the guard)."""
    torch.manual_seed(0)
    model = CASES[case][0]().train()
    batch = batch_for(model, n=4)
    model.loss(batch).backward()
    before = snapshot(model)
    internal_covariate_shift(model, batch, sgd_update(0.1))
    loss_landscape(model, batch, [0.1, 0.2])
    assert_same(before, snapshot(model))


def test_guard_restores_what_it_keeps_and_catches_what_it_only_checks() -> None:
    import random

    from bnlightning.callbacks import ObserverEffectError

    torch.manual_seed(0)
    model = mlp("noisy_batch")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = batch_for(model)
    model.loss(batch).backward()
    opt.step()
    before = snapshot(model, opt)
    fc1 = model.net.fc1
    with observer_guard(model, [opt]):
        model.eval().net.train()
        with torch.no_grad():
            model.loss(batch)  # BN running statistics move, noise is drawn
        random.random()
        np.random.rand()
        fc1._parameters["weight"] = torch.zeros_like(fc1.weight)  # a substitute left in a slot
    assert_same(before, snapshot(model, opt))
    assert isinstance(fc1.weight, nn.Parameter)
    # parameters, gradients and optimizer state are checked (version counters), not copied
    for meddle, what in [
        (lambda: fc1.weight.detach().add_(1.0), "parameter net.fc1.weight"),  # detach() shares the version counter
        (lambda: fc1.weight.grad.mul_(2.0), "gradient of net.fc1.weight"),
        (lambda: setattr(fc1.weight, "grad", None), "gradient of net.fc1.weight"),
        (lambda: opt.state[fc1.weight]["exp_avg"].add_(1.0), "state of Adam"),
        (lambda: opt.param_groups[0].__setitem__("lr", 5.0), "state of Adam"),
    ]:
        with pytest.raises(ObserverEffectError, match=what):
            with observer_guard(model, [opt]):
                meddle()


def test_bf16_module_is_measured_in_float32() -> None:
    torch.manual_seed(0)
    model = mlp("batch").train()
    batch = batch_for(model)
    ref = internal_covariate_shift(model, batch, sgd_update(0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = internal_covariate_shift(model, batch, sgd_update(0.1))
    _close(got, ref, rtol=1e-6, atol=1e-8)
    assert all(v.dtype == torch.float32 for v in got.values())


def test_module_defined_here_works_with_another_loss_method() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.bn = nn.BatchNorm1d(8)
            self.b = nn.Linear(8, 1)

        def objective(self, batch):
            x, y = batch
            return ((self.b(torch.tanh(self.bn(self.a(x)))) - y) ** 2).mean()

    torch.manual_seed(0)
    model = Tiny()
    batch = (torch.randn(16, 4), torch.randn(16, 1))
    out = internal_covariate_shift(model, batch, sgd_update(0.5), loss_fn=resolve_loss(model, loss_method="objective"))
    assert set(out) == {f"ics/{k}/{n}" for k in ("l2", "cos", "rel") for n in ("a", "b")}
    with pytest.raises(AttributeError, match="loss"):
        internal_covariate_shift(model, batch, sgd_update(0.5))


@pytest.mark.parametrize("make,mode", [(mlp, "vmap"), (mlp, "loop"), (vgg, "prefix")])
def test_precomputed_gradient_gives_bit_identical_results(make, mode) -> None:
    from bnlightning.callbacks import step_gradient

    torch.manual_seed(0)
    model = make("noisy_batch")
    batch = batch_for(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = torch.get_rng_state()
    lmode = "loop" if mode == "prefix" else mode
    ics = internal_covariate_shift(model, batch, opt, mode=mode)
    land = loss_landscape(model, batch, [0.1, 0.4], mode=lmode)
    assert torch.equal(rng, torch.get_rng_state())
    gradient = step_gradient(model, batch)
    assert torch.equal(rng, torch.get_rng_state())
    ics2 = internal_covariate_shift(model, batch, opt, mode=mode, gradient=gradient)
    land2 = loss_landscape(model, batch, [0.1, 0.4], mode=lmode, gradient=gradient)
    for a, b in ((ics, ics2), (land, land2)):
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]) or (a[k].isnan() and b[k].isnan()), k
    with pytest.raises(ValueError, match="lacks trainable parameter"):
        loss_landscape(model, batch, [0.1], gradient=gradient._replace(grads={}))
