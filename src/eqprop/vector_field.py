"""Vector-field blocks: layered networks whose top-down connections are parameters of their
own, so that the dynamics derive from no energy (asymmetric, "vector-field" EP).

A `VectorFieldBlock` has forward couplings W_l (with bias b_l, layer l -> l+1) and backward
couplings K_l (no bias, same shape as W_l); the top-down current into layer l is
B_l s_{l+1} with B_l = K_l^T, so the fixed-point dynamics are

    s_l <- sigma_l( W_{l-1} s_{l-1} + b_{l-1} + B_l s_{l+1} )      (W_{-1} s_{-1} = u)

which are a Hopfield block's when B_l = W_l^T. Every estimator of the library runs on it:
ID and BPTT differentiate these dynamics exactly; EP, and C-EP (eqprop.continual: "C-VF"),
contrast the local quantity

    Phi(s) = <s_1, u> + sum_l <s_{l+1}, W_l s_l + b_l> + <s_{l+1}, K_l s_l>

between their two states. For W this is EP's usual local update; for B_l = K_l^T it is the
transpose of W_l's update (dPhi/dK_l = dPhi/dW_l). Phi is not a primitive of the dynamics
(its derivative in s also carries W_l^T and K_l terms), so the block has no energy and
`energy` raises. Since W and B get transposed updates, only their initial difference and
the optimizer's weight decay (which shrinks B - W^T) change the angle between B_l and
W_l^T; `backward_angles` measures it.

Couplings with 2x2 max-pooling (`ConvVF(..., pools="m-")`): the forward map chooses the
routing. Going up, s_{l+1} sees pool(W_l s_l) + b_l as in the Hopfield block; going down, the
top-down current is K_l^T applied to s_{l+1} un-pooled to the argmax positions of W_l s_l
(the forward map's switches, at the current state), and the K-term of Phi is
<s_{l+1}, K_l s_l read at those positions>. So B = W^T is still the Hopfield block with
pooling, and K_l still gets exactly the update of W_l.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .activations import Activation, Identity, make_activation
from .blocks import ConvHopfield, EnergyBlock, State
from .chain import FFEBM, dense_chain
from .couplings import ConvCoupling, Coupling, DenseCoupling, init_module_
from .estimators import Estimator
from .registry import make_estimator
from .validate import check_choice

__all__ = ["VectorFieldBlock", "DenseVF", "ConvVF", "backward_angles", "model_backward_angles", "dense_vf_ffebm",
           "BACKWARD_INIT"]

BACKWARD_INIT = ("random", "transpose")


def _angle(a: Tensor, b: Tensor) -> float:
    """Angle in degrees between two tensors seen as vectors."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0:
        return 90.0
    c = float((a @ b) / (na * nb))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


class VectorFieldBlock(EnergyBlock):
    """A layered block with separate forward couplings (W_l, b_l) and backward couplings K_l
    (B_l = K_l^T carries layer l+1 down to layer l); see the module docstring.

    couplings: forward couplings, layer l -> l+1
    backward:  one bias-free coupling per forward coupling, of the same kind and weight shape
    """

    def __init__(self, couplings: Sequence[Coupling], backward: Sequence[Coupling], activations: Sequence[Activation],
                 **kw):
        couplings, backward = list(couplings), list(backward)
        name = kw.get("name") or type(self).__name__
        if len(activations) != len(couplings) + 1:
            raise ValueError(f"{name}: {len(couplings)} couplings need {len(couplings) + 1} activations, "
                             f"got {len(activations)}")
        if len(backward) != len(couplings):
            raise ValueError(f"{name}: {len(couplings)} forward couplings need as many backward couplings, "
                             f"got {len(backward)}")
        for l, (c, k) in enumerate(zip(couplings, backward)):
            if type(k) is not type(c):
                raise ValueError(f"{name}: backward coupling {l} is a {type(k).__name__}, the forward coupling "
                                 f"{l} a {type(c).__name__}; they must be of the same kind")
            if tuple(k.weight.shape) != tuple(c.weight.shape):
                raise ValueError(f"{name}: backward coupling {l} has a weight of shape {tuple(k.weight.shape)}, "
                                 f"the forward coupling {l} has {tuple(c.weight.shape)}; B_{l} = K_{l}^T needs "
                                 f"K_{l} shaped like W_{l}")
            if k.bias is not None:
                raise ValueError(f"{name}: backward coupling {l} has a bias; the top-down current takes none "
                                 f"(build it with bias=False)")
            if c.routed != k.routed:
                raise ValueError(f"{name}: forward coupling {l} {'pools' if c.routed else 'does not pool'} but the "
                                 f"backward coupling {l} {'does' if k.routed else 'does not'}; build both with the "
                                 f"same pool setting (the top-down current un-pools by the forward map's switches)")
        super().__init__(activations, **kw)
        self.couplings = nn.ModuleList(couplings)
        self.backward_couplings = nn.ModuleList(backward)

    def state_shapes(self, in_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        shapes = [tuple(in_shape)]
        for c in self.couplings:
            shapes.append(tuple(c.out_shape(shapes[-1])))
        return shapes

    def phi(self, s: State, u: Tensor) -> Tensor:
        """The local quantity whose parameter derivatives EP contrasts (not a primitive of the
        dynamics): <s_1, u> + sum_l <s_{l+1}, W_l s_l + b_l> + <s_{l+1}, K_l s_l>."""
        out = (s[0] * u).flatten(1).sum(1)
        for l, (c, k) in enumerate(zip(self.couplings, self.backward_couplings)):
            y, aux = c(s[l])  # aux: the forward map's pooling switches (None without pooling)
            out = out + (s[l + 1] * (y + k.forward_held(s[l], aux))).flatten(1).sum(1)
        return out

    def energy(self, s: State, u: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.block_name}: a vector-field block has no energy (its top-down couplings "
                                  f"are not the transposes of the bottom-up ones)")

    def preactivations(self, s: State, u: Tensor, layers: Sequence[int], nudge: Tensor | None = None,
                       cache: dict | None = None) -> dict[int, Tensor]:
        L = len(s)
        out = {}
        for l in layers:
            z = u if l == 0 else self.couplings[l - 1](s[l - 1])[0]
            if l < L - 1:
                z = z + self.backward_couplings[l].adjoint(s[l + 1], self._switches(s, l), s[l].shape)
            if nudge is not None and l == L - 1:
                z = z + nudge
            out[l] = z
        return out

    def _switches(self, s: State, l: int) -> object:
        """The pooling switches of forward coupling l at s_l (None when it does not pool): the
        routing of the top-down current into layer l."""
        c = self.couplings[l]
        if not c.routed:
            return None
        with torch.no_grad():
            return c(s[l])[1]

    def backward_angles(self) -> list[float]:
        """Per coupling, the angle in degrees between B_l and W_l^T (0: a Hopfield block)."""
        return [_angle(k.weight, c.weight) for c, k in zip(self.couplings, self.backward_couplings)]

    @torch.no_grad()
    def tie_backward(self) -> VectorFieldBlock:
        """Set B_l = W_l^T for every coupling (the symmetric block)."""
        for c, k in zip(self.couplings, self.backward_couplings):
            k.weight.copy_(c.weight)
        return self


def backward_angles(block: VectorFieldBlock) -> list[float]:
    """Angles in degrees between B_l and W_l^T, per coupling of `block`."""
    return block.backward_angles()


def model_backward_angles(model: nn.Module) -> list[list[float]]:
    """Per vector-field block of `model` (in order), the angles between B_l and W_l^T."""
    return [m.backward_angles() for m in model.modules() if isinstance(m, VectorFieldBlock)]


def _init_backward(block: VectorFieldBlock, backward_init: str) -> None:
    check_choice(block.block_name, "backward_init", backward_init, BACKWARD_INIT)
    if backward_init == "transpose":
        block.tie_backward()


class DenseVF(VectorFieldBlock):
    """Dense vector-field block with layers of the given widths (widths[0] = input size),
    initialised like `DenseHopfield`; backward_init 'random' (B independent of W, an angle
    of about 90 degrees) or 'transpose' (B = W^T, the Hopfield block to start with)."""

    def __init__(self, widths: Sequence[int], activation: str | Activation = "hardsigmoid", slope: float = 1.0,
                 last_linear: bool = False, init: str = "kaiming", alpha: float = 0.5, backward_init: str = "random",
                 **kw):
        widths = list(widths)
        if len(widths) < 1 or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
            raise ValueError(f"DenseVF: widths must be positive integers, got {widths}")
        acts = [make_activation(activation, slope) for _ in widths]
        if last_linear:
            acts[-1] = Identity()
        backward = [DenseCoupling(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:])]
        super().__init__([DenseCoupling(a, b) for a, b in zip(widths[:-1], widths[1:])], backward, acts, **kw)
        self.widths = widths
        init_module_(self, init, alpha)
        _init_backward(self, backward_init)


class ConvVF(VectorFieldBlock):
    """Convolutional vector-field block: 3x3 convolutions, each followed by a 2x2 max-pool
    where `pools` has an 'm' ('-': none; default: no pooling), then optional dense layers
    (the layers of `ConvHopfield(channels, pools, fc)`); backward_init as for `DenseVF`. With
    pooling, the top-down current is routed by the forward map's switches (module docstring)."""

    def __init__(self, channels: Sequence[int], fc: Sequence[int] = (), in_size: int | tuple[int, int] | None = None,
                 activation: str | Activation = "hardsigmoid", slope: float = 1.0, last_linear: bool = False,
                 init: str = "kaiming", variance: float = 8.351e-5, alpha: float = 0.5,
                 backward_init: str = "random", pools: str | None = None, **kw):
        channels, fc = list(channels), list(fc)
        pools = "-" * (len(channels) - 1) if pools is None else pools
        try:
            shape = ConvHopfield(channels, pools, fc, in_size=in_size, activation=activation, slope=slope,
                                 last_linear=last_linear, init="default")
        except ValueError as e:
            raise ValueError(f"ConvVF: {e}") from None
        backward: list[Coupling] = [ConvCoupling(a, b, p == "m", bias=False)
                                    for a, b, p in zip(channels[:-1], channels[1:], pools)]
        dense = [c for c in shape.couplings if isinstance(c, DenseCoupling)]
        backward += [DenseCoupling(c.linear.in_features, c.linear.out_features, bias=False) for c in dense]
        super().__init__(list(shape.couplings), backward, shape.activations, **kw)
        self.channels, self.fc, self.pools = channels, fc, pools
        init_module_(self, init, alpha, variance)
        _init_backward(self, backward_init)


def dense_vf_ffebm(in_features: int, blocks: Sequence[Sequence[int]], num_classes: int = 10,
                   activation: str = "hardsigmoid", slope: float = 1.0, alpha: float = 0.5,
                   backward_init: str = "random", estimator: str | Estimator = "ep",
                   estimator_settings: dict | None = None, **relax) -> FFEBM:
    """Like `eqprop.chain.dense_ffebm`, with `DenseVF` blocks: Linear -> DenseVF(widths) per
    block, then a linear readout."""
    def block(widths: list[int], name: str) -> EnergyBlock:
        return DenseVF(widths, activation=activation, slope=slope, alpha=alpha, backward_init=backward_init,
                       estimator=make_estimator(estimator, **(estimator_settings or {})), name=name, **relax)
    return dense_chain("dense_vf_ffebm", block, in_features, blocks, num_classes, alpha, relax)
