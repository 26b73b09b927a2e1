"""eqprop: feedforward-tied energy-based models trained by Equilibrium Propagation."""
from .activations import Activation, HardSigmoid, Identity, Logistic, make_activation
from .blocks import ConvHopfield, DenseHopfield, DivergenceError, EnergyBlock, HopfieldBlock, RelaxStats
from .chain import FFEBM, conv_ffebm, dense_ffebm
from .couplings import ConvCoupling, Coupling, DenseCoupling, goe_, weighted_kaiming_
from .estimators import BPTT, EP, ID, Estimator, make_estimator

__version__: str = __import__("eqprop.optional", fromlist=["package_version"]).package_version("eqprop")
from . import rules  # registers the learning-rule family (cl, pep, nep, cep, pcpl, ncpl, ccpl, tbp, rbp)
