r"""Influence functions with EK-FAC curvature (Grosse et al., 2023) through ``kronfluence``.

On a checkpoint :math:`\theta` (the trained model, or the starting one), ``kronfluence``
approximates the Gauss-Newton Hessian of the mean training loss by the Fisher of the
:math:`N` training examples, block-diagonal over the tracked layers (the ``nn.Linear`` and
``nn.Conv2d`` modules whose weights are trained), each block Kronecker-factored and
eigenvalue-corrected (EK-FAC):

.. math::

    F_\ell = (Q_S \otimes Q_A)\, \mathrm{diag}(\Lambda)\, (Q_S \otimes Q_A)^\top,\quad
    A = \tfrac1N \sum_i \bar a_i \bar a_i^\top,\ S = \tfrac1N \sum_i \delta_i \delta_i^\top,\
    \Lambda = \tfrac1N \sum_i \big((Q_S \otimes Q_A)^\top g_i\big)^{2},

(:math:`\bar a_i` the layer's input with a 1 for the bias, :math:`\delta_i` the gradient at
its output, :math:`g_i` the example's gradient), and returns the pairwise score

.. math::

    I_{im} = g_m^\top (F + \lambda I)^{-1} g_i .

Upweighting training example :math:`i` by :math:`\epsilon` in the mean loss moves the
optimum by :math:`-\epsilon (F+\lambda I)^{-1} g_i`, so test loss :math:`m` changes by
:math:`-\epsilon I_{im}`: a **positive** ``kronfluence`` score means the example lowers the
test loss (helpful). Adding one example to the mean over :math:`N` is
:math:`\epsilon = 1/N` (``kronfluence``'s documentation: "influence scores need to be
divided by the total number of training data points"), so the shared orientation is

.. math::

    S_{im} = -I_{im} / N \quad \text{(nats)},

averaged over the checkpoints when several are given (each analysed on its own).

Settings: the measurement and the training loss are both the task's per-example loss
(summed over the batch, as ``kronfluence`` requires). The Fisher is the true Fisher
(labels sampled from the model's softmax, ``kronfluence``'s recommended setting) when the
task's outputs are class logits ``[n, C]`` with integer targets ``[n]``, else the empirical
Fisher (the task's own targets); ``fisher`` forces one. Damping ``None`` is
``kronfluence``'s heuristic :math:`0.1 \times` the mean eigenvalue per layer. Factors use
every training example; CPU, no ``DataLoader`` workers, a temporary output directory.

Coverage: only tracked layers enter :math:`g`. On ``digits-mlp`` and ``text-minilm`` that is
every trained weight; on ``tiny-lm`` (GPT-2, whose blocks are ``Conv1D``) only the LM head
(tied to the token embedding).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from simfluence.errors import UsageError
from simfluence.peers.base import Checkpoints, Peer, model_at, split_rows
from simfluence.tasks.base import Inputs, Task, logits_of, num_examples, take

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FISHERS = ("auto", "true", "empirical")


class Rows(torch.utils.data.Dataset):
    """``(inputs, target)`` of one example per index: what ``kronfluence``'s ``DataLoader`` collates."""

    def __init__(self, inputs: Inputs, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return num_examples(self.inputs)

    def __getitem__(self, index: int):
        return take(self.inputs, index), self.targets[index]


class Holder(nn.Module):
    """Calls the task's model, held as a child.

    ``kronfluence`` wraps tracked modules in place through their parent, so a model that is
    itself one ``nn.Linear`` (``text-minilm``) needs one.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        """The held model called on the same arguments."""
        return self.model(*args, **kwargs)


@contextlib.contextmanager
def frozen_heap():
    """Keep the objects alive now out of garbage collection for the block (``gc.freeze``).

    ``kronfluence`` calls ``gc.collect()`` about ten times per analysis to release GPU memory; in a
    process with torch (and transformers) loaded each call scans some 10^5 objects, about 0.2 s, which
    dominates a small analysis. Objects created inside the block are still collected. Does nothing if
    the caller has frozen objects already (unfreezing would release theirs too).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def classifies(task: Task, model: nn.Module) -> bool:
    """Whether the task's outputs (or their ``.logits``) are class logits ``[n, C]`` for integer targets ``[n]``.

    Sampling labels from ``softmax(outputs)`` then gives the true Fisher.
    """
    inputs, targets = task.split_data("train")
    with torch.no_grad():
        outputs = logits_of(task.forward(model, take(inputs, torch.arange(1))))
    return (isinstance(outputs, torch.Tensor) and outputs.ndim == 2 and targets.ndim == 1
            and not targets.dtype.is_floating_point)


def tracked_modules(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` / ``nn.Conv2d`` modules whose parameters are all trained."""
    names = []
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if type(module) in (nn.Linear, nn.Conv2d) and params and all(p.requires_grad for p in params):
            names.append(name)
    if not names:
        raise UsageError(f"ekfac: the model has no trained nn.Linear or nn.Conv2d layer, which kronfluence "
                         f"needs; use another peer (trak, tracin) for {type(model).__name__}")
    return names


def kronfluence_task(task: Task, modules: list[str]):
    """A :class:`kronfluence.task.Task` built on ``task.example_losses`` (``kronfluence`` imported here).

    Its sampled training loss (the true Fisher, requested by ``kronfluence`` unless
    ``use_empirical_fisher``) draws labels from ``softmax(outputs)``: only for classification outputs,
    see :func:`classifies`.

    Args:
        task: the simfluence task.
        modules: the modules to track (:func:`tracked_modules`).
    """
    from kronfluence.task import Task as KronfluenceTask

    class LossTask(KronfluenceTask):
        """Training loss and measurement: the task's per-example loss, summed over the batch."""

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            inputs, targets = batch
            outputs = task.forward(model, inputs)
            if sample:  # kronfluence asks for this only when use_empirical_fisher is False
                with torch.no_grad():
                    targets = torch.distributions.Categorical(logits=logits_of(outputs).detach().float()).sample()
            return task.example_loss(outputs, targets).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            inputs, targets = batch
            return task.example_losses(model, inputs, targets).sum()

        def get_influence_tracked_modules(self):
            return list(modules)

    return LossTask()


@dataclass
class EKFAC(Peer):
    r"""Influence scores from ``kronfluence`` (EK-FAC by default) on each given checkpoint.

    Attributes:
        strategy: ``kronfluence``'s curvature: ``"ekfac"``, ``"kfac"``, ``"diagonal"`` or
            ``"identity"`` (no curvature: plain gradient dot products of the tracked layers).
        damping: ``kronfluence``'s ``damping_factor`` :math:`\lambda`; ``None``: its heuristic.
        fisher: ``"auto"`` (true Fisher for classification, else empirical), ``"true"`` or ``"empirical"``.
        seed: seeds the sampled labels of the true Fisher (checkpoint ``k`` uses ``seed + k``).
        checkpoints: usually one, the trained model (``trainings = 1``) or the starting model
            (:func:`~simfluence.peers.base.start_checkpoint`, free).
    """

    name = "ekfac"
    module = "kronfluence"
    library = "kronfluence==1.0.1"

    strategy: str = "ekfac"
    damping: float | None = None
    fisher: str = "auto"
    seed: int = 0

    def _scores(self, task: Task, checkpoints: Checkpoints, train_index: np.ndarray, test_index: np.ndarray,
                progress: bool) -> np.ndarray:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.utils.dataset import DataLoaderKwargs

        if self.strategy not in STRATEGIES:
            raise UsageError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.fisher not in FISHERS:
            raise UsageError(f"fisher: expected one of {', '.join(FISHERS)}, got {self.fisher!r}")
        if self.damping is not None and not self.damping >= 0:
            raise UsageError(f"damping: must be >= 0 or None (kronfluence's heuristic), got {self.damping}")
        num_train = task.num_train
        train_all = Rows(*task.split_data("train"))
        train_rows = Rows(*split_rows(task, "train", train_index))
        test_rows = Rows(*split_rows(task, "test", test_index))
        total = np.zeros((train_index.size, test_index.size))
        for k, state in enumerate(checkpoints.states):
            model = Holder(model_at(task, state))
            classifier = classifies(task, model)
            if self.fisher == "true" and not classifier:
                raise UsageError(f"fisher='true': task '{task.name}' has no class-logit outputs to sample labels "
                                 "from; use fisher='empirical'")
            sample = self.fisher == "true" or (self.fisher == "auto" and classifier)
            kron_task = kronfluence_task(task, tracked_modules(model))
            model = prepare_model(model, kron_task)
            factor_args = FactorArguments(strategy=self.strategy, use_empirical_fisher=not sample,
                                          covariance_max_examples=None, lambda_max_examples=None)
            score_args = ScoreArguments(damping_factor=self.damping)
            with tempfile.TemporaryDirectory(prefix="simfluence-ekfac-") as output_dir, \
                    torch.random.fork_rng(devices=[]), warnings.catch_warnings(), frozen_heap():
                # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler, deprecated in torch >= 2.4.
                warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
                torch.manual_seed(self.seed + k)
                analyzer = Analyzer(analysis_name="simfluence", model=model, task=kron_task, cpu=True,
                                    log_level=logging.WARNING,
                                    disable_tqdm=not progress, output_dir=output_dir)
                analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
                analyzer.fit_all_factors(factors_name="factors", dataset=train_all,
                                         per_device_batch_size=min(self.chunk_size, num_train),
                                         factor_args=factor_args, overwrite_output_dir=True)
                analyzer.compute_pairwise_scores(
                    scores_name="scores", factors_name="factors", query_dataset=test_rows, train_dataset=train_rows,
                    per_device_query_batch_size=min(self.chunk_size, int(test_index.size)),
                    per_device_train_batch_size=min(self.chunk_size, int(train_index.size)),
                    score_args=score_args, overwrite_output_dir=True)
                scores = analyzer.load_pairwise_scores(scores_name="scores")["all_modules"]   # [M', N']
            total += scores.to(torch.float64).numpy().T
        return -total / (len(checkpoints) * num_train)
