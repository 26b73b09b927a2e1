"""The benchmark models, their estimators and inputs, and timing.

Models (docs/theory.md; the published splitting and scaling runs): L6 = the 2-block split of
the L = 6 DHN (T1 = 60, T2 = 20, slope 1, GOE V = 8.351e-5), L6x3 its 3-block split, L6x1 the
unsplit DHN; L12 = the 6-block split of the L = 12 DHN of the scaling chains (T1 = 15, T2 = 5,
slope 0.5, V = 4.9e-5). Centered EP with beta = 0.2 throughout. Inputs are a fixed random batch.
"""
from __future__ import annotations

from eqprop.analysis.common import block_inputs, synthetic_images, timed, train_step
from eqprop.analysis.splitting import DHN_L6, DHN_L12, dhn_model
from eqprop.chain import FFEBM

__all__ = ["MODELS", "BETA", "ESTIMATORS", "build", "use_estimator", "batch", "wall", "timed", "train_step",
           "block_inputs"]

MODELS = {
    "L6": dict(dhn=DHN_L6, n_blocks=2, slope=1.0, variance=8.351e-5, alpha=0.5, T1=60, T2=20),
    "L6x1": dict(dhn=DHN_L6, n_blocks=1, slope=1.0, variance=8.351e-5, alpha=0.5, T1=60, T2=20),
    "L6x3": dict(dhn=DHN_L6, n_blocks=3, slope=1.0, variance=8.351e-5, alpha=0.5, T1=60, T2=20),
    "L12": dict(dhn=DHN_L12, n_blocks=6, slope=0.5, variance=4.9e-5, alpha=0.99, T1=15, T2=5),
}
BETA = 0.2
ESTIMATORS = ("ep", "id", "bptt")


def build(name: str, div: int, device, estimator: str = "ep", T2: int | None = None, seed: int = 0) -> FFEBM:
    """Benchmark model `name` with every width divided by `div`, async updates, in train mode."""
    cfg = MODELS[name]
    model = dhn_model(cfg["dhn"], cfg["n_blocks"], div, seed, slope=cfg["slope"], variance=cfg["variance"],
                      alpha=cfg["alpha"], T1=cfg["T1"], update="async")
    use_estimator(model, estimator, cfg["T2"] if T2 is None else T2)
    return model.to(device).train()


def use_estimator(model: FFEBM, estimator: str, T2: int) -> None:
    """ep (centered, beta = BETA), bptt or id on every block, with T2 steps where it has any."""
    settings = {"ep": {"beta": BETA, "T2": T2}, "bptt": {"T2": T2}, "id": {}}[estimator]
    model.set_estimator(estimator, **settings)


def batch(n: int, device, seed: int = 0):
    """A fixed batch of n CIFAR-shaped Gaussian images and labels."""
    return synthetic_images(n, 32, 10, seed, device=device)


def wall(fn, *args, device=None) -> float:
    """Wall seconds of fn(*args) (device synchronised)."""
    return timed(fn, *args, device=device)[0]
