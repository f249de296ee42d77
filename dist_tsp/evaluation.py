"""Predictions of several models on one image set, sharded over ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dist_tsp.data import Normalizer, Samples, eval_batches


@torch.no_grad()
def predict(models: list[nn.Module], data: Samples, *, shard: int, num_shards: int, batch_size: int,
            normalize: Normalizer, autocast, group: dist.ProcessGroup | None = None, what: str | None = None
            ) -> torch.Tensor:
    """Each model's predicted class [len(models), len(data)] for the `shard`-th of `num_shards` strided slices of
    `data` (samples shard, shard + num_shards, ...); -1 elsewhere. Models run in eval mode. The ranks of `group`
    (which evaluate the same slice) share its reading (see eval_batches, which shows `what` in a progress bar)."""
    device = data.labels.device
    predicted = torch.full((len(models), len(data)), -1, dtype=torch.long, device=device)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    mine = torch.arange(min(shard, len(data)), len(data), num_shards)  # none when shard is past the set's end
    for batch in eval_batches(data, batch_size, normalize, mine, group, what):
        columns = batch.indices.to(device)
        with autocast():
            for k, model in enumerate(models):
                predicted[k, columns] = model(batch.images).argmax(-1)
    for m, mode in zip(models, modes):
        m.train(mode)
    return predicted
