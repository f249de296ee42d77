"""Optimizers and learning-rate schedules from an OptimConfig."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch

from dist_tsp.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer and a per-step schedule over `total_steps`."""
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                    nesterov=cfg.momentum > 0)
    else:
        optimizer_class = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        optimizer = optimizer_class(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Closed-form factors of the step: a resumed run with another length follows its own schedule.
    if cfg.schedule == "cosine":
        factor = functools.partial(_cosine, total_steps=max(1, total_steps))
    else:
        factor = _constant
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _cosine(step: int, total_steps: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _constant(step: int) -> float:
    return 1.0
