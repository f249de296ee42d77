"""teacher.mode=cached: the teacher's logits for every sample's view of an epoch, computed once, then read.

A sample's augmented view depends only on (seed, epoch, sample) (see data.Augmentation), so
the cache replays exactly the view each student sees: the logits of epoch e are computed on the
views of epoch e, batch-sharded over all ranks, and stored as one memory-mapped .npy per epoch
(one file in all when augmentation is off). The folder is named by a hash of everything the logits
depend on (teacher file, teacher model and input scale, training images and labels, augmentation,
seed, precision), so runs that share `teacher.cache_dir` reuse it and a changed input never
matches a stale file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dist_tsp.augmentation import Augmentation
from dist_tsp.checkpoint import write_atomic, write_text_atomic
from dist_tsp.config import RunConfig
from dist_tsp.data import Batch, Normalizer, Samples
from dist_tsp.exchange import all_reduce
from dist_tsp.teacher_modes import RunTeacher, gathered_logits


def cache_key(cfg: RunConfig, teacher_sha256: str, train: Samples, augmentation: Augmentation,
              mixed_precision: str) -> dict:
    """Everything the cached logits depend on (a streamed set by its file names and labels, not its pixels)."""
    content = hashlib.sha256(train.fingerprint())
    return {"teacher_sha256": teacher_sha256, "teacher_model": cfg.teacher.model, "teacher_args": cfg.teacher.args,
            "input_scale": cfg.teacher.input_scale, "dataset": cfg.data.name, "train_sha256": content.hexdigest(),
            **augmentation.key(), "mixed_precision": mixed_precision}


class CachedLogits:
    """Per step, the cached rows of the batch's samples for the current epoch: nothing to add to the step's
    all-gather."""

    def __init__(self, folder: Path, key: dict, teacher: RunTeacher, data: Samples, augmentation: Augmentation,
                 normalize: Normalizer, *, world: dist.ProcessGroup | None, batch_size: int, device: torch.device,
                 writer: bool, verbose: bool) -> None:
        """`teacher` must be batch-sharded over `world` (every rank); `writer` ranks store what is computed."""
        self.folder, self.key, self.teacher = folder, key, teacher
        self.data, self.augmentation, self.normalize, self.world = data, augmentation, normalize, world
        self.batch_size, self.device, self.writer, self.verbose = batch_size, device, writer, verbose
        self.computed: list[int] = []
        self.reused: list[int] = []
        self.current: np.ndarray | None = None

    @classmethod
    def under(cls, root: Path, key: dict, **kwargs) -> CachedLogits:
        """The cache for `key` inside `root` (a folder per key)."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return cls(root / digest, key, **kwargs)

    def path(self, epoch: int) -> Path:
        return self.folder / (f"epoch_{epoch:04d}.npy" if self.augmentation.enabled else "all_epochs.npy")

    def start_epoch(self, epoch: int) -> None:
        """Compute the epoch's logits if no run has yet (every rank takes part), then map them."""
        path = self.path(epoch)
        exists = torch.tensor([float(path.is_file())], device=self.device)
        all_reduce(exists, self.world, dist.ReduceOp.MIN)  # decide together: none computes alone
        if exists.item():
            self.reused.append(epoch)
        else:
            self._compute(epoch, path)
            self.computed.append(epoch)
        self.current = np.load(path, mmap_mode="r")

    def contribution(self, batch: Batch, group: dist.ProcessGroup | None) -> None:
        """Every rank reads the rows itself."""

    def logits(self, batch: Batch, gathered: None) -> torch.Tensor:
        rows = self.current[batch.indices.numpy()]
        return torch.from_numpy(rows).to(self.device, non_blocking=True)

    def _compute(self, epoch: int, path: Path) -> None:
        chunks = torch.arange(len(self.data)).split(self.batch_size)
        views = self.data.loader(self.augmentation, self.device)(chunks, epoch)
        logits = [gathered_logits(self.teacher, self._batch(indices, images), self.world).float().cpu()
                  for indices, images in tqdm(zip(chunks, views), total=len(chunks),
                                              desc=f"teacher logits, epoch {epoch}", disable=not self.verbose)]
        if self.writer:
            self._write(torch.cat(logits).numpy(), path)
        if self.world is not None:
            dist.barrier(self.world)

    def _batch(self, indices: torch.Tensor, images: torch.Tensor) -> Batch:
        return Batch(self.normalize(images), self.data.labels[indices.to(self.device)], indices)

    def _write(self, logits: np.ndarray, path: Path) -> None:
        """Write-then-rename: a reader never sees half a file, concurrent writers never clash."""
        key_file = self.folder / "key.json"
        if not key_file.is_file():
            write_text_atomic(key_file, json.dumps(self.key, indent=1))
        write_atomic(path, lambda f: np.save(f, logits))

    def summary(self) -> dict:
        """For results.json: where the cache is and which epochs this run computed or reused."""
        return {"path": str(self.folder), "computed_epochs": self.computed, "reused_epochs": self.reused}

