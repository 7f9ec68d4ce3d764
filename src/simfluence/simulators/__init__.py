"""Training-run simulators: one protocol (:class:`Simulator`), one module per method."""

from simfluence.simulators.additive import AdditiveSimulator
from simfluence.simulators.base import NotFittedError, Simulator, simulator_kinds
from simfluence.simulators.baselines import ConstantSimulator, MeanTrajectorySimulator
from simfluence.simulators.featurized import FeaturizedSimulator
from simfluence.simulators.gradient import (GradDotScaledSimulator, GradDotSimulator, InfluenceScaledSimulator,
                                            InfluenceSimulator, TracInCPScaledSimulator, TracInCPSimulator)
from simfluence.simulators.linear import LinearIdentitySimulator, LinearSimulator
from simfluence.simulators.interaction import PairwiseSimulator
from simfluence.simulators.uncertainty import BootstrapLinearSimulator
from simfluence.simulators.trajectory import TrajectorySimulator
from simfluence.simulators.auto import AutoSimulator

SIMULATORS = {cls.kind: cls for cls in (
    LinearSimulator, LinearIdentitySimulator, BootstrapLinearSimulator, PairwiseSimulator, AdditiveSimulator,
    MeanTrajectorySimulator, ConstantSimulator,
    GradDotSimulator, GradDotScaledSimulator, TracInCPSimulator, TracInCPScaledSimulator, InfluenceSimulator,
    InfluenceScaledSimulator, FeaturizedSimulator, TrajectorySimulator, AutoSimulator)}


def make_simulator(kind: str, **params) -> Simulator:
    """A new simulator of ``kind`` (see :func:`simulator_kinds`) with constructor ``params``."""
    if kind not in SIMULATORS:
        raise ValueError(f"unknown simulator '{kind}': choose one of {sorted(SIMULATORS)}")
    return SIMULATORS[kind](**params)


__all__ = ["AdditiveSimulator", "BootstrapLinearSimulator", "ConstantSimulator", "FeaturizedSimulator", "GradDotScaledSimulator", "GradDotSimulator",
           "InfluenceScaledSimulator", "InfluenceSimulator", "TracInCPScaledSimulator", "TracInCPSimulator", "LinearIdentitySimulator", "LinearSimulator",
           "MeanTrajectorySimulator", "NotFittedError", "PairwiseSimulator", "SIMULATORS", "Simulator", "make_simulator",
           "simulator_kinds", "TrajectorySimulator", "AutoSimulator"]
