"""The flat-row vector kernels under the Krylov methods, against plain float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from bnlightning.callbacks.functional import _vectors
from bnlightning.callbacks.functional._vectors import Layout, inner, orthogonalize_, rotate_, subtract_combination_


def _params() -> dict[str, torch.Tensor]:
    return {"conv": torch.zeros(4, 3, 2, 2), "bias": torch.zeros(3), "scalar": torch.zeros(())}


def test_a_dict_goes_flat_and_back_whatever_its_strides() -> None:
    like = _params()
    layout = Layout(like)
    assert layout.n == 48 + 3 + 1
    v = {
        "conv": torch.randn(3, 4, 2, 2).transpose(0, 1),  # strided, as a double backward through a conv returns it
        "bias": torch.randn(3),
        "scalar": torch.tensor(2.5),
    }
    assert not v["conv"].is_contiguous()
    out = torch.full((layout.n,), float("nan"))
    flat = layout.flatten(v, out=out)
    assert flat.data_ptr() == out.data_ptr()
    back = layout.as_dict(flat)
    for k in like:
        assert back[k].shape == like[k].shape and torch.equal(back[k], v[k])
    back["bias"].add_(1.0)  # views: writing through the dict writes the flat vector
    assert torch.equal(flat[48:51], v["bias"] + 1.0)


def test_rademacher_entries_are_fair_independent_signs() -> None:
    for n in (1, 7, 8, 9, 1001):
        layout = Layout({"w": torch.zeros(n)})
        a = layout.rademacher(torch.Generator().manual_seed(3), out=torch.zeros(n))
        b = layout.rademacher(torch.Generator().manual_seed(3), out=torch.zeros(n))
        assert torch.equal(a.abs(), torch.ones(n)) and torch.equal(a, b)
    n = 200_000
    layout = Layout({"w": torch.zeros(n)})
    gen = torch.Generator().manual_seed(0)
    z, z2 = layout.rademacher(gen, torch.empty(n)), layout.rademacher(gen, torch.empty(n))
    # mean and correlations of n fair independent signs have standard deviation 1/sqrt(n) = 0.0022
    assert abs(float(z.mean())) < 0.01
    assert abs(float((z[1:] * z[:-1]).mean())) < 0.01  # neighbours (bits of one byte, bytes of one word)
    assert abs(float((z[8:] * z[:-8]).mean())) < 0.01
    assert abs(float((z * z2).mean())) < 0.01  # successive probes


def test_inner_products_are_exact_to_float32_rounding_over_many_slices() -> None:
    """The error of a float32 dot product scales with Σ|a_i b_i|: within a slice the matrix kernel sums in float32
    (3e-6 of the scale measured on a squared norm; a ``torch.vdot`` over ResNet-18's largest weight, as the dict
    form summed per tensor, is off by 1e-5), and the slices' sums add up in float64."""
    n = 3 * _vectors.CHUNK + 5
    rows = torch.randn(4, n)
    got = inner(rows[:3], rows[2:])
    want = rows[:3].double() @ rows[2:].double().T
    scale = rows[:3].double().abs() @ rows[2:].double().abs().T
    assert got.dtype == torch.float64 and got.shape == (3, 2)
    assert bool(((got - want).abs() <= 1e-5 * scale).all())


def test_subtract_and_rotate_are_the_matrix_products() -> None:
    n = 2 * _vectors.CHUNK + 3
    rows = torch.randn(5, n)
    x = torch.randn(n)
    c = torch.randn(5, dtype=torch.float64)
    want = x.double() - c @ rows.double()
    assert torch.allclose(subtract_combination_(x, rows, c).double(), want, atol=1e-5)
    coeffs = torch.randn(5, 3, dtype=torch.float64)
    want_rows = coeffs.T @ rows.double()
    rotated = rotate_(rows, coeffs)
    assert rotated.shape == (3, n) and torch.allclose(rotated.double(), want_rows, atol=1e-4)


@pytest.mark.parametrize(("inside", "passes"), [(0.1, 1), (0.999999, 2)], ids=["one-pass", "two-passes"])
def test_orthogonalize_leaves_x_orthogonal_and_reports_its_norm(
    inside: float, passes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``inside``: the share of x's norm in the basis's span; only a large share takes the second pass."""
    n = 50_000
    q, _ = torch.linalg.qr(torch.randn(n, 4, dtype=torch.float64))
    basis = q.T.float().contiguous()
    along = q @ torch.randn(4, dtype=torch.float64)
    outside = torch.randn(n, dtype=torch.float64)
    outside -= q @ (q.T @ outside)
    x = (inside * along / along.norm() + math.sqrt(1 - inside**2) * outside / outside.norm()).float()
    before = x.clone()
    calls = []
    project = _vectors._project
    monkeypatch.setattr(_vectors, "_project", lambda b, v: calls.append(1) or project(b, v))
    coeffs, norm = orthogonalize_(x, basis)
    assert len(calls) == passes
    assert float((basis.double() @ x.double()).abs().max()) < 1e-6
    assert norm == pytest.approx(float(x.double().norm()), rel=1e-4)
    assert torch.allclose(coeffs @ basis.double() + x.double(), before.double(), atol=1e-5)
