"""Feedforward-tied energy-based models: a chain of feedforward modules and energy-based
blocks, then a readout (docs/theory.md).

    model = FFEBM(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64),
                  ConvHopfield([64, 128], pools="m"),
                  nn.Flatten(), nn.Linear(128 * 16 * 16, 10))

Autograd backpropagates through the feedforward modules; each block's backward is
computed by its estimator (EP unless the block was given another), so `loss.backward()` is
the hybrid algorithm.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from .blocks import RELAX_SETTINGS, ConvHopfield, DenseHopfield, EnergyBlock
from .couplings import init_module_
from .estimators import EP, Estimator
from .registry import make_estimator, set_estimator
from .validate import check_positive_int

__all__ = ["FFEBM", "conv_ffebm", "dense_ffebm", "configure_blocks", "relax_stats", "total_halvings"]


def configure_blocks(model: nn.Module, **settings: Any) -> nn.Module:
    """Set relaxation settings (any of eqprop.blocks.RELAX_SETTINGS: T1, tol, update, first,
    check_every, relax_dtype, check_inputs, device, omega, anderson, compile_sweep) on every
    energy-based block of `model`; nothing changes if one is invalid."""
    blocks = [m for m in model.modules() if isinstance(m, EnergyBlock)]
    if not blocks:
        raise ValueError(f"configure_blocks: {type(model).__name__} holds no energy-based block")
    unknown = set(settings) - set(RELAX_SETTINGS)
    if unknown:
        raise ValueError(f"configure_blocks: unknown relaxation setting(s) {sorted(unknown)}; valid: "
                         f"{', '.join(RELAX_SETTINGS)}")
    old = [{k: getattr(b, k) for k in settings} for b in blocks]
    try:
        for b in blocks:
            b.configure(**settings)
    except ValueError:
        for b, o in zip(blocks, old):
            for k, v in o.items():
                setattr(b, k, v)
        raise
    return model


def relax_stats(model: nn.Module) -> list[dict]:
    """Per energy-based block, the RelaxStats (as dicts) of the phases run by the last
    forward and its backward."""
    return [{phase: st.as_dict() for phase, st in m.last_relax.items()}
            for m in model.modules() if isinstance(m, EnergyBlock)]


class FFEBM(nn.Sequential):
    """An ordered chain of modules, some of which are (or hold) `EnergyBlock`s. Blocks built
    without an estimator get EP with its default settings, and blocks left with their class
    name are named block1, block2, ... in order (error messages name them). `input_shape`
    (without batch), when given, is checked at every forward so that a wrong input size is
    named as such."""

    def __init__(self, *modules: nn.Module, input_shape: Sequence[int] | None = None):
        super().__init__(*modules)
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        for k, b in enumerate(self.blocks):
            if b.estimator is None:
                b.estimator = EP()
            if b.block_name == type(b).__name__:
                b.block_name = f"block{k + 1}"

    @property
    def blocks(self) -> list[EnergyBlock]:
        """Every energy-based block of the chain, nested ones included, in order (the indices
        of `set_estimator(..., blocks=[...])`)."""
        return [m for m in self.modules() if isinstance(m, EnergyBlock)]

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        """Run the chain; `target` goes to the last module, which must then be an energy-based
        block holding the output layer (rules such as cl, cpl and EP with a cost need it)."""
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"FFEBM: the model was built for inputs of shape {self.input_shape} (without batch), "
                             f"got {tuple(x.shape[1:])}")
        if target is not None and not isinstance(self[-1], EnergyBlock):
            raise ValueError(f"FFEBM: a target was given but the last module is {type(self[-1]).__name__}, not an "
                             f"energy-based block holding the output layer")
        for i, m in enumerate(self):
            x = m(x, target) if (target is not None and i == len(self) - 1) else m(x)
        return x

    def set_estimator(self, estimator: str | Estimator, /, blocks: Iterable[int] | None = None,
                      **settings: Any) -> FFEBM:
        """Same as `eqprop.set_estimator(self, ...)`: all blocks or the given block indices."""
        set_estimator(self, estimator, blocks, **settings)
        return self

    def configure_blocks(self, **settings: Any) -> FFEBM:
        """Same as `eqprop.configure_blocks(self, ...)`."""
        configure_blocks(self, **settings)
        return self

    def relax_stats(self) -> list[dict]:
        """Same as `eqprop.relax_stats(self)`."""
        return relax_stats(self)


def check_relax_settings(owner: str, relax: dict) -> None:
    """Builders pass extra keywords to the blocks as relaxation settings: refuse others."""
    unknown = set(relax) - set(RELAX_SETTINGS)
    if unknown:
        raise ValueError(f"{owner}: unknown setting(s) {sorted(unknown)}; block settings are "
                         f"{', '.join(RELAX_SETTINGS)} (estimator settings go in estimator_settings)")


def total_halvings(size: int) -> int:
    """How many 2x2 poolings a size x size input allows before it drops below one pixel."""
    return max(size.bit_length() - 1, 0)


def _feedforward(c_in: int, c_out: int, pool: bool, batchnorm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1)]
    if pool:
        layers.append(nn.MaxPool2d(2, 2))
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    return nn.Sequential(*layers)


def conv_ffebm(blocks: Sequence[dict], num_classes: int = 10, in_size: int = 32, activation: str = "hardsigmoid",
               slope: float = 1.0, init: str = "goe", variance: float = 8.351e-5, alpha: float = 0.5,
               batchnorm: bool = True, last_linear: bool = False, estimator: str | Estimator = "ep",
               estimator_settings: dict | None = None, **relax) -> FFEBM:
    """Build a published-style convolutional ff-EBM in one call.

    Each entry of `blocks` is {'channels': [c_in, c_1, ..., c_K], 'pools': 'm-..', 'fc': [..]}
    with one pool character per convolution. The first convolution (+ its pooling +
    batch-norm) is the feedforward map into the block; the rest are inside the block.
    `relax` holds block settings (T1, tol, update, first, check_every).
    """
    if not blocks:
        raise ValueError("conv_ffebm: at least one block spec is needed")
    check_relax_settings("conv_ffebm", relax)
    modules: list[nn.Module] = []
    size = in_size
    prev = None
    check_positive_int("conv_ffebm", "in_size", in_size)
    for k, spec in enumerate(blocks):
        if not isinstance(spec, dict):
            raise ValueError(f"conv_ffebm: block {k} must be a dict with 'channels', 'pools' and optionally 'fc', "
                             f"got {spec!r}")
        unknown = set(spec) - {"channels", "pools", "fc"}
        if unknown:
            raise ValueError(f"conv_ffebm: block {k} has unknown keys {sorted(unknown)}")
        if "channels" not in spec:
            raise ValueError(f"conv_ffebm: block {k} needs 'channels' ([c_in, c_1, ...]); it has {sorted(spec)}")
        ch, pools, fc = list(spec["channels"]), spec.get("pools", ""), list(spec.get("fc", []))
        if len(ch) < 2 or len(pools) != len(ch) - 1:
            raise ValueError(f"conv_ffebm: block {k} needs channels [c_in, c_1, ...] and one pool per "
                             f"convolution, got channels={ch} pools={pools!r}")
        if prev is not None and ch[0] != prev:
            raise ValueError(f"conv_ffebm: block {k} takes {ch[0]} channels but block {k - 1} gives {prev}")
        if fc and k != len(blocks) - 1:
            raise ValueError(f"conv_ffebm: only the last block may hold dense layers (block {k} has fc={fc})")
        if any(not isinstance(c, int) or isinstance(c, bool) or c <= 0 for c in ch):
            raise ValueError(f"conv_ffebm: block {k} channels must be positive integers, got {ch}")
        halvings = pools.count("m")
        if size >> halvings < 1:
            raise ValueError(f"conv_ffebm: block {k} pools {pools!r} halve its {size}x{size} input {halvings} times, "
                             f"below one pixel; in_size={in_size} allows {total_halvings(in_size)} 2x2 poolings in "
                             f"all")
        ff = _feedforward(ch[0], ch[1], pools[0] == "m", batchnorm)
        init_module_(ff, "kaiming", alpha)
        size = size // 2 if pools[0] == "m" else size
        block = ConvHopfield(ch[1:], pools[1:], fc, in_size=size, activation=activation, slope=slope,
                             last_linear=last_linear and k == len(blocks) - 1, init=init, variance=variance,
                             alpha=alpha, estimator=make_estimator(estimator, **(estimator_settings or {})),
                             name=f"block{k + 1}", **relax)
        for p in pools[1:]:
            size = size // 2 if p == "m" else size
        modules += [ff, block]
        prev = ch[-1]
    last = blocks[-1]
    n_out = last["fc"][-1] if last.get("fc") else prev * size * size
    readout = nn.Linear(n_out, num_classes)
    init_module_(readout, "kaiming", alpha)
    modules += [nn.Flatten(), readout]
    return FFEBM(*modules, input_shape=(blocks[0]["channels"][0], in_size, in_size))


def dense_ffebm(in_features: int, blocks: Sequence[Sequence[int]], num_classes: int = 10,
                activation: str = "hardsigmoid", slope: float = 1.0, alpha: float = 0.5,
                estimator: str | Estimator = "ep", estimator_settings: dict | None = None, **relax) -> FFEBM:
    """Dense ff-EBM: Linear -> DenseHopfield(widths) per block, then a linear readout."""
    def block(widths: list[int], name: str) -> EnergyBlock:
        return DenseHopfield(widths, activation=activation, slope=slope, alpha=alpha,
                             estimator=make_estimator(estimator, **(estimator_settings or {})), name=name, **relax)
    return dense_chain("dense_ffebm", block, in_features, blocks, num_classes, alpha, relax)


def dense_chain(owner: str, make_block: Callable[[list[int], str], EnergyBlock], in_features: int,
                blocks: Sequence[Sequence[int]], num_classes: int, alpha: float, relax: dict) -> FFEBM:
    """The dense ff-EBM of `dense_ffebm` with blocks from make_block(widths, name): Flatten, then
    per block a Linear into its first layer and the block, then a linear readout (weighted
    Kaiming with `alpha`). `owner` names the builder in errors."""
    check_positive_int(owner, "in_features", in_features)
    check_relax_settings(owner, relax)
    if not blocks:
        raise ValueError(f"{owner}: at least one block (a list of layer widths) is needed")
    modules: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for k, widths in enumerate(blocks):
        if not isinstance(widths, (list, tuple)) or not widths:
            raise ValueError(f"{owner}: block {k} must be a non-empty list of layer widths, got {widths!r}")
        ff = nn.Linear(prev, widths[0])
        init_module_(ff, "kaiming", alpha)
        modules += [ff, make_block(list(widths), f"block{k + 1}")]
        prev = widths[-1]
    readout = nn.Linear(prev, num_classes)
    init_module_(readout, "kaiming", alpha)
    return FFEBM(*modules, readout)
