"""Vectors for the curvature operators and algorithms: parameter dicts at the boundary, flat rows inside (pure torch).

An operator ``v -> A v`` takes and returns a ``dict[str, Tensor]`` shaped like the parameters (float32). The Krylov
methods keep their vectors instead as rows of one float32 matrix laid out by :class:`Layout`, because on a large model
their cost is memory traffic, not arithmetic: on ResNet-18 (11.2 M parameters, one CPU thread) one pass over a vector
costs about 0.04 training steps, and the dict form paid one pass per inner product and per update, per tensor. With
rows, the inner products of one vector with a whole basis are one pass (:func:`inner`), and so is an update by a
combination of the basis (:func:`subtract_combination_`). Inner products are accumulated in float64 over slices of
``CHUNK`` elements, so that reorthogonalization coefficients keep the digits a convergence test needs; the vectors
themselves stay float32.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = [
    "CHUNK",
    "Hvp",
    "Layout",
    "Vec",
    "check_like",
    "dot",
    "inner",
    "norm",
    "orthogonalize_",
    "rotate_",
    "row_norm",
    "subtract_combination_",
]

Vec = dict[str, Tensor]
#: ``v -> A v`` for a symmetric operator A (a Hessian) on parameter dicts.
Hvp = Callable[[Vec], Vec]

#: Elements per slice of the row kernels (1 MB of float32 per row): a slice of the vector the rows are multiplied by
#: stays in cache, the loop's overhead is small (43 slices for ResNet-18), and each slice's float32 partial sums are
#: added up in float64.
CHUNK = 1 << 18

# The 8 Rademacher signs of every byte value: a probe is 1 random bit per entry, expanded by lookup (a third of the
# time of one ``randint`` per entry on the CPU, which cost about 0.5 training steps per probe on ResNet-18).
_SIGNS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.float32).mul_(2).sub_(1)


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """⟨a, b⟩ of two parameter dicts in float64 arithmetic (exact products of the float32 entries, float64 sums).

    Slice by slice (``CHUNK`` entries), so the float64 copies stay in cache: on ResNet-18 6.5 ms where converting
    whole tensors took 122 ms (1.7 training steps) and a float32 ``torch.vdot`` 2.6 ms at 1e-5 relative error.
    """
    # Summed on each device first: one host sync per device and dot product, not per tensor.
    per_device: dict[torch.device, Tensor] = {}
    for k in a:
        x, y = a[k].reshape(-1), b[k].reshape(-1)
        for s in range(0, x.numel(), CHUNK):
            d = torch.dot(x[s : s + CHUNK].double(), y[s : s + CHUNK].double())
            per_device[d.device] = per_device[d.device] + d if d.device in per_device else d
    return math.fsum(float(t) for t in per_device.values())


def norm(a: Mapping[str, Tensor]) -> float:
    """‖a‖ of a parameter dict."""
    return math.sqrt(max(dot(a, a), 0.0))


def check_like(like: Mapping[str, Tensor], what: str = "like") -> None:
    """``like`` must be a non-empty dict of float32 tensors (ValueError naming the bad entry)."""
    if not isinstance(like, Mapping) or not like:
        raise ValueError(f"{what} must be a non-empty dict of tensors, got {type(like).__name__}")
    for k, t in like.items():
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{what}[{k!r}] must be a float32 tensor, got {got}")


class Layout:
    """Where each tensor of a parameter dict lies in one flat float32 vector (on the first tensor's device).

    Args:
        like: the parameter dict (keys, shapes, devices; values are not read).
    """

    def __init__(self, like: Mapping[str, Tensor]) -> None:
        check_like(like)
        self.keys = list(like)
        self.shapes = [like[k].shape for k in self.keys]
        self.devices = [like[k].device for k in self.keys]
        self.device = self.devices[0]
        self.offsets = list(itertools.accumulate((like[k].numel() for k in self.keys), initial=0))
        self.n = self.offsets[-1]

    def rows(self, count: int) -> Tensor:
        """An uninitialized ``count × n`` matrix: ``count`` flat vectors as rows."""
        return torch.empty(count, self.n, dtype=torch.float32, device=self.device)

    def as_dict(self, x: Tensor) -> Vec:
        """The flat vector ``x`` shaped like the parameters: views (copies only on a tensor's other device)."""
        spans = zip(self.keys, self.shapes, self.devices, self.offsets, self.offsets[1:])
        return {k: x[a:b].view(shape).to(device) for k, shape, device, a, b in spans}

    def flatten(self, v: Mapping[str, Tensor], out: Tensor | None = None) -> Tensor:
        """The parameter dict ``v`` as one flat float32 vector (written into ``out`` when given: one copy)."""
        if out is None:
            out = torch.empty(self.n, dtype=torch.float32, device=self.device)
        spans = zip(self.keys, self.shapes, self.offsets, self.offsets[1:])
        for k, shape, a, b in spans:  # one strided copy per tensor (``reshape`` would copy a strided one twice)
            out[a:b].view(shape).copy_(v[k].detach())
        return out

    def product(self, hvp: Hvp, reduce: Callable[[Vec], Vec] | None, x: Tensor, out: Tensor) -> Tensor:
        """``reduce(hvp(x))`` written into ``out`` (a copy: the caller's hvp may return views it reuses)."""
        hv = hvp(self.as_dict(x))
        if reduce is not None:
            hv = reduce(hv)
        return self.flatten(hv, out)

    def rademacher(self, generator: torch.Generator, out: Tensor) -> Tensor:
        """Independent ±1 entries into ``out`` from 64-bit words drawn from ``generator`` (on its device)."""
        words = torch.randint(-(2**63), 2**63 - 1, ((self.n + 63) // 64,), generator=generator, device=generator.device)
        index = words.to(self.device).view(torch.uint8).int()
        signs = _SIGNS.to(self.device)
        whole = self.n // 8  # entries 8 at a time, straight into ``out``; the last n mod 8 apart
        torch.index_select(signs, 0, index[:whole], out=out[: 8 * whole].view(whole, 8))
        if self.n > 8 * whole:
            out[8 * whole :].copy_(signs[index[whole]][: self.n - 8 * whole])
        return out

    def gaussian(self, generator: torch.Generator) -> Tensor:
        """A flat vector of standard normal entries drawn from ``generator`` (on its device)."""
        r = torch.randn(self.n, generator=generator, device=generator.device, dtype=torch.float32)
        return r.to(self.device)


def inner(a: Tensor, b: Tensor) -> Tensor:
    """The inner products ``a @ b.T`` of the rows of ``a`` (r × n) with those of ``b`` (s × n): r × s, float64, CPU.

    One pass over each row, slice by slice (float32 within a slice of ``CHUNK`` entries, float64 across slices).
    """
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for s in range(0, a.shape[1], CHUNK):
        out += (a[:, s : s + CHUNK] @ b[:, s : s + CHUNK].T).double()
    return out.cpu()


def subtract_combination_(x: Tensor, rows: Tensor, coeffs: Tensor) -> Tensor:
    """``x -= coeffs @ rows`` in place (x: n, rows: r × n, coeffs: r), one pass over each row."""
    c = coeffs.to(device=rows.device, dtype=rows.dtype)[None]
    for s in range(0, x.shape[0], CHUNK):
        x[s : s + CHUNK].view(1, -1).addmm_(c, rows[:, s : s + CHUNK], alpha=-1.0)
    return x


def rotate_(rows: Tensor, coeffs: Tensor, out: Tensor | None = None) -> Tensor:
    """``coeffs.T @ rows[:m]`` (``coeffs``: m × l, l <= m) written into ``out`` (l × n), by default over ``rows[:l]``
    in place; returns it.

    Slice by slice, so that new vectors replace the old ones without a second set ever being held.
    """
    m, n_new = coeffs.shape
    out = rows[:n_new] if out is None else out
    c = coeffs.to(device=rows.device, dtype=rows.dtype).T.contiguous()
    for s in range(0, rows.shape[1], CHUNK):
        out[:, s : s + CHUNK] = c @ rows[:m, s : s + CHUNK]
    return out


def orthogonalize_(x: Tensor, basis: Tensor) -> tuple[Tensor, float]:
    """Make ``x`` orthogonal to the orthonormal rows of ``basis`` in place; return the float64 coefficients removed
    and the norm of ``x`` after.

    Classical Gram–Schmidt, with the second pass ("twice is enough", Giraud et al. 2005) only when the first removed
    more than half of ‖x‖², the criterion of Daniel, Gragg, Kaufman & Stewart (1976) that ARPACK uses: without that
    cancellation one pass already leaves x orthogonal to working precision. Each pass reads the basis twice (the
    coefficients with ‖x‖², then the update), and the norm after comes from them (Pythagoras), not a third read.
    """
    coeffs, squared = _project(basis, x)
    subtract_combination_(x, basis, coeffs)
    left = squared - float(coeffs @ coeffs)
    if left >= 0.5 * squared:
        return coeffs, math.sqrt(left)
    again, squared = _project(basis, x)  # ‖x‖² measured afresh: the first estimate lost its digits to cancellation
    subtract_combination_(x, basis, again)
    return coeffs + again, math.sqrt(max(squared - float(again @ again), 0.0))


def _project(basis: Tensor, x: Tensor) -> tuple[Tensor, float]:
    """``basis @ x`` (float64, CPU) and ‖x‖², in one pass over both."""
    coeffs = torch.zeros(basis.shape[0], dtype=torch.float64, device=x.device)
    squared = torch.zeros((), dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], CHUNK):
        part = x[s : s + CHUNK]
        coeffs += (basis[:, s : s + CHUNK] @ part).double()
        squared += torch.dot(part, part).double()
    return coeffs.cpu(), float(squared)


def row_norm(x: Tensor) -> float:
    """‖x‖ of a flat vector (float64 accumulation)."""
    return math.sqrt(max(float(inner(x[None], x[None])), 0.0))
