"""TRAK of a collection's own fitting runs: the final weights a run store kept, scored once per machine.

Both the ``trak`` method of ``simfluence lds`` (TRAK at the simulators' budget) and
``gradient-trajectory``'s ``checkpoints`` prior read TRAK's ensemble over the final weights of the
fitting runs. :func:`fitting_run_trak` computes it once and keeps it in the on-disk cache
(:mod:`simfluence.cache`), keyed by the task, the runs' ids and curricula, the peer's settings and
the versions, so the second reader pays nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from simfluence.runs.log import RunDataError, RunSet


@dataclass(frozen=True)
class RunEnsembleScores:
    """TRAK's scores of an ensemble of fitting runs' final weights.

    Attributes:
        scores: float64 ``[N, M]``, the peer's convention (negative: training on ``i`` lowers
            test loss ``m``).
        models: final weights in the ensemble ``K``.
        seconds: TRAK's own seconds when they were computed (NaN for an entry cached before
            they were kept).
        cached: read from the on-disk cache (``False``: computed now).
        settings: the peer's settings.
    """

    scores: np.ndarray
    models: int
    seconds: float
    cached: bool
    settings: dict


def fitting_run_trak(task, runs: RunSet, store: str | Path, *, models: int | None = None, disk_cache: bool = True,
                     progress: bool = False) -> RunEnsembleScores:
    """TRAK of the final weights that run store ``store`` kept of ``runs`` (the first ``models`` of them).

    Only the fitting runs' own weights are read: a store whose run under the same id trained
    along another curriculum is refused, as is one that kept no final weights (one line naming
    ``store``, the field ``checkpoints`` and the fix). The task must be the runs' (its ids are
    not checked here).
    """
    from simfluence.cache import cached_scores, package_version
    from simfluence.peers import Checkpoints, get_peer, peer_settings
    from simfluence.runs.store import RunStore

    source = str(store)
    opened = RunStore(store)
    candidates = range(runs.num_runs if models is None else min(int(models), runs.num_runs))
    chosen = [index for index in candidates if runs.num_steps in opened.checkpoint_steps(str(runs.run_ids[index]))]
    if not chosen:
        raise RunDataError(source, "checkpoints", f"holds no final weights (step {runs.num_steps}) of the fitting runs",
                           f"collect the runs with --checkpoint-steps {runs.num_steps} into that store, or leave "
                           "checkpoints unset")
    ids = [str(runs.run_ids[index]) for index in chosen]
    for index, run_id in zip(chosen, ids):   # the same runs, not others under the same ids
        if not np.array_equal(opened.read(run_id).curriculum, runs.curricula[index]):
            raise RunDataError(source, "checkpoints", f"run '{run_id}' there trained along another curriculum than "
                               "the fitting run of that id", "pass the store the fitting runs were collected into")
    settings = peer_settings("trak", task)
    computed: list[bool] = []

    def compute() -> dict[str, torch.Tensor]:
        computed.append(True)
        start = time.perf_counter()
        states = tuple(opened.stored_checkpoint(run_id, runs.num_steps) for run_id in ids)
        result = get_peer("trak", **settings).attribute(task, Checkpoints(states, trainings=float(len(states))),
                                                        progress=progress)
        return {"scores": torch.from_numpy(np.asarray(result.scores, dtype=np.float64)),
                "seconds": torch.tensor(time.perf_counter() - start, dtype=torch.float64)}

    # Final weights are a function of the task and the curriculum (training is deterministic given it).
    curricula = np.ascontiguousarray(runs.curricula[chosen], dtype=np.int32).tobytes()
    entry = {"task": task.name, "task_config": json.dumps(task.config(), sort_keys=True, default=str),
             "runs": ids, "curricula": hashlib.sha256(curricula).hexdigest(), "steps": runs.num_steps,
             "settings": settings, "simfluence": package_version(), "torch": torch.__version__}
    scores, tensors = cached_scores("trak-prior", entry, compute, (runs.num_train, runs.num_test),
                                    f"TRAK scores of task '{task.name}'", disk_cache)
    seconds = float(tensors["seconds"]) if "seconds" in tensors else math.nan
    return RunEnsembleScores(scores, len(ids), seconds, not computed, settings)
