"""Accuracy of several models on one image set, sharded over ranks."""

from __future__ import annotations

import torch
from torch import nn

from dist_tsp.data import ImageSet, Normalizer, eval_batches


@torch.no_grad()
def count_correct(models: list[nn.Module], data: ImageSet, *, shard: int, num_shards: int, batch_size: int,
                  normalize: Normalizer, autocast) -> torch.Tensor:
    """Correct predictions of each model on the `shard`-th of `num_shards` strided slices of `data`.

    Returns a float tensor [len(models)] on the data's device; sum it over the shards' ranks.
    """
    part = ImageSet(data.images[shard::num_shards], data.labels[shard::num_shards])
    correct = torch.zeros(len(models), device=data.images.device)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    for images, labels in eval_batches(part, batch_size, normalize):
        with autocast():
            for k, model in enumerate(models):
                correct[k] += (model(images).argmax(-1) == labels).sum()
    for m, mode in zip(models, modes):
        m.train(mode)
    return correct
