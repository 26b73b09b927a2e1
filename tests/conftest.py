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

from eqprop import FFEBM, EnergyBlock
from eqprop.activations import Logistic
from eqprop.gradcheck import build_check_model
from eqprop.testing import finite_differences, flatten, gradients

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------------------------------
# a small ff-EBM with conv + max-pool + batch-norm between its blocks
# ---------------------------------------------------------------------------------------

@pytest.fixture
def check_model() -> Callable[..., tuple[FFEBM, Tensor, Tensor]]:
    """Factory of small ff-EBMs for gradient checks: check_model(kind, n_blocks, **settings)
    (eqprop.gradcheck's model: conv + max-pool + batch-norm between blocks)."""
    return build_check_model


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
