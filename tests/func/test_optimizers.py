"""Update rules (simfluence.func.optimizers) against PyTorch's own optimizers and gradient clipping."""

import numpy as np
import pytest
import torch

from simfluence.func.optimizers import apply_update, rule_from_optimizer, sgd_rule


def tensors(seed):
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=generator, dtype=torch.float64),
            "b": torch.randn(3, generator=generator, dtype=torch.float64)}


@pytest.mark.parametrize("make, clip", [
    (lambda groups: torch.optim.SGD(groups, lr=0.1), None),
    (lambda groups: torch.optim.SGD(groups, lr=0.1, weight_decay=0.05), 0.5),
    (lambda groups: torch.optim.Adam(groups, lr=0.01, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6), None),
    (lambda groups: torch.optim.AdamW(groups, lr=0.01), 0.7),
], ids=["sgd", "sgd-l2-clipped", "adam-l2", "adamw-clipped"])
def test_apply_update_follows_the_real_optimizer(make, clip):
    start = tensors(0)
    params = {name: torch.nn.Parameter(value.clone()) for name, value in start.items()}
    # Two groups: the bias without weight decay and at half the rate, as Trainer-style groups.
    optimizer = make([{"params": [params["w"]]}, {"params": [params["b"]], "weight_decay": 0.0}])
    optimizer.param_groups[1]["lr"] *= 0.5
    steps = 6
    rates = np.array([[group["lr"] * (1 - t / steps) for t in range(steps)] for group in optimizer.param_groups])
    rule = rule_from_optimizer(optimizer, {id(value): name for name, value in params.items()}, rates, clip)
    state = rule.initial_state(start)
    clipped = False
    for t in range(steps):
        grads = tensors(t + 1)
        grads["w"][0] = 0.0                      # a row whose gradient is always exactly 0 (Adam's v stays 0)
        for group, group_rates in zip(optimizer.param_groups, rates):
            group["lr"] = float(group_rates[t])
        for name, param in params.items():
            param.grad = grads[name].clone()
        if clip is not None:
            clipped |= float(torch.nn.utils.clip_grad_norm_(list(params.values()), clip)) > clip
        optimizer.step()
        state = apply_update(rule, state, grads, t)
        for name in params:
            torch.testing.assert_close(state["theta"][name], params[name].detach(), rtol=1e-12, atol=1e-14)
    assert clip is None or clipped


def test_the_update_is_differentiable_where_adam_has_never_seen_a_gradient():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], lr=0.1)
    rule = rule_from_optimizer(optimizer, {id(optimizer.param_groups[0]["params"][0]): "p"}, np.full(2, 0.1))
    state = rule.initial_state({"p": torch.ones(3, dtype=torch.float64)})
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    grads = {"p": torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64) * scale}
    moved = apply_update(rule, apply_update(rule, state, grads, 0), grads, 1)["theta"]["p"]
    (derivative,) = torch.autograd.grad(moved.sum(), scale)
    assert torch.isfinite(derivative)
    # Adam's step is scale-free: theta - rate * m_hat / (sqrt(v_hat) + eps) barely depends on the scale.
    assert abs(float(derivative)) < 1e-6


def test_rules_refuse_what_they_cannot_follow():
    param = torch.nn.Parameter(torch.zeros(2))
    names = {id(param): "p"}
    with pytest.raises(ValueError, match="momentum"):
        rule_from_optimizer(torch.optim.SGD([param], lr=0.1, momentum=0.9), names, np.ones(3))
    with pytest.raises(ValueError, match="amsgrad"):
        rule_from_optimizer(torch.optim.Adam([param], lr=0.1, amsgrad=True), names, np.ones(3))
    with pytest.raises(ValueError, match="RMSprop cannot be replayed"):
        rule_from_optimizer(torch.optim.RMSprop([param], lr=0.1), names, np.ones(3))
    with pytest.raises(ValueError, match="not one of the model's parameters"):
        rule_from_optimizer(torch.optim.SGD([param], lr=0.1), {}, np.ones(3))
    with pytest.raises(ValueError, match="rates"):
        rule_from_optimizer(torch.optim.SGD([param], lr=0.1), names, np.ones((2, 3)))
    with pytest.raises(ValueError, match="does not have"):
        sgd_rule(["q"], np.ones(3)).initial_state({"p": param})
