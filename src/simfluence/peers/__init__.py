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

from typing import Any

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


LARGE_MODEL = 1_000_000
"""Trained weights above which the peers run with per-example gradient batches sized for memory."""
LARGE_MODEL_SETTINGS: dict[str, dict[str, Any]] = {"trak": {"chunk_size": 8}, "tracin": {"chunk_size": 1}}
"""Peer settings for models above ``LARGE_MODEL`` (minilm-finetune, 22.7M): TRAK vmaps 8 examples' gradients
at a time (8 x 91 MB); captum's per-example path backpropagates each example through its batch's graph, so
a batch of 1 is cheapest."""


def peer_settings(name: str, task) -> dict[str, Any]:
    """The settings peer ``name`` runs with on ``task``: its defaults, or ``LARGE_MODEL_SETTINGS`` for big models."""
    model = task.build_model()
    trained = sum(value.numel() for value in model.parameters() if value.requires_grad)
    return dict(LARGE_MODEL_SETTINGS.get(name, {})) if trained > LARGE_MODEL else {}


__all__ = ["EKFAC", "PEERS", "TRAK", "Attribution", "Checkpoints", "Cost", "Peer", "TracInCP",
           "ensemble_checkpoints", "get_peer", "peer_settings", "start_checkpoint", "trajectory_checkpoints"]
