"""Shared test settings and fixtures.

Tiny models run fastest (and steadiest on a loaded machine) on one thread. The fixtures that
build models or compute gradients return plain functions (factories), so that a test can
call them with its own settings; no test module is imported by another.
"""
from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable

import numpy as np
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


# ---------------------------------------------------------------------------------------
# small dataset files in their real formats (idx, CIFAR pickles, .ts)
# ---------------------------------------------------------------------------------------

class DataWriters:
    """Writers of small dataset files in the published formats, from one seeded generator."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def idx(self, path, arr, type_code: int = 0x08) -> None:
        """An idx file (gzip-compressed when the name ends in .gz); ``type_code`` 0x08 is unsigned bytes."""
        dtype = {0x08: np.uint8, 0x09: np.int8, 0x0D: ">f4"}[type_code]
        raw = bytes([0, 0, type_code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes() + \
            np.asarray(arr).astype(dtype).tobytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)

    def mnist_like(self, directory, n_train: int = 12, n_test: int = 5, side: int = 28, test_side: int | None = None,
                   gz: bool = True) -> dict:
        """{train,t10k}-{images,labels} idx files in ``directory``; returns {prefix: (images, labels)}."""
        out = {}
        for prefix, n, s in (("train", n_train, side), ("t10k", n_test, test_side or side)):
            x = self.rng.integers(0, 256, (n, s, s), dtype=np.uint8)
            y = self.rng.integers(0, 10, n, dtype=np.uint8)
            ext = ".gz" if gz else ""
            self.idx(directory / f"{prefix}-images-idx3-ubyte{ext}", x)
            self.idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", y)
            out[prefix] = (x, y)
        return out

    def pickle(self, path, obj, protocol: int = 2) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(obj, protocol=protocol))

    def cifar10(self, root, n: int = 3, test_labels: list[int] | None = None) -> None:
        """cifar-10-batches-py/data_batch_1..5 and test_batch with ``n`` random images each."""
        d = root / "cifar-10-batches-py"
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            labels = test_labels if name == "test_batch" and test_labels is not None else \
                [int(v) for v in self.rng.integers(0, 10, n)]
            data = self.rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
            self.pickle(d / name, {b"batch_label": name.encode(), b"data": data, b"labels": labels})

    @staticmethod
    def ts(rows: list[str], labels: tuple[str, ...] | None = ("a", "b"), dims: int = 2) -> str:
        """A .ts file: a header, then ``rows`` as data lines (``"1,2,3:4,5,6:a"``); ``labels=None``
        declares a regression file (@targetLabel true)."""
        head = ["@problemName Toy", "@timeStamps false", "@missing true", "@univariate false",
                f"@dimensions {dims}", "@equalLength false"]
        head.append(f"@classLabel true {' '.join(labels)}" if labels else "@targetLabel true")
        return "\n".join(head + ["@data"] + list(rows)) + "\n"

    @staticmethod
    def uea(root, name: str, train: str, test: str):
        """root/uea/<name>/<name>_{TRAIN,TEST}.ts; returns the folder."""
        d = root / "uea" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}_TRAIN.ts").write_text(train)
        (d / f"{name}_TEST.ts").write_text(test)
        return d


@pytest.fixture
def data_files() -> DataWriters:
    """Writers of small dataset files in their real formats (see DataWriters)."""
    return DataWriters()
