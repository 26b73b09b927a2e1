"""`eqprop analyze`: dispatch to one analysis (gdd, splitting, rhel, fidelity, stability).

Each analysis module provides `add_arguments(parser)` and `run(args) -> int`; it is
imported only when its analysis runs, and parses the options after the analysis name.
"""
from __future__ import annotations

import argparse
import importlib

__all__ = ["ANALYSES", "add_arguments", "build_parser", "run"]

ANALYSES = {
    "gdd": ("eqprop.analysis.gdd", "static gradient analysis: EP's nudged transient vs truncated BPTT"),
    "splitting": ("eqprop.analysis.splitting",
                  "split a deep Hopfield network into blocks: equilibrium cost and gradients"),
    "rhel": ("eqprop.analysis.rhel", "Recurrent Hamiltonian Echo Learning vs BPTT"),
    "fidelity": ("eqprop.analysis.fidelity",
                 "EP (variants, free or held pooling) against ID and BPTT, at initialisation and checkpoints"),
    "stability": ("eqprop.analysis.stability",
                  "per block and sample, how strongly the sweep contracts at the free state of a checkpoint"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("analysis", choices=sorted(ANALYSES),
                        help="; ".join(f"{k}: {v[1]}" for k, v in ANALYSES.items()))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the analysis' own options (ANALYSIS --help)")


def build_parser(name: str):
    """(parser, module) of one analysis."""
    if name not in ANALYSES:
        raise ValueError(f"eqprop analyze: unknown analysis {name!r}, expected one of {sorted(ANALYSES)}")
    module_name, help_text = ANALYSES[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"eqprop analyze {name}", description=help_text)
    module.add_arguments(parser)
    return parser, module


def run(args: argparse.Namespace) -> int:
    from ..training.config import ConfigError

    parser, module = build_parser(args.analysis)
    options = parser.parse_args(args.options)
    try:
        return int(module.run(options) or 0)
    except ConfigError:
        raise
    except ValueError as e:  # the analyses check their settings with ValueErrors that name them
        raise ConfigError(str(e)) from e
