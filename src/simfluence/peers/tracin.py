r"""TracIn-CP (Pruthi et al., 2020) through ``captum.influence.TracInCP``.

Over checkpoints :math:`\theta_k` along one run, each with a weight :math:`w_k`, captum
computes

.. math::

    T_{mi} = \sum_k w_k\, \nabla_\theta \ell(z_m; \theta_k) \cdot \nabla_\theta \ell(z_i; \theta_k),

the weight being what ``checkpoints_load_func`` returns for the checkpoint (captum's
"learning rate"). Here :math:`w_k` is the summed learning rate of the steps checkpoint
:math:`k` stands for (:func:`~simfluence.func.checkpoints.checkpoint_weights`, filled in by
:func:`~simfluence.peers.base.trajectory_checkpoints`); for checkpoints without weights every
:math:`w_k` is the task's peak learning rate.

Orientation: a step of SGD on the mean loss of a batch of :math:`B` holding example
:math:`i` changes test loss :math:`m` by :math:`-(\eta_t / B)\, g_i \cdot g_m` to first order;
a run drawing its :math:`B` examples per step uniformly from :math:`N` holds :math:`i` in
a fraction :math:`B / N` of the slots, so over the run example :math:`i` is predicted to
change loss :math:`m` by

.. math::

    S_{im} = -\frac1N \sum_k w_k\, g_i(\theta_k) \cdot g_m(\theta_k) = -T_{mi} / N \quad \text{(nats)},

and :math:`\sum_i S_{im}` is the first-order change of the whole run. Positive captum
scores (proponents) are helpful examples: negative :math:`S`.

Gradients are taken with respect to every trained parameter (frozen modules are left out
through captum's ``layers``), per example (``sample_wise_grads_per_batch=False``, captum's
general path, any layer type). captum calls ``model(*batch[:-1])``; the model is wrapped so
that this returns the task's per-example losses (``loss_fn=None``), which lets every task
through: tensor or dict inputs (passed by keyword), any output type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from torch import nn

from simfluence.errors import UsageError
from simfluence.peers.base import Checkpoints, Peer, model_at, split_rows
from simfluence.tasks.base import Inputs, Task


class LossModel(nn.Module):
    """``forward(*tensors, targets) -> float [n]``: the task's per-example losses, for captum.

    Args:
        task: the simfluence task.
        model: the task's model (held as ``self.model``: its parameter names gain a ``model.`` prefix).
        keys: the names of dict inputs, in the order of ``tensors``; ``None`` for one input tensor.
    """

    def __init__(self, task: Task, model: nn.Module, keys: list[str] | None):
        super().__init__()
        self.task, self.model, self.keys = task, model, keys

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Per-example losses ``[n]``; the last of ``tensors`` are the targets."""
        *inputs, targets = tensors
        batch = dict(zip(self.keys, inputs)) if self.keys is not None else inputs[0]
        return self.task.example_losses(self.model, batch, targets)


def flat(inputs: Inputs, targets: torch.Tensor, keys: list[str] | None) -> tuple[torch.Tensor, ...]:
    """``(*input tensors, targets, targets)``: captum's batch layout.

    The last element, its "labels", is unused since :class:`LossModel` already returns the loss.
    """
    if keys is None:
        tensors = [cast(torch.Tensor, inputs)]
    else:   # dict inputs
        tensors = [cast(Mapping[str, torch.Tensor], inputs)[key] for key in keys]
    return (*tensors, targets, targets)


def trained_layers(model: LossModel) -> list[str] | None:
    """Captum ``layers`` covering exactly the trained parameters.

    ``None`` if every parameter is trained, else the modules that own trained parameters
    directly (a module mixing both is an error).
    """
    if all(param.requires_grad for param in model.parameters()):
        return None
    layers = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if any(param.requires_grad for param in own):
            if not all(param.requires_grad for param in own):
                raise UsageError(f"tracin: module '{name}' mixes trained and frozen parameters, which captum's "
                                 "layers cannot separate")
            layers.append(name)
    return layers


GRADIENT_BYTES = 2 << 30
"""Default memory for the test gradients captum holds at once (see :attr:`TracInCP.test_chunk_size`)."""


@dataclass
class TracInCP(Peer):
    """TracIn-CP scores from captum over checkpoints of one run.

    captum's ``influence`` first computes the gradients of every test example it is given at every
    checkpoint (``K x M' x P`` floats, ``P`` the trained weights: 17 GB for minilm-finetune's 48
    test examples at 4 checkpoints), then passes once over the training set. So each checkpoint
    gets its own captum call (summed here, each weighted by its ``w_k``), on at most
    ``test_chunk_size`` test examples at a time; every extra test chunk costs another pass of
    training gradients.

    Attributes:
        checkpoints: e.g. :func:`~simfluence.peers.base.trajectory_checkpoints` (weights set,
            ``trainings`` = the fraction of the run replayed); cost is that plus ``K (N' C + M')``
            per-example gradients for ``C`` test chunks.
    """

    name = "tracin"
    module = "captum"
    library = "captum==0.9.0"

    chunk_size: int = field(default=8, kw_only=True)
    """Examples per captum batch. captum's per-example path backpropagates each example's loss
    through its whole batch's graph, so the cost grows with batch size times examples: small
    batches are fastest for larger models (tiny-lm: 8 is ~6x faster than 64, 256 ~40x slower;
    minilm-finetune: use 1)."""
    test_chunk_size: int | None = None
    """Test examples whose gradients captum holds at once (``test_chunk_size x P`` float32);
    ``None``: as many as fit in ``GRADIENT_BYTES`` (2 GiB; all of them for small models)."""

    def _scores(self, task: Task, checkpoints: Checkpoints, train_index: np.ndarray, test_index: np.ndarray,
                progress: bool) -> np.ndarray:
        from captum.influence import TracInCP as CaptumTracInCP

        if self.test_chunk_size is not None and self.test_chunk_size < 1:
            raise UsageError(f"test_chunk_size: must be >= 1 or None, got {self.test_chunk_size}")
        weights = (checkpoints.weights if checkpoints.weights is not None
                   else np.full(len(checkpoints), float(task.learning_rate)))
        train_inputs, train_targets = split_rows(task, "train", train_index)
        test_inputs, test_targets = split_rows(task, "test", test_index)
        keys = list(train_inputs) if isinstance(train_inputs, Mapping) else None
        model = LossModel(task, model_at(task, checkpoints.states[0]), keys)
        num_params = sum(param.numel() for param in model.parameters() if param.requires_grad)
        test_chunk = (self.test_chunk_size if self.test_chunk_size is not None
                      else max(1, GRADIENT_BYTES // (4 * num_params)))

        def load(wrapper: LossModel, k: int) -> float:
            wrapper.model.load_state_dict(checkpoints.states[k])
            wrapper.model.eval()
            return float(weights[k])

        train_set = torch.utils.data.TensorDataset(*flat(train_inputs, train_targets, keys))
        test_set = torch.utils.data.TensorDataset(*flat(test_inputs, test_targets, keys))
        scores = torch.zeros(test_index.size, train_index.size, dtype=torch.float64)     # [M', N']
        for k in range(len(checkpoints)):
            tracin = CaptumTracInCP(model, train_set, checkpoints=[k], checkpoints_load_func=load,
                                    layers=trained_layers(model), loss_fn=None, batch_size=self.chunk_size,
                                    sample_wise_grads_per_batch=False)
            for start in range(0, int(test_index.size), test_chunk):
                rows = range(start, min(start + test_chunk, int(test_index.size)))
                loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, rows),
                                                     batch_size=self.chunk_size, shuffle=False)
                scores[start:rows.stop] += tracin.influence(loader, show_progress=progress).to(torch.float64)
        return -scores.numpy().T / task.num_train
