"""torch.autograd.gradcheck on every custom autograd.Function of the library, through the
public entry points (a block's forward, rhel_readout), in float64.

gradcheck compares the Function's backward with numerical differences of its forward, so each
case uses settings where the estimator is the true gradient to well below gradcheck's
tolerances: converged smooth relaxations, EP with a tiny beta, ID to 1e-13, RHEL on the
linear unit (exact) and with a tiny eps on the nonlinear one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

import eqprop
from eqprop import EP, ID, RHEL, ConvHopfield, DenseHopfield
from eqprop.hamiltonian import LinearHRU, NonlinearHRU, rhel_readout

DT = torch.float64
SRC = Path(eqprop.__file__).resolve().parent


class Readout(nn.Module):
    """rhel_readout(unit, u, y0, z0) as a module, so that functional_call can pass the unit's
    parameters as inputs."""

    def __init__(self, unit: nn.Module, eps: float):
        super().__init__()
        self.unit, self.eps = unit, eps

    def forward(self, u, y0, z0):
        return rhel_readout(self.unit, u, y0, z0, estimator=RHEL(eps=self.eps))


def dense_ep():
    block = DenseHopfield([3, 4, 2], activation="sigmoid", alpha=1.5, T1=3000, tol=1e-13,
                          estimator=EP(beta=1e-4, T2=3000, tol=1e-13))
    return block, (torch.randn(2, 3),)


def conv_pool_ep():
    block = ConvHopfield([1, 2], pools="m", activation="sigmoid", init="kaiming", alpha=1.5, T1=3000, tol=1e-13,
                         estimator=EP(beta=1e-4, T2=3000, tol=1e-13))
    return block, (torch.randn(2, 1, 4, 4),)


def dense_id():
    block = DenseHopfield([3, 4, 2], activation="sigmoid", alpha=1.5, T1=3000, tol=1e-13,
                          estimator=ID(max_iter=5000, tol=1e-13))
    return block, (torch.randn(2, 3),)


def rhel(unit_cls, eps):
    def make():
        unit = unit_cls(2, 3, dt_min=0.2, dt_max=0.5)
        return Readout(unit, eps), (torch.randn(2, 5, 2), 0.5 * torch.randn(2, 3), 0.5 * torch.randn(2, 3))
    return make


# (case, the Function it exercises, builder)
CASES = [
    ("ep-dense", "_EquilibriumFunction", dense_ep),
    ("ep-conv-maxpool", "_EquilibriumFunction", conv_pool_ep),
    ("id-dense", "_EquilibriumFunction", dense_id),
    ("rhel-linear", "_RHELFunction", rhel(LinearHRU, 0.5)),  # exact at any eps
    ("rhel-nonlinear", "_RHELFunction", rhel(NonlinearHRU, 1e-5)),
]


@pytest.mark.parametrize("function,build", [(f, b) for _, f, b in CASES], ids=[c for c, _, _ in CASES])
def test_gradcheck(function, build):
    torch.manual_seed(5)
    module, inputs = build()
    module = module.to(DT)
    inputs = tuple(x.to(DT).requires_grad_(True) for x in inputs)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters() if p.requires_grad)
    n_in = len(inputs)

    def fn(*args):
        return functional_call(module, dict(zip(names, args[n_in:])), args[:n_in])

    out = fn(*inputs, *params)
    assert type(out.grad_fn).__name__ == function + "Backward"
    grads = torch.autograd.grad(out.sum(), inputs + params, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads), "every input and parameter gets a gradient"
    assert torch.autograd.gradcheck(fn, inputs + params, eps=1e-6, atol=1e-7, rtol=1e-5)


# Functions whose backward is deliberately not the derivative of their forward (gradcheck
# would fail by design), or that need a process group; where their backward is checked
NOT_GRADCHECKED = {
    "SignSTE": "straight-through binarisation; tests/test_binary.py checks the latent weight gets EP's gradient",
    "_StepFunction": "step neuron with a surrogate window derivative; tests/test_binary.py",
    "_SignHardtanh": "sign with the straight-through 1[|x| <= 1]; tests/test_binary.py",
    "_DTPFunction": "returns DTP's update, not the gradient; tests/test_target_prop.py checks it against "
                    "backprop's with transposed feedback",
    "SumOverRanks": "an all-reduce (needs ranks); tests/test_ddp.py's synchronised batch norm equals one process",
}


def test_every_autograd_function_is_gradchecked():
    """The custom autograd.Functions defined anywhere in the library are those covered above,
    or listed, with where their backward is checked, in NOT_GRADCHECKED."""
    found = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                if bases & {"torch.autograd.Function", "autograd.Function", "Function"}:
                    found.add(node.name)
    assert found, "no autograd.Function found: the source walk is broken"
    assert found == {f for _, f, _ in CASES} | set(NOT_GRADCHECKED)
