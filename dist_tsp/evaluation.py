"""Predictions of several models on one image set, sharded over ranks."""

from __future__ import annotations

import torch
from torch import nn

from dist_tsp.data import ImageSet, Normalizer, eval_batches


@torch.no_grad()
def predict(models: list[nn.Module], data: ImageSet, *, shard: int, num_shards: int, batch_size: int,
            normalize: Normalizer, autocast) -> torch.Tensor:
    """Each model's predicted class [len(models), len(data)] for the `shard`-th of `num_shards` strided slices of
    `data` (samples shard, shard + num_shards, ...); -1 elsewhere. Models run in eval mode."""
    part = ImageSet(data.images[shard::num_shards], data.labels[shard::num_shards])
    predicted = torch.full((len(models), len(data)), -1, dtype=torch.long, device=data.images.device)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    start = shard
    for batch in eval_batches(part, batch_size, normalize):
        images = batch.images
        columns = slice(start, start + num_shards * len(images), num_shards)
        with autocast():
            for k, model in enumerate(models):
                predicted[k, columns] = model(images).argmax(-1)
        start += num_shards * len(images)
    for m, mode in zip(models, modes):
        m.train(mode)
    return predicted
