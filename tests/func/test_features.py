"""Example features: gradient sketches, checkpoints, the caller's arrays, task features by id, block scaling."""

import numpy as np
import pytest
import torch

from simfluence import RunDataError
from simfluence.tasks import get_task
from simfluence.func.features import (
    align_features,
    block_scales,
    check_features,
    checkpoint_states,
    checkpoint_steps,
    given_features,
    gradient_sketch,
    scale_blocks,
    task_features,
)
from simfluence.func.gradients import gradient_products, trainable_params


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)
    return get_task("digits-mlp", num_train=40, num_test=12)


def test_gradient_sketch_preserves_gradient_products(task):
    model = task.build_model().eval()
    exact = gradient_products(task, model, trainable_params(model)).numpy()
    whole = gradient_sketch(task, "train", dim=10**6) @ gradient_sketch(task, "test", dim=10**6).T
    assert np.allclose(whole, exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max())
    sketched = gradient_sketch(task, "train", dim=1024) @ gradient_sketch(task, "test", dim=1024).T
    assert np.corrcoef(sketched.ravel(), exact.ravel())[0, 1] > 0.95


def test_checkpoints_spread_over_the_run_and_the_start_needs_no_replay():
    assert checkpoint_steps(20, 4) == [0, 5, 10, 15]
    assert checkpoint_steps(20, 1) == [0]
    assert checkpoint_steps(0, 4) == [0]
    assert checkpoint_steps(3, 4) == [0, 1, 2]
    assert checkpoint_states(None, None, [0]) == [None]


def test_task_features_in_the_order_of_the_ids_one_block_per_source(task):
    ids = task.test_ids[[3, 0, 7]]
    features, blocks = task_features(task, "test", ids, ("task", "gradients"), sketch_dim=64)
    pixels = task.example_features("test")
    assert features.dtype == np.float32 and features.shape == (3, pixels.shape[1] + 64)
    assert blocks.tolist() == [[0, pixels.shape[1]], [pixels.shape[1], pixels.shape[1] + 64]]
    assert np.array_equal(features[:, :pixels.shape[1]], pixels[[3, 0, 7]])
    assert np.allclose(features[:, pixels.shape[1]:], gradient_sketch(task, "test", 64)[[3, 0, 7]])
    with pytest.raises(RunDataError, match="1 ids have no features"):
        task_features(task, "test", np.array(["no-such-id"]))
    with pytest.raises(ValueError, match="sources"):
        task_features(task, "test", ids, ("pixels",))


def test_the_callers_features_come_both_or_neither():
    train_ids, test_ids = np.array(["a", "b"]), np.array(["x"])
    assert given_features(None, None, train_ids, test_ids) is None
    train, test = given_features(np.ones((2, 3)), np.zeros((1, 4), dtype=np.int64), train_ids, test_ids)
    assert train.dtype == test.dtype == np.float32 and test.shape == (1, 4)
    for pair, word in (((np.ones((2, 3)), None), "test_features"), ((None, np.ones((1, 3))), "train_features"),
                       ((np.ones((3, 3)), np.ones((1, 3))), r"expected \[2, D\]"),
                       ((np.ones((2, 3)), np.full((1, 3), np.inf)), "NaN or inf")):
        with pytest.raises(RunDataError, match=word):
            given_features(*pair, train_ids, test_ids)
    with pytest.raises(RunDataError, match="3 feature columns.*fitted on 2"):
        check_features(np.ones((1, 3)), test_ids, "test_features", dims=2)
    assert align_features(np.arange(3)[:, None], np.array(["p", "q", "r"]), np.array(["r", "p"]), "f").ravel().tolist() \
        == [2, 0]


def test_each_block_is_scaled_to_unit_root_mean_square():
    features = np.concatenate([np.full((4, 2), 3.0), np.full((4, 3), 0.5)], axis=1).astype(np.float32)
    blocks = np.array([[0, 2], [2, 5]])
    scales = block_scales(features, blocks)
    assert scales.tolist() == [3.0, 0.5]
    assert np.allclose(scale_blocks(features, blocks, scales), 1.0)
    assert block_scales(np.zeros((2, 2)), np.array([[0, 2]])).tolist() == [1e-12]
