"""eqprop: feedforward-tied energy-based models trained by Equilibrium Propagation.

Layers (each imports only from those before it): activations, couplings, devices, solvers
-> blocks (energies, relaxation, targets) -> routing, binary, metaplastic -> precision ->
estimators (EP, ID, BPTT, RHEL) -> rules (CL, CpL, TBP), continual, spiking -> registry
(names, set_estimator) -> chain (FFEBM) -> vector_field, target_prop, hamiltonian ->
testing, analysis, training, studies -> cli. docs/theory.md has the mathematics.
"""
from .activations import Activation, HardSigmoid, Identity, Logistic, make_activation
from .blocks import (
                     ConvHopfield,
                     DenseHopfield,
                     DivergenceError,
                     EnergyBlock,
                     HopfieldBlock,
                     RelaxStats,
                     current_target,
                     targets,
)
from .chain import FFEBM, configure_blocks, conv_ffebm, dense_ffebm, relax_stats
from .continual import ContinualEP
from .couplings import ConvCoupling, Coupling, DenseCoupling, goe_, weighted_kaiming_
from .devices import Device, attach_device_writes
from .estimators import BPTT, EP, ID, RHEL, Contrast, ContrastEstimator, Estimator
from .optional import package_version
from .registry import estimator_names, make_estimator, register_estimator, set_estimator, unregister_estimator
from .rules import CL, TBP, CpL
from .spiking import EqSpike, SpikingDenseHopfield
from .target_prop import DTP, DTPConv2d, DTPLinear, DTPNetwork, dtp_ffebm, feedback_step, update_angles
from .vector_field import ConvVF, DenseVF, VectorFieldBlock

__version__: str = package_version("eqprop")

__all__ = [
    "Activation", "HardSigmoid", "Identity", "Logistic", "make_activation",
    "ConvHopfield", "DenseHopfield", "DivergenceError", "EnergyBlock", "HopfieldBlock", "RelaxStats",
    "current_target", "targets",
    "FFEBM", "configure_blocks", "conv_ffebm", "dense_ffebm", "relax_stats",
    "ConvCoupling", "Coupling", "DenseCoupling", "goe_", "weighted_kaiming_",
    "BPTT", "EP", "ID", "RHEL", "Contrast", "ContrastEstimator", "Estimator",
    "estimator_names", "make_estimator", "register_estimator", "set_estimator", "unregister_estimator",
    "CL", "CpL", "TBP", "__version__",
    "EqSpike", "SpikingDenseHopfield",
    "ContinualEP",
    "ConvVF", "DenseVF", "VectorFieldBlock",
    "Device", "attach_device_writes",
    "DTP", "DTPConv2d", "DTPLinear", "DTPNetwork", "dtp_ffebm", "feedback_step", "update_angles",
]
