r"""Per-example gradients of a task's loss, in bounded memory.

For a task (model, per-example loss, data) and parameters :math:`\theta` (the trainable
ones only), :func:`per_example_gradients` returns :math:`g_j = \nabla_\theta \ell(z_j; \theta)`
flattened to ``[n, P]``, computed ``chunk_size`` examples at a time with
``torch.func.vmap(torch.func.grad(...))`` (a plain autograd loop is the fallback for models
that ``vmap`` cannot batch). :func:`gradient_products` returns the matrix of inner products
:math:`g_{\text{train},i} \cdot g_{\text{test},m}` ``[N, M]`` without holding all training
gradients at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import grad, vmap

from simfluence.tasks.base import Inputs, Task, num_examples, take


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters that require gradients (frozen layers excluded)."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def _one(inputs: Inputs) -> Inputs:
    if isinstance(inputs, Mapping):
        return {key: value.unsqueeze(0) for key, value in inputs.items()}
    return inputs.unsqueeze(0)


def per_example_gradients(task: Task, model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Inputs,
                          targets: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """Float ``[n, P]``: flattened gradient of each example's loss w.r.t. ``params``.

    Args:
        task: supplies ``example_losses(model, inputs, targets, params)``.
        model: the module whose parameters ``params`` replace (functionally).
        params: name -> tensor, e.g. :func:`trainable_params` of a checkpoint.
        inputs: ``n`` examples (a tensor or a dict of tensors, examples on dim 0).
        targets: their targets, examples on dim 0.
        chunk_size: examples per vectorised pass (memory is ``O(chunk_size * P)``).
    """
    names = list(params)
    count = num_examples(inputs)

    def loss(p, x, y):
        return task.example_losses(model, _one(x), y.unsqueeze(0), params=p)[0]

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    chunks = []
    for start in range(0, count, chunk_size):
        index = torch.arange(start, min(start + chunk_size, count))
        x, y = take(inputs, index), targets[index]
        try:
            grads = per_example(dict(params), x, y)
            flat = torch.cat([grads[name].reshape(index.numel(), -1) for name in names], dim=1)
        except (RuntimeError, NotImplementedError):  # ops without a batching rule
            flat = _looped_gradients(task, model, params, x, y)
        chunks.append(flat.detach())
    return torch.cat(chunks)


def _looped_gradients(task: Task, model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Inputs,
                      targets: torch.Tensor) -> torch.Tensor:
    leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
    rows = []
    for j in range(num_examples(inputs)):
        index = torch.tensor([j])
        value = task.example_losses(model, take(inputs, index), targets[index], params=leaves)[0]
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, leaves.values())]))
    return torch.stack(rows)


def gradient_products(task: Task, model: nn.Module, params: Mapping[str, torch.Tensor],
                      test_transform=None, chunk_size: int = 256) -> torch.Tensor:
    """float64 ``[N, M]``: ``g_train_i . T(g_test_m)`` over the task's training and test sets.

    ``test_transform`` maps the test gradients ``[M, P]`` before the products (e.g. an
    inverse-Hessian solve for influence functions); by default the identity.
    """
    data = task.data
    test = per_example_gradients(task, model, params, data.test_inputs, data.test_targets, chunk_size)
    if test_transform is not None:
        test = test_transform(test)
    test = test.to(torch.float64)
    products = []
    for start in range(0, task.num_train, chunk_size):
        index = torch.arange(start, min(start + chunk_size, task.num_train))
        train = per_example_gradients(task, model, params, take(data.train_inputs, index), data.train_targets[index],
                                      chunk_size)
        products.append(train.to(torch.float64) @ test.T)
    return torch.cat(products)
