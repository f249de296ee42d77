"""Optimizers and learning-rate schedules from an OptimConfig."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch

from dist_tsp.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, total_steps: int,
                    graph_safe_on: torch.device | None = None
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer and a per-step schedule over `total_steps`.

    With `graph_safe_on` (the device of the graph-ready step, see dist_tsp/cuda_graph.py): the learning rate is a
    tensor on that device that the schedule fills in place at the step's boundary, and on CUDA the optimizer is the
    fused one (capturable, for Adam's step count), so that no step reads anything back. On the CPU the optimizer
    reads the float64 rate back as the eager one's float: the same arithmetic. Its checkpoints keep the eager
    optimizer's format (a float learning rate, the step counts on the CPU): either step resumes the other's.
    """
    lr: float | torch.Tensor = cfg.lr
    options: dict = {}
    if graph_safe_on is not None and graph_safe_on.type == "cuda":
        lr = torch.tensor(cfg.lr, device=graph_safe_on)
        options = {"fused": True} if cfg.name == "sgd" else {"fused": True, "capturable": True}
    elif graph_safe_on is not None:
        lr = torch.tensor(cfg.lr, dtype=torch.float64)
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                    nesterov=cfg.momentum > 0, **options)
    else:
        optimizer_class = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        optimizer = optimizer_class(params, lr=lr, weight_decay=cfg.weight_decay, **options)
    if graph_safe_on is not None:
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.lr  # the schedule's base rate: a float, so that it never reads the device
        _keep_eager_format(optimizer, options)
    # Closed-form factors of the step: a resumed run with another length follows its own schedule.
    if cfg.schedule == "cosine":
        factor = functools.partial(_cosine, total_steps=max(1, total_steps))
    elif cfg.schedule == "triangular":
        factor = functools.partial(_triangular, total_steps=max(1, total_steps))
    else:
        factor = _constant
    if graph_safe_on is None:
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, _FloatLRSchedule(optimizer, factor)


def resume_state(optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR,
                 optimizer_state: dict, schedule_state: dict) -> None:
    """Load a checkpoint's optimizer and schedule state into a pair built for this run, keeping this run's settings.

    The saved state brings the per-parameter state (moments, step counts) and the schedule's step; the settings
    (learning rate, weight decay, momentum: resume=force may change them) and the rate of that step (another run
    length changes it) are this run's, as an uninterrupted run with them would have at that step.
    """
    settings = [{key: value for key, value in group.items() if key not in ("params", "lr")}
                for group in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    schedule.load_state_dict(schedule_state)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    schedule.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    rates = [base * factor(schedule.last_epoch) for base, factor in zip(schedule.base_lrs, schedule.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        if isinstance(group["lr"], torch.Tensor):  # the graph-safe rate: filled in place, as the schedule does
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate
    schedule._last_lr = rates


def _cosine(step: int, total_steps: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


TRIANGULAR_START, TRIANGULAR_PEAK = 0.2, 0.1  # airbench96's: from 0.2x, the peak after 10 % of the steps


def _triangular(step: int, total_steps: int) -> float:
    """Linear from TRIANGULAR_START up to 1 over the first TRIANGULAR_PEAK of the steps, then linear down to 0."""
    peak = int(TRIANGULAR_PEAK * total_steps)
    if step < peak:
        return TRIANGULAR_START + (1.0 - TRIANGULAR_START) * step / peak
    return (total_steps - min(step, total_steps)) / (total_steps - peak)


def _constant(step: int) -> float:
    return 1.0


class _FloatLRSchedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over a tensor learning rate (it fills the tensor in place), saved with float rates as usual."""

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["_last_lr"] = [float(lr) for lr in state["_last_lr"]]
        return state


def _keep_eager_format(optimizer: torch.optim.Optimizer, options: dict) -> None:
    """Save a graph-safe optimizer as the eager one would be saved, and load either kind of state into it: the
    learning rate as a float, the step counts on the CPU, the eager flags."""
    rates = [group["lr"] for group in optimizer.param_groups]
    eager = {key: {"fused": None, "capturable": False}[key] for key in options}

    def save_eager(_optimizer: torch.optim.Optimizer, state: dict) -> dict:
        groups = [{**group, "lr": float(group["lr"]), **eager} for group in state["param_groups"]]
        per_param = {key: {name: value.cpu() if name == "step" else value for name, value in entry.items()}
                     for key, entry in state["state"].items()}
        return {"state": per_param, "param_groups": groups}

    def load_graph_safe(_optimizer: torch.optim.Optimizer, state: dict) -> dict:
        return {**state, "param_groups": [{**group, **options} for group in state["param_groups"]]}

    def restore_rates(_optimizer: torch.optim.Optimizer) -> None:
        for group, rate in zip(optimizer.param_groups, rates):
            rate.fill_(group["lr"])
            group["lr"] = rate

    optimizer.register_state_dict_post_hook(save_eager)
    optimizer.register_load_state_dict_pre_hook(load_graph_safe)
    optimizer.register_load_state_dict_post_hook(restore_rates)
