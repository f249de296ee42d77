"""Images streamed from disk: an image folder's files, or the rows of a Hugging Face `datasets` split saved in
Arrow shards (`save_to_disk`, memory-mapped). Each sample is decoded (TorchCodec), resized and augmented in
`torch.utils.data.DataLoader` workers, so a rank's memory is bounded by the batches in flight, not the dataset.

A sample is reached by its index alone, in either source, so the batch plan is made in the main process
(data.PeerBatches) and a batch holds the same samples and views whatever the number of workers. File names are one
numpy byte-string array, shared by forked workers without copy-on-write growth (unlike a list of Python strings).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

try:  # only streamed and folder datasets decode images: the other sources run without TorchCodec
    from torchcodec.decoders import decode_image

    TORCHCODEC_MISSING: str | None = None  # why no image can be decoded here, when so
except (ImportError, OSError, RuntimeError) as error:  # not installed, or its libraries built for another torch
    decode_image = None
    TORCHCODEC_MISSING = "is not installed" if isinstance(error, ModuleNotFoundError) else \
        f"cannot be loaded ({type(error).__name__}: {(str(error).splitlines() or [''])[0]})"

from dist_tsp.augmentation import Augmentation, Crop, Views, evaluation_view, import_transforms
from dist_tsp.errors import UserError

# torchvision ImageFolder's and GIF: TorchCodec decodes JPEG, PNG, WebP and GIF, Pillow the rest (BMP, TIFF, PPM, PGM)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
_UNSUPPORTED = "Unsupported or unrecognized image format"  # TorchCodec's message for a format it does not read
PREFETCH_BATCHES = 4  # per worker
DEFAULT_WORKERS = 4  # per rank, at most (default_workers)
_SOURCE_LOCATION = re.compile(r"^\w+, \S+:\d+, ")  # "decode_rows, .../DecodeJpeg.cpp:287, " in a decoder's error


_CHECK_DATA = "python -m dist_tsp.check_data"
_RESUME = "rerun the same command to resume from the last checkpoint"
_gave_up_after_s = 0.0  # set once this process killed its loader workers for delivering no batch in that long


class ImageError(UserError):
    """An image that cannot be decoded."""


class LoaderWorkerLost(RuntimeError):
    """A worker's connection closed as it handed a batch over: it died before torch noticed."""


@dataclass(frozen=True, slots=True)
class FolderImages:
    """Image files under `root`, one relative path (bytes) per sample."""

    root: Path
    paths: np.ndarray
    fix_unreadable = "replace or remove it"

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, keep: np.ndarray) -> FolderImages:
        return FolderImages(self.root, self.paths[keep])

    def where(self, index: int) -> str:
        """Sample `index`'s file, read without opening it."""
        return str(self.root / os.fsdecode(self.paths[index]))

    def encoded(self, index: int) -> tuple[str, str | bytes]:
        """What names sample `index` in a message, and what the decoder reads (a path)."""
        path = self.where(index)
        return path, path

    def add_content_to(self, digest: hashlib._Hash) -> None:
        """Its file names, hashed into `digest`: what identifies it without reading it."""
        digest.update(b"\0".join(self.paths.tolist()))


@dataclass(frozen=True, slots=True)
class ArrowImages:
    """Rows of a `datasets` split saved with save_to_disk: its `image` column read as encoded bytes, memory-mapped."""

    path: Path
    rows: np.ndarray  # int64, the dataset rows of this split's samples
    table: Any = field(compare=False, repr=False)  # the datasets.Dataset, image column not decoded
    fix_unreadable = "replace it in the folder the shards came from and convert it again (python -m dist_tsp.shards)"

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, keep: np.ndarray) -> ArrowImages:
        return ArrowImages(self.path, self.rows[keep], self.table)

    def where(self, index: int) -> str:
        """Sample `index`'s split and row, found without reading the row."""
        return f"{self.path} row {int(self.rows[index])}"

    def encoded(self, index: int) -> tuple[str, str | bytes]:
        """What names sample `index` in a message (its row and source file: the `file` column python -m
        dist_tsp.shards writes, or the image's own base name), and what the decoder reads."""
        row = self.table[int(self.rows[index])]
        image = row["image"]
        source = row.get("file") or image.get("path")
        name = self.where(index) + (f" ({source})" if source else "")
        return name, image["bytes"] if image.get("bytes") is not None else image["path"]

    def add_content_to(self, digest: hashlib._Hash) -> None:
        """The saved dataset's own fingerprint and the rows taken from it, hashed into `digest`."""
        digest.update(self.table._fingerprint.encode())
        digest.update(self.rows)


@dataclass(frozen=True, slots=True)
class StreamedImages:
    """One split read on demand: its images (a folder's files or Arrow rows) and labels [N]."""

    images: FolderImages | ArrowImages
    labels: torch.Tensor
    image_size: int
    crop: Crop
    workers: int | None  # loader workers (None: default_workers() of the process that reads it)
    timeout_s: float  # for the workers to deliver a batch (0: wait for ever)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> StreamedImages:
        return replace(self, images=self.images.select(indices.cpu().numpy()), labels=self.labels[indices])

    def to(self, device: torch.device) -> StreamedImages:
        """The labels on `device`; images are decoded when loaded."""
        return replace(self, labels=self.labels.to(device))

    def add_content_to(self, digest: hashlib._Hash) -> None:
        """What identifies the split's content without decoding it, its images' names and its labels, hashed into
        `digest`."""
        self.images.add_content_to(digest)
        digest.update(self.labels.cpu().contiguous().numpy())

    def loader(self, augmentation: Augmentation | None, device: torch.device, *, persistent: bool = False
               ) -> StreamLoader:
        return StreamLoader(self, augmentation, device, persistent=persistent)


class StreamLoader:
    """Batches of views of a streamed split, decoded by DataLoader workers (pinned, prefetched) and moved to
    `device`. Called with a plan (a sequence of index tensors, one per batch) and an epoch (None: evaluation
    views); `persistent` keeps its workers between calls."""

    def __init__(self, files: StreamedImages, augmentation: Augmentation | None, device: torch.device, *,
                 persistent: bool) -> None:
        self.device, self.plan = device, _Plan()
        workers, with_workers = default_workers() if files.workers is None else files.workers, {}
        self.timeout_s = files.timeout_s if workers > 0 else 0.0  # with no workers, nothing can be stopped
        if workers > 0:  # forked, as the module's docstring has them (the default: spawn on macOS, forkserver from
            # Python 3.14)
            import_transforms()
            with_workers = dict(persistent_workers=persistent, prefetch_factor=PREFETCH_BATCHES,
                                multiprocessing_context="fork")
        self.loader = DataLoader(_Views(files, augmentation), batch_sampler=self.plan, num_workers=workers,
                                 collate_fn=_collate, pin_memory=device.type == "cuda", **with_workers)

    def __call__(self, plan: Sequence[torch.Tensor], epoch: int | None) -> Iterator[torch.Tensor]:
        self.plan.batches = [indices.numpy() for indices in plan]  # views of the plan's CPU tensors, no copy
        self.plan.epoch = -1 if epoch is None else epoch
        batches = self._in_time(iter, self.loader)  # persistent workers are first told a new pass starts
        while (images := self._in_time(next, batches, None)) is not None:
            if isinstance(images, str):
                raise ImageError(images)
            yield images.to(self.device, non_blocking=True)

    def _in_time(self, wait: Callable[..., Any], *args: Any) -> Any:
        """wait(*args), which waits for the workers, the workers killed if it takes longer than timeout_s. Not torch's
        own timeout, which bounds only the wait for a batch's message: a batch's memory is then handed over by its
        worker, and a stopped worker, or one whose decoder holds the interpreter lock, would never hand it over."""
        try:
            with _WATCHDOG.waiting(self.timeout_s):
                return wait(*args)
        except Exception as error:  # a worker's death, noticed by torch or as a batch was handed over: the run ends
            stop_loader_workers()
            if isinstance(error, (ConnectionError, EOFError)):
                said = ": ".join(filter(None, (type(error).__name__, str(error))))  # EOFError's is often empty
                raise LoaderWorkerLost(f"its connection closed as it handed a batch over: {said}") from error
            raise


class _Watchdog:
    """One thread per process that kills its loader workers once a wait for them lasts longer than its limit (a
    timer thread per wait would start a thread per batch, 0.14 ms)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._wait: tuple[float, float] | None = None  # the wait in progress: (its monotonic deadline, its limit)
        self._thread: threading.Thread | None = None
        self._watching = False  # the thread has started and waits on _changed

    @contextlib.contextmanager
    def waiting(self, limit_s: float) -> Iterator[None]:
        """The enclosed wait bounded by `limit_s` (0: unbounded)."""
        if limit_s <= 0:
            yield
            return
        with self._changed:
            if self._thread is None or not self._thread.is_alive():  # never started, or gave up
                self._watching = False
                self._thread = threading.Thread(target=self._watch, name="dist-tsp loader watchdog", daemon=True)
                self._thread.start()
                self._changed.wait_for(lambda: self._watching)  # not still starting when the workers fork
            self._wait = (time.monotonic() + limit_s, limit_s)
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._wait = None

    def _watch(self) -> None:
        with self._changed:
            self._watching = True
            self._changed.notify_all()
            while self._wait is None or (left := self._wait[0] - time.monotonic()) > 0:
                self._changed.wait(None if self._wait is None else left)
            limit_s, self._wait = self._wait[1], None
        _give_up_on_stuck_workers(limit_s)


_WATCHDOG = _Watchdog()


class _Plan(Sampler):
    """The next pass's batches as (epoch, index) keys, made one batch at a time from the plan StreamLoader sets."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.epoch = -1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return ([(self.epoch, i) for i in indices.tolist()] for indices in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Views(torch.utils.data.Dataset):
    """In a worker: (epoch, index) -> the sample's uint8 view [3, S, S] (epoch -1: its evaluation view), or the
    one-line reason it cannot be read."""

    def __init__(self, files: StreamedImages, augmentation: Augmentation | None) -> None:
        self.files, self.augmentation = files, augmentation
        self.epoch_views = (None, None)  # (epoch, its padded-crop table), made once per epoch per worker

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor | str:
        epoch, index = key
        name, encoded = self.files.images.encoded(index)
        image = decoded(encoded)
        if isinstance(image, str):
            return f"image {name} cannot be read ({image}): {self.files.images.fix_unreadable}"
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


def decoded(encoded: str | bytes) -> torch.Tensor | str:
    """An image file (path or bytes) as uint8 RGB [3, H, W], or the one-line reason it cannot be read."""
    try:
        return _decode_rgb(encoded)
    except (RuntimeError, ValueError, OSError) as error:
        return _reason(error)


def _decode_rgb(encoded: str | bytes) -> torch.Tensor:
    """An image file (path or bytes) as uint8 RGB [3, H, W], an animated one's first frame."""
    try:
        image = decode_image(encoded, mode="RGB")
    except ValueError as error:
        if not str(error).startswith(_UNSUPPORTED):
            raise
        return _decode_with_pillow(encoded)
    return image[0] if image.ndim == 4 else image


def _decode_with_pillow(encoded: str | bytes) -> torch.Tensor:
    """What TorchCodec does not read (BMP, TIFF, PPM, PGM), as torchvision's ImageFolder reads it."""
    from PIL import Image

    try:
        with Image.open(encoded if isinstance(encoded, str) else io.BytesIO(encoded)) as image:
            pixels = np.array(image.convert("RGB"))
    except Image.DecompressionBombError as error:  # an Exception, not an OSError: unreadable as the others
        raise ValueError(str(error)) from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _reason(error: BaseException) -> str:
    """The decoder's message without the C++ function and source line it starts with."""
    lines = str(error).strip().splitlines()
    return _SOURCE_LOCATION.sub("", lines[-1]) if lines else type(error).__name__


def loader_failed(error: BaseException) -> str | None:
    """The one line for a loader worker's death (torch's error, raised wherever the main process was when it noticed,
    or a batch's hand-over cut short), or for any error once this process killed its workers for delivering no batch
    in data.loader_timeout_s; None for another error."""
    if _gave_up_after_s:  # whatever then failed (a worker's death, a batch's hand-over, the pinning thread)
        return (f"the data loader's workers delivered no batch in {_gave_up_after_s:g} s (data.loader_timeout_s): one "
                f"is stuck: if its decoder loops on an image, {_CHECK_DATA} names it; if the file system is only "
                f"slow, raise data.loader_timeout_s; then {_RESUME}")
    said = " ".join(str(error).split())
    if not isinstance(error, LoaderWorkerLost) and "DataLoader worker (pid" not in said:
        return None
    return (f"a data loader worker died ({said}): if memory ran out, lower data.loader_workers; if an image crashed "
            f"its decoder, {_CHECK_DATA} names it; then {_RESUME}")


def _give_up_on_stuck_workers(timeout_s: float) -> None:
    """Kill this process's loader workers, which delivered no batch in `timeout_s`: the main process, waiting for
    one, then fails with their death, which loader_failed says they were stuck."""
    global _gave_up_after_s
    _gave_up_after_s = timeout_s
    stop_loader_workers()


def stop_loader_workers() -> None:
    """Kill this process's loader workers (all first, then wait for them), as it ends on their failure: a stuck one
    would keep it from exiting. In the main thread, their deaths are no longer checked: torch's SIGCHLD handler would
    raise for each again, wherever the process then is."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers = multiprocessing.active_children()
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join()


def default_workers() -> int:
    """Loader workers per rank: up to 4, the CPUs this process may use shared among the ranks on its node."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(DEFAULT_WORKERS, len(os.sched_getaffinity(0)) // ranks_here))


def _collate(samples: list[torch.Tensor | str]) -> torch.Tensor | str:
    """Stack the views; a batch with an unreadable image becomes that image's reason."""
    failed = next((s for s in samples if isinstance(s, str)), None)
    return failed if failed is not None else torch.stack(samples)


def list_image_folder(split: Path, classes: list[str] | None = None) -> tuple[list[str], np.ndarray, torch.Tensor]:
    """The class folders of `split` (sorted, or `classes` when given), every image file under them (sorted), and
    their labels, without opening any file."""
    found = class_folders(split) if classes is None else classes
    paths, labels = [], []
    for label, name in enumerate(found):
        folder = split / name
        files = sorted(f for f in _walk(folder) if f.lower().endswith(EXTENSIONS)) if folder.is_dir() else []
        paths += [os.fsencode(f"{name}/{f}") for f in files]  # as the file system names them, UTF-8 or not
        labels += [label] * len(files)
    return found, np.array(paths, dtype=bytes), torch.tensor(labels, dtype=torch.int64)


def class_folders(split: Path) -> list[str]:
    """The names of a split's class folders, sorted (ImageError where it cannot be read)."""
    with _scan(split) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir())


def _scan(folder: Path) -> Iterator[os.DirEntry]:
    """os.scandir(folder), with ImageError where it cannot be read (its images would be left out)."""
    try:
        return os.scandir(folder)
    except OSError as error:
        raise ImageError(f"folder {folder} cannot be read ({error.strerror}): give this user read access to it") \
            from None


def _walk(folder: Path) -> list[str]:
    """Every file under `folder` (symbolic links to files included, linked folders not entered), as a path relative
    to it, told from the folders' entries: only a symbolic link is looked up (stat), so listing ImageNet's 1.28 M
    files costs no round trip each on a network file system. ImageError for a folder that cannot be read or a
    symbolic link to no file with an image's extension (else images silently left out of the dataset)."""
    files, broken, folders = [], [], [""]
    while folders:
        relative = folders.pop()
        with _scan(folder / relative) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(f"{relative}{entry.name}/")
                elif entry.is_file():
                    files.append(f"{relative}{entry.name}")
                elif entry.is_symlink() and entry.name.lower().endswith(EXTENSIONS) and not os.path.exists(entry.path):
                    broken.append(entry.path)
    if broken:
        raise ImageError(f"image {min(broken)} is a symbolic link to no file ({len(broken)} such in {folder}): fix or "
                         "remove it")
    return files
