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
    """T: layer l -> layer l+1, split into a bias-free linear part and what follows it.

    T(x) = route(W x) + b, where `linear_map` is the linear map W (a convolution or a matrix),
    `route` a fixed routing such as 2x2 max-pooling (its choice is returned as `aux`), and b
    the bias. The adjoint (no bias) is W^T route^T. Keeping the parts apart lets reduced
    precision (eqprop.precision), analyses and benchmarks use any coupling the same way.

    Subclasses implement `core`, `linear_map`, `linear_adjoint`, `out_shape` and `macs`, and override
    `route`/`route_adjoint`/`add_bias` when they pool or have no bias.
    """

    def core(self) -> nn.Module:
        """The module that holds W (`.weight`) and b (`.bias`), e.g. an nn.Conv2d."""
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """The weight of the linear part (what `linear_map(x, weight=...)` replaces)."""
        return self.core().weight

    @property
    def bias(self) -> Tensor | None:
        return self.core().bias

    def weight_or(self, weight: Tensor | None) -> Tensor:
        """`weight` when given (a replacement W, e.g. a 16-bit copy), else W."""
        return self.weight if weight is None else weight

    def linear_map(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """W x, bias-free, before routing; `weight` replaces W (e.g. a 16-bit copy)."""
        raise NotImplementedError

    def linear_adjoint(self, y: Tensor, x_shape: torch.Size, weight: Tensor | None = None) -> Tensor:
        """W^T y, shaped like the lower layer (`x_shape`, with batch)."""
        raise NotImplementedError

    @property
    def routed(self) -> bool:
        """Whether the adjoint needs the routing chosen by the forward map (its `aux`)."""
        return False

    def route(self, z: Tensor) -> tuple[Tensor, object]:
        """(route(z), aux): the routing after the linear part; identity by default."""
        return z, None

    def route_adjoint(self, y: Tensor, aux: object, z_shape: torch.Size) -> Tensor:
        """route^T y for the routing recorded in `aux` (shaped like W x, i.e. `z_shape`)."""
        return y

    def route_held(self, z: Tensor, aux: object) -> Tensor:
        """The routing recorded in `aux` (by `route` at another input) applied to z: the
        switches held, as a sample-and-hold of the pooling choice would (identity by default)."""
        return z

    def forward_held(self, x: Tensor, aux: object) -> Tensor:
        """T(x) + bias with the routing of `aux` (as returned by `forward`) held."""
        if aux is None:
            return self(x)[0]
        return self.add_bias(self.route_held(self.linear_map(x), aux[0]))

    def add_bias(self, y: Tensor) -> Tensor:
        """y + b, in y's dtype: under a 16-bit relaxation's autocast the bias is cast down
        rather than promoting the state to float32 (which the next coupling would cast back)."""
        b = self.bias
        return y if b is None else y + b.view(1, -1, *([1] * (y.dim() - 2))).to(y.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, object]:
        """(T(x) + bias, aux) where aux is whatever `adjoint` needs (None when no routing)."""
        z = self.linear_map(x)
        y, aux = self.route(z)
        return self.add_bias(y), (None if aux is None else (aux, z.shape))

    def adjoint(self, y: Tensor, aux: object, x_shape: torch.Size) -> Tensor:
        """T^T(y) without bias, shaped like the lower layer; `aux` from `forward`."""
        if aux is not None:
            route_aux, z_shape = aux
            y = self.route_adjoint(y, route_aux, z_shape)
        return self.linear_adjoint(y, x_shape)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the upper layer (without batch) for a lower layer of `in_shape`."""
        raise NotImplementedError

    def macs(self, in_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of one application of W (or of W^T) to one sample."""
        raise NotImplementedError

    def pairing(self, x: Tensor, y: Tensor) -> Tensor:
        """<y, T(x) + b> per sample, shape (batch,)."""
        return (y * self(x)[0]).flatten(1).sum(1)


def is_channels_last(x: Tensor) -> bool:
    """Whether a 4-d tensor is laid out channels-last (and not also plainly contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def unpool(y: Tensor, idx: Tensor, z_shape: torch.Size) -> Tensor:
    """The adjoint of a max-pool with indices `idx` (flat positions within each H x W plane of
    z, shape `z_shape`): y scattered to the argmax positions, zeros elsewhere. The same values
    as `F.max_unpool2d`, by one scatter in y's dtype and memory format (max_unpool2d returns
    float32 under CPU autocast and fills its output in the contiguous layout)."""
    n, c, h, w = z_shape
    if is_channels_last(y) and idx.is_contiguous(memory_format=torch.channels_last):
        # channels last: the (N, H, W, C) views are contiguous, scatter over the H*W positions
        out = torch.zeros((n, h, w, c), dtype=y.dtype, device=y.device)
        out.view(n, h * w, c).scatter_(1, idx.permute(0, 2, 3, 1).reshape(n, -1, c),
                                       y.permute(0, 2, 3, 1).reshape(n, -1, c))
        return out.permute(0, 3, 1, 2)
    out = torch.zeros((n, c, h * w), dtype=y.dtype, device=y.device)
    out.scatter_(2, idx.reshape(n, c, -1), y.reshape(n, c, -1))
    return out.view(n, c, h, w)


class DenseCoupling(Coupling):
    """Dense matrix between two layers; flattens a convolutional lower layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def core(self) -> nn.Module:
        return self.linear

    def linear_map(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        return x.flatten(1) @ self.weight_or(weight).t()

    def linear_adjoint(self, y: Tensor, x_shape: torch.Size, weight: Tensor | None = None) -> Tensor:
        return (y @ self.weight_or(weight)).view(x_shape)

    def forward(self, x: Tensor) -> tuple[Tensor, object]:
        return F.linear(x.flatten(1), self.linear.weight, self.linear.bias), None

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        n = math.prod(in_shape)
        if n != self.linear.in_features:
            raise ValueError(
                f"DenseCoupling: lower layer has {n} units {tuple(in_shape)}, expected {self.linear.in_features}"
            )
        return (self.linear.out_features,)

    def macs(self, in_shape: tuple[int, ...]) -> int:
        self.out_shape(in_shape)
        return self.linear.in_features * self.linear.out_features


class ConvCoupling(Coupling):
    """Square convolution (stride 1, same padding), optionally followed by 2x2 max-pooling.

    The bias is added after pooling (a per-channel constant commutes with max). The adjoint
    un-pools with the argmax indices of the pool taken on conv(s_l), then applies the
    transposed convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: bool = False, kernel_size: int = 3,
                 bias: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ConvCoupling: kernel_size must be odd (same padding), got {kernel_size}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.pool = bool(pool)

    def core(self) -> nn.Module:
        return self.conv

    def linear_map(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        return F.conv2d(x, self.weight_or(weight), None, padding=self.conv.padding)

    def linear_adjoint(self, y: Tensor, x_shape: torch.Size, weight: Tensor | None = None) -> Tensor:
        return F.conv_transpose2d(y, self.weight_or(weight), None, padding=self.conv.padding)

    @property
    def routed(self) -> bool:
        return self.pool

    def route(self, z: Tensor) -> tuple[Tensor, object]:
        if not self.pool:
            return z, None
        return F.max_pool2d(z, 2, 2, return_indices=True)

    def route_adjoint(self, y: Tensor, aux: object, z_shape: torch.Size) -> Tensor:
        if not self.pool:
            return y
        return unpool(y, aux, z_shape)

    def route_held(self, z: Tensor, aux: object) -> Tensor:
        if not self.pool:
            return z
        idx = aux  # flat argmax positions within each (sample, channel) plane of z
        return z.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)

    def forward(self, x: Tensor) -> tuple[Tensor, object]:
        if not self.pool:
            return F.conv2d(x, self.conv.weight, self.conv.bias, padding=self.conv.padding), None
        return super().forward(x)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(in_shape) != 3 or in_shape[0] != self.conv.in_channels:
            raise ValueError(
                f"ConvCoupling: lower layer shape {tuple(in_shape)} does not have "
                f"{self.conv.in_channels} channels x H x W"
            )
        c, h, w = self.conv.out_channels, in_shape[1], in_shape[2]
        if self.pool and (h < 2 or w < 2):
            raise ValueError(f"ConvCoupling: a 2x2 max-pool needs at least 2x2 pixels, the lower layer is {h}x{w}")
        return (c, h // 2, w // 2) if self.pool else (c, h, w)

    def macs(self, in_shape: tuple[int, ...]) -> int:
        self.out_shape(in_shape)
        k = self.conv.kernel_size[0] * self.conv.kernel_size[1]
        return self.conv.in_channels * self.conv.out_channels * k * in_shape[1] * in_shape[2]


# --- initialisations ---------------------------------------------------------------

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


__all__ = ["Coupling", "DenseCoupling", "ConvCoupling", "is_channels_last", "unpool", "goe_", "weighted_kaiming_",
           "init_module_"]
