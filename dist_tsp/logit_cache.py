"""teacher.mode=cached: the teacher's logits for every sample's view of an epoch, computed once, then read.

A sample's augmented view depends only on (seed, epoch, sample) (see data.Augmentation), so the cache replays
exactly the view each student sees: the logits of epoch e are computed on the views of epoch e, batch-sharded over
all ranks, streamed to one memory-mapped .npy per epoch (one file in all when augmentation is off) as they come.
A row holds all C logits, or (teacher.cache_topk=k) the k largest and their classes, in float32 or float16
(teacher.cache_precision): ImageNet's 1.28 M x 1000 dense float32 logits are 5 GB per epoch, its top-10 in
float16 77 MB. The folder is named by a hash of everything the logits depend on (teacher file, teacher model and
input scale, training images and labels, augmentation, seed, precision, layout), so runs that share
`teacher.cache_dir` reuse it and a changed input never matches a stale file. Runs side by side that share it (the
protocol's KD and TSP) compute each epoch once: while one computes, the others wait for its file.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dist_tsp.augmentation import Augmentation
from dist_tsp.checkpoint import check_writable, try_lock, write_atomic, write_text_atomic
from dist_tsp.config import RunConfig
from dist_tsp.data import Batch, Dataset, Normalizer, Samples
from dist_tsp.errors import Preempted, UserError
from dist_tsp.exchange import all_reduce
from dist_tsp.run_control import StopVote
from dist_tsp.teacher_modes import RunTeacher, gathered_logits

WAIT_POLL_S = 1.0  # how often the ranks of a run waiting for another run's epoch look again


def cache_key(cfg: RunConfig, teacher_sha256: str, data: Dataset, augmentation: Augmentation,
              mixed_precision: str) -> dict:
    """Everything the cached logits depend on: the teacher, the training images (a streamed set by its file names
    and labels, not its pixels) at their size and normalisation, their views, the precision and the layout."""
    content = hashlib.sha256()
    data.train.add_content_to(content)
    return {"teacher_sha256": teacher_sha256, "teacher_model": cfg.teacher.model, "teacher_args": cfg.teacher.args,
            "input_scale": cfg.teacher.input_scale, "dataset": cfg.data.name, "train_sha256": content.hexdigest(),
            "image_size": data.train.image_size, "mean": data.mean, "std": data.std, **augmentation.key(),
            "mixed_precision": mixed_precision, **layout_key(cfg)}


def layout_key(cfg: RunConfig) -> dict:
    """The storage settings, when not the dense float32 of caches written before they existed."""
    return {k: v for k, v in (("topk", cfg.teacher.cache_topk), ("precision", cfg.teacher.cache_precision))
            if v not in (None, "float32")}


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """How a sample's teacher logits are stored: all C of them (dense), or the k largest with their classes
    (top-k, as FKD stores its soft labels), in float32 or float16. A top-k row reads back as C logits that are
    -inf outside its k classes: the softmax is then the renormalised top-k distribution, and with k = C and
    float32 it is exactly the dense row."""

    num_classes: int
    topk: int | None
    precision: str  # float32 or float16

    @property
    def dtype(self) -> np.dtype:
        """One row's numpy type: C values, or a record of k values and k classes."""
        if self.topk is None:
            return np.dtype((self.precision, (self.num_classes,)))
        return np.dtype([("logits", self.precision, (self.topk,)), ("classes", np.int32, (self.topk,))])

    def encode(self, logits: torch.Tensor) -> np.ndarray:
        """[B, C] float32 logits -> B rows."""
        if self.topk is None:
            return logits.cpu().numpy().astype(self.precision)
        values, classes = logits.topk(self.topk, dim=-1)
        rows = np.empty(len(logits), self.dtype)
        rows["logits"], rows["classes"] = values.cpu().numpy(), classes.cpu().numpy()
        return rows

    def decode(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """B rows -> [B, C] float32 logits on `device`."""
        if self.topk is None:
            return torch.from_numpy(np.asarray(rows, np.float32)).to(device, non_blocking=True)
        values = torch.from_numpy(np.asarray(rows["logits"], np.float32)).to(device, non_blocking=True)
        classes = torch.from_numpy(rows["classes"].astype(np.int64)).to(device, non_blocking=True)
        dense = torch.full((len(rows), self.num_classes), -torch.inf, device=device)
        return dense.scatter_(1, classes, values)

    def array(self, num_rows: int) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and type of the .npy array of `num_rows` rows."""
        if self.topk is None:
            return (num_rows, self.num_classes), self.dtype.base
        return (num_rows,), self.dtype

    def write(self, file: BinaryIO, num_rows: int, rows: Iterator[np.ndarray]) -> None:
        """An .npy file of `num_rows` rows, written batch by batch as `rows` yields them."""
        shape, dtype = self.array(num_rows)
        np.lib.format.write_array_header_1_0(file, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                    "fortran_order": False, "shape": shape})
        for batch in rows:
            file.write(np.ascontiguousarray(batch).tobytes())


class CachedLogits:
    """Per step, the cached rows of the batch's samples for the current epoch: nothing to add to the step's
    all-gather. Read from host memory: a captured step takes them at its boundary."""

    capturable = False

    def __init__(self, folder: Path, key: dict, teacher: RunTeacher, data: Samples, augmentation: Augmentation,
                 normalize: Normalizer, layout: CacheLayout, *, world: dist.ProcessGroup | None, batch_size: int,
                 device: torch.device, writer: bool, main: bool, stop_vote: StopVote) -> None:
        """`teacher` must be batch-sharded over `world` (every rank); `writer` ranks store what is computed; the
        `main` rank shows progress and holds the epoch's lock for the run; `stop_vote` ends a computation after the
        batch a stop signal comes in."""
        self.folder, self.key, self.teacher, self.layout, self.stop_vote = folder, key, teacher, layout, stop_vote
        self.data, self.augmentation, self.normalize, self.world = data, augmentation, normalize, world
        self.batch_size, self.device, self.writer, self.main = batch_size, device, writer, main
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
        with self._claimed(epoch):
            exists = torch.tensor([float(path.is_file())], device=self.device)
            # Decide together (none computes alone), and only now that the lock is held: a file the run before
            # finished meanwhile is then seen by every rank, and not computed again.
            all_reduce(exists, self.world, dist.ReduceOp.MIN)
            if not exists.item():
                self._check_writable(epoch)
                self._compute(epoch, path)
            if epoch not in self.computed + self.reused:  # not the epoch a resumed run goes on with
                (self.reused if exists.item() else self.computed).append(epoch)
        self.current = self._mapped(path)

    def _check_writable(self, epoch: int) -> None:
        """Refuse on every rank, before any computes them, an epoch's logits that a writer could not store: a cache
        folder this run cannot write into is read, until an epoch is missing from it."""
        writable = True
        if self.writer:
            try:
                check_writable(self.folder, "teacher.cache_dir")
            except UserError:
                writable = False
        agreed = torch.tensor([float(writable)], device=self.device)
        all_reduce(agreed, self.world, dist.ReduceOp.MIN)
        if not agreed.item():
            raise UserError(f"the teacher's logits for epoch {epoch} are not in {self.folder}, which this run cannot "
                            "write into: give it write access there, or point teacher.cache_dir to a folder it can "
                            "write")

    def _mapped(self, path: Path) -> np.ndarray:
        """The epoch's rows, memory-mapped; UserError for a file that is not the whole array this cache holds."""
        shape, dtype = self.layout.array(len(self.data))
        try:
            rows = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:  # ValueError: cut short, or not an .npy file
            problem = f"{type(error).__name__}: {error}"
        else:
            if (rows.shape, rows.dtype) == (shape, dtype):
                return rows
            problem = f"an array {rows.shape} of {rows.dtype}, not {shape} of {dtype}"
        raise UserError(f"teacher logits {path} cannot be read ({problem}): delete it, and the next run computes it "
                        "again")

    @contextmanager
    def _claimed(self, epoch: int) -> Iterator[None]:
        """Hold the epoch's lock file (the main rank, for the whole run): while another run that shares the cache
        holds it, computing that epoch, every rank of this one waits (in short collectives, well inside any
        timeout). The lock goes with the process that held it, however it ends; a folder this run cannot write to
        is only read."""
        lock = None
        if self.main:
            with suppress(OSError):
                self.folder.mkdir(parents=True, exist_ok=True)
                lock = open(self.path(epoch).with_suffix(".lock"), "ab")
        try:
            said = False
            while True:
                # without locks (Lustre mounted without flock), runs side by side may compute an epoch twice
                held = torch.tensor([float(lock is None or try_lock(lock))], device=self.device)
                all_reduce(held, self.world, dist.ReduceOp.MIN)
                if held.item():
                    break
                if lock is not None and not said:
                    print(f"teacher logits, epoch {epoch}: another run is computing them in {self.folder}; waiting",
                          flush=True)
                    said = True
                time.sleep(WAIT_POLL_S)
            yield
        finally:
            if lock is not None:
                lock.close()  # releases the lock

    def contribution(self, batch: Batch, group: dist.ProcessGroup | None) -> None:
        """Every rank reads the rows itself."""

    def logits(self, batch: Batch, gathered: None) -> torch.Tensor:
        return self.layout.decode(self.current[batch.indices.numpy()], self.device)

    def _compute(self, epoch: int, path: Path) -> None:
        """Every rank runs its share of the teacher on the epoch's views; the writer streams the rows to disk as
        they come (nothing of the size of the epoch's logits is held in memory)."""
        chunks = torch.arange(len(self.data)).split(self.batch_size)
        views = self.data.loader(self.augmentation, self.device)(chunks, epoch)
        rows = self._rows(epoch, tqdm(zip(chunks, views), total=len(chunks), desc=f"teacher logits, epoch {epoch}",
                                      disable=not self.main))
        if self.writer:
            self._write(rows, path)
        else:
            for _ in rows:
                pass
        if self.world is not None:
            dist.barrier(self.world)

    def _rows(self, epoch: int, batches: tqdm) -> Iterator[np.ndarray]:
        """The stored rows of each batch's logits; Preempted on every rank after the same batch when a stop signal
        came (a scheduler's grace is shorter than an ImageNet epoch's logits)."""
        for done, (indices, images) in enumerate(batches, start=1):
            self.stop_vote.start()
            yield self.layout.encode(gathered_logits(self.teacher, self._batch(indices, images), self.world).float())
            if self.stop_vote.result() and done < batches.total:
                raise Preempted(f"stopped by a signal at batch {done} of {batches.total} of the teacher's logits for "
                                f"epoch {epoch}, before they were saved: rerun the same command to resume from the "
                                "last checkpoint")

    def _batch(self, indices: torch.Tensor, images: torch.Tensor) -> Batch:
        return Batch(self.normalize(images), self.data.labels[indices.to(self.device)], indices)

    def _write(self, rows: Iterator[np.ndarray], path: Path) -> None:
        """Write-then-rename: a reader never sees half a file, concurrent writers never clash."""
        key_file = self.folder / "key.json"
        if not key_file.is_file():
            write_text_atomic(key_file, json.dumps(self.key, indent=1))
        write_atomic(path, lambda file: self.layout.write(file, len(self.data), rows))

    def summary(self) -> dict:
        """For results.json: where the cache is and which epochs this run computed or reused."""
        return {"path": str(self.folder), "computed_epochs": self.computed, "reused_epochs": self.reused}

    def resume_summary(self, saved: dict) -> None:
        """A resumed run's: the epochs computed or reused before its checkpoint, as its summary said then (unless
        that was another cache's: a forced resume with other settings starts its own)."""
        if saved.get("path") == str(self.folder):
            self.computed, self.reused = list(saved["computed_epochs"]), list(saved["reused_epochs"])
