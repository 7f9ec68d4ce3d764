"""Training-run simulators: one protocol (:class:`Simulator`), one module per method.

Every simulator class registers itself (``@register``) with its ``kind`` and declared
:class:`Capabilities`; :data:`SIMULATORS`, the command line's choices and the benchmarks'
groups all come from that one registry (:func:`simulator_kinds`).
"""

# isort: off
# Registration order is listing order (within each family): the modules are imported in it.
from simfluence.simulators.auto import AutoSimulator
from simfluence.simulators.trajectory import TrajectorySimulator
from simfluence.simulators.linear import LinearIdentitySimulator, LinearSimulator
from simfluence.simulators.additive import AdditiveSimulator
from simfluence.simulators.featurized import FeaturizedSimulator
from simfluence.simulators.uncertainty import BootstrapLinearSimulator
from simfluence.simulators.interaction import PairwiseSimulator
from simfluence.simulators.gptfluence import GPTfluenceSimulator
from simfluence.simulators.hybrid import HybridSimulator
from simfluence.simulators.gradtraj import GradientTrajectorySimulator
from simfluence.simulators.gradient import (
    GradDotScaledSimulator,
    GradDotSimulator,
    InfluenceScaledSimulator,
    InfluenceSimulator,
    TracInCPScaledSimulator,
    TracInCPSimulator,
)
from simfluence.simulators.baselines import ConstantSimulator, MeanTrajectorySimulator
# isort: on
from simfluence.simulators.base import (
    FAMILIES,
    Capabilities,
    NotFittedError,
    Simulator,
    capabilities,
    simulator_class,
    simulator_kinds,
)

SIMULATORS: dict[str, type[Simulator]] = {kind: simulator_class(kind) for kind in simulator_kinds()}
"""Every registered simulator class by kind, in listing order (a view of the registry)."""


def make_simulator(kind: str, **params) -> Simulator:
    """A new simulator of ``kind`` (see :func:`simulator_kinds`) with constructor ``params``."""
    return simulator_class(kind)(**params)


__all__ = [
    "FAMILIES",
    "SIMULATORS",
    "AdditiveSimulator",
    "AutoSimulator",
    "BootstrapLinearSimulator",
    "Capabilities",
    "ConstantSimulator",
    "FeaturizedSimulator",
    "GPTfluenceSimulator",
    "GradDotScaledSimulator",
    "GradDotSimulator",
    "GradientTrajectorySimulator",
    "HybridSimulator",
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
    "capabilities",
    "make_simulator",
    "simulator_class",
    "simulator_kinds",
]
