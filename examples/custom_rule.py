"""A new learning rule in one file: EP with unequal nudges, +beta_plus against -beta_minus.
Its estimate is biased at first order in beta_plus - beta_minus and equals centered EP when
the two are equal. Only `contrast` is written: it returns the two states to contrast."""
from dataclasses import dataclass
from typing import ClassVar

import torch

import eqprop
from eqprop.estimators import normalized_current
from eqprop.testing import check_estimator


@dataclass(frozen=True, kw_only=True)
class SkewEP(eqprop.ContrastEstimator):
    beta_plus: float = 0.2
    beta_minus: float = 0.1
    name: ClassVar[str] = "skew-ep"

    def validate(self) -> None:
        super().validate()
        if not (self.beta_plus > 0 and self.beta_minus > 0):
            raise ValueError(f"skew-ep: beta_plus and beta_minus must be > 0, got {self.beta_plus}, {self.beta_minus}")

    def contrast(self, block, u, s, delta, target):
        delta_hat, scale = normalized_current(delta, "sample")
        stats = {}
        plus, stats["nudged+"] = self.relax(block, u, s, nudge=-self.beta_plus * delta_hat)
        minus, stats["nudged-"] = self.relax(block, u, s, nudge=self.beta_minus * delta_hat)
        return eqprop.Contrast(plus, minus, self.beta_plus + self.beta_minus, scale, stats)


eqprop.register_estimator("skew-ep", SkewEP, replace=True)

if __name__ == "__main__":
    torch.manual_seed(0)
    block = eqprop.DenseHopfield([4, 6, 3], activation="sigmoid", T1=400, tol=1e-12)
    u = torch.randn(3, 4)
    for b in (1e-2, 1e-3, 1e-4):
        rule = eqprop.make_estimator("skew-ep", beta_plus=b, beta_minus=b / 2, T2=400, tol=1e-12)
        report = check_estimator(block, rule, u)
        print(f"beta_plus={b:g}: cosine {report.cosine:.8f}, relative error {report.rel_error:.2e}")
