r"""TRAK (Park et al., 2023) through the ``traker`` library's :class:`trak.TRAKer`.

For each checkpoint :math:`\theta_k` (an ensemble of independently trained models), TRAK
featurizes every training example by a random projection of the gradient of a model
output :math:`f`:

.. math::

    \phi_k(z) = P_k^\top \nabla_\theta f(z; \theta_k) / \sqrt{p_\theta}, \qquad
    \Phi_k = [\phi_k(z_1), \dots, \phi_k(z_N)]^\top \in \mathbb{R}^{N \times d},

and scores a target :math:`z_m` by

.. math::

    \tau(z_m)_i = \Big(\frac1K \sum_k c_k\, \phi_k(z_m)^\top (\Phi_k^\top \Phi_k + \lambda I)^{-1}
                  \phi_k(z_i)\Big) \cdot \Big(\frac1K \sum_k Q_k(z_i)\Big),

with :math:`c_k = 1 / \mathrm{mean}|(\Phi_k^\top\Phi_k + \lambda I)^{-1}|` (TRAK's own
rescaling, for float16 safety) and :math:`Q_k(z_i) = 1 - p(z_i; \theta_k)`.

Model output: TRAK's margin generalised to any per-example loss, so every task works
(classification and language modelling): with :math:`p = e^{-\ell}` the probability the
loss stands for,

.. math::

    f(z; \theta) = \log\frac{p}{1 - p} = -\ell - \log(1 - e^{-\ell}), \qquad
    Q = \Big|\frac{\partial \ell}{\partial f}\Big| = 1 - p.

For cross-entropy classification this is exactly TRAK's ``image_classification`` margin
(correct logit minus the log-sum-exp of the others). For a language model ``\ell`` is the
task's per-example loss (mean token cross-entropy).

Sign: TRAK's score is positive when training on :math:`z_i` raises the target's margin,
i.e. lowers its loss, so the shared orientation (predicted change of test loss) is
:math:`S_{im} = -\tau(z_m)_i`. Units are TRAK's (margin, up to the :math:`c_k` scale), not
nats.

Projection: ``traker``'s :class:`~trak.projectors.BasicProjector` with Gaussian entries
(its CPU choice; ``fast_jl``'s CUDA projector is not used), seeded by ``seed`` and the
checkpoint index; ``projector="none"`` uses the exact gradients (``NoOpProjector``).
Everything runs on the CPU in float32, in a temporary directory.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from simfluence.errors import UsageError
from simfluence.peers.base import Checkpoints, Peer, frozen_names, model_at, one, split_rows
from simfluence.tasks.base import Task, take

LOSS_FLOOR = 1e-12
"""Losses below this are raised to it before the margin (``-log(1 - e^{-0})`` is infinite)."""


def margin_of_loss(loss: torch.Tensor) -> torch.Tensor:
    r"""TRAK's margin :math:`\log(p / (1 - p))` of per-example losses :math:`\ell = -\log p` (same shape)."""
    loss = loss.clamp_min(LOSS_FLOOR)
    return -loss - torch.log(-torch.expm1(-loss))


def out_to_loss(loss: torch.Tensor) -> torch.Tensor:
    r"""TRAK's :math:`Q = 1 - p = 1 - e^{-\ell}` of per-example losses (same shape)."""
    return -torch.expm1(-loss)


def loss_margin_output(task: Task):
    """A :class:`trak.modelout_functions.AbstractModelOutput`: :func:`margin_of_loss` of ``task.example_losses``.

    Built lazily: ``trak`` is only imported here.
    """
    from trak.modelout_functions import AbstractModelOutput

    class LossMargin(AbstractModelOutput):
        """TRAK model output from a simfluence task's per-example loss."""

        def __init__(self) -> None:
            super().__init__()

        def get_output(self, model, weights, buffers, inputs, targets) -> torch.Tensor:
            # One example (TRAK vmaps over the batch), so no batch dimension on inputs/targets.
            loss = task.example_losses(model, one(inputs), targets.unsqueeze(0), params={**weights, **buffers})
            return margin_of_loss(loss).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch) -> torch.Tensor:
            inputs, targets = batch
            with torch.no_grad():
                loss = task.example_losses(model, inputs, targets, params={**weights, **buffers})
            return out_to_loss(loss).unsqueeze(-1)

    return LossMargin()


@contextlib.contextmanager
def _quiet_trak(progress: bool):
    """Silence ``traker``'s progress bars (it calls ``tqdm`` unconditionally) unless ``progress``."""
    import trak.traker as module

    original = module.tqdm
    module.tqdm = partial(original, disable=not progress)
    try:
        yield
    finally:
        module.tqdm = original


@dataclass
class TRAK(Peer):
    r"""TRAK scores from an ensemble of checkpoints (one ``load_checkpoint(model_id=k)`` each).

    Attributes:
        proj_dim: projection dimension ``d``; ``None``: ``min(2048, N // 2, P)`` (``P`` the number
            of trained weights): TRAK needs ``d`` well below ``N`` for :math:`\Phi^\top\Phi` to be
            invertible, and its default 2048 assumes tens of thousands of training examples.
        lambda_reg: ridge term :math:`\lambda` added to :math:`\Phi^\top\Phi` (TRAK's ``lambda_reg``).
        projector: ``"basic"`` (Gaussian random projection) or ``"none"`` (exact gradients, ``d = P``).
        seed: the projector's seed.
        checkpoints: an ensemble, e.g. :func:`~simfluence.peers.base.ensemble_checkpoints`; cost
            is that of producing them (``K`` runs) plus featurizing ``K (N + M')`` gradients.
    """

    name = "trak"
    module = "trak"
    library = "traker==0.3.2"

    proj_dim: int | None = None
    lambda_reg: float = 0.0
    projector: str = "basic"
    seed: int = 0

    def _scores(self, task: Task, checkpoints: Checkpoints, train_index: np.ndarray, test_index: np.ndarray,
                progress: bool) -> np.ndarray:
        from trak import TRAKer
        from trak.projectors import NoOpProjector

        if self.projector not in ("basic", "none"):
            raise UsageError(f"projector: expected 'basic' or 'none', got {self.projector!r}")
        model = model_at(task, checkpoints.states[0])
        frozen = frozen_names(model)
        trained = [name for name, value in model.named_parameters() if value.requires_grad]
        num_params = sum(value.numel() for value in model.parameters() if value.requires_grad)
        num_train = task.num_train
        proj_dim = self.proj_dim if self.proj_dim is not None else max(1, min(2048, num_train // 2, num_params))
        train_inputs, train_targets = task.split_data("train")
        test_inputs, test_targets = split_rows(task, "test", test_index)

        with tempfile.TemporaryDirectory(prefix="simfluence-trak-") as save_dir, _quiet_trak(progress), \
                warnings.catch_warnings():
            # vmap over attention (minilm-finetune) falls back to a loop for the CPU attention backward
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            projector = NoOpProjector(device="cpu") if self.projector == "none" else None
            traker = TRAKer(model=model, task=loss_margin_output(task), train_set_size=num_train, save_dir=save_dir,
                            load_from_save_dir=True, device="cpu", projector=projector, proj_dim=proj_dim,
                            use_half_precision=False, projector_seed=self.seed, lambda_reg=self.lambda_reg,
                            grad_wrt=trained if frozen else None,
                            logging_level=logging.WARNING)
            for k, state in enumerate(checkpoints.states):
                traker.load_checkpoint(state, model_id=k)
                for rows in _chunks(num_train, self.chunk_size):
                    index = torch.as_tensor(rows)
                    traker.featurize(batch=(take(train_inputs, index), train_targets[index]), inds=rows)
            traker.finalize_features()
            _restore_projection(traker.projector)
            for k, state in enumerate(checkpoints.states):
                traker.start_scoring_checkpoint(exp_name="simfluence", checkpoint=state, model_id=k,
                                                num_targets=int(test_index.size))
                for rows in _chunks(int(test_index.size), self.chunk_size):
                    index = torch.as_tensor(rows)
                    traker.score(batch=(take(test_inputs, index), test_targets[index]), inds=rows)
            scores = np.array(traker.finalize_scores(exp_name="simfluence"), dtype=np.float64)  # [N, M'], copied
        return -scores[train_index]


def _restore_projection(projector) -> None:
    """Work around traker 0.3.2's freed projection matrix.

    ``finalize_features`` frees a ``BasicProjector``'s matrix, and ``project`` only regenerates it
    for a new model id or when it has several blocks, so scoring the checkpoint featurized last
    (always, with one checkpoint) and ``proj_dim <= 100`` fails.
    Regenerate the matrix of the projector's current model id from its own seeded state.
    """
    if getattr(projector, "proj_matrix_available", True) or getattr(projector, "num_blocks", 0) != 1:
        return
    projector.generate_sketch_matrix(projector.generator_states[0])


def _chunks(count: int, size: int):
    """int64 index arrays ``[0, size), [size, 2 size), ...`` covering ``0..count-1``."""
    for start in range(0, count, size):
        yield np.arange(start, min(start + size, count), dtype=np.int64)


__all__ = ["TRAK", "loss_margin_output", "margin_of_loss", "out_to_loss"]
