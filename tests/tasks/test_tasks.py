"""Task interface, registry and the digits-mlp task."""

import time

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from simfluence.tasks import DigitsMLP, Task, TaskData, get_task, list_tasks, take
from simfluence.tasks.digits import _digits, _split


def test_registry_lists_and_builds_digits():
    assert "digits-mlp" in [info.name for info in list_tasks()]
    task = get_task("digits-mlp", learning_rate=0.5)
    assert isinstance(task, DigitsMLP) and task.learning_rate == 0.5
    assert get_task(task) is task
    with pytest.raises(ValueError, match="unknown; choose one of: .*digits-mlp"):
        get_task("no-such-task")
    with pytest.raises(ValueError, match="bad options"):
        get_task("digits-mlp", no_such_option=1)


def test_digits_data_shapes_and_disjoint_splits():
    task = get_task("digits-mlp")
    data = task.data
    assert (task.num_train, task.num_test) == (200, 100)
    assert data.train_inputs.shape == (200, 64) and data.train_inputs.dtype == torch.float32
    assert data.test_targets.shape == (100,) and data.test_targets.dtype == torch.int64
    split = _split(task.split_seed, task.num_train, task.num_test, task.pretrain_per_class)
    groups = [set(split[name].tolist()) for name in ("train", "test", "pretrain")]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1:])
    assert len(groups[2]) == sum(task.pretrain_per_class)
    assert set(data.train_ids) == {f"digits-{index}" for index in split["train"]}
    assert set(data.test_targets.tolist()) == set(range(10))  # every class is tested


def test_digits_file_matches_sklearn_load_digits():
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    mine_images, mine_labels = _digits()
    np.testing.assert_array_equal(mine_images, images)
    np.testing.assert_array_equal(mine_labels, labels)


def test_build_model_is_the_same_checkpoint_every_call_and_a_fresh_copy():
    task = get_task("digits-mlp")
    first, second = task.build_model(), task.build_model()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        next(first.parameters()).add_(1.0)
    assert torch.equal(task.build_model().state_dict()["0.weight"], second.state_dict()["0.weight"])


def test_pretraining_is_fast_and_leaves_room_to_learn():
    task = DigitsMLP(init_seed=12345)  # a setting not cached yet: really pretrains
    start = time.perf_counter()
    model = task.build_model()
    assert time.perf_counter() - start < 2.0
    with torch.no_grad():
        losses = task.example_losses(model, task.data.test_inputs, task.data.test_targets)
        strong = task.data.test_targets < 5
    # Pretrained mostly on digits 0-4: those are learnt, 5-9 are not yet.
    assert losses[strong].mean() < 0.5 < 1.0 < losses[~strong].mean()


def test_config_round_trips_through_get_task():
    task = DigitsMLP(learning_rate=0.07, pretrain_per_class=[3] * 10)
    again = get_task(task.name, **task.config())
    assert again == task and again.meta() == task.meta()


def test_task_pickles_without_its_data():
    import pickle

    task = get_task("digits-mlp")
    task.data
    payload = pickle.dumps(task)
    assert len(payload) < 2000
    assert pickle.loads(payload).num_test == 100


def test_per_example_gradients_via_torch_func_average_to_the_batch_gradient():
    """The interface gradient-based attribution relies on: model, loss and data from the task."""
    task = get_task("digits-mlp")
    model = task.build_model()
    params = {name: value.detach() for name, value in model.named_parameters()}
    index = torch.tensor([0, 5, 9])
    inputs, targets = take(task.data.train_inputs, index), task.data.train_targets[index]

    def loss(p, x, y):
        return task.example_losses(model, x[None], y[None], params=p)[0]

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)
    task.example_losses(model, inputs, targets).mean().backward()
    for name, value in model.named_parameters():
        torch.testing.assert_close(per_example[name].mean(0), value.grad, rtol=1e-5, atol=1e-6)


def test_task_data_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="^train_targets: has 2 rows"):
        TaskData(np.array(["a", "b", "c"]), np.array(["t"]), torch.zeros(3, 2), torch.zeros(2),
                 torch.zeros(1, 2), torch.zeros(1))


def test_a_user_task_with_dict_inputs_fits_the_interface():
    class Toy(Task):
        name, description, source = "toy", "toy", "random"
        learning_rate, batch_size = 0.1, 2

        def load_data(self):
            g = torch.Generator().manual_seed(0)
            x = {"features": torch.randn(6, 3, generator=g)}
            return TaskData([f"a{i}" for i in range(6)], ["t0", "t1"], x, torch.randn(6, generator=g),
                            {"features": torch.randn(2, 3, generator=g)}, torch.randn(2, generator=g))

        def build_model(self):
            torch.manual_seed(0)
            return _KeywordModel()

        def example_loss(self, outputs, targets):
            return (outputs - targets) ** 2

    task = Toy()
    assert task.example_losses(task.build_model(), task.data.test_inputs, task.data.test_targets).shape == (2,)
    assert task.meta()["task"] == "toy" and task.config() == {"learning_rate": 0.1, "batch_size": 2,
                                                              "lr_schedule": "constant", "warmup_steps": 0}


class _KeywordModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, features):
        return self.linear(features).squeeze(-1)
