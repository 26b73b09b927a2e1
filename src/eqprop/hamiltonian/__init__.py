"""Hamiltonian recurrent units, RHEL and Hamiltonian SSMs (docs/theory.md)."""
from .hssm import HSSM, HSSMBlock, build_hssm
from .rhel import echo, reverse, rhel_readout
from .units import HRU, LinearHRU, NonlinearHRU, make_hru

__all__ = ["HRU", "LinearHRU", "NonlinearHRU", "make_hru", "echo", "reverse", "rhel_readout",
           "HSSM", "HSSMBlock", "build_hssm"]
