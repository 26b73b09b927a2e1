"""Couplings T_l between consecutive layers of a Hopfield block, with their adjoints.

A coupling is the linear map in the primitive function Phi = ... + <s_{l+1}, T_l(s_l)>.
The analytical relaxation only needs `forward` (T_l, plus anything the adjoint must
reuse, such as max-pool indices) and `adjoint` (T_l^T): no autograd in the loop.
The parameter gradient dPhi/dtheta is taken by autograd on `pairing`, at fixed states.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Coupling(nn.Module):
    """T: layer l -> layer l+1. Subclasses implement forward/adjoint/out_shape."""

    def forward(self, x: Tensor) -> tuple[Tensor, object]:
        """Return (T(x) + bias, aux) where aux is whatever `adjoint` needs (or None)."""
        raise NotImplementedError

    def adjoint(self, y: Tensor, aux: object, x_shape: torch.Size) -> Tensor:
        """Return T^T(y) (no bias), shaped like the lower layer."""
        raise NotImplementedError

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the upper layer (without batch) for a lower layer of `in_shape`."""
        raise NotImplementedError

    def pairing(self, x: Tensor, y: Tensor) -> Tensor:
        """<y, T(x) + b> per sample, shape (batch,)."""
        return (y * self(x)[0]).flatten(1).sum(1)


class DenseCoupling(Coupling):
    """Dense matrix between two layers; flattens a convolutional lower layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> tuple[Tensor, object]:
        return self.linear(x.flatten(1)), None

    def adjoint(self, y: Tensor, aux: object, x_shape: torch.Size) -> Tensor:
        return (y @ self.linear.weight).view(x_shape)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        n = math.prod(in_shape)
        if n != self.linear.in_features:
            raise ValueError(
                f"DenseCoupling: lower layer has {n} units {tuple(in_shape)}, expected {self.linear.in_features}"
            )
        return (self.linear.out_features,)


class ConvCoupling(Coupling):
    """3x3 convolution (stride 1, padding 1), optionally followed by 2x2 max-pooling.

    The adjoint un-pools with the argmax indices of the pool taken on conv(s_l), then
    applies the transposed convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: bool = False, kernel_size: int = 3,
                 bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.pool = bool(pool)

    def forward(self, x: Tensor) -> tuple[Tensor, object]:
        w, b = self.conv.weight, self.conv.bias
        if not self.pool:
            return F.conv2d(x, w, b, padding=self.conv.padding), None
        # Bias is added after pooling (a per-channel constant commutes with max).
        z = F.conv2d(x, w, None, padding=self.conv.padding)
        p, idx = F.max_pool2d(z, 2, 2, return_indices=True)
        if b is not None:
            p = p + b.view(1, -1, 1, 1)
        return p, (idx, z.shape)

    def adjoint(self, y: Tensor, aux: object, x_shape: torch.Size) -> Tensor:
        if self.pool:
            idx, z_shape = aux
            y = F.max_unpool2d(y, idx, 2, 2, output_size=z_shape[-2:])
        return F.conv_transpose2d(y, self.conv.weight, None, padding=self.conv.padding)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(in_shape) != 3 or in_shape[0] != self.conv.in_channels:
            raise ValueError(
                f"ConvCoupling: lower layer shape {tuple(in_shape)} does not have "
                f"{self.conv.in_channels} channels x H x W"
            )
        c, h, w = self.conv.out_channels, in_shape[1], in_shape[2]
        return (c, h // 2, w // 2) if self.pool else (c, h, w)


# --- initialisations (SPEC §1) -------------------------------------------------------

@torch.no_grad()
def goe_(weight: Tensor, variance: float) -> Tensor:
    """Symmetric Gaussian k x k slices: off-diagonal variance V/k, diagonal 2V/k."""
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"goe_: expects a convolution weight (out, in, k, k), got {tuple(weight.shape)}")
    if not variance > 0:
        raise ValueError(f"goe_: variance must be > 0, got {variance}")
    k = weight.shape[-1]
    a = torch.randn(weight.shape, dtype=weight.dtype, device=weight.device) * math.sqrt(variance / k)
    weight.copy_((a + a.transpose(-1, -2)) / math.sqrt(2.0))
    return weight


@torch.no_grad()
def weighted_kaiming_(weight: Tensor, bias: Tensor | None, alpha: float) -> Tensor:
    """Uniform in +-alpha/sqrt(fan_in); bias uniform in +-0.5/sqrt(fan_in)."""
    fan_in = math.prod(weight.shape[1:])
    bound = alpha / math.sqrt(fan_in)
    weight.uniform_(-bound, bound)
    if bias is not None:
        bias.uniform_(-0.5 / math.sqrt(fan_in), 0.5 / math.sqrt(fan_in))
    return weight


@torch.no_grad()
def init_module_(module: nn.Module, init: str = "kaiming", alpha: float = 0.5, variance: float | None = None) -> None:
    """Initialise every conv/linear inside `module`: 'goe' (convs; dense layers fall back
    to weighted Kaiming), 'kaiming' (weighted Kaiming with `alpha`) or 'default' (PyTorch's)."""
    if init == "default":
        return
    if init not in ("goe", "kaiming"):
        raise ValueError(f"unknown init {init!r}: expected 'goe', 'kaiming' or 'default'")
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if init == "goe" and isinstance(m, nn.Conv2d):
                if variance is None:
                    raise ValueError("init='goe' needs a variance V (e.g. 8.351e-5)")
                goe_(m.weight, variance)
                if m.bias is not None:
                    m.bias.zero_()
            else:
                weighted_kaiming_(m.weight, m.bias, alpha)
