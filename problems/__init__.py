"""Ready-made bilevel problems, built only on the public surface of ``bilevel`` and ``hypergrad``."""

from problems.cleaning import DigitsCleaning
from problems.constrained import ActiveConstraintP6, CoupledToyP5
from problems.fewshot import ANIL, FOMAML, IMAML, MAML, DigitsTasks, SinusoidMAML, SinusoidTasks
from problems.hpo import LogisticL2
from problems.hyperrep import HyperRepresentation
from problems.mulo import LOMetaTraining
from problems.nonconvex import LayerwiseWeightDecay, NoisyLabelReweighting, ProximalSinusoid
from problems.quadratic import SpectralQuadratic
from problems.reference import BiasedRegularizationP3, QuadraticP1, RidgeP2, WeightedLeastSquaresP4
from problems.reweighting import MetaWeightNet
from problems.sequence import SequenceHyperRep
from problems.svm import SVMHyperparameters

__all__ = [
    "ANIL", "ActiveConstraintP6", "BiasedRegularizationP3", "CoupledToyP5", "DigitsCleaning", "DigitsTasks",
    "FOMAML", "HyperRepresentation", "IMAML", "LOMetaTraining", "LayerwiseWeightDecay", "LogisticL2", "MAML",
    "MetaWeightNet",
    "NoisyLabelReweighting", "SinusoidMAML", "SinusoidTasks",
    "ProximalSinusoid", "QuadraticP1", "RidgeP2", "SVMHyperparameters", "SequenceHyperRep",
    "SpectralQuadratic", "WeightedLeastSquaresP4",
]
