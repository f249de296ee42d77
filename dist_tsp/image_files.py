"""Image folders read from disk on demand: each sample decoded (TorchCodec), resized and augmented in
`torch.utils.data.DataLoader` workers, so a rank's memory is bounded by the batches in flight, not the dataset.

The paths are one numpy byte-string array (shared by forked workers without copy-on-write growth, unlike a list of
Python strings); the batch plan is made in the main process (data.PeerBatches), so a batch holds the same samples
and views whatever the number of workers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torchcodec.decoders import decode_image

from dist_tsp.augmentation import Augmentation, Crop, Views, evaluation_view
from dist_tsp.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
PREFETCH_BATCHES = 4  # per worker
_SOURCE_LOCATION = re.compile(r"^\w+, \S+:\d+, ")  # "decode_rows, .../DecodeJpeg.cpp:287, " in a decoder's error


class ImageError(UserError):
    """An image file that cannot be decoded."""


@dataclass(frozen=True, slots=True)
class ImageFiles:
    """One split of an image folder: files (relative to `root`) and labels [N]; decoded only when loaded."""

    root: Path
    paths: np.ndarray  # bytes, one relative path per sample
    labels: torch.Tensor
    image_size: int
    crop: Crop
    workers: int

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ImageFiles:
        keep = indices.cpu().numpy()
        return ImageFiles(self.root, self.paths[keep], self.labels[indices], self.image_size, self.crop, self.workers)

    def to(self, device: torch.device) -> ImageFiles:
        """The labels on `device`; images are decoded when loaded."""
        return ImageFiles(self.root, self.paths, self.labels.to(device), self.image_size, self.crop, self.workers)

    def fingerprint(self) -> bytes:
        """What identifies the split's content without reading it: its file names and labels."""
        return b"\0".join(self.paths.tolist()) + self.labels.cpu().numpy().tobytes()

    def loader(self, augmentation: Augmentation | None, device: torch.device, *, persistent: bool = False
               ) -> FileLoader:
        return FileLoader(self, augmentation, device, persistent=persistent)


class FileLoader:
    """Batches of views of an ImageFiles split, decoded by DataLoader workers (pinned, prefetched) and moved to
    `device`. Called with a plan (a sequence of index tensors, one per batch) and an epoch (None: evaluation
    views); `persistent` keeps its workers between calls."""

    def __init__(self, files: ImageFiles, augmentation: Augmentation | None, device: torch.device, *,
                 persistent: bool) -> None:
        self.device, self.plan = device, _Plan()
        workers = files.workers
        self.loader = DataLoader(_Views(files, augmentation), batch_sampler=self.plan, num_workers=workers,
                                 collate_fn=_collate, pin_memory=device.type == "cuda",
                                 persistent_workers=persistent and workers > 0,
                                 prefetch_factor=PREFETCH_BATCHES if workers > 0 else None)

    def __call__(self, plan: Sequence[torch.Tensor], epoch: int | None) -> Iterator[torch.Tensor]:
        self.plan.batches = [[(-1 if epoch is None else epoch, i) for i in indices.tolist()] for indices in plan]
        for images in self.loader:
            if isinstance(images, str):
                raise ImageError(images)
            yield images.to(self.device, non_blocking=True)


class _Plan(Sampler):
    """The batches of (epoch, index) keys of the next pass, set by FileLoader before it iterates."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Views(torch.utils.data.Dataset):
    """In a worker: (epoch, index) -> the sample's uint8 view [3, S, S] (epoch -1: its evaluation view), or the
    one-line reason it cannot be read."""

    def __init__(self, files: ImageFiles, augmentation: Augmentation | None) -> None:
        self.files, self.augmentation = files, augmentation
        self.epoch_views = (None, None)  # (epoch, its padded-crop table), made once per epoch per worker

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor | str:
        epoch, index = key
        path = self.files.root / self.files.paths[index].decode()
        try:
            image = decode_image(str(path), mode="RGB")
        except (RuntimeError, ValueError, OSError) as error:
            return f"image {path} cannot be read ({_reason(error)}): replace or remove it"
        if image.ndim == 4:  # an animated GIF or WebP: its first frame
            image = image[0]
        size, augmentation = self.files.image_size, self.augmentation
        if epoch < 0 or augmentation is None or not augmentation.enabled:
            return evaluation_view(image, size, self.files.crop)
        if augmentation.crop == "random_resized":
            return augmentation.random_resized(image, size, epoch, index)
        views = self._views(epoch)
        flips = None if views.flips is None else views.flips[index, None]
        return augmentation.crop_flip(evaluation_view(image, size, "padded")[None], views.offsets[index, None],
                                      flips)[0]

    def _views(self, epoch: int) -> Views:
        if self.epoch_views[0] != epoch:
            self.epoch_views = (epoch, self.augmentation.epoch_views(epoch, len(self.files), torch.device("cpu")))
        return self.epoch_views[1]


def _reason(error: BaseException) -> str:
    """The decoder's message without the C++ function and source line it starts with."""
    lines = str(error).strip().splitlines()
    return _SOURCE_LOCATION.sub("", lines[-1]) if lines else type(error).__name__


def _collate(samples: list[torch.Tensor | str]) -> torch.Tensor | str:
    """Stack the views; a batch with an unreadable image becomes that image's reason."""
    failed = next((s for s in samples if isinstance(s, str)), None)
    return failed if failed is not None else torch.stack(samples)


def list_image_folder(split: Path, classes: list[str] | None = None) -> tuple[list[str], np.ndarray, torch.Tensor]:
    """The class folders of `split` (sorted, or `classes` when given), every image file under them (sorted), and
    their labels, without opening any file."""
    found = sorted(p.name for p in split.iterdir() if p.is_dir()) if classes is None else classes
    paths, labels = [], []
    for label, name in enumerate(found):
        folder = split / name
        files = sorted(f for f in _walk(folder) if f.lower().endswith(EXTENSIONS)) if folder.is_dir() else []
        paths += [f"{name}/{f}".encode() for f in files]
        labels += [label] * len(files)
    return found, np.array(paths, dtype=bytes), torch.tensor(labels, dtype=torch.int64)


def _walk(folder: Path) -> list[str]:
    """Every file under `folder`, as a path relative to it."""
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
