"""Datasets as in-memory uint8 tensors, the seeded per-sample augmentation, and the per-replica batch stream."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dist_tsp.config import DataConfig
from dist_tsp.errors import UserError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
VIEW_STREAM = 0x5EED  # seeds the per-sample augmentation, apart from the sample order
SUBSET_SEED = 2024  # data.max_train_samples keeps the same images whatever the run's seed


class DataError(UserError):
    """A dataset that cannot be found or read, with where to put it."""


@dataclass(frozen=True, slots=True)
class ImageSet:
    """Images [N, 3, H, W] uint8 and labels [N] int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices])

    def to(self, device: torch.device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True, slots=True)
class Dataset:
    """Train/val/test splits of one dataset plus what is needed to feed a model."""

    name: str
    train: ImageSet
    val: ImageSet | None
    test: ImageSet
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool
    normalize: Normalizer = dataclasses.field(init=False)  # the training images' statistics, on their device

    def __post_init__(self) -> None:
        object.__setattr__(self, "normalize", Normalizer(self.mean, self.std, self.train.images.device))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def augmentation(self, seed: int, enabled: bool) -> Augmentation:
        """The training views' seeded crop (a pad of 1/8 of the image side) and flip (for the sets it suits)."""
        return Augmentation(enabled=enabled, hflip=self.hflip, pad=max(1, self.train.images.shape[-1] // 8), seed=seed)

    def to(self, device: torch.device) -> Dataset:
        val = None if self.val is None else self.val.to(device)
        return dataclasses.replace(self, train=self.train.to(device), val=val, test=self.test.to(device))


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Load the configured dataset on the CPU, resized to cfg.image_size, with the optional val split."""
    loader = {"digits": _digits, "fashion_mnist": _fashion_mnist, "cifar10": _cifar10,
              "image_folder": _image_folder}[cfg.name]
    train, test, classes, hflip = loader(cfg)
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(SUBSET_SEED))
        train = train.subset(subset[: cfg.max_train_samples].sort().values)
    train, test = (_resized(s, cfg.image_size) for s in (train, test))
    val = None
    if cfg.val_fraction > 0:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        n_val = int(round(cfg.val_fraction * len(train)))
        train, val = train.subset(order[n_val:]), train.subset(order[:n_val])
    mean, std = _channel_stats(train.images)
    return Dataset(cfg.name, train, val, test, classes, mean, std, hflip)


def _resized(images: ImageSet, size: int) -> ImageSet:
    if images.images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images.images.float(), size=(size, size), mode="bilinear", antialias=True)
    return ImageSet(resized.round().clamp(0, 255).to(torch.uint8), images.labels)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pixels = images.float().div(255).transpose(0, 1).reshape(3, -1)
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp_min(1e-3).tolist())


def _gray_to_rgb(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[N, H, W] grayscale -> [N, 3, H, W]."""
    return torch.as_tensor(images).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _digits(cfg: DataConfig) -> tuple[ImageSet, ImageSet, list[str], bool]:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped with the package); a fixed 20 % test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = _gray_to_rgb(np.clip(digits.images * 16, 0, 255).astype(np.uint8))
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(12345))
    n_test = len(labels) // 5
    full = ImageSet(images, labels)
    return full.subset(order[n_test:]), full.subset(order[:n_test]), [str(d) for d in range(10)], False


def _fashion_mnist(cfg: DataConfig) -> tuple[ImageSet, ImageSet, list[str], bool]:
    """Fashion-MNIST from the original IDX files (Debian's dataset-fashion-mnist package by default)."""
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.mnist import read_image_file, read_label_file
    from torchvision.datasets.utils import extract_archive

    root = Path(cfg.root) if cfg.root else FASHION_MNIST_ROOT
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    found = [next((p for p in (root / n, root / f"{n}.gz") if p.is_file()), None) for n in names]
    if None in found:
        missing = names[found.index(None)]
        raise DataError(
            f"Fashion-MNIST file {missing}[.gz] not found in {root}: "
            "run `apt-get install dataset-fashion-mnist` or set data.root to a folder with the four IDX files"
        )
    with tempfile.TemporaryDirectory() as scratch:
        raw = [extract_archive(str(p), scratch) if p.suffix == ".gz" else str(p) for p in found]
        train = ImageSet(_gray_to_rgb(read_image_file(raw[0])), read_label_file(raw[1]).long())
        test = ImageSet(_gray_to_rgb(read_image_file(raw[2])), read_label_file(raw[3]).long())
    return train, test, list(FashionMNIST.classes), True


def _cifar10(cfg: DataConfig) -> tuple[ImageSet, ImageSet, list[str], bool]:
    """CIFAR-10 through torchvision: downloaded into data.root when online and asked to."""
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root) if cfg.root else Path("data/cifar10")
    try:
        splits = [CIFAR10(str(root), train=train, download=cfg.download) for train in (True, False)]
    except (RuntimeError, OSError) as error:
        how = "the download failed (offline?)" if cfg.download else "data.download is false"
        raise DataError(
            f"CIFAR-10 not found in {root} and {how}: put cifar-10-batches-py/ (from "
            f"cifar-10-python.tar.gz) in {root}, or run online with data.download=true ({_first_line(error)})"
        ) from None
    train, test = (
        ImageSet(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(s.targets)) for s in splits
    )
    return train, test, list(splits[0].classes), True


def _image_folder(cfg: DataConfig) -> tuple[ImageSet, ImageSet, list[str], bool]:
    """Your own images: data.root/train/<class>/*.png and data.root/test/<class>/*.png."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    root = Path(cfg.root)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"image folder {root / split} not found: "
                            "data.root needs train/<class>/ and test/<class>/ folders")
    transform = v2.Compose([v2.PILToTensor(), v2.RGB(), v2.Resize((cfg.image_size, cfg.image_size), antialias=True)])
    sets = [ImageFolder(str(root / split), transform=transform) for split in ("train", "test")]
    if sets[0].classes != sets[1].classes:
        raise DataError(f"image folder {root}: train/ and test/ must have the same class folders")
    train, test = (ImageSet(torch.stack([img for img, _ in s]), torch.as_tensor(s.targets)) for s in sets)
    return train, test, sets[0].classes, True


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (seed, epoch, replica, ...)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class Normalizer:
    """uint8 [B, 3, H, W] -> normalized float, on the images' device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


class Batch(NamedTuple):
    """One step's input: normalized images and labels on the device, and the sample indices on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


@dataclass(frozen=True, slots=True)
class Augmentation:
    """The seeded per-sample augmentation: a random crop of the image zero-padded by `pad` pixels, plus a horizontal
    flip when `hflip`, drawn per sample and epoch from (seed, epoch) alone. A sample's view is therefore the same
    whatever the placement, the batch it falls in or who asks: the batch stream, the teacher-logit cache and its
    key all share this object. Disabled, every view is the image itself."""

    enabled: bool
    hflip: bool
    pad: int
    seed: int

    def epoch_views(self, epoch: int, num_samples: int, device: torch.device) -> Views | None:
        """Every sample's crop offset [N, 2] and flip [N] in this epoch, on `device` (None: no augmentation)."""
        if not self.enabled:
            return None
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, epoch, VIEW_STREAM))
        offsets = torch.randint(0, 2 * self.pad + 1, (num_samples, 2), generator=generator)
        flips = torch.rand(num_samples, generator=generator) < 0.5 if self.hflip else None
        return Views(offsets.to(device), None if flips is None else flips.to(device))

    def view(self, images: torch.Tensor, indices: torch.Tensor, views: Views | None) -> torch.Tensor:
        """The uint8 views of samples `indices` of `images` [N, 3, H, W] (on the images' device): one gather per
        batch."""
        selected = images[indices]
        if views is None:
            return selected
        b, c, h, w = selected.shape
        padded = F.pad(selected, (self.pad,) * 4)
        offsets = views.offsets[indices]
        rows = offsets[:, 0, None] + torch.arange(h, device=images.device)
        cols = offsets[:, 1, None] + torch.arange(w, device=images.device)
        if views.flips is not None:
            cols = torch.where(views.flips[indices][:, None], cols.flip(1), cols)
        pixels = (rows[:, :, None] * padded.shape[-1] + cols[:, None, :]).view(b, 1, h * w)
        return padded.flatten(2).gather(2, pixels.expand(b, c, h * w)).view(b, c, h, w)

    def key(self) -> dict:
        """What a sample's view depends on, besides the image (for the teacher-logit cache's key)."""
        return {"augment": self.enabled, "hflip": self.hflip, "pad": self.pad, "seed": self.seed}


class Views(NamedTuple):
    """Per-sample augmentation of one epoch: crop offsets [N, 2] and horizontal flips [N] (or None)."""

    offsets: torch.Tensor
    flips: torch.Tensor | None


class PeerBatches:
    """One replica's batches: identical on every rank of a peer group, disjoint across replicas.

    The sample order depends only on (seed, epoch, replica), never on the rank; each sample's view comes from
    `augmentation`, on the data's device.
    """

    def __init__(self, data: ImageSet, *, batch_size: int, num_replicas: int, replica: int, seed: int,
                 augmentation: Augmentation, normalize: Normalizer) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.num_replicas, self.replica = num_replicas, replica
        self.augmentation, self.normalize = augmentation, normalize
        if len(self) == 0:
            raise DataError(
                f"{len(data)} training images over {num_replicas} replicas do not fill one batch of {batch_size}: "
                "lower data.batch_size"
            )

    def __len__(self) -> int:
        return len(self.data) // self.num_replicas // self.batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This replica's sample indices for every step of the epoch [steps, B] (on the CPU)."""
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(mixed_seed(self.seed, epoch)))
        steps, b = len(self), self.batch_size
        return order[self.replica :: self.num_replicas][: steps * b].view(steps, b)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield the batches of the epoch from `start_step`."""
        device = self.data.images.device
        order, views = self.epoch_order(epoch), self.augmentation.epoch_views(epoch, len(self.data), device)
        shard = order.to(device)
        for step in range(start_step, len(order)):
            images = self.augmentation.view(self.data.images, shard[step], views)
            yield Batch(self.normalize(images), self.data.labels[shard[step]], order[step])


def eval_batches(data: ImageSet, batch_size: int, normalize: Normalizer) -> Iterator[Batch]:
    """The whole set in order, unaugmented."""
    for start in range(0, len(data), batch_size):
        end = min(start + batch_size, len(data))
        yield Batch(normalize(data.images[start:end]), data.labels[start:end], torch.arange(start, end))
