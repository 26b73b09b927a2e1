"""Metaplasticity for binarized weights: an Adam optimizer whose updates that move a hidden
weight towards zero are attenuated (docs/binary.md).

A binarized weight is sign(W_h) of a real hidden weight W_h. With metaplasticity strength
m >= 0, an update dW of W_h is applied as

    dW * (1 - tanh^2(m * W_h))   where sign(dW) = -sign(W_h)  (towards zero: a sign flip),
    dW                           elsewhere                    (away from zero: consolidation),

so hidden weights far from zero, the ones that mattered for earlier tasks, become hard to
flip. m = 0 is plain Adam (the update is the `torch.optim.Adam` one). The base is Adam as in
the metaplasticity paper; `m` is a per-group setting `meta`, and groups with meta = 0 (biases,
batch norm, scales) are trained by plain Adam:

    opt = MetaplasticAdam(metaplastic_groups(model, meta=1.3), lr=5e-3)

It works on any hidden weights: those of a binarized feedforward network trained by backprop
(eqprop.binary.binary_mlp) and the latent weights of binary energy-based blocks trained by EP
(eqprop.binary.binarize_weights).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .binary import latent_weights

__all__ = ["MetaplasticAdam", "metaplastic_factor", "metaplastic_groups"]


def metaplastic_factor(hidden: Tensor, meta: float) -> Tensor:
    """f_meta = 1 - tanh^2(meta * W_h), elementwise."""
    return 1 - torch.tanh(meta * hidden).square()


def _check_meta(meta: Any, where: str) -> None:
    if isinstance(meta, bool) or not isinstance(meta, (int, float)) or not math.isfinite(meta) or meta < 0:
        raise ValueError(f"MetaplasticAdam: meta must be a finite number >= 0{where}, got {meta!r}")


class MetaplasticAdam(torch.optim.Optimizer):
    """Adam (without amsgrad) with metaplastic attenuation of updates towards zero.

    lr, betas, eps, weight_decay: as in torch.optim.Adam (L2 weight decay added to the
    gradient). meta: the metaplasticity strength m >= 0 of a parameter group (default for
    groups that do not set it).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, meta: float = 0.0):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ValueError(f"MetaplasticAdam: lr must be a number >= 0, got {lr!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"MetaplasticAdam: betas must be two numbers in [0, 1), got {betas!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"MetaplasticAdam: eps must be a number >= 0, got {eps!r}")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"MetaplasticAdam: weight_decay must be a number >= 0, got {weight_decay!r}")
        _check_meta(meta, "")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, meta=meta))

    def add_param_group(self, param_group: dict) -> None:
        if "meta" in param_group:
            _check_meta(param_group["meta"], f" (parameter group {len(self.param_groups)})")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam step per parameter, attenuated towards zero where meta > 0."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            meta = group["meta"]
            _check_meta(meta, "")
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MetaplasticAdam does not support sparse gradients")
                grad = p.grad
                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = int(state["step"].item())
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
                bias_correction1 = 1 - beta1 ** t
                bias_correction2_sqrt = math.sqrt(1 - beta2 ** t)
                step_size = group["lr"] / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
                if meta == 0:
                    p.addcdiv_(exp_avg, denom, value=-step_size)
                    continue
                # the update is -step_size * exp_avg / denom: it points towards zero where
                # exp_avg has the sign of p
                towards_zero = (torch.sign(p) * exp_avg) > 0
                scaled = torch.where(towards_zero, exp_avg * metaplastic_factor(p, meta), exp_avg)
                p.addcdiv_(scaled, denom, value=-step_size)
        return loss


def metaplastic_groups(model: nn.Module, meta: float, hidden: Iterable[Tensor] | None = None) -> list[dict]:
    """Two parameter groups of `model` for `MetaplasticAdam`: the hidden weights of its
    binarized weights (or `hidden`, when given) with strength `meta`, and every other
    trainable parameter with meta = 0."""
    _check_meta(meta, "")
    chosen = list(latent_weights(model) if hidden is None else hidden)
    if not chosen:
        raise ValueError(f"metaplastic_groups: {type(model).__name__} has no binarized weights (see "
                         f"eqprop.binary.binarize_weights); pass the hidden weights as `hidden`")
    ids = {id(p) for p in chosen}
    params = [p for p in model.parameters() if p.requires_grad]
    missing = ids - {id(p) for p in params}
    if missing:
        raise ValueError(f"metaplastic_groups: {len(missing)} of the hidden weights are not trainable parameters of "
                         f"{type(model).__name__}")
    rest = [p for p in params if id(p) not in ids]
    groups = [{"params": chosen, "meta": meta}]
    if rest:
        groups.append({"params": rest, "meta": 0.0})
    return groups
