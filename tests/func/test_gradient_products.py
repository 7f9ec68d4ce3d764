"""gradient_products in bounded memory, with Adam's diagonal and normalised rows, against an explicit reference."""

import numpy as np
import pytest
import torch

from simfluence.func.gradients import gradient_products, trainable_params
from simfluence.tasks import get_task


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)
    return get_task("digits-mlp", num_train=30, num_test=9)


def reference_gradients(task, model, split):
    """float64 ``[n, P]``: one torch.autograd backward pass per example (no vmap)."""
    inputs, targets = (task.data.train_inputs, task.data.train_targets) if split == "train" else \
        (task.data.test_inputs, task.data.test_targets)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for j in range(len(targets)):
        loss = task.example_losses(model, inputs[j:j + 1], targets[j:j + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("preconditioner,normalise", [(None, False), ("adam", False), ("adam", True), (None, True)])
def test_products_match_an_explicit_sum(task, preconditioner, normalise):
    model = task.build_model().eval()
    train, test = reference_gradients(task, model, "train"), reference_gradients(task, model, "test")
    eps = 1e-8
    diagonal = np.sqrt((train ** 2).mean(axis=0)) + eps if preconditioner == "adam" else np.ones(train.shape[1])
    expected = np.zeros((len(train), len(test)))
    for i in range(len(train)):
        for m in range(len(test)):
            expected[i, m] = np.sum(train[i] * test[m] / diagonal)
        if normalise:
            expected[i] /= np.sqrt(np.sum(train[i] * train[i] / diagonal))
    params = trainable_params(model)
    whole = gradient_products(task, model, params, preconditioner=preconditioner, normalise_train=normalise).numpy()
    # tiny memory: one test example and a few training examples at a time, parameters in small blocks
    size = sum(p.numel() for p in params.values())
    chunked = gradient_products(task, model, params, chunk_size=4, preconditioner=preconditioner,
                                normalise_train=normalise, test_chunk_size=1, memory_bytes=4 * size).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(whole, expected, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(chunked, expected, rtol=1e-4, atol=1e-5 * scale)


def test_unknown_preconditioner_is_refused(task):
    model = task.build_model()
    with pytest.raises(ValueError, match="preconditioner"):
        gradient_products(task, model, trainable_params(model), preconditioner="kfac")
