"""Pretraining optimizer for the built-in tasks' starting checkpoints."""

from __future__ import annotations

from collections.abc import Callable

import torch


def adam(params: list[torch.Tensor], loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float,
         betas=(0.9, 0.999), eps=1e-8) -> None:
    """Adam on ``params`` for ``steps`` steps of ``loss_fn(step)`` (step from 0), written out.

    ``torch.optim`` first imports ``torch._dynamo``, seconds of start-up in every worker.
    """
    first = [torch.zeros_like(param) for param in params]
    second = [torch.zeros_like(param) for param in params]
    for step in range(1, steps + 1):
        grads = torch.autograd.grad(loss_fn(step - 1), params)
        with torch.no_grad():
            for param, grad, m, v in zip(params, grads, first, second):
                m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
                v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
                denominator = (v / (1 - betas[1] ** step)).sqrt_().add_(eps)
                param.addcdiv_(m, denominator, value=-lr / (1 - betas[0] ** step))
