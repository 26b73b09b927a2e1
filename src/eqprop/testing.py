"""Tools to check gradients: finite differences, cosine, relative error, and
`check_estimator`, which runs one estimator on one module and compares what it gives with a
reference (central finite differences of the loss, or another estimator's gradients).

    block = DenseHopfield([4, 5, 3], activation="sigmoid", T1=500, tol=1e-12)
    report = check_estimator(block, EP(beta=1e-4, T2=500, tol=1e-12), torch.randn(3, 4))
    assert report.cosine > 0.9999

Used by `eqprop gradcheck`, the analyses and the test suite. Use float64: finite
differences in float32 carry errors of ~1e-3.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .estimators import Estimator
from .registry import estimator_modules, make_estimator, set_estimator

__all__ = ["cosine", "rel_error", "flatten", "gradients", "finite_differences", "EstimatorCheck", "check_estimator",
           "compare"]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """One vector of all entries (an empty vector for no tensors)."""
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.detach().flatten() for t in tensors])


def rel_error(a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor]) -> float:
    """||a - b|| / ||b|| (0 when a == b, inf when only b vanishes); lists are concatenated."""
    a = a if isinstance(a, Tensor) else flatten(a)
    b = b if isinstance(b, Tensor) else flatten(b)
    nb = torch.linalg.vector_norm(b.double()).item()
    na = torch.linalg.vector_norm(a.double() - b.double()).item()
    return 0.0 if na == 0 else na / nb if nb > 0 else math.inf


def cosine(a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor]) -> float:
    """Cosine of the angle between a and b (1 when both vanish, 0 when one does)."""
    a = (a if isinstance(a, Tensor) else flatten(a)).double().flatten()
    b = (b if isinstance(b, Tensor) else flatten(b)).double().flatten()
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return (a @ b).item() / (na * nb)


def gradients(loss_fn: Callable[[], Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
    """d loss / d tensor for each tensor, from one `loss_fn().backward()` (zeros where none)."""
    for t in tensors:
        t.grad = None
    loss_fn().backward()
    return [t.grad.detach().clone() if t.grad is not None else torch.zeros_like(t) for t in tensors]


@torch.no_grad()
def finite_differences(loss_fn: Callable[[], Tensor], tensors: Sequence[Tensor], eps: float) -> list[Tensor]:
    """Central differences of loss_fn() w.r.t. every entry of every tensor (changed in place and
    restored; 2 forwards per entry)."""
    if not eps > 0:
        raise ValueError(f"finite_differences: eps must be > 0, got {eps!r}")
    out = []
    for t in tensors:
        g = torch.zeros_like(t)
        flat, gflat = t.data.view(-1), g.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            lp = loss_fn().item()
            flat[i] = old - eps
            lm = loss_fn().item()
            flat[i] = old
            gflat[i] = (lp - lm) / (2 * eps)
        out.append(g)
    return out


def compare(estimate: Sequence[Tensor], reference: Sequence[Tensor], names: Sequence[str]) -> dict[str, dict]:
    """Per tensor: {'cos', 'rel'} of estimate against reference."""
    return {n: {"cos": cosine(e, r), "rel": rel_error(e, r)} for n, e, r in zip(names, estimate, reference)}


@dataclass
class EstimatorCheck:
    """What `check_estimator` measured: over all checked tensors together (`cosine`,
    `rel_error`) and per tensor (`per_tensor`, names as in named_parameters, 'input' for
    dl/du), plus the relaxation statistics of the estimator's run."""

    estimator: Estimator
    reference: str
    cosine: float
    rel_error: float
    per_tensor: dict[str, dict] = field(default_factory=dict)
    estimate: list[Tensor] = field(default_factory=list, repr=False)
    expected: list[Tensor] = field(default_factory=list, repr=False)
    relax: list[dict] = field(default_factory=list)

    def worst_cosine(self) -> float:
        return min((v["cos"] for v in self.per_tensor.values()), default=1.0)


def check_estimator(module: nn.Module, estimator: str | Estimator, u: Tensor, *,
                    loss: Callable[[Tensor], Tensor] | None = None, target: Tensor | None = None,
                    reference: str | Estimator = "fd", expected: Callable[[nn.Module, Tensor], list[Tensor]] | None
                    = None, fd_eps: float = 1e-6, input_grad: bool = True, dtype: torch.dtype | None = torch.float64,
                    seed: int = 0) -> EstimatorCheck:
    """Run `estimator` on `module` (an energy-based block, an HRU, or any module holding them)
    and compare the gradients of its parameters (and of its input, when `input_grad`) with
    a reference.

    u:         the input (batch first)
    loss:      maps the module's output to a scalar (default: 1/2 ||out - target||^2 summed,
               with a fixed random target when none is given)
    target:    passed to the module's forward (rules that clamp or nudge the output need it);
               also the default loss's target
    reference: 'fd' (central finite differences of the loss, step fd_eps), or an estimator
               (name or instance) whose gradients are the reference
    expected:  instead of `reference`, a function (module, u) -> tensors (parameters in
               order, then dl/du) with the quantity a rule documents when it is not the loss
               gradient (e.g. contrastive learning)
    dtype:     cast module and input (float64 by default; None keeps them)
    The check runs on a copy: `module` itself (dtype, estimators, gradients) is untouched.
    """
    g = torch.Generator().manual_seed(seed)
    module = copy.deepcopy(module)
    if dtype is not None:
        module = module.to(dtype)
    u = u.detach().clone()
    if dtype is not None:
        u = u.to(dtype)
    with torch.no_grad():
        out0 = module(u) if target is None else module(u, target=target)
    y = target
    if y is None or not y.is_floating_point():
        y = torch.randn(out0.shape, generator=g, dtype=out0.dtype) if y is None else \
            torch.nn.functional.one_hot(y.long(), out0.shape[-1]).to(out0.dtype)
    loss = loss or (lambda out: 0.5 * ((out - y) ** 2).sum())
    params = [p for p in module.parameters() if p.requires_grad]
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    if input_grad:
        u.requires_grad_(True)
        names = names + ["input"]
    tensors = params + ([u] if input_grad else [])

    def loss_fn() -> Tensor:
        return loss(module(u) if target is None else module(u, target=target))

    carriers = estimator_modules(module)
    est = make_estimator(estimator)
    set_estimator(module, est)
    estimate = gradients(loss_fn, tensors)
    relax = [dict(m.last_relax) for m in carriers if hasattr(m, "last_relax")]
    if expected is not None:
        ref_name = "expected"
        ref = [r.detach() for r in expected(module, u.detach())]
        if not input_grad:
            ref = ref[:len(params)]
    elif isinstance(reference, str) and reference == "fd":
        ref_name = "fd"
        ref = finite_differences(loss_fn, tensors, fd_eps)
    else:
        ref_est = make_estimator(reference)
        ref_name = ref_est.name
        set_estimator(module, ref_est)
        ref = gradients(loss_fn, tensors)
    if len(ref) != len(estimate):
        raise ValueError(f"check_estimator: the reference gives {len(ref)} tensors, expected {len(estimate)}")
    return EstimatorCheck(est, ref_name, cosine(estimate, ref), rel_error(estimate, ref),
                          compare(estimate, ref, names), estimate, ref,
                          [{k: v.as_dict() for k, v in r.items()} for r in relax])
