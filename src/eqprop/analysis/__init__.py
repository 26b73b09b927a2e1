"""Analyses of ff-EBMs: static gradient analysis (gdd), splitting study, RHEL checks.

Run them from the command line: `eqprop analyze gdd|splitting|rhel --help`.
"""
