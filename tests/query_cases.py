"""Shared cases of the query tests (tests/query/): simulator kinds, a hand-edited curriculum, explicit rollouts."""

import numpy as np

from simfluence.runs import PAD
from simfluence.simulators import AdditiveSimulator, LinearIdentitySimulator, LinearSimulator

KINDS = {"linear": LinearSimulator, "linear-identity": LinearIdentitySimulator, "additive": AdditiveSimulator}


class GenericPath(LinearIdentitySimulator):
    """The same model with its own ``_simulate``, so queries take the generic ``simulate`` path."""

    kind = "linear-identity-generic"

    def _simulate(self, curricula, initial):
        return super()._simulate(curricula, initial)


def query_curriculum(runs):
    """A held-out-like curriculum with padding, a duplicate, and one step made of a single example."""
    curriculum = runs.curricula[0].copy()
    curriculum[2, 1] = PAD
    curriculum[4, 2] = curriculum[4, 0]
    curriculum[7] = [11, PAD, 11]  # removing example 11 empties step 8
    return curriculum, runs.initial_losses[0].astype(np.float64)


def explicit(simulator, curriculum, initial):
    """One plain ``simulate`` call; steps with nothing left to train on are deleted (loss held)."""
    keep = (curriculum != PAD).any(axis=1)
    trajectory = simulator.simulate(curriculum[keep], initial).astype(np.float64)
    position = np.concatenate([[0], np.cumsum(keep)])
    return trajectory[position]
