"""Train a task's model along given curricula and log every test example's loss.

* :func:`train_run` is the reference: a plain PyTorch loop, one run at a time.
* :func:`train_runs_vmap` trains ``R`` runs at once. The ``R`` copies of the weights are
  stacked along a new leading dimension and the model is applied to each copy with
  ``torch.func.vmap`` over ``functional_call``. Runs never interact, so the gradient of
  the *sum* of the runs' batch losses with respect to the stacked weights is, slice by
  slice, each run's own gradient: one ordinary backward pass gives all ``R`` gradients
  (cheaper than ``vmap(grad(...))``, same numbers). It matches the loop to float32
  rounding (max abs difference well below 1e-5 on digits-mlp).

Both start from ``task.build_model()``, take one SGD step per curriculum row on the
mean loss of the row's examples (``-1`` padding skipped) with the step's learning rate
from the task's schedule (:meth:`Task.learning_rates`), and record the loss of every
test example before training (step 0) and after each step in ``eval_steps``. Both can
hand the weights at chosen ``checkpoint_steps`` to a callback (collection stores them
for TracIn-CP). The model
is kept in eval mode (no dropout): a run is then a deterministic function of its
curriculum, which is what a simulator is asked to predict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.func import vmap

from simfluence.errors import UsageError
from simfluence.runs.log import PAD, RunLog, validate_curriculum, validate_eval_steps
from simfluence.tasks.base import Task, state_copy, take

EVAL_CHUNK = 4096
"""Test examples evaluated per forward pass (bounds memory for big test sets)."""


def _check_curricula(task: Task, curricula, eval_steps, source: str) -> tuple[np.ndarray, np.ndarray]:
    curricula = validate_curriculum(curricula, task.num_train, source)
    num_steps = curricula.shape[-2]
    steps = np.arange(num_steps + 1) if eval_steps is None else eval_steps
    return curricula, validate_eval_steps(np.asarray(steps, dtype=np.int64), num_steps, source)


def _test_losses(task: Task, model, params=None) -> torch.Tensor:
    """float32 ``[M]`` loss of every test example (no gradient)."""
    data = task.data
    with torch.no_grad():
        if task.num_test <= EVAL_CHUNK:
            return task.example_losses(model, data.test_inputs, data.test_targets, params)
        chunks = []
        for start in range(0, task.num_test, EVAL_CHUNK):
            index = torch.arange(start, min(start + EVAL_CHUNK, task.num_test))
            chunks.append(task.example_losses(model, take(data.test_inputs, index), data.test_targets[index], params))
    return torch.cat(chunks)


Checkpoint = Callable[[int, dict[str, torch.Tensor]], object]
"""``on_checkpoint(step, state_dict)``: called with the model's weights after ``step`` (0: the start)."""


def _sgd_steps(task: Task, model, optimizer, curriculum: np.ndarray):
    """Take one optimizer step per curriculum row on its batch-mean loss (``-1`` skipped); yield the step.

    The learning rate follows the task's schedule over the whole curriculum's length, so
    a caller that stops early (``train_states``) still sees the rates of the full run.
    """
    data = task.data
    rates = task.learning_rates(curriculum.shape[0])
    for step, row in enumerate(torch.from_numpy(curriculum.astype(np.int64)), start=1):
        index = row[row != PAD]
        for group in optimizer.param_groups:
            group["lr"] = float(rates[step - 1])
        optimizer.zero_grad(set_to_none=True)
        task.example_losses(model, take(data.train_inputs, index), data.train_targets[index]).mean().backward()
        optimizer.step()
        yield step


def train_run(task: Task, curriculum, eval_steps=None, *, run_id: str = "run-000000", seed: int | None = None,
              meta: dict | None = None, checkpoint_steps: Sequence[int] = (),
              on_checkpoint: Checkpoint | None = None) -> RunLog:
    """Train one run with a plain PyTorch loop.

    Args:
        task: the task (data, starting checkpoint, loss, SGD learning rate).
        curriculum: int ``[T, B]`` training-example indices per step, ``-1`` pads.
        eval_steps: int ``[K]`` steps to record, starting at 0; default every step ``0..T``.
        run_id: stored in the returned log.
        seed: stored in the returned log.
        meta: stored in the returned log.
        checkpoint_steps: steps after which ``on_checkpoint`` is called (``0``: before training).
        on_checkpoint: ``on_checkpoint(step, state_dict)`` after each of ``checkpoint_steps``.

    Returns:
        A :class:`RunLog` with ``losses`` float32 ``[K, M]``.
    """
    curriculum, eval_steps = _check_curricula(task, curriculum, eval_steps, f"train_run[{run_id}]")
    if curriculum.ndim != 2:
        raise UsageError(f"curriculum: expected shape [steps, batch], got {curriculum.shape}; "
                         "use train_runs_vmap for several runs")
    checkpoints = _check_checkpoint_steps(checkpoint_steps, curriculum.shape[0], on_checkpoint)
    model = task.build_model().eval()
    optimizer = task.make_optimizer(model.parameters())
    record = np.zeros(curriculum.shape[0] + 1, dtype=bool)
    record[eval_steps] = True
    losses = [_test_losses(task, model)]
    if 0 in checkpoints and on_checkpoint is not None:   # (checkpoints come with a callback)
        on_checkpoint(0, state_copy(model))
    for step in _sgd_steps(task, model, optimizer, curriculum):
        if record[step]:
            losses.append(_test_losses(task, model))
        if step in checkpoints and on_checkpoint is not None:
            on_checkpoint(step, state_copy(model))
    return RunLog(run_id, curriculum, torch.stack(losses).numpy(), eval_steps, seed, dict(meta or {}))


def checkpoint_steps_of(steps: Sequence[int] | None, num_steps: int) -> tuple[int, ...]:
    """``steps`` sorted without repeats, each checked to lie in ``0..num_steps`` (the run length)."""
    steps = tuple(sorted({int(step) for step in steps or ()}))
    if steps and (steps[0] < 0 or steps[-1] > num_steps):
        raise UsageError(f"checkpoint_steps: must lie in 0..{num_steps} (the run length), got {list(steps)}")
    return steps


def _check_checkpoint_steps(steps: Sequence[int], num_steps: int, callback) -> set[int]:
    steps = checkpoint_steps_of(steps, num_steps)
    if steps and callback is None:
        raise UsageError("checkpoint_steps: given without on_checkpoint, so the checkpoints would be lost")
    return set(steps)


def train_runs_vmap(task: Task, curricula, eval_steps=None, *, run_ids: Sequence[str] | None = None,
                    seeds: Sequence[int | None] | None = None, meta: dict | None = None,
                    checkpoint_steps: Sequence[int] = (),
                    on_checkpoint: Callable[[int, int, dict[str, torch.Tensor]], object] | None = None,
                    ) -> list[RunLog]:
    """Train ``R`` runs at once, vectorised over runs; same results as :func:`train_run`.

    Args:
        task: the task; its optimizer must be plain SGD.
        curricula: int ``[R, T, B]``, ``-1`` pads.
        eval_steps: int ``[K]``, default ``0..T``.
        run_ids: ``R`` names, default ``run-000000, ...``.
        seeds: ``R`` curriculum seeds to store with the runs.
        meta: stored in every returned log.
        checkpoint_steps: steps after which ``on_checkpoint`` is called (``0``: before training).
        on_checkpoint: ``on_checkpoint(r, step, state_dict)`` for every run ``r`` after each of
            ``checkpoint_steps``.

    Memory is about ``R`` copies of the weights and their gradients plus ``R`` times one
    step's activations: chunk ``R`` for big models.
    """
    if task.optimizer != "sgd":
        raise UsageError(f"task '{task.name}': optimizer '{task.optimizer}' is not supported by the vectorised "
                         "trainer; collect with vectorize=False")
    curricula, eval_steps = _check_curricula(task, curricula, eval_steps, "train_runs_vmap")
    if curricula.ndim != 3:
        raise UsageError(f"curricula: expected shape [runs, steps, batch], got {curricula.shape}")
    num_runs, num_steps, _ = curricula.shape
    checkpoints = _check_checkpoint_steps(checkpoint_steps, num_steps, on_checkpoint)
    run_ids = [f"run-{r:06d}" for r in range(num_runs)] if run_ids is None else list(run_ids)
    seeds = [None] * num_runs if seeds is None else list(seeds)
    if len(run_ids) != num_runs or len(seeds) != num_runs:
        raise UsageError(f"run_ids/seeds: need one per run ({num_runs}), got {len(run_ids)} and {len(seeds)}")

    data = task.data
    model = task.build_model().eval()
    # Trained parameters get one copy per run. Frozen parameters (requires_grad=False,
    # which SGD in the loop leaves alone too) and buffers are shared.
    names = [name for name, value in model.named_parameters() if value.requires_grad]
    params = {name: value.detach().unsqueeze(0).repeat(num_runs, *[1] * value.dim()).requires_grad_()
              for name, value in model.named_parameters() if value.requires_grad}
    buffers = {name: value.detach() for name, value in model.named_buffers()}
    buffers.update({name: value.detach() for name, value in model.named_parameters() if not value.requires_grad})

    def batch_loss(run_params, inputs, targets, weights):
        # Padding slots hold a real example with weight 0: same mean as skipping them.
        losses = task.example_losses(model, inputs, targets, {**run_params, **buffers})
        return (losses * weights).sum() / weights.sum()

    # State-dict keys to the trained parameter behind each (tied weights share one), if any.
    parameter_names = {id(value): name for name, value in model.named_parameters()}
    state_sources = {key: parameter_names.get(id(value)) for key, value in model.state_dict(keep_vars=True).items()}
    start_state = state_copy(model)

    def save_checkpoints(step: int) -> None:
        assert on_checkpoint is not None  # _check_checkpoint_steps: no checkpoint steps without it
        for r in range(num_runs):
            on_checkpoint(r, step, {key: params[name][r].detach().clone() if name in params else start_state[key]
                                    for key, name in state_sources.items()})

    losses_of_runs = vmap(batch_loss)
    evaluate = vmap(lambda run_params: _test_losses(task, model, {**run_params, **buffers}))

    record = np.zeros(num_steps + 1, dtype=bool)
    record[eval_steps] = True
    index_all = torch.from_numpy(curricula.astype(np.int64))            # [R, T, B]
    weights_all = (index_all != PAD).to(torch.float32)                  # [R, T, B]
    index_all = index_all.clamp_min(0)
    rates = task.learning_rates(num_steps)
    with torch.no_grad():
        losses = [evaluate(params)]                                     # each [R, M]
    if 0 in checkpoints:
        save_checkpoints(0)
    for step in range(1, num_steps + 1):
        index = index_all[:, step - 1]                                  # [R, B]
        total = losses_of_runs(params, take(data.train_inputs, index), data.train_targets[index],
                               weights_all[:, step - 1]).sum()
        grads = torch.autograd.grad(total, [params[name] for name in names])
        with torch.no_grad():
            for name, grad in zip(names, grads):
                params[name].sub_(grad, alpha=float(rates[step - 1]))
            if record[step]:
                losses.append(evaluate(params))
        if step in checkpoints:
            save_checkpoints(step)
    stacked = torch.stack(losses, dim=1).numpy()                        # [R, K, M]
    return [RunLog(run_ids[r], curricula[r], stacked[r], eval_steps, seeds[r], dict(meta or {}))
            for r in range(num_runs)]


def train_states(task: Task, curriculum, steps: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """Model state dicts after each of ``steps`` (0 = the starting checkpoint) along ``curriculum``.

    Replays the run the way the task's runs are trained (training is deterministic given the
    curriculum), so these are the checkpoints that run passed through: a ``"torch"`` task with
    the loop of :func:`train_run`, a ``"trainer"`` task (``task.runner``) with its Hugging Face
    ``Trainer`` through :func:`simfluence.collect.hf.trainer_states`, the code path its
    collection takes. Used by TracIn-CP and the peers.

    Args:
        task: the task.
        curriculum: int ``[T, B]``, ``-1`` pads.
        steps: steps in ``0..T``.

    Returns:
        One state dict per distinct step, in increasing step order.
    """
    curriculum, _ = _check_curricula(task, curriculum, None, "train_states")
    if curriculum.ndim != 2:
        raise UsageError(f"curriculum: expected shape [steps, batch], got {curriculum.shape}")
    wanted = sorted({int(step) for step in steps})
    if not wanted or wanted[0] < 0 or wanted[-1] > curriculum.shape[0]:
        raise UsageError(f"steps: must lie in 0..{curriculum.shape[0]}, got {list(steps)}")
    if task.runner == "trainer":
        from simfluence.collect.hf import trainer_states

        trainer_task: Any = task   # a Trainer task has make_trainer
        return trainer_states(trainer_task.make_trainer, curriculum, wanted)
    if task.runner != "torch":
        raise UsageError(f"task '{task.name}': unknown runner '{task.runner}'; expected 'torch' or 'trainer'")
    model = task.build_model().eval()
    optimizer = task.make_optimizer(model.parameters())
    states = {0: state_copy(model)} if 0 in wanted else {}
    for step in _sgd_steps(task, model, optimizer, curriculum):
        if step in wanted:
            states[step] = state_copy(model)
        if step == wanted[-1]:
            break
    return [states[step] for step in wanted]
