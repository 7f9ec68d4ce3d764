"""Training-run simulators: one protocol (:class:`Simulator`), one module per method."""

from simfluence.simulators.additive import AdditiveSimulator
from simfluence.simulators.auto import AutoSimulator
from simfluence.simulators.base import NotFittedError, Simulator, simulator_kinds
from simfluence.simulators.baselines import ConstantSimulator, MeanTrajectorySimulator
from simfluence.simulators.featurized import FeaturizedSimulator
from simfluence.simulators.gptfluence import GPTfluenceSimulator
from simfluence.simulators.gradient import (
    GradDotScaledSimulator,
    GradDotSimulator,
    InfluenceScaledSimulator,
    InfluenceSimulator,
    TracInCPScaledSimulator,
    TracInCPSimulator,
)
from simfluence.simulators.interaction import PairwiseSimulator
from simfluence.simulators.linear import LinearIdentitySimulator, LinearSimulator
from simfluence.simulators.trajectory import TrajectorySimulator
from simfluence.simulators.uncertainty import BootstrapLinearSimulator

SIMULATORS = {cls.kind: cls for cls in (
    LinearSimulator, LinearIdentitySimulator, BootstrapLinearSimulator, PairwiseSimulator, AdditiveSimulator,
    MeanTrajectorySimulator, ConstantSimulator,
    GradDotSimulator, GradDotScaledSimulator, TracInCPSimulator, TracInCPScaledSimulator, InfluenceSimulator,
    InfluenceScaledSimulator, FeaturizedSimulator, TrajectorySimulator, AutoSimulator, GPTfluenceSimulator)}


def make_simulator(kind: str, **params) -> Simulator:
    """A new simulator of ``kind`` (see :func:`simulator_kinds`) with constructor ``params``."""
    if kind not in SIMULATORS:
        raise ValueError(f"unknown simulator '{kind}': choose one of {sorted(SIMULATORS)}")
    return SIMULATORS[kind](**params)


__all__ = [
    "SIMULATORS",
    "AdditiveSimulator",
    "AutoSimulator",
    "BootstrapLinearSimulator",
    "ConstantSimulator",
    "FeaturizedSimulator",
    "GPTfluenceSimulator",
    "GradDotScaledSimulator",
    "GradDotSimulator",
    "InfluenceScaledSimulator",
    "InfluenceSimulator",
    "LinearIdentitySimulator",
    "LinearSimulator",
    "MeanTrajectorySimulator",
    "NotFittedError",
    "PairwiseSimulator",
    "Simulator",
    "TracInCPScaledSimulator",
    "TracInCPSimulator",
    "TrajectorySimulator",
    "make_simulator",
    "simulator_kinds",
]
