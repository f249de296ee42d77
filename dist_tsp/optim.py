"""Optimizers and learning-rate schedules from an OptimConfig."""

from __future__ import annotations

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
    if cfg.schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    else:
        schedule = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return optimizer, schedule
