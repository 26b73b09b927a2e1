"""Hamiltonian state-space models (HSSM): HRU blocks tied by digital parts (docs/theory.md).

    x -> Linear encoder -> N x [ h + Dropout(GLU(Dropout(act(HRU(LayerNorm(h)))))) ]
      -> mean over time or last step -> Linear readout

Autograd backpropagates through the digital parts; each HRU's backward is RHEL or BPTT
(`model.set_estimator`), so `loss.backward()` is end-to-end RHEL/BP, like an ff-EBM.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from ..estimators import Estimator
from ..registry import set_estimator
from .units import HRU, check_sequence, make_hru

__all__ = ["HSSM", "HSSMBlock", "build_hssm", "ACTIVATIONS", "READOUTS"]

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "identity": nn.Identity}
READOUTS = ("mean", "last")


class HSSMBlock(nn.Module):
    """Pre-norm residual block around one HRU."""

    def __init__(self, hidden: int, state_size: int, unit: str = "linear", activation: str = "gelu",
                 dropout: float = 0.0, **hru_settings):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"HSSMBlock: unknown activation {activation!r}, expected one of {sorted(ACTIVATIONS)}")
        self.norm = nn.LayerNorm(hidden)
        self.hru = make_hru(unit, hidden, state_size, **hru_settings)
        self.act = ACTIVATIONS[activation]()
        self.glu = nn.Linear(hidden, 2 * hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        x = self.drop(self.act(self.hru(self.norm(h))))
        return h + self.drop(nn.functional.glu(self.glu(x), dim=-1))


class HSSM(nn.Module):
    """(batch, time, in_features) -> (batch, num_classes) logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64, state_size: int = 64,
                 n_blocks: int = 2, unit: str = "linear", readout: str = "mean", dropout: float = 0.0,
                 activation: str = "gelu", estimator: str | Estimator = "rhel",
                 estimator_settings: dict | None = None, scan: str = "loop", dt_min: float = 0.01,
                 dt_max: float = 0.1, chunk: int = 32):
        super().__init__()
        for name, v in (("in_features", in_features), ("num_classes", num_classes), ("hidden", hidden),
                        ("state_size", state_size), ("n_blocks", n_blocks)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"HSSM: {name} must be a positive integer, got {v!r}")
        if readout not in READOUTS:
            raise ValueError(f"HSSM: unknown readout {readout!r}, expected one of {READOUTS}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"HSSM: dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.readout = in_features, readout
        self.encoder = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(
            HSSMBlock(hidden, state_size, unit, activation, dropout, estimator=estimator,
                      estimator_settings=estimator_settings, scan=scan, dt_min=dt_min, dt_max=dt_max,
                      chunk=chunk)
            for _ in range(n_blocks))
        self.head = nn.Linear(hidden, num_classes)

    @property
    def hrus(self) -> list[HRU]:
        return [b.hru for b in self.blocks]

    def set_estimator(self, estimator: str | Estimator, /, blocks: Iterable[int] | None = None,
                      **settings: Any) -> HSSM:
        """Same as `eqprop.set_estimator(self, ...)`: 'rhel' or 'bptt' (through every time step)
        for every HRU or the given indices; parameters untouched."""
        set_estimator(self, estimator, blocks, **settings)
        return self

    def set_scan(self, scan: str) -> HSSM:
        for hru in self.hrus:
            hru.set_scan(scan)
        return self

    def forward(self, x: Tensor) -> Tensor:
        check_sequence("HSSM", x, self.in_features)
        h = self.encoder(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1) if self.readout == "mean" else h[:, -1])


def build_hssm(**settings) -> HSSM:
    """An HSSM from a config's model settings (in_features, num_classes, hidden, state_size,
    n_blocks, unit linear|nonlinear, readout mean|last, dropout, activation, estimator
    rhel|bptt, estimator_settings, scan loop|parallel, dt_min, dt_max, chunk)."""
    allowed = set(inspect.signature(HSSM.__init__).parameters) - {"self"}
    unknown = set(settings) - allowed
    if unknown:
        raise ValueError(f"build_hssm: unknown setting(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    for key in ("in_features", "num_classes"):
        if key not in settings:
            raise ValueError(f"build_hssm: missing required setting {key!r}")
    return HSSM(**settings)
