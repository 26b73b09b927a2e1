"""Shared test settings and fixtures.

Tiny models run fastest (and steadiest on a loaded machine) on one thread. The fixtures that
build models or compute gradients return plain functions (factories), so that a test can
call them with its own settings; no test module is imported by another.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from eqprop import FFEBM, ConvHopfield, DenseHopfield, EnergyBlock
from eqprop.activations import Logistic
from eqprop.testing import finite_differences, flatten, gradients

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------------------------------
# a small ff-EBM with conv + max-pool + batch-norm between its blocks
# ---------------------------------------------------------------------------------------

def _check_model(kind: str = "conv", n_blocks: int = 3, activation: str = "sigmoid", pool_in_blocks: bool = False,
                 seed: int = 0, dtype: torch.dtype = torch.float64, T1: int = 1000, tol: float | None = 1e-13,
                 update: str = "sync") -> tuple[FFEBM, Tensor, Tensor]:
    """(model, x, y): an ff-EBM with `n_blocks` energy-based blocks and non-trivial feedforward
    parts between them (conv + 2x2 max-pool + batch-norm in train mode, or linear +
    batch-norm), and one batch with integer labels for a cross-entropy loss."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    relax = dict(T1=T1, tol=tol, update=update)
    modules: list[nn.Module] = []
    # maps that feed a batch-norm carry no bias (it would have no gradient)
    if kind == "conv":
        size = 16 if pool_in_blocks else 8
        x = torch.randn(4 if pool_in_blocks else 3, 1, size, size, generator=g)
        c = 1
        for k in range(n_blocks):
            last = k == n_blocks - 1
            pool_ff = size >= 4 and not (pool_in_blocks and k > 0)
            modules += [nn.Conv2d(c, 2, 3, padding=1, bias=False)] + ([nn.MaxPool2d(2)] if pool_ff else [])
            modules.append(nn.BatchNorm2d(2))
            size = size // 2 if pool_ff else size
            pools = "m" if pool_in_blocks and size >= 2 else "-"
            modules.append(ConvHopfield([2, 3], pools, fc=[4] if last else [], in_size=size, activation=activation,
                                        init="kaiming", alpha=0.6, name=f"block{k + 1}", **relax))
            size = size // 2 if pools == "m" else size
            c = 3
        modules += [nn.Flatten(), nn.Linear(4, 3)]
    elif kind == "dense":
        x = torch.randn(4, 6, generator=g)
        n = 6
        for k in range(n_blocks):
            modules += [nn.Linear(n, 5, bias=False), nn.BatchNorm1d(5)]
            modules.append(DenseHopfield([5, 4, 3], activation=activation, alpha=0.8, name=f"block{k + 1}", **relax))
            n = 3
        modules.append(nn.Linear(3, 3))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    if activation == "hardsigmoid":  # centre the input currents inside the clamp's linear range
        for m in modules:
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.constant_(m.bias, 0.5)
    model = FFEBM(*modules).to(dtype)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    return model, x.to(dtype), y


@pytest.fixture
def check_model() -> Callable[..., tuple[FFEBM, Tensor, Tensor]]:
    """Factory of small ff-EBMs for gradient checks: check_model(kind, n_blocks, **settings)."""
    return _check_model


@pytest.fixture
def param_grads() -> Callable[[nn.Module, Callable[[], Tensor]], Tensor]:
    """param_grads(model, loss_fn): all parameter gradients of one backward, as one vector."""
    def grads(model: nn.Module, loss_fn: Callable[[], Tensor]) -> Tensor:
        return flatten(gradients(loss_fn, list(model.parameters())))
    return grads


@pytest.fixture
def param_grads_list() -> Callable[[nn.Module, Callable[[], Tensor]], list[Tensor]]:
    """param_grads_list(model, loss_fn): the parameter gradients of one backward, per tensor."""
    def grads(model: nn.Module, loss_fn: Callable[[], Tensor]) -> list[Tensor]:
        return gradients(loss_fn, list(model.parameters()))
    return grads


@pytest.fixture
def param_fd() -> Callable[..., list[Tensor]]:
    """param_fd(model, loss_fn, eps): central differences of the loss over every parameter entry."""
    def fd(model: nn.Module, loss_fn: Callable[[], Tensor], eps: float) -> list[Tensor]:
        return finite_differences(loss_fn, list(model.parameters()), eps)
    return fd


# ---------------------------------------------------------------------------------------
# a block written only through its primitive function (autograd-energy fallback)
# ---------------------------------------------------------------------------------------

class QuadraticBlock(EnergyBlock):
    """A user-defined block written only through `phi` and `state_shapes`: two logistic
    layers with a dense coupling and an extra self-interaction 0.1 <s_2, s_2>."""

    def __init__(self, n: int, m: int, scale: float = 0.3, **kw):
        super().__init__([Logistic(), Logistic()], **kw)
        self.w = nn.Parameter(torch.randn(m, n) * scale)

    def state_shapes(self, in_shape):
        return [tuple(in_shape), (self.w.shape[0],)]

    def phi(self, s, u):
        return (s[0] * u).sum(1) + ((s[0] @ self.w.T) * s[1]).sum(1) + 0.1 * (s[1] * s[1]).sum(1)


@pytest.fixture
def quadratic_block() -> type[QuadraticBlock]:
    """The class of a custom block defined only by its energy (see QuadraticBlock)."""
    return QuadraticBlock


@pytest.fixture
def sq_loss() -> Callable[[Tensor, Tensor], Tensor]:
    """The squared error 1/2 ||out - y||^2, summed per sample, averaged over the batch."""
    def loss(out: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((out - y) ** 2).flatten(1).sum(1).mean()
    return loss
