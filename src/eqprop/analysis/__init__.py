"""Analyses of ff-EBMs: static gradient analysis (gdd), splitting study, RHEL checks, gradient fidelity.

Run them from the command line: `eqprop analyze gdd|splitting|rhel|fidelity --help`.
"""

__all__: list[str] = []  # the analyses are modules: eqprop.analysis.gdd, .splitting, .rhel, .fidelity
