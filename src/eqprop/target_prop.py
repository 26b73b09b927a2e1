"""Difference target propagation (DTP) with learned backprop targets, for feedforward layers
(docs/target_propagation.md).

A `DTPLinear` layer computes h_out = f(h) = sigma(W h + b) and owns a feedback map
g(y) = V sigma_g(y) + c from its output space back to its input space (`DTPConv2d`: a
convolution, and a transposed convolution back). Its forward is an
autograd.Function, so an ordinary `loss.backward()` runs DTP instead of backprop:

  * the error current delta = dl/dh_out that reaches the layer defines its target
    t_out = h_out - beta * delta (per sample, delta normalised to unit norm by default);
  * the layer sends down t_in = g(t_out) + h - g(h_out) (difference correction), i.e. the
    "gradient" (h - t_in) / beta, which the layer below treats as its own error current;
  * its forward weights get the gradient of ||h_out - t_out||^2 / (2 beta) with t_out and
    h held fixed (a local loss: no backprop across layers);
  * its feedback weights get no gradient from the backward: `feedback_step(model, x)` (which
    `model.local_step(x)` calls, and the Trainer calls before every step's forward) takes
    plain SGD steps on the layer's feedback loss at the batch's activations, so feedback and
    forward training are interleaved step by step.

Two feedback trainings (`DTP.feedback`):
  'ldrl'            local difference reconstruction loss: for noise eps (input) and eta (output),
                    [-eps.(g(f(h+eps)) - g(f(h))) + 1/2 ||g(f(h)+eta) - g(f(h))||^2] / std^2,
                    whose expectation is, to second order, -tr(J_g J_f) + 1/2 ||J_g||^2:
                    minimal at J_g = J_f^T, so DTP's update approaches backprop's;
  'reconstruction'  plain DTP: 1/2 ||g(f(h+eps)) - (h+eps)||^2, g an approximate inverse of f
                    (DTP's update then approaches a Gauss-Newton-like direction, not backprop's).

`learning` names: 'dtp' (reconstruction), 'dtp-ldrl' (L-DRL), 'bp' (plain autograd, for
reference). `DTPLinear` layers can sit in an `FFEBM` next to energy-based blocks: the error
current a block's estimator returns for its input becomes the target of the layer below,
so the whole chain learns without backprop (`dtp_ffebm`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import DenseHopfield
from .chain import FFEBM, check_relax_settings
from .estimators import NORMALIZE, normalized_current, per_sample
from .registry import make_estimator
from .validate import check_choice, check_nonnegative_int, check_positive, check_positive_int

__all__ = ["DTP", "DTPLayer", "DTPLinear", "DTPConv2d", "DTPNetwork", "LEARNING", "FEEDBACK", "ACTIVATIONS",
           "make_rule", "dtp_layers", "set_learning", "learning_of", "layer_inputs", "feedback_loss", "feedback_step",
           "update_angles", "dtp_mlp", "DTPFFEBM", "dtp_ffebm"]

LEARNING = ("dtp", "dtp-ldrl", "bp")
FEEDBACK = ("ldrl", "reconstruction")
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "elu": F.elu, "tanh": torch.tanh, "relu": F.relu, "sigmoid": torch.sigmoid, "identity": lambda z: z,
}


@dataclass(frozen=True, kw_only=True)
class DTP:
    """Settings of difference target propagation, validated when built.

    beta:          step of the output target t = h - beta * delta_hat (> 0)
    feedback:      'ldrl' (learned backprop targets) or 'reconstruction' (plain DTP)
    noise_std:     std of the noise of the feedback loss (> 0)
    noise_samples: noise draws averaged per feedback loss (>= 1)
    normalize:     'sample' (each sample's error current scaled to unit norm before the
                   target is taken, so beta is a distance in activation units), 'batch'
                   (by the mean norm) or 'none' (beta multiplies dl/dh as it arrives)
    feedback_lr:   learning rate of the feedback weights' SGD steps (`feedback_step`)
    feedback_iterations: SGD steps on the feedback loss per training step (>= 0)
    feedback_warmup: extra SGD steps of a layer's first feedback step (its feedback maps start
                   at zero, so the first targets are better for a few more iterations)
    """

    beta: float = 0.1
    feedback: str = "ldrl"
    noise_std: float = 0.1
    noise_samples: int = 1
    normalize: str = "sample"
    feedback_lr: float = 0.05
    feedback_iterations: int = 1
    feedback_warmup: int = 0

    def __post_init__(self) -> None:
        check_positive("dtp", "beta", self.beta)
        check_choice("dtp", "feedback", self.feedback, FEEDBACK)
        check_positive("dtp", "noise_std", self.noise_std)
        check_positive_int("dtp", "noise_samples", self.noise_samples)
        check_choice("dtp", "normalize", self.normalize, NORMALIZE)
        check_positive("dtp", "feedback_lr", self.feedback_lr)
        check_nonnegative_int("dtp", "feedback_iterations", self.feedback_iterations)
        check_nonnegative_int("dtp", "feedback_warmup", self.feedback_warmup)

    def replace(self, **settings: Any) -> DTP:
        """A copy with some settings changed (validated)."""
        return replace(self, **settings)


def make_rule(learning: str, **settings: Any) -> DTP | None:
    """The rule of a `learning` name: DTP(feedback='reconstruction') for 'dtp',
    DTP(feedback='ldrl') for 'dtp-ldrl', None (autograd) for 'bp'."""
    check_choice("target_prop", "learning", learning, LEARNING)
    if learning == "bp":
        if settings:
            raise ValueError(f"target_prop: learning 'bp' takes no DTP settings, got {sorted(settings)}")
        return None
    if "feedback" in settings:
        raise ValueError(f"target_prop: learning {learning!r} fixes the feedback training; got feedback="
                         f"{settings['feedback']!r} (use learning 'dtp' or 'dtp-ldrl')")
    try:
        return DTP(feedback="reconstruction" if learning == "dtp" else "ldrl", **settings)
    except TypeError as e:
        raise ValueError(f"target_prop: unknown DTP setting(s) in {sorted(settings)}; valid: beta, noise_std, "
                         f"noise_samples, normalize, feedback_lr, feedback_iterations, feedback_warmup ({e})") from None


def _activation(owner: str, name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class DTPLayer(nn.Module):
    """A feedforward layer h_out = f(h) = sigma(A h) trained by DTP (A a dense or convolutional
    map with bias), with its feedback map g(y) = B sigma_g(y) (B a map of the transposed shape,
    with bias) from the output space back to the input space. Subclasses give A and B
    (`forward_map`, `feedback_map`) and the shape checks. `feedback=False` builds a layer
    without feedback (the first layer, whose input is the data and needs no target). `rule` is
    a `DTP` or None (plain autograd: backprop through the layer)."""

    def __init__(self, activation: str, feedback_activation: str | None, feedback: bool, rule: DTP | None,
                 name: str):
        super().__init__()
        self.layer_name = name
        self.activation = activation
        self.feedback_activation = activation if feedback_activation is None else feedback_activation
        _activation(self.layer_name, self.activation)
        _activation(self.layer_name + " (feedback)", self.feedback_activation)
        if not isinstance(feedback, bool):
            raise ValueError(f"{self.layer_name}: feedback must be True or False, got {feedback!r}")
        self.rule = rule

    def _init_feedback(self, feedback: bool, weight_shape: tuple[int, ...], bias_size: int) -> None:
        if feedback:
            # zero at the start: the first feedback steps then move B along the forward map's
            # (mean) transposed Jacobian rather than away from a random start
            self.feedback_weight = nn.Parameter(torch.zeros(weight_shape))
            self.feedback_bias = nn.Parameter(torch.zeros(bias_size))
            # feedback steps taken (a buffer, so that a resumed run knows the warm-up is done)
            self.register_buffer("feedback_steps", torch.zeros((), dtype=torch.long))
        else:
            self.register_parameter("feedback_weight", None)
            self.register_parameter("feedback_bias", None)
            self.feedback_steps = None

    @property
    def rule(self) -> DTP | None:
        return self._rule

    @rule.setter
    def rule(self, rule: DTP | None) -> None:
        if rule is not None and not isinstance(rule, DTP):
            raise TypeError(f"{self.layer_name}: rule must be an eqprop.target_prop.DTP or None (backprop), got "
                            f"{type(rule).__name__}")
        self._rule = rule

    @property
    def has_feedback(self) -> bool:
        return self.feedback_weight is not None

    def forward_parameters(self) -> list[Tensor]:
        return [self.weight, self.bias]

    def feedback_parameters(self) -> list[Tensor]:
        return [p for p in (self.feedback_weight, self.feedback_bias) if p is not None]

    # ---- what a subclass gives ----------------------------------------------------------------
    def forward_map(self, h: Tensor) -> Tensor:
        """A h (with bias)."""
        raise NotImplementedError

    def feedback_map(self, a: Tensor, in_shape: torch.Size) -> Tensor:
        """B a (with bias), shaped (batch, *in_shape[1:])."""
        raise NotImplementedError

    def check_input(self, h: Tensor) -> None:
        """Raise a ValueError naming the layer for an input or a parameter of the wrong shape."""
        raise NotImplementedError

    # ---- maps ----------------------------------------------------------------------------------
    def f(self, h: Tensor) -> Tensor:
        """The forward map sigma(A h)."""
        return ACTIVATIONS[self.activation](self.forward_map(h))

    def g(self, y: Tensor, in_shape: torch.Size) -> Tensor:
        """The feedback map B sigma_g(y), from the output space to an input of shape in_shape."""
        if not self.has_feedback:
            raise RuntimeError(f"{self.layer_name}: built without feedback (feedback=False), so no target can be "
                               f"sent to its input")
        return self.feedback_map(ACTIVATIONS[self.feedback_activation](y), in_shape)

    def forward(self, h: Tensor) -> Tensor:
        self.check_input(h)
        if self.rule is None or not torch.is_grad_enabled():
            return self.f(h)
        return _DTPFunction.apply(h, self, self.rule, *self.forward_parameters(), *self.feedback_parameters())

    # ---- what DTP computes --------------------------------------------------------------
    def propagate(self, h: Tensor, out: Tensor, delta: Tensor, rule: DTP) -> Tensor:
        """The error current sent to the input h: (h - t_in) / beta = (g(h_out) - g(t_out)) / beta
        with t_out = h_out - beta delta_hat, scaled back by the normalisation."""
        hat, scale = normalized_current(delta, rule.normalize)
        t_out = out - rule.beta * hat
        down = (self.g(out, h.shape) - self.g(t_out, h.shape)) / rule.beta
        return down * per_sample(scale, down)

    def feedback_loss(self, h: Tensor, rule: DTP | None = None, out: Tensor | None = None) -> Tensor:
        """The feedback loss of `rule` (default: the layer's) at inputs h, differentiable in the
        feedback weights only (the forward map is evaluated without graph)."""
        rule = rule or self.rule
        if rule is None:
            raise ValueError(f"{self.layer_name}: no DTP rule to take the feedback loss from (learning is 'bp')")
        if not self.has_feedback:
            raise RuntimeError(f"{self.layer_name}: built without feedback (feedback=False)")
        h = h.detach()
        with torch.no_grad():
            out = self.f(h) if out is None else out.detach()
        sd, k = rule.noise_std, rule.noise_samples
        if k > 1:  # the noise draws as one larger batch
            h, out = h.repeat(k, *([1] * (h.dim() - 1))), out.repeat(k, *([1] * (out.dim() - 1)))
        eps = sd * torch.randn_like(h)
        with torch.no_grad():
            out_eps = self.f(h + eps)
        if rule.feedback == "reconstruction":
            return 0.5 * (self.g(out_eps, h.shape) - (h + eps)).pow(2).flatten(1).sum(1).mean()
        r = self.g(out, h.shape)
        eta = sd * torch.randn_like(out)
        first = -(eps * (self.g(out_eps, h.shape) - r)).flatten(1).sum(1)
        second = 0.5 * (self.g(out + eta, h.shape) - r).pow(2).flatten(1).sum(1)
        return (first + second).mean() / sd ** 2

    def _check_parameters(self, shapes: dict[str, tuple[int, ...]], what: str) -> None:
        for name, shape in shapes.items():
            p = getattr(self, name)
            if p is not None and tuple(p.shape) != shape:
                raise ValueError(f"{self.layer_name}: {name} must have shape {shape} for a {what} layer, "
                                 f"got {tuple(p.shape)}")


class DTPLinear(DTPLayer):
    """A dense DTP layer h_out = sigma(W h + b) with feedback g(y) = V sigma_g(y) + c
    (V: in x out). See `DTPLayer`."""

    def __init__(self, in_features: int, out_features: int, activation: str = "elu",
                 feedback_activation: str | None = None, feedback: bool = True, rule: DTP | None = None,
                 name: str | None = None):
        super().__init__(activation, feedback_activation, feedback, rule, name or "DTPLinear")
        check_positive_int(self.layer_name, "in_features", in_features)
        check_positive_int(self.layer_name, "out_features", out_features)
        lin = nn.Linear(in_features, out_features)
        self.weight, self.bias = lin.weight, lin.bias
        self._init_feedback(feedback, (in_features, out_features), in_features)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward_map(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight, self.bias)

    def feedback_map(self, a: Tensor, in_shape: torch.Size) -> Tensor:
        return F.linear(a, self.feedback_weight, self.feedback_bias)

    def check_input(self, h: Tensor) -> None:
        if not isinstance(h, Tensor) or not h.is_floating_point() or h.dim() != 2:
            raise ValueError(f"{self.layer_name}: input must be a floating-point (batch, features) tensor, got "
                             f"{getattr(h, 'dtype', type(h).__name__)} of shape {tuple(getattr(h, 'shape', ()))}")
        if h.shape[1] != self.weight.shape[1]:
            raise ValueError(f"{self.layer_name}: input has {h.shape[1]} features, the layer takes "
                             f"{self.weight.shape[1]}")
        self.check_shapes()

    def check_shapes(self) -> None:
        """The feedback weights map the output space back to the input space: (in, out) and (in,)."""
        n_out, n_in = self.weight.shape
        self._check_parameters({"bias": (n_out,), "feedback_weight": (n_in, n_out), "feedback_bias": (n_in,)},
                               f"{n_in} -> {n_out}")

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]} -> {self.weight.shape[0]}, activation={self.activation}, "
                f"feedback={self.has_feedback}, rule={self.rule}")


class DTPConv2d(DTPLayer):
    """A convolutional DTP layer h_out = sigma(conv(h, W) + b) (square kernel, stride, zero
    padding) with feedback g(y) = conv_transpose(sigma_g(y), V) + c, V shaped like W (the
    transposed convolution with V = W is the exact adjoint of the convolution). Strides stand
    in for pooling. See `DTPLayer`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1,
                 activation: str = "elu", feedback_activation: str | None = None, feedback: bool = True,
                 rule: DTP | None = None, name: str | None = None):
        super().__init__(activation, feedback_activation, feedback, rule, name or "DTPConv2d")
        for key, v in (("in_channels", in_channels), ("out_channels", out_channels), ("kernel_size", kernel_size),
                       ("stride", stride)):
            check_positive_int(self.layer_name, key, v)
        check_nonnegative_int(self.layer_name, "padding", padding)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding = stride, padding
        self._init_feedback(feedback, tuple(self.weight.shape), in_channels)

    def forward_map(self, h: Tensor) -> Tensor:
        return F.conv2d(h, self.weight, self.bias, self.stride, self.padding)

    def feedback_map(self, a: Tensor, in_shape: torch.Size) -> Tensor:
        k = self.weight.shape[-1]
        extra = [in_shape[d] - ((a.shape[d] - 1) * self.stride - 2 * self.padding + k) for d in (2, 3)]
        return F.conv_transpose2d(a, self.feedback_weight, self.feedback_bias, self.stride, self.padding,
                                  output_padding=tuple(extra))

    def check_input(self, h: Tensor) -> None:
        if not isinstance(h, Tensor) or not h.is_floating_point() or h.dim() != 4:
            raise ValueError(f"{self.layer_name}: input must be a floating-point (batch, channels, H, W) tensor, got "
                             f"{getattr(h, 'dtype', type(h).__name__)} of shape {tuple(getattr(h, 'shape', ()))}")
        c_out, c_in, k, _ = self.weight.shape
        if h.shape[1] != c_in:
            raise ValueError(f"{self.layer_name}: input has {h.shape[1]} channels, the layer takes {c_in}")
        if min(h.shape[2:]) + 2 * self.padding < k:
            raise ValueError(f"{self.layer_name}: a {tuple(h.shape[2:])} input is smaller than the {k}x{k} kernel "
                             f"(padding {self.padding})")
        self._check_parameters({"bias": (c_out,), "feedback_weight": (c_out, c_in, k, k), "feedback_bias": (c_in,)},
                               f"{c_in} -> {c_out} channel, {k}x{k}")

    def extra_repr(self) -> str:
        c_out, c_in, k, _ = self.weight.shape
        return (f"{c_in} -> {c_out}, kernel {k}, stride {self.stride}, padding {self.padding}, "
                f"activation={self.activation}, feedback={self.has_feedback}, rule={self.rule}")


class _DTPFunction(torch.autograd.Function):
    """Forward: f(h). Backward: the DTP error current for h and the local target loss's gradient
    for the forward weights; none for the feedback weights (they learn in `feedback_step`)."""

    @staticmethod
    def forward(ctx, h, layer, rule, *params):
        ctx.layer, ctx.rule = layer, rule
        with torch.no_grad():
            out = layer.f(h)
        ctx.save_for_backward(h, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, out = ctx.saved_tensors
        layer, rule = ctx.layer, ctx.rule
        fwd, fb = layer.forward_parameters(), layer.feedback_parameters()
        needs = ctx.needs_input_grad
        grad_h = None
        if needs[0]:
            if not layer.has_feedback:
                raise RuntimeError(f"{layer.layer_name}: its input needs a gradient but the layer has no feedback "
                                   f"map (built with feedback=False); DTP cannot send a target below it")
            with torch.no_grad():
                grad_h = layer.propagate(h, out, grad_out, rule)
        fwd_grads: list[Tensor | None] = [None] * len(fwd)
        if any(needs[3:3 + len(fwd)]):
            with torch.enable_grad():  # gradient of ||f(h) - t_out||^2 / (2 beta): J^T delta, local
                z = layer.f(h.detach())
                fwd_grads = list(torch.autograd.grad(z, fwd, grad_out, allow_unused=True))
        return (grad_h, None, None, *fwd_grads, *([None] * len(fb)))


# ---- networks -------------------------------------------------------------------------------

def dtp_layers(model: nn.Module) -> list[DTPLayer]:
    """The DTP layers of `model`, in order."""
    return [m for m in model.modules() if isinstance(m, DTPLayer)]


def set_learning(model: nn.Module, learning: str, **settings: Any) -> nn.Module:
    """Use `learning` ('dtp', 'dtp-ldrl' or 'bp') with DTP `settings` for every DTP layer."""
    layers = dtp_layers(model)
    if not layers:
        raise ValueError(f"set_learning: {type(model).__name__} holds no DTP layer")
    rule = make_rule(learning, **settings)
    for layer in layers:
        layer.rule = rule
    return model


def learning_of(model: nn.Module) -> str:
    """The learning name of the model's DTP layers (they must agree)."""
    names = {"bp" if m.rule is None else ("dtp-ldrl" if m.rule.feedback == "ldrl" else "dtp")
             for m in dtp_layers(model)}
    if len(names) != 1:
        raise ValueError(f"learning_of: the DTP layers use {sorted(names)}")
    return names.pop()


@contextmanager
def _rules(model: nn.Module, rules: Sequence[DTP | None]) -> Iterator[None]:
    layers = dtp_layers(model)
    old = [m.rule for m in layers]
    try:
        for m, r in zip(layers, rules):
            m.rule = r
        yield
    finally:
        for m, r in zip(layers, old):
            m.rule = r


class DTPNetwork(nn.Sequential):
    """A multilayer perceptron of `DTPLinear` layers: Flatten, hidden layers with `activation`,
    a linear output layer (logits). The first layer has no feedback map (nothing below it
    needs a target)."""

    def __init__(self, widths: Sequence[int], activation: str = "elu", learning: str = "dtp-ldrl",
                 feedback_activation: str | None = None, **settings: Any):
        widths = list(widths)
        if len(widths) < 2 or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
            raise ValueError(f"DTPNetwork: widths must be at least two positive integers [in, ..., out], got "
                             f"{widths}")
        rule = make_rule(learning, **settings)
        layers: list[nn.Module] = [nn.Flatten()]
        n = len(widths) - 1
        for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            act = "identity" if k == n - 1 else activation
            fb_act = act if feedback_activation is None or k == n - 1 else feedback_activation
            layers.append(DTPLinear(a, b, act, fb_act, feedback=k > 0, rule=rule, name=f"layer{k + 1}"))
        super().__init__(*layers)
        self.widths = widths

    def feedback_loss(self, x: Tensor) -> Tensor:
        """Sum of the layers' feedback losses at the activations of inputs x."""
        return feedback_loss(self, x)

    def local_step(self, x: Tensor) -> None:
        """The Trainer calls this before each step's forward: `feedback_step` on the batch."""
        feedback_step(self, x)


def dtp_mlp(in_features: int, hidden: Sequence[int] = (256, 256), num_classes: int = 10, activation: str = "elu",
            learning: str = "dtp-ldrl", feedback_activation: str | None = None, beta: float = 0.1,
            noise_std: float = 0.1, noise_samples: int = 1, normalize: str = "sample", feedback_lr: float = 0.05,
            feedback_iterations: int = 1, feedback_warmup: int = 0) -> DTPNetwork:
    """`DTPNetwork([in_features, *hidden, num_classes], ...)` with the DTP settings spelled out
    (the builder of the training configs' `model.kind: mlp`). The settings are validated for
    every learning; with learning 'bp' they are not used (so that one config can switch
    between DTP and its backprop reference with `model.learning=bp`)."""
    check_positive_int("dtp_mlp", "in_features", in_features)
    check_positive_int("dtp_mlp", "num_classes", num_classes)
    if not isinstance(hidden, (list, tuple)):
        raise ValueError(f"dtp_mlp: hidden must be a list of layer widths, got {hidden!r}")
    settings = dict(beta=beta, noise_std=noise_std, noise_samples=noise_samples, normalize=normalize,
                    feedback_lr=feedback_lr, feedback_iterations=feedback_iterations, feedback_warmup=feedback_warmup)
    make_rule("dtp-ldrl", **settings)  # validated whatever the learning, so that a bad one is never passed over
    if learning == "bp":
        settings = {}
    return DTPNetwork([in_features, *hidden, num_classes], activation, learning, feedback_activation, **settings)


def layer_inputs(model: nn.Sequential, x: Tensor) -> list[tuple[DTPLayer, Tensor]]:
    """(layer, its input) for every DTP layer with a feedback map and a DTP rule, from one forward
    of x without graph through the modules of the sequential model."""
    out = []
    h = x
    with torch.no_grad():
        for m in model:
            if isinstance(m, DTPLayer) and m.has_feedback and m.rule is not None:
                out.append((m, h))
            h = m(h)
    return out


def feedback_loss(model: nn.Sequential, x: Tensor) -> Tensor:
    """Sum of the feedback losses of the model's DTP layers (with feedback and a DTP rule) at
    the activations of inputs x; differentiable in the feedback weights only."""
    pairs = layer_inputs(model, x)
    if not pairs:
        raise ValueError(f"feedback_loss: {type(model).__name__} has no DTP layer with a feedback map and a DTP "
                         f"rule (learning 'bp' trains no feedback)")
    return sum((m.feedback_loss(h) for m, h in pairs), x.new_zeros(()))


def feedback_step(model: nn.Sequential, x: Tensor) -> None:
    """Train the feedback weights on the batch x: one forward without graph, then, per layer,
    `rule.feedback_iterations` plain SGD steps (`rule.feedback_lr`; `rule.feedback_warmup` more
    the first time) on its feedback loss at its input. Plain SGD keeps no state, so a resumed
    run continues exactly. Layers with learning 'bp' are skipped; forward weights are untouched."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise RuntimeError("feedback_step: DTP's feedback maps are trained per process, without averaging over "
                           "ranks, so under DDP they would drift apart; train DTP models in one process")
    for m, h in layer_inputs(model, x):
        params = m.feedback_parameters()
        n = m.rule.feedback_iterations + (m.rule.feedback_warmup if int(m.feedback_steps) == 0 else 0)
        m.feedback_steps += 1
        for _ in range(n):
            with torch.enable_grad():
                grads = torch.autograd.grad(m.feedback_loss(h), params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(m.rule.feedback_lr * g)


def _angle(a: Tensor, b: Tensor) -> float:
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(torch.finfo(a.dtype).tiny)
    return math.degrees(math.acos(max(-1.0, min(1.0, float(cos)))))


def update_angles(model: nn.Module, x: Tensor, y: Tensor,
                  loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> list[float]:
    """Per DTP layer, the angle (degrees) between the update its current rule gives the forward
    weights (weight and bias together) and backprop's on the batch (x, y). Layers whose rule
    is None (bp) give 0. No parameter or .grad is changed."""
    layers = dtp_layers(model)
    params = [p for m in layers for p in m.forward_parameters()]

    def grads() -> list[Tensor]:
        loss = loss_fn(model(x), y)
        return [g.flatten() if g is not None else torch.zeros_like(p).flatten()
                for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]

    rule_grads = grads()
    with _rules(model, [None] * len(layers)):
        bp_grads = grads()
    return [_angle(torch.cat(rule_grads[2 * k:2 * k + 2]), torch.cat(bp_grads[2 * k:2 * k + 2]))
            for k in range(len(layers))]


# ---- ff-EBM: DTP feedforward parts, EP energy blocks ------------------------------------------

class DTPFFEBM(FFEBM):
    """An `FFEBM` holding DTP layers: `local_step` (called by the Trainer before each step's
    forward) trains their feedback maps on the batch (`feedback_step`; one forward without
    graph, i.e. one extra free phase per block)."""

    def local_step(self, x: Tensor) -> None:
        feedback_step(self, x)


def dtp_ffebm(in_features: int, blocks: Sequence[Sequence[int]], num_classes: int = 10, learning: str = "dtp-ldrl",
              dtp_settings: dict | None = None, ff_activation: str = "identity", activation: str = "hardsigmoid",
              slope: float = 1.0, alpha: float = 0.5, estimator: str = "ep", estimator_settings: dict | None = None,
              **relax: Any) -> DTPFFEBM:
    """Dense ff-EBM whose feedforward maps are DTP layers and whose blocks learn by `estimator`
    (EP by default): DTPLinear -> DenseHopfield(widths) per block, then a DTP readout. With
    learning 'dtp' or 'dtp-ldrl' no part of the backward is backprop: each block's estimator
    turns the error current at its output into one at its input, which becomes the target of
    the DTP layer below. `ff_activation` is the feedforward layers' activation (their output is
    the block's input current). `dtp_settings` are validated for every learning and unused by
    'bp' (backprop through the feedforward parts, the blocks' estimator for the blocks)."""
    check_positive_int("dtp_ffebm", "in_features", in_features)
    check_relax_settings("dtp_ffebm", relax)
    if not blocks:
        raise ValueError("dtp_ffebm: at least one block (a list of layer widths) is needed")
    make_rule("dtp-ldrl", **(dtp_settings or {}))  # validated whatever the learning; unused by 'bp'
    rule = make_rule(learning, **({} if learning == "bp" else dtp_settings or {}))
    modules: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for k, widths in enumerate(blocks):
        if not isinstance(widths, (list, tuple)) or not widths:
            raise ValueError(f"dtp_ffebm: block {k} must be a non-empty list of layer widths, got {widths!r}")
        modules += [DTPLinear(prev, widths[0], ff_activation, feedback=k > 0, rule=rule, name=f"ff{k + 1}"),
                    DenseHopfield(widths, activation=activation, slope=slope, alpha=alpha,
                                  estimator=make_estimator(estimator, **(estimator_settings or {})),
                                  name=f"block{k + 1}", **relax)]
        prev = widths[-1]
    modules.append(DTPLinear(prev, num_classes, "identity", rule=rule, name="readout"))
    return DTPFFEBM(*modules)
