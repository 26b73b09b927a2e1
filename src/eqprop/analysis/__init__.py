"""Analyses of ff-EBMs: static gradient analysis (gdd), splitting study, RHEL checks.

Run them from the command line: `eqprop analyze gdd|splitting|rhel --help`.
"""

__all__: list[str] = []  # the analyses are modules: eqprop.analysis.gdd, .splitting, .rhel
