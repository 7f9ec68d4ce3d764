r"""Optimizer steps as pure functions of the training state, to replay a run and differentiate through it.

A run's update rule (:class:`UpdateRule`) is read from the real optimizer that trains it
(:func:`rule_from_optimizer`: ``torch.optim.SGD`` without momentum, ``Adam`` or ``AdamW``; the
Hugging Face ``Trainer``'s through :func:`simfluence.collect.hf.trainer_update_rule`) and
applied by :func:`apply_update` to a state of plain tensors, so ``torch.func`` can
differentiate a step with respect to the state and the batch's gradient.

With :math:`g` the batch gradient of step :math:`t` (1-based), :math:`\eta_t` its learning rate
and a group's weight decay :math:`\lambda`, one step is, after clipping
:math:`g \leftarrow g \min(1, c / (\lVert g \rVert + 10^{-6}))` to ``max_grad_norm`` :math:`c`
over all trained weights (as ``torch.nn.utils.clip_grad_norm_``):

* ``sgd``: :math:`g \leftarrow g + \lambda\theta`, :math:`\theta \leftarrow \theta - \eta_t g`;
* ``adam`` (L2 decay, ``torch.optim.Adam``): :math:`g \leftarrow g + \lambda\theta`, then the Adam step;
* ``adamw`` (decoupled decay, ``torch.optim.AdamW``): :math:`\theta \leftarrow (1 - \eta_t\lambda)\theta`,
  then the Adam step :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
  :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
  :math:`\theta \leftarrow \theta - \frac{\eta_t}{1-\beta_1^t}\, m / (\sqrt{v / (1-\beta_2^t)} + \epsilon)`.

These are the operations of PyTorch's own implementations, in the same order. Where
:math:`v = 0` (a weight whose gradient has been exactly zero so far, such as the embedding
of a token no batch contained) the square root's derivative is taken as 0: such a weight's
:math:`m` is 0 too, and no weight on the batch's examples can move its gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from simfluence.errors import UsageError

Params = dict[str, torch.Tensor]
State = dict[str, Params]
"""``{"theta": weights}`` for SGD, plus ``"m"`` and ``"v"`` (Adam's moments) for Adam and AdamW."""

KINDS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class ParamGroup:
    r"""Weights trained with the same settings (one ``param_groups`` entry of the optimizer).

    Attributes:
        names: the weights' names (``model.named_parameters()``).
        rates: float64 ``[T]``: the group's learning rate at each step.
        weight_decay: :math:`\lambda` (L2 for ``sgd``/``adam``, decoupled for ``adamw``).
        betas: Adam's :math:`(\beta_1, \beta_2)`.
        eps: Adam's :math:`\epsilon`.
    """

    names: tuple[str, ...]
    rates: np.ndarray
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class UpdateRule:
    """How a run updates its weights at each step (module docstring for the math).

    Attributes:
        kind: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        groups: the weights and their settings; every trained weight is in exactly one.
        max_grad_norm: clip the batch gradient's norm over all trained weights to this; ``None``: no clipping.
    """

    kind: str
    groups: tuple[ParamGroup, ...]
    max_grad_norm: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UsageError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        lengths = {group.rates.shape for group in self.groups}
        if len(lengths) != 1:
            raise UsageError(f"groups: every group needs rates of the same length [T], got {sorted(lengths)}")

    @property
    def num_steps(self) -> int:
        """``T``: the steps the rule has rates for."""
        return int(self.groups[0].rates.shape[0])

    @property
    def names(self) -> tuple[str, ...]:
        """Every trained weight's name."""
        return tuple(name for group in self.groups for name in group.names)

    @property
    def learning_rates(self) -> np.ndarray:
        """float64 ``[T]``: the first group's learning rates (those of every group, for one group)."""
        return self.groups[0].rates

    @property
    def plain_sgd(self) -> bool:
        """SGD without weight decay or clipping: ``theta - rate * g``."""
        return (self.kind == "sgd" and self.max_grad_norm is None
                and all(group.weight_decay == 0 for group in self.groups))

    def initial_state(self, params: Mapping[str, torch.Tensor]) -> State:
        """The state before the first step: the weights (and zero moments for Adam)."""
        missing = [name for name in self.names if name not in params]
        if missing:
            raise UsageError(f"params: the update rule trains {missing[:3]}, which the model does not have")
        theta = {name: params[name] for name in self.names}
        if self.kind == "sgd":
            return {"theta": theta}
        return {"theta": theta, "m": {name: torch.zeros_like(value) for name, value in theta.items()},
                "v": {name: torch.zeros_like(value) for name, value in theta.items()}}


def sgd_rule(names: Iterable[str], rates: np.ndarray) -> UpdateRule:
    """Plain SGD of every weight in ``names`` at ``rates`` float64 ``[T]``."""
    return UpdateRule("sgd", (ParamGroup(tuple(names), np.asarray(rates, dtype=np.float64)),))


def rule_from_optimizer(optimizer: torch.optim.Optimizer, names: Mapping[int, str], rates: np.ndarray,
                        max_grad_norm: float | None = None) -> UpdateRule:
    """The :class:`UpdateRule` of a real PyTorch optimizer.

    Args:
        optimizer: a ``torch.optim.SGD`` (no momentum), ``Adam`` or ``AdamW`` (no AMSGrad, not
            maximising).
        names: ``id(parameter) -> name`` of the model's weights.
        rates: float64 ``[G, T]`` (one row per parameter group) or ``[T]`` (every group).
        max_grad_norm: the run's gradient clipping (``None``: none).

    Raises:
        ValueError: for another optimizer or a setting the replay does not follow.
    """
    kinds = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
    kind = kinds.get(type(optimizer))
    if kind is None:
        raise UsageError(f"optimizer: {type(optimizer).__name__} cannot be replayed; supported: torch.optim.SGD "
                         "(no momentum), Adam and AdamW")
    rates = np.asarray(rates, dtype=np.float64)
    if rates.ndim == 1:
        rates = np.broadcast_to(rates, (len(optimizer.param_groups), rates.size))
    if rates.ndim != 2 or rates.shape[0] != len(optimizer.param_groups):
        raise UsageError(f"rates: expected [T] or [groups={len(optimizer.param_groups)}, T], got {rates.shape}")
    groups = []
    for group, group_rates in zip(optimizer.param_groups, rates):
        unsupported = [key for key, off in (("momentum", 0), ("nesterov", False), ("amsgrad", False),
                                            ("maximize", False), ("differentiable", False))
                       if group.get(key, off) not in (off, None)]
        if kind == "adam" and group.get("decoupled_weight_decay", False):
            kind = "adamw"
        if unsupported:
            raise UsageError(f"optimizer: {type(optimizer).__name__} with {unsupported} cannot be replayed; use "
                             "the defaults for them")
        try:
            group_names = tuple(names[id(param)] for param in group["params"] if param.requires_grad)
        except KeyError:
            raise UsageError("optimizer: it trains a tensor that is not one of the model's parameters") from None
        betas = tuple(float(beta) for beta in group.get("betas", (0.9, 0.999)))
        groups.append(ParamGroup(group_names, np.array(group_rates), float(group.get("weight_decay", 0.0)),
                                 (betas[0], betas[1]), float(group.get("eps", 1e-8))))
    clip = None if max_grad_norm is None or max_grad_norm <= 0 else float(max_grad_norm)
    return UpdateRule(kind, tuple(group for group in groups if group.names), clip)


def apply_update(rule: UpdateRule, state: State, grads: Mapping[str, torch.Tensor], step: int) -> State:
    """The state after step ``step`` (0-based) with batch gradient ``grads`` (module docstring; differentiable)."""
    theta = state["theta"]
    if rule.max_grad_norm is not None:
        norms = torch.stack([torch.linalg.vector_norm(grads[name]) for name in rule.names])
        scale = torch.clamp(rule.max_grad_norm / (torch.linalg.vector_norm(norms) + 1e-6), max=1.0)
        grads = {name: grads[name] * scale for name in rule.names}
    if rule.kind == "sgd":
        new = {}
        for group in rule.groups:
            rate = float(group.rates[step])
            for name in group.names:
                g = grads[name] + group.weight_decay * theta[name] if group.weight_decay else grads[name]
                new[name] = theta[name] - rate * g
        return {"theta": new}
    new_theta, new_m, new_v = {}, {}, {}
    count = step + 1
    for group in rule.groups:
        rate, (beta1, beta2) = float(group.rates[step]), group.betas
        correction1, correction2 = 1 - beta1 ** count, (1 - beta2 ** count) ** 0.5
        for name in group.names:
            param, g = theta[name], grads[name]
            if group.weight_decay and rule.kind == "adam":
                g = g + group.weight_decay * param
            elif group.weight_decay:
                param = param * (1 - rate * group.weight_decay)
            m = state["m"][name] * beta1 + g * (1 - beta1)
            v = state["v"][name] * beta2 + g * g * (1 - beta2)
            denominator = _sqrt_zero_safe(v) / correction2 + group.eps
            new_theta[name] = param - (rate / correction1) * m / denominator
            new_m[name], new_v[name] = m, v
    return {"theta": new_theta, "m": new_m, "v": new_v}


def _sqrt_zero_safe(value: torch.Tensor) -> torch.Tensor:
    """``sqrt(value)`` for ``value >= 0`` whose derivative is 0 (not infinite) where ``value == 0``."""
    positive = value > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, value, torch.ones_like(value))),
                       torch.zeros_like(value))
