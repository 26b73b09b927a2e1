"""Binary weights and binary (step) neurons for energy-based blocks, and a binarized
feedforward network (docs/binary.md).

Binary weights: every coupling's weight W is replaced, through
`torch.nn.utils.parametrize`, by W_b = a * sign(W_h) computed from a real-valued latent
(hidden) weight W_h that the optimizer updates; a is one scale per coupling (per layer).
The relaxation, the nudged phases and dPhi/dtheta all see W_b (every read of
`coupling.weight` goes through the parametrization), and the gradient that the estimator
computes for W_b is handed unchanged to W_h (a straight-through estimator). This is the
latent-weight variant of binary EP; the momentum-threshold variant is not implemented.

    model = eqprop.dense_ffebm(784, [[256, 128]])
    binarize_weights(model, scale="init")         # every coupling of every block
    binarize_activations(model)                   # step neurons in every block
    latent_weights(model)                         # what metaplasticity consolidates

Binary neurons: `Step` is sigma(z) = 1[z > threshold], values in {0, 1}, the limit of the
hard sigmoid as its slope grows; its potential G is that limit, 0 on [0, 1]. EP only needs
sigma in the relaxation, so EP (and CL) train step neurons as they are; estimators that
differentiate through the steps (BPTT, ID) get the surrogate derivative 1[|z - t| <= 1/2]
instead of the true one (zero almost everywhere).

`binary_mlp` is the feedforward binarized network of the metaplasticity experiments (binary
weights with scale 1, batch norm, sign neurons with a straight-through derivative).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .activations import Activation
from .blocks import EnergyBlock
from .couplings import Coupling
from .validate import check_choice, check_positive_int

__all__ = ["SCALES", "SignSTE", "BinaryWeight", "Step", "SignActivation", "binarize_weight", "binarize_weights",
           "binarize_activations", "binarize_model", "is_binary", "binary_modules", "latent_weights", "binary_mlp"]

SCALES = ("init", "mean", "learned")


class SignSTE(torch.autograd.Function):
    """scale * sign(x) with sign(0) = +1 (so a weight is never 0). Backward: the gradient
    for the output is passed to x unchanged (identity straight-through estimator) and the
    scale gets sum(grad * sign(x))."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        sign = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
        ctx.save_for_backward(sign)
        return scale * sign

    @staticmethod
    def backward(ctx, grad: Tensor):
        (sign,) = ctx.saved_tensors
        return grad, ((grad * sign).sum() if ctx.needs_input_grad[1] else None)


def _check_scale(owner: str, scale: Any) -> None:
    if isinstance(scale, str):
        check_choice(owner, "scale", scale, SCALES)
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and scale < float("inf")):
        raise ValueError(f"{owner}: scale must be a finite number > 0 or one of {SCALES}, got {scale!r}")


class BinaryWeight(nn.Module):
    """Parametrization W_b = a * sign(W_h) of a weight W_h (the latent weight).

    scale: a number (fixed a), 'init' (a fixed to mean |W_h| when the weight is binarized),
    'mean' (a = mean |W_h| at every read, not differentiated) or 'learned' (a parameter
    starting at mean |W_h|, trained with the other parameters: its gradient is
    sum(dl/dW_b * sign(W_h))).
    """

    def __init__(self, latent: Tensor, scale: float | str = "init"):
        super().__init__()
        _check_scale("BinaryWeight", scale)
        self.mode = scale if isinstance(scale, str) else "fixed"
        start = latent.detach().abs().mean().clamp_min(torch.finfo(latent.dtype).tiny)
        if self.mode == "learned":
            self.scale = nn.Parameter(start.clone())
        elif self.mode == "init":
            self.register_buffer("scale", start.clone())
        elif self.mode == "fixed":
            self.register_buffer("scale", torch.tensor(float(scale), dtype=latent.dtype, device=latent.device))
        else:
            self.scale = None

    def current_scale(self, latent: Tensor) -> Tensor:
        """The scale a for the latent weight `latent` (a 0-dim tensor)."""
        if self.mode == "mean":
            return latent.detach().abs().mean()
        return self.scale

    def forward(self, latent: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return SignSTE.apply(latent, self.current_scale(latent))
        # a relaxation reads the weight at every step: reuse W_b until W_h or the scale changes
        scale = self.scale
        key = (latent.data_ptr(), latent._version, latent.dtype, latent.device,
               None if scale is None else (scale.data_ptr(), scale._version))
        cached = getattr(self, "_cached", None)
        if cached is None or cached[0] != key:
            cached = (key, SignSTE.apply(latent, self.current_scale(latent)))
            self._cached = cached
        return cached[1]

    def extra_repr(self) -> str:
        return f"scale={self.mode}"


def is_binary(module: nn.Module) -> bool:
    """Whether `module`'s weight is binarized by a `BinaryWeight`."""
    if not parametrize.is_parametrized(module, "weight"):
        return False
    return any(isinstance(p, BinaryWeight) for p in module.parametrizations["weight"])


def binarize_weight(module: nn.Module, scale: float | str = "init") -> nn.Module:
    """Binarize `module.weight` (an nn.Linear or nn.Conv2d, or any module with a `weight`
    parameter) in place; its latent weight becomes `module.parametrizations.weight.original`."""
    name = type(module).__name__
    _check_scale(name, scale)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"binarize_weight: {name} has no weight tensor to binarize")
    if is_binary(module):
        raise ValueError(f"binarize_weight: the weight of {name} is already binary")
    parametrize.register_parametrization(module, "weight", BinaryWeight(weight, scale))
    return module


def _blocks(model: nn.Module, what: str) -> list[EnergyBlock]:
    blocks = [m for m in model.modules() if isinstance(m, EnergyBlock)]
    if not blocks:
        raise ValueError(f"{what}: {type(model).__name__} holds no energy-based block")
    return blocks


def _couplings(block: EnergyBlock, what: str) -> list[Coupling]:
    couplings = [m for m in block.modules() if isinstance(m, Coupling)]
    if not couplings:
        raise ValueError(f"{what}: block {block.block_name} has no couplings (only Hopfield-type blocks, whose "
                         f"weights live in couplings, can be binarized)")
    return couplings


def binarize_weights(model: nn.Module, scale: float | str = "init") -> nn.Module:
    """Binarize the weights of every coupling of every energy-based block of `model` (one
    scale per coupling); biases and feedforward parts stay real. Returns `model`."""
    _check_scale("binarize_weights", scale)
    couplings = [c for b in _blocks(model, "binarize_weights") for c in _couplings(b, "binarize_weights")]
    done = [c for c in couplings if is_binary(c.core())]
    if done:
        raise ValueError(f"binarize_weights: {len(done)} coupling(s) of {type(model).__name__} are already binary")
    for c in couplings:
        binarize_weight(c.core(), scale)
    return model


def _window(z: Tensor, threshold: float) -> Tensor:
    return ((z - threshold).abs() <= 0.5).to(z.dtype)


class _StepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, threshold: float) -> Tensor:
        ctx.save_for_backward(z)
        ctx.threshold = threshold
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        return grad * _window(z, ctx.threshold), None


class Step(Activation):
    """Binary neuron sigma(z) = 1[z > threshold] in {0, 1}; potential G = 0 (the limit of
    the hard sigmoid's s^2 / (2 slope)). Under autograd its derivative is the surrogate
    1[|z - threshold| <= 1/2]."""

    name = "step"

    def __init__(self, threshold: float = 0.0):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
                not float("-inf") < threshold < float("inf"):
            raise ValueError(f"Step: threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)

    def __call__(self, z: Tensor) -> Tensor:
        if torch.is_grad_enabled() and z.requires_grad:
            return _StepFunction.apply(z, self.threshold)
        return (z > self.threshold).to(z.dtype)

    def potential(self, s: Tensor) -> Tensor:
        return s.new_zeros(s.shape[0])

    def __repr__(self) -> str:
        return f"Step(threshold={self.threshold})"


def binarize_activations(model: nn.Module, threshold: float = 0.0, layers: Iterable[int] | None = None
                         ) -> nn.Module:
    """Replace the activations of every energy-based block of `model` by `Step(threshold)`:
    all layers, or the given 0-based layer indices of each block. Returns `model`."""
    blocks = _blocks(model, "binarize_activations")
    step = Step(threshold)
    chosen = None if layers is None else list(layers)
    for b in blocks:
        idx = range(b.num_layers) if chosen is None else chosen
        for l in idx:
            if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < b.num_layers:
                raise ValueError(f"binarize_activations: block {b.block_name} has layers 0..{b.num_layers - 1}, "
                                 f"got layer {l!r}")
    for b in blocks:
        for l in (range(b.num_layers) if chosen is None else chosen):
            b.activations[l] = step
    return model


BINARY_KEYS = ("weights", "activations", "scale", "threshold")


def binarize_model(model: nn.Module, spec: dict) -> nn.Module:
    """Apply a config's binary settings {weights: bool, activations: bool, scale, threshold}
    to every energy-based block of `model` (what `model.binary` in a training config does)."""
    if not isinstance(spec, dict):
        raise ValueError(f"binary: expected a mapping with keys {BINARY_KEYS}, got {spec!r}")
    unknown = set(spec) - set(BINARY_KEYS)
    if unknown:
        raise ValueError(f"binary: unknown key(s) {sorted(unknown)}; valid: {', '.join(BINARY_KEYS)}")
    weights, acts = spec.get("weights", False), spec.get("activations", False)
    for key, v in (("weights", weights), ("activations", acts)):
        if not isinstance(v, bool):
            raise ValueError(f"binary: {key} must be true or false, got {v!r}")
    if not (weights or acts):
        raise ValueError("binary: neither weights nor activations is true; remove the setting for a real network")
    if "scale" in spec and not weights:
        raise ValueError("binary: scale applies to binary weights (weights: true)")
    if "threshold" in spec and not acts:
        raise ValueError("binary: threshold applies to binary activations (activations: true)")
    if weights:
        binarize_weights(model, spec.get("scale", "init"))
    if acts:
        binarize_activations(model, spec.get("threshold", 0.0))
    return model


def binary_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` whose weight is binarized."""
    return [m for m in model.modules() if is_binary(m)]


def latent_weights(model: nn.Module) -> list[Tensor]:
    """The latent (hidden) weights W_h of every binarized weight of `model`."""
    return [m.parametrizations["weight"].original for m in binary_modules(model)]


class _SignHardtanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class SignActivation(nn.Module):
    """sign(x) in {-1, +1} with the straight-through derivative 1[|x| <= 1] (binarized
    feedforward networks)."""

    def forward(self, x: Tensor) -> Tensor:
        return _SignHardtanh.apply(x)


def binary_mlp(widths: Sequence[int], binary: bool = True, init_width: float = 0.1) -> nn.Sequential:
    """Feedforward network widths[0] -> ... -> widths[-1]: bias-free linear layers each
    followed by batch norm, sign neurons between them. binary=True: weights sign(W_h)
    (scale 1) and sign neurons (the metaplasticity paper's network); False: the same
    network with real weights and ReLU neurons (the full-precision reference). Weights start
    uniform in +-init_width/2."""
    widths = list(widths)
    if len(widths) < 2:
        raise ValueError(f"binary_mlp: widths needs an input and an output size, got {widths}")
    for w in widths:
        check_positive_int("binary_mlp", "widths", w)
    if isinstance(init_width, bool) or not isinstance(init_width, (int, float)) or not init_width > 0:
        raise ValueError(f"binary_mlp: init_width must be a number > 0, got {init_width!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b, bias=False)
        nn.init.uniform_(lin.weight, -init_width / 2, init_width / 2)
        if binary:
            binarize_weight(lin, 1.0)
        layers += [lin, nn.BatchNorm1d(b)]
        if k < len(widths) - 2:
            layers.append(SignActivation() if binary else nn.ReLU())
    return nn.Sequential(*layers)
