r"""Per-example gradients of a task's loss, in bounded memory.

For a task (model, per-example loss, data) and parameters :math:`\theta` (the trainable
ones only), :func:`per_example_gradients` returns :math:`g_j = \nabla_\theta \ell(z_j; \theta)`
flattened to ``[n, P]``, computed ``chunk_size`` examples at a time with
``torch.func.vmap(torch.func.grad(...))`` (a plain autograd loop is the fallback for models
that ``vmap`` cannot batch). :func:`gradient_products` returns the matrix of inner products
:math:`g_{\text{train},i} \cdot g_{\text{test},m}` ``[N, M]`` in bounded memory: at most
``memory_bytes`` of test gradients and of training gradients are held at a time (for a model
too large for all test gradients at once, the training gradients are recomputed once per chunk
of test examples), and the float64 products are accumulated over blocks of parameters. Optionally
the products are preconditioned by Adam's diagonal,
:math:`g_i^\top \operatorname{diag}(\sqrt{v} + \epsilon)^{-1} g_m` with :math:`v` the mean
squared training gradient (one extra pass over the training examples), and the training rows
normalised by their own (preconditioned) norm.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import grad, vmap

from simfluence.errors import UsageError
from simfluence.tasks.base import Inputs, Task, num_examples, take


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters that require gradients (frozen layers excluded)."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def model_at(task: Task, state: Mapping[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The task's model in eval mode with ``state`` loaded (``None``: the start) and its trained weights."""
    model = task.build_model().eval()
    if state is not None:
        model.load_state_dict(state)
    return model, trainable_params(model)


def composite_attention():
    """Context: scaled dot-product attention by its composite "math" kernel (same results up to rounding).

    PyTorch's fused CPU attention kernel has no double backward, which metagradients need; the
    composite kernel is plain batched matrix products. (Per-example gradients keep the fused
    kernel: on minilm-finetune the composite one was 1.13x faster on one thread and 0.96x on two.)
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


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


MEMORY_BYTES = 2 ** 30
"""Default bound on the gradients :func:`gradient_products` holds at once, per side (test and training)."""


def gradient_products(task: Task, model: nn.Module, params: Mapping[str, torch.Tensor],
                      test_transform=None, chunk_size: int = 256, *, preconditioner: str | None = None,
                      eps: float = 1e-8, normalise_train: bool = False, test_chunk_size: int | None = None,
                      memory_bytes: int = MEMORY_BYTES) -> torch.Tensor:
    r"""float64 ``[N, M]``: ``g_train_i . T(g_test_m)`` over the task's training and test sets.

    Args:
        task: supplies the data and ``example_losses``.
        model: the module whose parameters ``params`` replace (functionally).
        params: name -> tensor, e.g. :func:`trainable_params` of a checkpoint.
        test_transform: maps a chunk of test gradients ``[m, P]`` (row by row) before the
            products (e.g. an inverse-Hessian solve for influence functions); by default the identity.
        chunk_size: training examples per vectorised gradient pass (fewer where ``chunk_size``
            gradients would exceed ``memory_bytes``).
        preconditioner: ``None`` (plain inner products) or ``"adam"``: divide by Adam's
            diagonal :math:`\sqrt{v} + \epsilon`, :math:`v = \frac1N \sum_i g_i^2` over the
            training examples (a first pass over them).
        eps: Adam's :math:`\epsilon`.
        normalise_train: divide each training row by the training gradient's (preconditioned)
            norm :math:`\sqrt{g_i^\top D^{-1} g_i}` (rows with a zero gradient stay 0).
        test_chunk_size: test gradients held at once; ``None``: as many as fit in
            ``memory_bytes`` as float32 (all of them for small models). Each chunk of test
            examples costs one pass over the training gradients.
        memory_bytes: the bound on each side's gradients held at once (see above).

    Peak memory is about three times ``memory_bytes`` plus one forward/backward pass of
    ``chunk_size`` examples and, with the preconditioner, two ``[P]`` vectors.
    """
    if preconditioner not in (None, "adam"):
        raise UsageError(f"preconditioner: expected None or 'adam', got {preconditioner!r}")
    data = task.data
    size = sum(value.numel() for value in params.values())
    fits = max(1, memory_bytes // max(4 * size, 1))
    train_chunk = max(1, min(chunk_size, fits))
    test_chunk = max(1, test_chunk_size if test_chunk_size is not None else fits)

    def train_gradients():
        for start in range(0, task.num_train, train_chunk):
            index = torch.arange(start, min(start + train_chunk, task.num_train))
            yield index, per_example_gradients(task, model, params, take(data.train_inputs, index),
                                               data.train_targets[index], train_chunk)

    denominator = None
    if preconditioner == "adam":
        second = torch.zeros(size, dtype=torch.float64)
        for _, train in train_gradients():
            second += train.to(torch.float64).square().sum(dim=0)
        denominator = ((second / task.num_train).sqrt() + eps).to(torch.float32)
        del second
    products = torch.zeros(task.num_train, task.num_test, dtype=torch.float64)
    norms = torch.zeros(task.num_train, dtype=torch.float64)
    for first in range(0, task.num_test, test_chunk):
        columns = torch.arange(first, min(first + test_chunk, task.num_test))
        test = per_example_gradients(task, model, params, take(data.test_inputs, columns),
                                     data.test_targets[columns], train_chunk)
        if test_transform is not None:
            test = test_transform(test)
        if denominator is not None:
            test = test / denominator.to(test.dtype)
        block = max(1, memory_bytes // (8 * (train_chunk + columns.numel())))   # float64 columns at once
        for index, train in train_gradients():
            for low in range(0, size, block):
                piece = train[:, low:low + block].to(torch.float64)
                products[index[:, None], columns[None, :]] += piece @ test[:, low:low + block].to(torch.float64).T
                if normalise_train and first == 0:
                    scaled = piece if denominator is None else piece / denominator[low:low + block].to(torch.float64)
                    norms[index] += (piece * scaled).sum(dim=1)
        del test
    if normalise_train:
        products /= torch.where(norms > 0, norms.sqrt(), torch.ones_like(norms))[:, None]
    return products
