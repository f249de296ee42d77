"""Optimizers and schedules: the graph-safe ones take the eager steps and resume each other's checkpoints; a
resumed one takes the checkpoint's state with this run's settings and schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dist_tsp.config import OptimConfig
from dist_tsp.optim import build_optimizer, resume_state


def _train(model, optimizer, schedule, steps: int = 4) -> None:
    inputs = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_graph_safe_optimizer_on_the_cpu_takes_the_eager_steps_and_saves_the_eager_state(name):
    cfg = OptimConfig(name=name, lr=0.01, weight_decay=1e-4, schedule="cosine")
    eager_model = torch.nn.Linear(4, 3)
    graph_model = copy.deepcopy(eager_model)
    eager = build_optimizer(eager_model.parameters(), cfg, total_steps=10)
    graph_safe = build_optimizer(graph_model.parameters(), cfg, total_steps=10, graph_safe_on=torch.device("cpu"))
    rate = graph_safe[0].param_groups[0]["lr"]
    _train(eager_model, *eager)
    _train(graph_model, *graph_safe)
    assert all(torch.equal(a, b) for a, b in zip(eager_model.parameters(), graph_model.parameters()))
    # filled in place by the schedule: the tensor a captured step read its rate from
    assert graph_safe[0].param_groups[0]["lr"] is rate and isinstance(rate, torch.Tensor)
    saved, expected = graph_safe[0].state_dict(), eager[0].state_dict()
    assert saved["param_groups"] == expected["param_groups"]  # a float rate, the eager flags
    for key, state in expected["state"].items():
        assert all(torch.equal(value, saved["state"][key][part]) for part, value in state.items())
    assert graph_safe[1].state_dict() == eager[1].state_dict()


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_graph_safe_and_eager_optimizers_resume_each_others_checkpoints(name):
    cfg = OptimConfig(name=name, lr=0.01, schedule="cosine")
    model = torch.nn.Linear(4, 3)
    _train(model, *build_optimizer(model.parameters(), cfg, total_steps=10), steps=2)
    for first, then in ((None, torch.device("cpu")), (torch.device("cpu"), None)):
        trained = copy.deepcopy(model)
        saved_by = build_optimizer(trained.parameters(), cfg, total_steps=10, graph_safe_on=first)
        _train(trained, *saved_by, steps=2)
        resumed = copy.deepcopy(trained)
        optimizer, schedule = build_optimizer(resumed.parameters(), cfg, total_steps=10, graph_safe_on=then)
        rate = optimizer.param_groups[0]["lr"]
        resume_state(optimizer, schedule, copy.deepcopy(saved_by[0].state_dict()),  # as from a file: no shared
                     copy.deepcopy(saved_by[1].state_dict()))  # tensors
        _train(trained, *saved_by, steps=2)
        _train(resumed, optimizer, schedule, steps=2)
        assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), resumed.parameters())), (first, then)
        if then is not None:  # still the tensor it was built with: the one a captured step reads
            assert optimizer.param_groups[0]["lr"] is rate and isinstance(rate, torch.Tensor)


def _settings(optimizer) -> list[dict]:
    return [{key: float(value) if key == "lr" else value for key, value in group.items() if key != "params"}
            for group in optimizer.param_groups]


@pytest.mark.parametrize("graph_safe_on", [None, torch.device("cpu")], ids=["eager", "graph-safe"])
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_a_resumed_optimizer_takes_this_runs_settings_and_the_rate_its_own_schedule_gives_that_step(name,
                                                                                                  graph_safe_on):
    """A checkpoint of 3 steps of a 3-step cosine run (its last rate 0), resumed with another rate, weight decay and
    momentum over 6 steps: the groups and schedule are those an uninterrupted 6-step run with the new settings has at
    step 3 (before: the old settings, and a first resumed step at the old schedule's rate of 0)."""
    before = OptimConfig(name=name, lr=0.01, weight_decay=0.0, momentum=0.9, schedule="cosine")
    after = OptimConfig(name=name, lr=0.02, weight_decay=1e-3, momentum=0.5, schedule="cosine")
    model = torch.nn.Linear(4, 3)
    saved_by = build_optimizer(model.parameters(), before, total_steps=3, graph_safe_on=graph_safe_on)
    _train(model, *saved_by, steps=3)
    uninterrupted_model = torch.nn.Linear(4, 3)
    uninterrupted = build_optimizer(uninterrupted_model.parameters(), after, total_steps=6)
    _train(uninterrupted_model, *uninterrupted, steps=3)

    optimizer, schedule = build_optimizer(copy.deepcopy(model).parameters(), after, total_steps=6,
                                          graph_safe_on=graph_safe_on)
    resume_state(optimizer, schedule, copy.deepcopy(saved_by[0].state_dict()), copy.deepcopy(saved_by[1].state_dict()))

    assert _settings(optimizer) == _settings(uninterrupted[0])
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.02 * 0.5)  # cosine at step 3 of 6
    assert schedule.state_dict() == uninterrupted[1].state_dict()
    if graph_safe_on is not None:
        assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)  # still the tensor the schedule fills
    saved = saved_by[0].state_dict()["state"]
    assert all(torch.equal(value, optimizer.state_dict()["state"][key][part])
               for key, entry in saved.items() for part, value in entry.items())  # the moments and step counts
    schedule.step()
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi * 4 / 6)))


@pytest.mark.parametrize("graph_safe_on", [None, torch.device("cpu")], ids=["eager", "graph-safe"])
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_the_first_step_on_a_zero_gradient_applies_the_configs_weight_decay_and_momentum(name, graph_safe_on):
    """Written out here, from weights p and a zero gradient: SGD's Nesterov step on the decay term's gradient wd*p
    moves p by lr*(1+momentum)*wd*p; AdamW decays p by lr*wd and its Adam step is 0; Adam's step on the gradient
    wd*p is lr*wd*p/(|wd*p|+eps)."""
    lr, weight_decay, momentum, eps = 0.1, 5e-3, 0.9, 1e-8  # not torch.optim.AdamW's default decay (1e-2)
    cfg = OptimConfig(name=name, lr=lr, weight_decay=weight_decay, momentum=momentum, schedule="constant")
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, _ = build_optimizer(model.parameters(), cfg, total_steps=10, graph_safe_on=graph_safe_on)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, p0 in zip(model.parameters(), before):
        decay = weight_decay * p0
        expected = {"sgd": p0 - lr * (1 + momentum) * decay, "adamw": p0 * (1 - lr * weight_decay),
                    "adam": p0 - lr * decay / (decay.abs() + eps)}[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
