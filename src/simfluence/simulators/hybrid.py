r"""``hybrid``: linear-identity whose ridge shrinks ``B`` towards a gradient prior, not towards 0.

.. math::

    L_t = \Bigl(1 + \sum_{i \in c_t} a_i\Bigr) L_{t-1} + \sum_{i \in c_t} B_i,
    \qquad
    \min_{a, B}\ \sum_{\text{transitions}} (\text{one-step error})^2
        + \lambda \bigl(\lVert a \rVert^2 + \lVert B - s\,G \rVert^2\bigr)

``G`` ``[N, M]`` are the additive scores of a gradient method along a replay of the first
fitting run (``tracin-cp``: learning-rate weighted gradient inner products at checkpoints;
``grad-dot``: at the start) and ``s`` their least-squares scale on the fitting transitions
(the ``-scaled`` kinds). The gradient method knows which training example moves which test
example from one run; the logged runs correct it where they disagree. With few runs or a strong
``lambda`` the fit is the scaled gradient method (plus the identity-centred ``a``); with many
runs and a weak one it is ``linear-identity``. ``lambda`` is chosen by cross-validation over the
fitting runs, as for ``linear-identity``, so the data decides between the two.

As for ``linear-identity``, the rollout is blended with the mean trajectory by per-test-example
weights chosen in that cross-validation (``nest_mean``, :mod:`simfluence.simulators.linear`).

Solved as ``linear-identity`` on the residual targets ``L_t - L_{t-1} - X_t s G``, then
``B = s G + B_residual``; the saved table holds ``B`` itself, so loading needs no task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from simfluence.runs.log import RunSet
from simfluence.simulators.base import Capabilities, register
from simfluence.simulators.config import TaskConfig, integer, one_of, setting
from simfluence.simulators.linear import _DTYPES, LinearConfig, LinearIdentitySimulator

PRIORS = ("tracin-cp", "grad-dot")


@dataclass(frozen=True)
class HybridConfig(TaskConfig, LinearConfig):
    """Settings of ``hybrid``: linear-identity's, the task, and which gradient method gives the prior."""

    prior: str = setting("tracin-cp", "The gradient method whose least-squares scaled scores B is shrunk towards: "
                         "'tracin-cp' or 'grad-dot'.")
    chunk_size: int = setting(256, "Examples per vectorised gradient pass of the prior.")

    def validate(self) -> None:
        """Linear's and the task's checks, the prior and the chunk size."""
        super().validate()
        one_of("prior", self.prior, PRIORS)
        self._set("chunk_size", integer("chunk_size", self.chunk_size, 1))


@register
class HybridSimulator(LinearIdentitySimulator):
    """Linear-identity with ridge towards a scaled gradient prior (see the module docstring).

    Args:
        prior: ``"tracin-cp"`` (default) or ``"grad-dot"``.
        task / task_options: the task the gradients come from (default: the runs' meta).
        chunk_size: examples per gradient pass.
        **linear: the settings of :class:`~simfluence.simulators.linear.LinearSimulator`.

    ``fit_info`` adds ``prior``, ``prior_scale`` (``s``) and ``prior_seconds``.
    """

    kind = "hybrid"
    capabilities = Capabilities(
        "extension", task="required", ridge=True, cross_validation=True, device=True, precision=True,
        column_rollout=True, expected_rollout=True)
    config_class = HybridConfig
    config: HybridConfig

    def _fit(self, runs: RunSet) -> None:
        from simfluence.simulators.base import simulator_class
        from simfluence.simulators.gradient import GradientSimulator

        config = self.config
        start = time.perf_counter()
        prior = simulator_class(f"{config.prior}-scaled")(
            task=self.task_spec, task_options=config.task_options, chunk_size=config.chunk_size,
            device=config.device, dtype=config.dtype)
        assert isinstance(prior, GradientSimulator)
        prior.fit(runs)
        seconds = time.perf_counter() - start
        self.prior_b = prior.table.to(torch.device(config.device), _DTYPES[config.dtype])
        try:
            super()._fit(runs)
        finally:
            self.prior_b = None  # fitted into the table; not state of its own
        self.fit_info.update(prior=config.prior, prior_scale=float(prior.scale), prior_seconds=seconds,
                             task=prior.fit_info.get("task"))
