"""Build the model a config describes and give it the config's gradient estimator.

`model.kind` picks the builder: conv -> eqprop.chain.conv_ffebm, dense ->
eqprop.chain.dense_ffebm, hssm -> eqprop.hamiltonian.build_hssm (imported lazily). The
estimator named by `algorithm` (with its settings from `estimator.<algorithm>`) is then set
on every block through the model's `set_estimator`.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
from torch import nn

from .config import ConfigError

RELAX_KEYS = ("T1", "tol", "update", "first", "check_every")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def _builder(kind: str) -> Callable[..., nn.Module]:
    if kind == "conv":
        from ..chain import conv_ffebm
        return conv_ffebm
    if kind == "dense":
        from ..chain import dense_ffebm
        return dense_ffebm
    if kind == "hssm":
        from ..hamiltonian import build_hssm
        return build_hssm
    raise ConfigError(f"config key 'model.kind' must be conv, dense or hssm, got {kind!r}")


def _check_keys(kind: str, builder: Callable, settings: dict) -> None:
    params = inspect.signature(builder).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()) and kind == "hssm":
        return  # build_hssm checks its own settings
    allowed = {n for n, p in params.items() if p.kind != p.VAR_KEYWORD} | set(RELAX_KEYS)
    allowed -= {"estimator", "estimator_settings"}
    unknown = set(settings) - allowed
    if unknown:
        raise ConfigError(f"model.kind={kind}: unknown model setting(s) {sorted(unknown)}; "
                          f"valid: kind, {', '.join(sorted(allowed))}")


def model_inputs(dataset) -> dict[str, Any]:
    """What the builders need to know about the data: classes, channels, size or features."""
    shape = tuple(dataset.x.shape[1:])
    info: dict[str, Any] = {"num_classes": dataset.num_classes, "kind": dataset.kind, "shape": shape}
    if dataset.num_classes < 1:
        raise ConfigError(f"dataset {dataset.name!r} is a regression set; the trainer handles classification only")
    return info


def build_model(cfg: dict, data_info: dict[str, Any]) -> nn.Module:
    """The model of `cfg` for data described by `model_inputs(dataset)`, with its estimator set."""
    settings = dict(cfg["model"])
    kind = settings.pop("kind")
    builder = _builder(kind)
    _check_keys(kind, builder, settings)
    shape = data_info["shape"]
    if kind == "conv":
        if data_info["kind"] != "image" or len(shape) != 3:
            raise ConfigError(f"model.kind=conv needs images (C, H, W), the dataset gives {data_info['kind']}s {shape}")
        blocks = settings.get("blocks") or []
        first = blocks[0].get("channels", [None])[0] if blocks and isinstance(blocks[0], dict) else None
        if first != shape[0]:
            raise ConfigError(f"model.blocks[0].channels[0] is {first} but the dataset's images have {shape[0]} "
                              f"channel(s)")
        if shape[1] != shape[2]:
            raise ConfigError(f"model.kind=conv expects square images, got {shape[1]}x{shape[2]}")
        settings.setdefault("in_size", shape[1])
        settings.setdefault("num_classes", data_info["num_classes"])
    elif kind == "dense":
        settings.setdefault("in_features", math.prod(shape))
        settings.setdefault("num_classes", data_info["num_classes"])
    else:
        if data_info["kind"] != "sequence":
            raise ConfigError(f"model.kind=hssm needs sequences (T, F), the dataset gives {data_info['kind']}s")
        settings.setdefault("in_features", shape[-1])
        settings.setdefault("num_classes", data_info["num_classes"])
    try:
        model = builder(**settings)
    except TypeError as e:
        raise ConfigError(f"model.kind={kind}: {e}") from None
    set_estimator(model, cfg)
    return model


def estimator_settings(cfg: dict) -> dict:
    return dict(cfg["estimator"].get(cfg["algorithm"]) or {})


def set_estimator(model: nn.Module, cfg: dict) -> None:
    """model.set_estimator(algorithm, **estimator.<algorithm>) with errors that name the keys."""
    if not hasattr(model, "set_estimator"):
        raise ConfigError(f"{type(model).__name__} has no set_estimator; cannot use algorithm={cfg['algorithm']}")
    try:
        model.set_estimator(cfg["algorithm"], **estimator_settings(cfg))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"algorithm={cfg['algorithm']} with estimator.{cfg['algorithm']}="
                          f"{estimator_settings(cfg)}: {e}") from None
    if cfg.get("relax_dtype"):
        for block in getattr(model, "blocks", []):
            if hasattr(block, "relax_dtype"):
                block.relax_dtype = DTYPES[cfg["relax_dtype"]]


def relax_summary(model: nn.Module) -> dict[str, float]:
    """Mean iterations of each phase over the blocks after the last forward/backward
    (empty for models without relaxation statistics)."""
    stats = getattr(model, "relax_stats", None)
    if stats is None:
        return {}
    out: dict[str, list[int]] = {}
    for block in stats():
        for phase, st in block.items():
            out.setdefault(phase, []).append(st["iters"])
    return {phase: sum(v) / len(v) for phase, v in out.items()}


def blocks_outside_autocast(model: nn.Module) -> None:
    """Run every energy-based block with autocast off and a full-precision input current.

    `precision=bf16|fp16` autocasts the feedforward parts and the readout; a block's
    relaxations (and its estimator's backward, which runs outside any autocast context) keep
    the parameters' dtype, or `relax_dtype` when set, so forward and backward agree.
    """
    from ..blocks import EnergyBlock

    for block in model.modules():
        if isinstance(block, EnergyBlock) and not getattr(block, "_outside_autocast", False):
            inner = block.forward

            def forward(u, _inner=inner, _block=block):
                dtype = next(_block.parameters()).dtype
                with torch.autocast(u.device.type, enabled=False):
                    return _inner(u.to(dtype))
            block.forward = forward
            block._outside_autocast = True
