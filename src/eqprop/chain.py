"""Feedforward-tied energy-based models (SPEC §2): a chain of feedforward modules and
energy-based blocks, then a readout.

    model = FFEBM(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64),
                  ConvHopfield([64, 128], pools="m"),
                  nn.Flatten(), nn.Linear(128 * 16 * 16, 10))

Autograd backpropagates through the feedforward modules; each block's backward is
computed by its estimator (EP by default), so `loss.backward()` is the hybrid algorithm.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from torch import nn

from .blocks import ConvHopfield, DenseHopfield, EnergyBlock
from .couplings import init_module_
from .estimators import Estimator, make_estimator


class FFEBM(nn.Sequential):
    """An ordered chain of modules, some of which are `EnergyBlock`s."""

    @property
    def blocks(self) -> list[EnergyBlock]:
        return [m for m in self if isinstance(m, EnergyBlock)]

    def set_estimator(self, estimator: str | Estimator, blocks: Iterable[int] | None = None, **settings) -> "FFEBM":
        """Use `estimator` ('ep', 'id', 'bptt' or an instance) for all blocks or the given
        block indices; no rebuild, parameters untouched."""
        all_blocks = self.blocks
        idx = range(len(all_blocks)) if blocks is None else list(blocks)
        for i in idx:
            if not 0 <= i < len(all_blocks):
                raise ValueError(f"set_estimator: block index {i} out of range (model has {len(all_blocks)} blocks)")
            all_blocks[i].estimator = make_estimator(estimator, **settings)
        return self

    def configure_blocks(self, **settings) -> "FFEBM":
        """Set relaxation settings (T1, tol, update, first, check_every) on every block."""
        for b in self.blocks:
            for k, v in settings.items():
                if not hasattr(b, k) or k not in ("T1", "tol", "update", "first", "check_every"):
                    raise ValueError(f"configure_blocks: unknown relaxation setting {k!r}")
                setattr(b, k, v)
            b.validate()
        return self

    def relax_stats(self) -> list[dict]:
        """Per block, the RelaxStats of the phases run by the last forward/backward."""
        return [{phase: st.as_dict() for phase, st in b.stats.items()} for b in self.blocks]


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
    """Build a published-style convolutional ff-EBM (SPEC §6) in one call.

    Each entry of `blocks` is {'channels': [c_in, c_1, ..., c_K], 'pools': 'm-..', 'fc': [..]}
    with one pool character per convolution. The first convolution (+ its pooling +
    batch-norm) is the feedforward map into the block; the rest are inside the block.
    `relax` holds block settings (T1, tol, update, first, check_every).
    """
    if not blocks:
        raise ValueError("conv_ffebm: at least one block spec is needed")
    modules: list[nn.Module] = []
    size = in_size
    prev = None
    for k, spec in enumerate(blocks):
        unknown = set(spec) - {"channels", "pools", "fc"}
        if unknown:
            raise ValueError(f"conv_ffebm: block {k} has unknown keys {sorted(unknown)}")
        ch, pools, fc = list(spec["channels"]), spec.get("pools", ""), list(spec.get("fc", []))
        if len(ch) < 2 or len(pools) != len(ch) - 1:
            raise ValueError(f"conv_ffebm: block {k} needs channels [c_in, c_1, ...] and one pool per "
                             f"convolution, got channels={ch} pools={pools!r}")
        if prev is not None and ch[0] != prev:
            raise ValueError(f"conv_ffebm: block {k} takes {ch[0]} channels but block {k - 1} gives {prev}")
        if fc and k != len(blocks) - 1:
            raise ValueError(f"conv_ffebm: only the last block may hold dense layers (block {k} has fc={fc})")
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
    return FFEBM(*modules)


def dense_ffebm(in_features: int, blocks: Sequence[Sequence[int]], num_classes: int = 10,
                activation: str = "hardsigmoid", slope: float = 1.0, alpha: float = 0.5,
                estimator: str | Estimator = "ep", estimator_settings: dict | None = None, **relax) -> FFEBM:
    """Dense ff-EBM: Linear -> DenseHopfield(widths) per block, then a linear readout."""
    modules: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for k, widths in enumerate(blocks):
        ff = nn.Linear(prev, widths[0])
        init_module_(ff, "kaiming", alpha)
        modules += [ff, DenseHopfield(widths, activation=activation, slope=slope, alpha=alpha,
                                      estimator=make_estimator(estimator, **(estimator_settings or {})),
                                      name=f"block{k + 1}", **relax)]
        prev = widths[-1]
    readout = nn.Linear(prev, num_classes)
    init_module_(readout, "kaiming", alpha)
    return FFEBM(*modules, readout)
