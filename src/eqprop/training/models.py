"""Build the model a config describes and give it the config's gradient estimator.

`model.kind` picks the builder: conv -> eqprop.chain.conv_ffebm, dense ->
eqprop.chain.dense_ffebm, hssm -> eqprop.hamiltonian.build_hssm, mlp ->
eqprop.target_prop.dtp_mlp (no estimator: `model.learning` is its rule), dtp_dense ->
eqprop.target_prop.dtp_ffebm (imported lazily). The
estimator named by `algorithm` (with its settings from `estimator.<algorithm>`) is then set
on every block with `eqprop.set_estimator`, and `relax_dtype` on every energy-based block
with `eqprop.configure_blocks`.

`model.kind: vf_dense` builds eqprop.vector_field.dense_vf_ffebm: dense blocks with separate
backward weights (vector-field EP; docs/local_learning.md).

Options of `model.kind: conv` handled here rather than by the builder:
  readout:     true (default): a linear readout after the last block. false: the last
               block holds the output layer (num_classes units appended to its `fc`), so
               rules that need the target (cl, cpl, EP with a cost) can train it.
  output_bias: with readout false, fill the output layer's bias with this value (e.g. 0.5
               starts hard-sigmoid output units inside their range); null keeps the init's.
  pad_to:      zero-pad the (normalised) images to this square size first (e.g. 28 -> 32).

Any kind with energy-based blocks also takes `binary: {weights: true, activations: false,
scale: init, threshold: 0.0}`: binary weights and/or step neurons in every block
(eqprop.binary.binarize_model).
"""
from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..blocks import EnergyBlock
from ..chain import FFEBM, configure_blocks, relax_stats
from ..registry import set_estimator
from ..spiking import make_spiking_
from .config import RELAX_KEYS, ConfigError

__all__ = ["CONV_OPTIONS", "DTYPES", "RELAX_KEYS", "build_model", "configure_compile", "configure_estimator",
           "configure_relax_dtype", "estimator_settings", "model_inputs", "relax_summary"]

CONV_OPTIONS = ("readout", "output_bias", "pad_to")
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
    if kind == "spiking_dense":
        return spiking_dense_ffebm
    if kind == "mlp":
        from ..target_prop import dtp_mlp
        return dtp_mlp
    if kind == "dtp_dense":
        from ..target_prop import dtp_ffebm
        return dtp_ffebm
    if kind == "vf_dense":
        from ..vector_field import dense_vf_ffebm
        return dense_vf_ffebm
    raise ConfigError(f"config key 'model.kind' must be conv, dense, hssm, spiking_dense, vf_dense, mlp or dtp_dense, "
                      f"got {kind!r}")


def spiking_dense_ffebm(in_features: int, blocks: list, num_classes: int = 10, activation: str = "hardsigmoid",
                        slope: float = 1.0, alpha: float = 0.5, spiking: str = "deterministic", threshold: float = 1.0,
                        tau: float = 10.0, dt: float = 1.0, rate: float = 1.0, **relax) -> FFEBM:
    """model.kind=spiking_dense: the network of kind dense (the same weights for the same seed)
    with spiking neurons in its blocks (eqprop.spiking; the spike settings are model keys)."""
    from ..chain import dense_ffebm
    model = dense_ffebm(in_features, blocks, num_classes, activation, slope, alpha, **relax)
    return make_spiking_(model, spiking=spiking, threshold=threshold, tau=tau, dt=dt, rate=rate)


def _check_keys(kind: str, builder: Callable, settings: dict) -> None:
    """Unknown model settings are errors that list the valid ones; the estimator is never a
    model setting (it comes from `algorithm` and `estimator.<algorithm>`)."""
    misplaced = {"estimator", "estimator_settings"} & set(settings)
    if misplaced:
        raise ConfigError(f"model.{sorted(misplaced)[0]}: the estimator is chosen by the config keys 'algorithm' and "
                          f"'estimator.<algorithm>', not inside 'model'")
    params = inspect.signature(builder).parameters
    if kind == "hssm":
        return  # build_hssm checks its own settings
    allowed = {n for n, p in params.items() if p.kind != p.VAR_KEYWORD} | set(RELAX_KEYS)
    allowed -= {"estimator", "estimator_settings"}
    if kind == "conv":
        allowed |= set(CONV_OPTIONS)
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


def _image_size(settings: dict, shape: tuple) -> int:
    """The square size the first block sees: the images', or `pad_to` when larger."""
    if shape[1] != shape[2]:
        raise ConfigError(f"model.kind=conv expects square images, got {shape[1]}x{shape[2]}")
    pad_to = settings.get("pad_to")
    if pad_to is None:
        return shape[1]
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < shape[1]:
        raise ConfigError(f"model.pad_to must be an integer >= the image size {shape[1]}, got {pad_to!r}")
    return pad_to


def _conv_settings(settings: dict, data_info: dict[str, Any]) -> dict:
    """Check that images fit the conv model and fill in its input size and classes."""
    shape = data_info["shape"]
    if data_info["kind"] != "image" or len(shape) != 3:
        raise ConfigError(f"model.kind=conv needs images (C, H, W), the dataset gives {data_info['kind']}s {shape}")
    blocks = settings.get("blocks")
    _check_conv_blocks(blocks)
    first = blocks[0]["channels"][0]
    if first != shape[0]:
        raise ConfigError(f"model.blocks[0].channels[0] is {first} but the dataset's images have {shape[0]} "
                          f"channel(s)")
    settings.setdefault("in_size", _image_size(settings, shape))
    settings.setdefault("num_classes", data_info["num_classes"])
    return settings


def _check_conv_blocks(blocks: Any) -> None:
    """Each block spec of model.kind=conv is a mapping with a list of channels."""
    if not isinstance(blocks, list) or not blocks:
        raise ConfigError(f"model.blocks must be a non-empty list of block specs ({{channels: [c_in, c_1, ...], "
                          f"pools: 'm-', fc: [...]}}), got {blocks!r}")
    for k, spec in enumerate(blocks):
        if not isinstance(spec, dict):
            raise ConfigError(f"model.blocks[{k}] must be a mapping with 'channels' and 'pools', got {spec!r}")
        if "channels" not in spec:
            raise ConfigError(f"model.blocks[{k}] has no 'channels' (the list [c_in, c_1, ...] of its channel "
                              f"counts); it has {sorted(spec)}")
        ch = spec["channels"]
        if not isinstance(ch, list) or len(ch) < 2 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                                          for c in ch):
            raise ConfigError(f"model.blocks[{k}].channels must be a list of at least two positive integers "
                              f"[c_in, c_1, ...], got {ch!r}")


def _inputs(kind: str, settings: dict, data_info: dict[str, Any]) -> dict:
    """The builder's settings completed from the data (sizes, features, classes)."""
    shape = data_info["shape"]
    if kind == "conv":
        return _conv_settings(settings, data_info)
    if kind == "vf_dense":
        settings.setdefault("in_features", math.prod(shape))
        settings.setdefault("num_classes", data_info["num_classes"])
        return settings
    if kind == "spiking_dense":
        settings.setdefault("in_features", math.prod(shape))
        settings.setdefault("num_classes", data_info["num_classes"])
        return settings
    if kind in ("dense", "mlp", "dtp_dense"):
        settings.setdefault("in_features", math.prod(shape))
    else:
        if data_info["kind"] != "sequence":
            raise ConfigError(f"model.kind=hssm needs sequences (T, F), the dataset gives {data_info['kind']}s")
        settings.setdefault("in_features", shape[-1])
    settings.setdefault("num_classes", data_info["num_classes"])
    return settings


def _conv_model(builder: Callable[..., nn.Module], settings: dict, side: int) -> nn.Module:
    """conv_ffebm, then the options of CONV_OPTIONS: no readout (the last block holds the
    output layer), the output layer's bias, zero-padding of `side`-pixel images."""
    readout, bias, pad_to = (settings.pop(k, d) for k, d in (("readout", True), ("output_bias", None),
                                                             ("pad_to", None)))
    if not isinstance(readout, bool):
        raise ConfigError(f"model.readout must be true or false, got {readout!r}")
    if bias is not None and readout:
        raise ConfigError("model.output_bias applies to the output layer of a model without readout "
                          "(model.readout=false)")
    if not readout:
        settings["blocks"] = copy.deepcopy(settings["blocks"])
        last = settings["blocks"][-1]
        last["fc"] = [*(last.get("fc") or []), settings["num_classes"]]
    modules = list(builder(**settings))
    if not readout:
        modules = modules[:-2]  # Flatten and the linear readout
        if bias is not None:
            with torch.no_grad():
                modules[-1].couplings[-1].bias.fill_(float(bias))
    if pad_to is not None and pad_to > side:
        a = pad_to - side
        modules.insert(0, nn.ZeroPad2d((a // 2, a - a // 2, a // 2, a - a // 2)))
    return FFEBM(*modules)


def build_model(cfg: dict, data_info: dict[str, Any]) -> nn.Module:
    """The model of `cfg` for data described by `model_inputs(dataset)`, with its estimator
    and relaxation dtype set."""
    settings = dict(cfg["model"])
    kind = settings.pop("kind")
    binary = settings.pop("binary", None)  # eqprop.binary.binarize_model's settings, applied after building
    builder = _builder(kind)
    _check_keys(kind, builder, settings)
    settings = _inputs(kind, settings, data_info)
    relax = {k: settings.pop(k) for k in RELAX_KEYS if k in settings} if kind != "hssm" else {}
    try:
        if kind == "conv":
            model = _conv_model(builder, settings, data_info["shape"][-1])
        else:
            model = builder(**settings)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model.kind={kind}: {e}") from e
    for key, value in relax.items():  # one at a time, so that the error names the key
        try:
            configure_blocks(model, **{key: value})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.{key}={value!r}: {e}") from e
    if binary is not None:
        from ..binary import binarize_model
        try:
            binarize_model(model, binary)
        except ValueError as e:
            raise ConfigError(f"model.binary={binary!r}: {e}") from e
    if kind == "mlp":  # no energy-based block: model.learning is the rule (eqprop.target_prop)
        if cfg["algorithm"] != "ep" or cfg.get("relax_dtype") is not None or cfg.get("compile"):
            raise ConfigError(f"model.kind=mlp has no energy-based block: its learning rule is model.learning (dtp, "
                              f"dtp-ldrl or bp); leave algorithm at ep, relax_dtype null and compile false, got "
                              f"algorithm={cfg['algorithm']} relax_dtype={cfg.get('relax_dtype')} "
                              f"compile={cfg.get('compile')}")
        return model
    configure_estimator(model, cfg)
    configure_relax_dtype(model, cfg)
    configure_compile(model, cfg)
    return model


def estimator_settings(cfg: dict) -> dict:
    """The settings of the config's algorithm (`estimator.<algorithm>`, empty if absent)."""
    return dict(cfg["estimator"].get(cfg["algorithm"]) or {})


def configure_estimator(model: nn.Module, cfg: dict) -> None:
    """eqprop.set_estimator(model, algorithm, **estimator.<algorithm>), with errors that name
    the config keys."""
    name, settings = cfg["algorithm"], estimator_settings(cfg)
    try:
        set_estimator(model, name, **settings)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"algorithm={name} with estimator.{name}={settings}: {e}") from None


def configure_relax_dtype(model: nn.Module, cfg: dict) -> None:
    """Run every energy-based block's relaxations in `relax_dtype` (null: the parameters'
    dtype). A model without energy-based blocks (an HSSM) cannot take one."""
    name = cfg.get("relax_dtype")
    if name is None:
        return
    if name not in DTYPES:
        raise ConfigError(f"config key 'relax_dtype' must be one of {[None, *DTYPES]}, got {name!r}")
    if not any(isinstance(m, EnergyBlock) for m in model.modules()):
        raise ConfigError(f"relax_dtype={name}: {type(model).__name__} has no energy-based block whose relaxation "
                          f"it could set; remove relax_dtype (precision= sets autocast for the other parts)")
    configure_blocks(model, relax_dtype=DTYPES[name])


def configure_compile(model: nn.Module, cfg: dict) -> None:
    """compile=true: every energy-based block runs its relaxation sweeps through torch.compile
    (`EnergyBlock.compile_sweep`); the feedforward parts, run once per step, stay eager."""
    if not cfg.get("compile"):
        return
    if not any(isinstance(m, EnergyBlock) for m in model.modules()):
        raise ConfigError(f"compile=true compiles the relaxation sweeps of energy-based blocks and "
                          f"{type(model).__name__} has none; set compile=false")
    try:
        configure_blocks(model, compile_sweep=True)
    except ValueError as e:
        raise ConfigError(f"compile=true: {e}") from e


def relax_health(model: nn.Module) -> dict[str, float]:
    """Per block and phase of the last forward/backward: iterations, last relative change and
    (when a tolerance was asked for) 1.0/0.0 for converged, keyed 'eq_<block>_<phase>_<stat>';
    the trainer logs their means over an epoch."""
    out: dict[str, float] = {}
    for m in model.modules():
        if isinstance(m, EnergyBlock):
            for phase, st in m.last_relax.items():
                key = f"eq_{m.block_name}_{phase}"
                out[f"{key}_iters"] = float(st.iters)
                out[f"{key}_residual"] = float(st.residual)
                if st.converged is not None:
                    out[f"{key}_converged"] = float(st.converged)
    return out


def relax_summary(model: nn.Module) -> dict[str, float]:
    """Mean iterations of each phase over the blocks after the last forward/backward, from
    eqprop.relax_stats (empty for models without energy-based blocks)."""
    out: dict[str, list[int]] = {}
    for block in relax_stats(model):
        for phase, st in block.items():
            out.setdefault(phase, []).append(st["iters"])
    return {phase: sum(v) / len(v) for phase, v in out.items()}
