"""Attribution peers computed by their own libraries (``pip install 'simfluence[peers]'``).

=========  ==========================  ==============================  =====================
name       method                      library                         checkpoints it reads
=========  ==========================  ==============================  =====================
trak       TRAK (ensemble)             ``traker==0.3.2``               final weights of K runs
ekfac      EK-FAC influence functions  ``kronfluence==1.0.1``          one trained model
tracin     TracIn-CP                   ``captum==0.9.0``               weights along one run
=========  ==========================  ==============================  =====================

Every peer's :meth:`~simfluence.peers.base.Peer.scores` returns float64 ``[N', M']``: the
predicted change of test example ``m``'s loss from training on example ``i`` (negative:
helpful). The libraries are imported only when a peer runs; a missing one raises
:class:`~simfluence.errors.MissingExtraError` naming the ``peers`` extra. Example::

    from simfluence.collect import UniformSampler
    from simfluence.peers import ensemble_checkpoints, get_peer
    from simfluence.tasks import get_task

    task = get_task("digits-mlp")
    sampler = UniformSampler(task.default_pool(), task.batch_size)
    checkpoints = ensemble_checkpoints(task, sampler.sample_many(200, seeds=range(4)))
    result = get_peer("trak").attribute(task, checkpoints)
    result.scores, result.cost.trainings, result.cost.seconds
"""

from __future__ import annotations

from simfluence.errors import UsageError
from simfluence.peers.base import (
    Attribution,
    Checkpoints,
    Cost,
    Peer,
    ensemble_checkpoints,
    start_checkpoint,
    trajectory_checkpoints,
)
from simfluence.peers.ekfac import EKFAC
from simfluence.peers.tracin import TracInCP
from simfluence.peers.trak import TRAK

PEERS: dict[str, type[Peer]] = {"trak": TRAK, "ekfac": EKFAC, "tracin": TracInCP}
"""Peer classes by name."""


def get_peer(name: str, **settings) -> Peer:
    """The peer called ``name`` (a key of :data:`PEERS`), built with ``settings`` (its dataclass fields)."""
    if name not in PEERS:
        raise UsageError(f"peer '{name}' is unknown; choose one of: {', '.join(PEERS)}")
    try:
        return PEERS[name](**settings)
    except TypeError as error:
        raise UsageError(f"peer '{name}': bad settings {sorted(settings)} ({error})") from None


__all__ = ["EKFAC", "PEERS", "TRAK", "Attribution", "Checkpoints", "Cost", "Peer", "TracInCP",
           "ensemble_checkpoints", "get_peer", "start_checkpoint", "trajectory_checkpoints"]
