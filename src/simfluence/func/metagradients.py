r"""Exact metagradients of a training run: how each example occurrence moves the final test losses.

A curriculum ``c`` int ``[T, B]`` (``-1`` pads) is replayed with a weight :math:`w_{t,b}` on
every example occurrence. With :math:`R_t` the real (non-pad) slots of step :math:`t`,
:math:`n_t = |R_t|`, :math:`\eta_t` the task's learning rate of step :math:`t`
(:meth:`Task.learning_rates`) and :math:`\ell(z; \theta)` the task's per-example loss, plain
SGD on the weighted batch loss is

.. math::

    \theta_t = \theta_{t-1} - \eta_t \nabla_\theta \Big[\tfrac{1}{n_t} \sum_{b \in R_t}
               w_{t,b}\, \ell(x_{c_{t,b}}; \theta_{t-1})\Big], \qquad t = 1..T,

so :math:`w = 1` is exactly :func:`simfluence.collect.train.train_run` (batch-mean loss; a step
without real slots makes no update). The **metagradient** of test example :math:`m` is

.. math::

    G_{t,b,m} = \frac{\partial\, \ell(z_m; \theta_T)}{\partial w_{t,b}}\Big|_{w=1}
              = -\frac{\eta_t}{n_t}\, g_{t,b}^\top \lambda_t^m, \qquad
    g_{t,b} = \nabla_\theta \ell(x_{c_{t,b}}; \theta_{t-1}),

with the adjoint :math:`\lambda_T^m = \nabla_\theta \ell(z_m; \theta_T)` carried back through every
step by :math:`\lambda_{t-1}^m = (I - \eta_t H_t)\, \lambda_t^m` (:math:`H_t`: Hessian of step
:math:`t`'s batch loss at :math:`\theta_{t-1}`). This is reverse-mode differentiation through
the whole run, as in MAGIC (Ilyas & Engstrom, 2025): exact, not an approximation of the
training dynamics. Each backward step is one ``torch.func.vjp`` of the SGD update
:math:`(\theta_{t-1}, w_t) \mapsto \theta_t` (which differentiates through the gradient: a
Hessian-vector product), ``torch.func.vmap``-ed over the test examples' adjoints (or, with
``hvp="forward"``, forward-over-reverse Hessian-vector products and the step's per-example
gradients, which is faster for larger models).

Memory. The backward pass needs :math:`\theta_{t-1}` at every step, ``T`` parameter copies in
all. :func:`metagradients` stores the parameters every ``k = checkpoint_every`` steps
(``ceil(sqrt(T))`` by default) in the forward pass and, going backwards one segment of ``k``
steps at a time, recomputes that segment's parameters from its checkpoint: about
``T / k + k`` parameter copies (``2 sqrt(T)``) for one extra forward pass. The adjoints take
``M' x P`` numbers (test examples x trained weights). Recomputation replays the same
operations, so the result does not depend on ``k``.

Using them. Summing :math:`G` over the occurrences of training example :math:`i` gives its
score (:meth:`MetagradientResult.per_example`): the first-order change of each final test
loss per unit up-weighting of all of :math:`i`'s occurrences, so removing :math:`i` changes the
loss by about :math:`-\text{score}`. :meth:`MetagradientResult.predict_removal` maps a removal
to weights exactly (a step that loses ``k`` of its ``n_t`` examples trains on the mean of
the rest: its kept weights become :math:`n_t / (n_t - k)`; a step that loses all makes no
update) and predicts the final losses to first order in that weight change.

Other optimizers. The same weights and the same definition of :math:`G` hold for any update
rule of :mod:`simfluence.func.optimizers`: AdamW with a warm-up and decay schedule and gradient
clipping, as the Hugging Face ``Trainer`` of ``minilm-finetune`` trains, read from that Trainer
(:func:`update_rule`). The state carried through the run is then the weights and Adam's two
moments :math:`(\theta_t, m_t, v_t)`, the adjoint has three parts, and each backward step is
the VJP of the whole Adam update (gradient, clipping, moments, bias correction) with respect
to the state and the step's weights. Adjoints then take ``3 x M' x P`` numbers, so test
examples go backwards in groups (``test_group``), each recomputing the forward segments.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import grad, jvp, vjp, vmap

from simfluence.errors import UsageError
from simfluence.func.gradients import composite_attention
from simfluence.func.optimizers import State, UpdateRule, apply_update, rule_from_optimizer, sgd_rule
from simfluence.progress import progress_bar
from simfluence.runs.log import PAD, check_indices
from simfluence.tasks.base import Inputs, Task, take

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MetagradientResult:
    r"""Metagradients of the final test losses of one training run.

    Attributes:
        occurrence: float64 ``[T, B, M']``: :math:`\partial L_T^m / \partial w_{t,b}` at
            :math:`w = 1`, for each step ``t``, batch slot ``b`` and target test example ``m``
            (0 at padding slots).
        final_losses: float64 ``[M']``: the target test examples' losses after the run
            (:math:`w = 1`; equal to :func:`~simfluence.collect.train.train_run`'s up to rounding).
        curriculum: int32 ``[T, B]``: the replayed curriculum (``-1`` pads).
        test_index: int64 ``[M']``: which test examples the last axis holds.
        learning_rates: float64 ``[T]``: the step sizes the run used.
        checkpoint_every: the parameter-checkpoint spacing that was used.
        seconds: wall time of the computation.
    """

    occurrence: np.ndarray
    final_losses: np.ndarray
    curriculum: np.ndarray
    test_index: np.ndarray
    learning_rates: np.ndarray
    checkpoint_every: int
    seconds: float

    def per_example(self, num_train: int) -> np.ndarray:
        r"""float64 ``[N, M']``: each training example's metagradients summed over its occurrences.

        Entry ``(i, m)`` is :math:`\sum_{(t,b): c_{t,b}=i} G_{t,b,m}`, the first-order change of
        final test loss ``m`` per unit up-weighting of all occurrences of ``i``; removing ``i``
        changes it by about ``-score`` (ignoring the re-normalisation of its batches, which
        :meth:`predict_removal` accounts for). Examples absent from the curriculum score 0.

        Args:
            num_train: ``N``, the number of training examples (the task's ``num_train``).
        """
        num_train = int(num_train)
        real = self.curriculum != PAD
        if real.any() and int(self.curriculum.max()) >= num_train:
            raise UsageError(f"num_train: {num_train} is too small, the curriculum uses index "
                             f"{int(self.curriculum.max())}")
        scores = np.zeros((num_train, self.occurrence.shape[-1]))
        np.add.at(scores, self.curriculum[real], self.occurrence[real])
        return scores

    def removal_weights(self, removed_examples) -> np.ndarray:
        r"""float64 ``[T, B]``: the weight change :math:`\Delta w` that drops every occurrence of ``removed_examples``.

        A step with ``n_t`` real slots of which ``k`` are removed trains, after the removal, on
        the mean loss of the other ``n_t - k``: in the weighted form (which divides by ``n_t``)
        the removed slots get weight 0 and the kept ones :math:`n_t / (n_t - k)`. A step that
        loses all its examples makes no update: all its weights become 0. Padding slots: 0.
        """
        removed = np.zeros(max(int(self.curriculum.max()) + 1, 1), dtype=bool)
        index = np.unique(np.asarray(removed_examples, dtype=np.int64).ravel())
        index = index[(index >= 0) & (index < removed.size)]
        removed[index] = True
        real = self.curriculum != PAD
        dropped = real & removed[np.where(real, self.curriculum, 0)]
        kept = real & ~dropped
        num_real, num_kept = real.sum(axis=1, keepdims=True), kept.sum(axis=1, keepdims=True)
        scale = np.divide(num_real, num_kept, out=np.zeros(num_real.shape), where=num_kept > 0)
        return np.where(kept, scale - 1.0, 0.0) - dropped

    def predict_removal(self, removed_examples) -> np.ndarray:
        r"""float64 ``[M']``: first-order prediction of the final test losses without ``removed_examples``.

        :math:`\hat L_T^m = L_T^m + \sum_{t,b} \Delta w_{t,b}\, G_{t,b,m}` with :math:`\Delta w`
        from :meth:`removal_weights` (every occurrence dropped, the rest of each batch
        re-weighted to its mean; empty steps skipped, as :func:`simfluence.retrain.retrain`
        trains them).

        Args:
            removed_examples: int ``[K]`` training-example indices (repeats and indices the
                curriculum never uses are harmless).
        """
        delta = self.removal_weights(removed_examples)
        return self.final_losses + np.einsum("tb,tbm->m", delta, self.occurrence)

    def predict_removals(self, removal_sets: Sequence) -> np.ndarray:
        """float64 ``[S, M']``: :meth:`predict_removal` of each of ``S`` sets of removed examples."""
        return np.stack([self.predict_removal(removed) for removed in removal_sets])


def metagradients(task: Task, curriculum, test_index=None, *, checkpoint_every: int | None = None,
                  test_chunk: int = 256, test_group: int | None = None, hvp: str = "reverse",
                  dtype: torch.dtype | None = None, progress: bool = False) -> MetagradientResult:
    r"""Exact metagradients of a run's final test losses w.r.t. the weight of every example occurrence.

    Replays ``curriculum`` with the optimizer that trains it, exactly as the run does (the
    task's starting checkpoint, learning-rate schedule, batch-mean loss, eval mode; frozen
    parameters and buffers stay fixed), and differentiates the final test losses backwards
    through every step (module docstring for the math and the memory).

    Args:
        task: a task trained by our loop with plain SGD (``digits-mlp``, ``text-minilm``,
            ``tiny-lm``) or another optimizer of :mod:`simfluence.func.optimizers` (its
            :meth:`~simfluence.tasks.base.Task.make_optimizer`), or by the Hugging Face
            ``Trainer`` (``minilm-finetune``: AdamW, warm-up and decay, gradient clipping, read
            from the Trainer by :func:`simfluence.collect.hf.trainer_update_rule`).
        curriculum: int ``[T, B]`` training-example indices, ``-1`` pads. A step of padding only
            makes no update under plain SGD (as :func:`simfluence.retrain.retrain` trains it)
            and keeps its place in the learning-rate schedule; other optimizers need an example
            in every step.
        test_index: int ``[M']`` test examples to differentiate (default: all ``M``).
        checkpoint_every: store the training state every this many steps and recompute the
            steps in between in the backward pass; default ``ceil(sqrt(T))``. ``1`` keeps every
            step's state (no recomputation, ``T + 1`` copies).
        test_chunk: test examples whose adjoints go through one vectorised backward step at
            once (bounds the memory of the batched Hessian-vector products).
        test_group: test examples carried backwards through the run together; each further
            group recomputes the forward segments again. Default: as many as keep the adjoints
            within 2 GiB (all of them for small models; Adam's adjoints are 3x the weights).
        hvp: how a backward step differentiates through the update (both exact):
            ``"reverse"`` (default): one ``torch.func.vjp`` of the update
            :math:`(\theta_{t-1}, w_t) \mapsto \theta_t`, reverse-over-reverse, vmapped over the
            adjoints; ``"forward"`` (plain SGD only): forward-over-reverse Hessian-vector
            products (``jvp`` of ``grad``) plus the step's per-example gradients. Measured on
            one CPU thread: reverse is about 2x faster on digits-mlp (2 vs 4-7 ms per step for
            100 test examples), forward about 1.5x faster on tiny-lm (0.67 vs 1.0 s per step for
            64 test examples); forward needs forward-mode support of every op of the model.
        dtype: compute in this floating dtype (e.g. ``torch.float64``; model and floating
            inputs are cast); default the model's own.
        progress: show a progress bar over the backward pass (on a terminal only).

    Returns:
        A :class:`MetagradientResult` (``occurrence`` float64 ``[T, B, M']``).

    Raises:
        ValueError: for an optimizer the replay cannot follow, or a malformed curriculum,
            ``test_index``, ``checkpoint_every`` or ``test_group``.
    """
    with composite_attention():   # the fused CPU attention kernels have no double backward
        return _metagradients(task, curriculum, test_index, checkpoint_every, test_chunk, test_group, hvp, dtype,
                              progress)


def _metagradients(task: Task, curriculum, test_index, checkpoint_every: int | None, test_chunk: int,
                   test_group: int | None, hvp: str, dtype: torch.dtype | None, progress: bool) -> MetagradientResult:
    start_time = time.perf_counter()
    curriculum = _check_curriculum(curriculum, task.num_train)
    test_index = check_indices(test_index, task.num_test, "test_index")
    num_steps, batch_size = curriculum.shape
    every = _check_checkpoint_every(checkpoint_every, num_steps)
    if hvp not in ("reverse", "forward"):
        raise UsageError(f"hvp: expected 'reverse' or 'forward', got {hvp!r}")
    test_chunk = _positive(test_chunk, "test_chunk")

    model = task.build_model().eval()
    if dtype is not None:
        if not dtype.is_floating_point:
            raise UsageError(f"dtype: expected a floating dtype such as torch.float64, got {dtype}")
        model = model.to(dtype)
    trainable = {name: value.detach() for name, value in model.named_parameters() if value.requires_grad}
    if not trainable:
        raise UsageError(f"task '{task.name}': the model has no trainable parameters")
    rule = update_rule(task, curriculum, model)
    if hvp == "forward" and not rule.plain_sgd:
        raise UsageError(f"hvp: 'forward' follows plain SGD only; task '{task.name}' trains with {rule.kind}"
                         f"{' and gradient clipping' if rule.max_grad_norm else ''}, use hvp='reverse'")
    trained = set(rule.names)
    fixed = {name: value.detach() for name, value in model.named_buffers()}
    fixed.update({name: value.detach() for name, value in model.named_parameters() if name not in trained})

    data = task.data
    train_inputs, train_targets = _cast(data.train_inputs, dtype), _cast(data.train_targets, dtype)
    rows = torch.from_numpy(curriculum.astype(np.int64))
    slots = [torch.nonzero(row != PAD).flatten() for row in rows]                # real slots of each step
    if rule.kind != "sgd" and any(slot.numel() == 0 for slot in slots):
        empty = next(t for t, slot in enumerate(slots) if slot.numel() == 0)
        raise UsageError(f"curriculum: step {empty + 1} has no example; {rule.kind} cannot skip a step and keep "
                         "its schedule, so keep at least one example per step")
    batches = [_as_collated(task, take(train_inputs, rows[t][slots[t]]), train_targets[rows[t][slots[t]]])
               for t in range(num_steps)]

    def update(state: State, weights: torch.Tensor, t: int) -> State:
        """Step ``t + 1`` on the weighted batch loss ``sum_b w_b loss_b / n`` (``t`` 0-based)."""
        inputs, targets = batches[t]
        count = weights.shape[0]

        def batch_loss(p: Params) -> torch.Tensor:
            return (task.example_losses(model, inputs, targets, {**p, **fixed}) * weights).sum() / count

        return apply_update(rule, state, grad(batch_loss)(state["theta"]), t)

    def advance(state: State, t: int) -> State:
        if slots[t].numel() == 0:
            return state
        with torch.no_grad():
            return update(state, _ones(slots[t].numel(), state["theta"]), t)

    # Forward: the run, keeping the state before every `every`-th step.
    checkpoints: dict[int, State] = {}
    state = rule.initial_state(trainable)
    for t in range(num_steps):
        if t % every == 0:
            checkpoints[t] = state
        state = advance(state, t)
    theta = state["theta"]
    del state

    test_inputs, test_targets = _cast(data.test_inputs, dtype), _cast(data.test_targets, dtype)
    index = torch.from_numpy(test_index)
    test_x, test_y = _as_collated(task, take(test_inputs, index), test_targets[index])
    with torch.no_grad():
        final = task.example_losses(model, test_x, test_y, {**theta, **fixed})
    slots_per_example = sum(value.numel() for value in theta.values()) * (1 if rule.kind == "sgd" else 3)
    if test_group is None:
        bytes_per = slots_per_example * next(iter(theta.values())).element_size()
        test_group = max(1, min(test_index.size, (2 << 30) // bytes_per))
    test_group = _positive(test_group, "test_group")

    occurrence = np.zeros((num_steps, batch_size, test_index.size))
    groups = list(range(0, test_index.size, test_group))
    bar = progress_bar(total=num_steps * len(groups), enabled=progress, desc=f"metagradients {task.name}",
                       unit="step")
    for group_start in groups:
        members = slice(group_start, min(group_start + test_group, test_index.size))
        # Adjoints at the end: each target test loss's gradient (Adam's moments: 0), [M'', *shape] each.
        adjoint = {("theta", name): value for name, value in _example_gradients(
            task, model, theta, fixed, take(test_x, torch.arange(members.start, members.stop)), test_y[members],
            test_chunk).items()}
        if rule.kind != "sgd":
            zeros = {name: torch.zeros_like(value) for (_, name), value in adjoint.items()}
            adjoint.update({(slot, name): value for slot in ("m", "v") for name, value in zeros.items()})
        for segment_start in reversed(range(0, num_steps, every)):
            segment_end = min(segment_start + every, num_steps)
            last_group = members.stop == test_index.size
            states = [checkpoints.pop(segment_start) if last_group else checkpoints[segment_start]]
            for t in range(segment_start, segment_end - 1):
                states.append(advance(states[-1], t))
            for t in reversed(range(segment_start, segment_end)):
                before = states.pop()
                bar.update(1)
                if slots[t].numel() == 0:
                    continue                                                    # no update: lambda unchanged
                if hvp == "reverse":
                    step_vjp = vjp(lambda flat, w, t=t: _flatten(update(_nest(flat), w, t)), _flatten(before),
                                   _ones(slots[t].numel(), before["theta"]))[1]
                    adjoint, weight_grads = _batched_vjp(step_vjp, adjoint, test_chunk)
                    del step_vjp
                else:
                    part, weight_grads = _forward_over_reverse(
                        task, model, fixed, before["theta"], batches[t], float(rule.learning_rates[t]),
                        {name: value for (_, name), value in adjoint.items()}, test_chunk)
                    adjoint = {("theta", name): value for name, value in part.items()}
                occurrence[t, slots[t].numpy(), members] = weight_grads.T.double().numpy()
    bar.close()
    return MetagradientResult(occurrence, final.double().numpy(), curriculum, test_index, rule.learning_rates,
                              every, time.perf_counter() - start_time)


def update_rule(task: Task, curriculum: np.ndarray, model: torch.nn.Module | None = None) -> UpdateRule:
    """How ``task`` trains ``curriculum``: from its Trainer, or from :meth:`Task.make_optimizer` and its schedule.

    Plain-SGD tasks of our loop train every weight that requires a gradient at
    :meth:`Task.learning_rates`; another optimizer of our loop is read from
    :meth:`Task.make_optimizer` (every group at the schedule's rate, as the loop sets it).
    """
    if getattr(task, "runner", "torch") == "trainer":
        from simfluence.collect.hf import trainer_update_rule

        make_trainer = getattr(task, "make_trainer", None)
        if make_trainer is None:
            raise UsageError(f"task '{task.name}': a Trainer task needs make_trainer(run_index, curriculum)")
        return trainer_update_rule(make_trainer, curriculum)
    model = task.build_model() if model is None else model
    rates = task.learning_rates(len(curriculum)).astype(np.float64)
    if task.optimizer == "sgd":
        return sgd_rule([name for name, value in model.named_parameters() if value.requires_grad], rates)
    names = {id(value): name for name, value in model.named_parameters()}
    return rule_from_optimizer(task.make_optimizer(model.parameters()), names, rates)


def _flatten(state: State) -> dict[tuple[str, str], torch.Tensor]:
    return {(slot, name): value for slot, part in state.items() for name, value in part.items()}


def _nest(flat: Mapping[tuple[str, str], torch.Tensor]) -> State:
    state: State = {}
    for (slot, name), value in flat.items():
        state.setdefault(slot, {})[name] = value
    return state


def _as_collated(task: Task, inputs: Inputs, targets: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
    """A Trainer task's batch as its collator pads it: to the batch's longest example, not the data's.

    The task's data are padded on the right to the longest example of all; the trailing columns
    no example of this batch uses (``attention_mask`` all 0) are dropped from the inputs (and
    from per-position targets). The same numbers up to rounding, at the Trainer's cost. Tasks of
    our own loop train on the data as they are, so theirs are left alone.
    """
    if getattr(task, "runner", "torch") != "trainer" or not isinstance(inputs, Mapping) \
            or "attention_mask" not in inputs or inputs["attention_mask"].ndim != 2:
        return inputs, targets
    mask = inputs["attention_mask"]
    full, width = mask.shape[1], max(int(mask.sum(dim=1).max()), 1)
    if width == full or bool(mask[:, width:].any()):
        return inputs, targets
    trimmed = {key: value[:, :width] if value.ndim == 2 and value.shape[1] == full else value
               for key, value in inputs.items()}
    return trimmed, targets[:, :width] if targets.ndim == 2 and targets.shape[1] == full else targets


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise UsageError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


def _forward_over_reverse(task: Task, model, fixed: Params, theta: Params, batch, rate: float, adjoint: Params,
                          chunk: int) -> tuple[Params, torch.Tensor]:
    """One backward step from explicit pieces: ``lambda - rate * H lambda`` and ``-rate / n * g_b . lambda``.

    ``H lambda`` by forward-mode differentiation of the batch gradient (``jvp`` of ``grad``),
    vmapped over the adjoints; ``g_b`` the per-example gradients of the step's ``n`` examples.
    """
    inputs, targets = batch
    count = targets.shape[0]

    def batch_loss(p: Params) -> torch.Tensor:
        return task.example_losses(model, inputs, targets, {**p, **fixed}).mean()

    def hessian_product(vector: Params) -> Params:
        return jvp(grad(batch_loss), (theta,), (vector,))[1]

    examples = _example_gradients(task, model, theta, fixed, inputs, targets, chunk)      # g_b: [n, *shape]
    total = next(iter(adjoint.values())).shape[0]
    new_parts, weight_parts = [], []
    for start in range(0, total, chunk):
        part = {name: value[start:start + chunk] for name, value in adjoint.items()}
        try:
            products = vmap(hessian_product)(part)
        except (RuntimeError, NotImplementedError):  # an op without a batching rule: one row at a time
            rows = [hessian_product({name: value[j] for name, value in part.items()})
                    for j in range(len(next(iter(part.values()))))]
            products = {name: torch.stack([row[name] for row in rows]) for name in part}
        new_parts.append({name: part[name] - rate * products[name] for name in part})
        dots = sum(torch.einsum("bp,mp->mb", examples[name].reshape(count, -1), part[name].reshape(len(part[name]), -1))
                   for name in part)
        weight_parts.append(-rate / count * dots)
    if len(new_parts) == 1:
        return new_parts[0], weight_parts[0]
    return ({name: torch.cat([part[name] for part in new_parts]) for name in adjoint}, torch.cat(weight_parts))


def _batched_vjp(step_vjp, adjoint: Mapping, chunk: int) -> tuple[dict, torch.Tensor]:
    """Apply one step's VJP to every adjoint row: new adjoints ``[M', ...]`` and weight gradients ``[M', n]``."""
    count = next(iter(adjoint.values())).shape[0]
    new_parts, weight_parts = [], []
    for start in range(0, count, chunk):
        part = {name: value[start:start + chunk] for name, value in adjoint.items()}
        try:
            new, weights = vmap(step_vjp)(part)
        except (RuntimeError, NotImplementedError):  # an op without a batching rule: one row at a time
            rows = [step_vjp({name: value[j] for name, value in part.items()}) for j in range(len(next(iter(
                part.values()))))]
            new = {name: torch.stack([row[0][name] for row in rows]) for name in part}
            weights = torch.stack([row[1] for row in rows])
        new_parts.append({name: value.detach() for name, value in new.items()})
        weight_parts.append(weights.detach())
    if len(new_parts) == 1:
        return new_parts[0], weight_parts[0]
    return ({name: torch.cat([part[name] for part in new_parts]) for name in adjoint}, torch.cat(weight_parts))


def _example_gradients(task: Task, model, theta: Params, fixed: Params, inputs: Inputs, targets: torch.Tensor,
                       chunk: int) -> Params:
    """Gradient of each example's loss at ``theta``: ``[n, *shape]`` per parameter."""

    def loss(p: Params, x, y) -> torch.Tensor:
        return task.example_losses(model, _unsqueeze(x), y.unsqueeze(0), {**p, **fixed})[0]

    count = targets.shape[0]
    parts = []
    for start in range(0, count, chunk):
        index = torch.arange(start, min(start + chunk, count))
        x, y = take(inputs, index), targets[index]
        try:
            parts.append(vmap(grad(loss), in_dims=(None, 0, 0))(theta, x, y))
        except (RuntimeError, NotImplementedError):  # an op without a batching rule: one example at a time
            rows = [grad(loss)(theta, take(x, torch.tensor(j)), y[j]) for j in range(index.numel())]
            parts.append({name: torch.stack([row[name] for row in rows]) for name in theta})
    return {name: torch.cat([part[name].detach() for part in parts]) for name in theta}


def _unsqueeze(inputs: Inputs) -> Inputs:
    if isinstance(inputs, Mapping):
        return {key: value.unsqueeze(0) for key, value in inputs.items()}
    return inputs.unsqueeze(0)


def _ones(count: int, like: Params) -> torch.Tensor:
    return torch.ones(count, dtype=next(iter(like.values())).dtype)


def _cast(value, dtype: torch.dtype | None):
    """Floating tensors (of a dict) cast to ``dtype``; integers (class and token ids) untouched."""
    if dtype is None:
        return value
    if isinstance(value, Mapping):
        return {key: _cast(item, dtype) for key, item in value.items()}
    return value.to(dtype) if value.is_floating_point() else value


def _check_curriculum(curriculum, num_train: int) -> np.ndarray:
    array = np.asarray(curriculum)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UsageError(f"curriculum: expected a non-empty int array [steps, batch], got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise UsageError(f"curriculum: expected integer indices, got dtype {array.dtype}")
    if array.min() < PAD or array.max() >= num_train:
        raise UsageError(f"curriculum: entries must lie in [0, {num_train - 1}] (the training examples) or be "
                         f"{PAD} (padding), got {int(array.min())}..{int(array.max())}")
    return array.astype(np.int32)


def _check_checkpoint_every(every, num_steps: int) -> int:
    if every is None:
        return max(1, math.ceil(math.sqrt(num_steps)))
    if isinstance(every, bool) or int(every) != every or every < 1:
        raise UsageError(f"checkpoint_every: must be a positive integer, got {every!r}")
    return int(every)
