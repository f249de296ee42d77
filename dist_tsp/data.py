"""Datasets (in memory as uint8 tensors, or image files streamed from disk), the per-replica batch stream, and the
evaluation batches."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar

import numpy as np
import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from dist_tsp import streaming
from dist_tsp.augmentation import Augmentation, mixed_seed
from dist_tsp.checkpoint import written_into
from dist_tsp.config import STREAMABLE, DataConfig
from dist_tsp.errors import OutOfSpace, UserError, not_a_file
from dist_tsp.exchange import all_gather_cat, group_size
from dist_tsp.streaming import EXTENSIONS, ArrowImages, FolderImages, StreamedImages, class_folders, list_image_folder

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
SUBSET_SEED = 2024  # data.max_train_samples keeps the same images whatever the run's seed
DIGITS_FILE = "sklearn/datasets/data/digits.csv.gz"  # as scikit-learn's installed-files list names it
STATS_SAMPLES = 2000  # a streamed set's normalisation statistics come from at most this many training images
RESIZE_CHUNK = 1024  # images resized at once when an in-memory dataset is brought to data.image_size
BAR_FROM_BATCHES = 8  # reading of fewer batches than this shows no progress bar
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what torchvision's weights expect


T = TypeVar("T")


class DataError(UserError):
    """A dataset that cannot be found or read, with where to put it."""


class ViewLoader(Protocol):
    """Batches of uint8 views on the device: one per index tensor of `plan`, augmented for `epoch` (None: the
    evaluation views)."""

    def __call__(self, plan: Sequence[torch.Tensor], epoch: int | None) -> Iterator[torch.Tensor]: ...


@dataclass(frozen=True, slots=True)
class ImageSet:
    """Images [N, 3, H, W] uint8 and labels [N] int64, in memory."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, indices: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices])

    def to(self, device: torch.device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device))

    def add_content_to(self, digest: hashlib._Hash) -> None:
        """The content, every image and label, hashed into `digest` without a copy of it."""
        for tensor in (self.images, self.labels):
            digest.update(tensor.cpu().contiguous().numpy())

    def loader(self, augmentation: Augmentation | None, device: torch.device, *, persistent: bool = False
               ) -> ViewLoader:
        """Views made on the images' device, one gather per batch (`device` is where the images already are)."""
        return _TensorViews(self.images, augmentation)


class _TensorViews:
    def __init__(self, images: torch.Tensor, augmentation: Augmentation | None) -> None:
        self.images, self.augmentation = images, augmentation

    def __call__(self, plan: Sequence[torch.Tensor], epoch: int | None) -> Iterator[torch.Tensor]:
        device = self.images.device
        views = None if epoch is None or self.augmentation is None else \
            self.augmentation.epoch_views(epoch, len(self.images), device)
        if isinstance(plan, torch.Tensor):  # an epoch's [steps, B]: to the device in one copy, not one per step
            plan = plan.to(device)
        for indices in plan:
            indices = indices.to(device)
            yield self.images[indices] if views is None else self.augmentation.view(self.images, indices, views)


Samples = ImageSet | StreamedImages


@dataclass(frozen=True, slots=True)
class Dataset:
    """Train/val/test splits of one dataset plus what is needed to feed a model."""

    name: str
    train: Samples
    val: Samples | None
    test: Samples
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool
    crop: str = "padded"
    normalize: Normalizer = dataclasses.field(init=False)  # the training images' statistics, on their device

    def __post_init__(self) -> None:
        object.__setattr__(self, "normalize", Normalizer(self.mean, self.std, self.train.labels.device))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def augmentation(self, seed: int, enabled: bool) -> Augmentation:
        """The training views' seeded crop (padded by 1/8 of the image side, or random-resized) and flip (for the
        sets it suits)."""
        return Augmentation(enabled=enabled, hflip=self.hflip, pad=max(1, self.train.image_size // 8), seed=seed,
                            crop=self.crop)

    def identity(self) -> str:
        """Its splits' sizes and a digest of their content (a streamed split's file names and labels), classes and
        statistics: what every rank of a run must have loaded alike."""
        splits = (self.train, self.val, self.test)
        content = hashlib.sha256(repr((self.name, self.classes, self.mean, self.std)).encode())
        for split in splits:
            content.update(repr(None if split is None else len(split)).encode())
            if split is not None:
                split.add_content_to(content)
        sizes = [0 if split is None else len(split) for split in splits]
        return (f"{sizes[0]} training, {sizes[1]} validation and {sizes[2]} test images in {self.num_classes} "
                f"classes, content {content.hexdigest()[:12]}")

    def to(self, device: torch.device) -> Dataset:
        val = None if self.val is None else self.val.to(device)
        return dataclasses.replace(self, train=self.train.to(device), val=val, test=self.test.to(device))


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Load the configured dataset on the CPU (image folders as file lists unless data.in_memory), at
    cfg.image_size, with the optional val split (both taken from the training images before an image folder is
    decoded into memory)."""
    if cfg.name in STREAMABLE:
        train, test, classes, hflip = {"image_folder": _image_folder, "arrow": _arrow}[cfg.name](cfg)
    else:
        loader = {"digits": _digits, "fashion_mnist": _fashion_mnist, "cifar10": _cifar10, "npz": _npz}[cfg.name]
        train, test, classes, hflip = loader(cfg)
        _fits_in_memory(sum(len(s) for s in (train, test) if not _at_size(s, cfg.image_size)), cfg,
                        "lower data.image_size, or give the images as an image folder (data.name=image_folder), "
                        "which is streamed from disk")
        train, test = (_resized(s, cfg.image_size) for s in (train, test))
    if len(classes) < 2:
        raise DataError(f"data.name={cfg.name} in {cfg.root} has a single class, {classes[0]!r}: a classifier needs "
                        "two or more; add the other classes' images")
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(SUBSET_SEED))
        train = train.subset(subset[: cfg.max_train_samples].sort().values)
    val = None
    if cfg.val_fraction > 0:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        n_val = int(round(cfg.val_fraction * len(train)))
        if n_val in (0, len(train)):
            held, fix = ("none", "raise it, or set it to 0") if n_val == 0 else ("every one", "lower it")
            raise DataError(f"data.val_fraction={cfg.val_fraction:g} of {len(train)} training images holds {held} "
                            f"out: {fix}")
        train, val = train.subset(order[n_val:]), train.subset(order[:n_val])
    if cfg.in_memory:  # an image folder decoded up front: the images the run reads, its subset only
        splits = {"training": train, "validation": val, "test": test}
        _fits_in_memory(sum(len(s) for s in splits.values() if s is not None), cfg,
                        "lower data.image_size, or stream them from disk (remove data.in_memory)")
        train, val, test = (None if s is None else decode_all(s, f"{name} images") for name, s in splits.items())
    return normalized(Dataset(cfg.name, train, val, test, classes, IMAGENET_MEAN, IMAGENET_STD, hflip, cfg.crop),
                      cfg.normalization)


def listed_from_disk(cfg: DataConfig) -> bool:
    """Whether loading this dataset walks a folder of image files and keeps only their names (an image folder,
    streamed): one rank per node does it, and the node's other ranks receive its result (shared_errors.once_per_node),
    not every rank walking ImageNet's 1.28 M files on a shared file system."""
    return cfg.name == "image_folder" and not cfg.in_memory


def normalized(data: Dataset, normalization: str) -> Dataset:
    """`data` normalised with torchvision's ImageNet constants, or with its training images' own statistics."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalization == "imagenet" else \
        _training_stats(data.train, sampled=data.name in STREAMABLE)
    return dataclasses.replace(data, mean=mean, std=std)


def _fits_in_memory(count: int, cfg: DataConfig, fix: str) -> None:
    """`count` images at data.image_size, the copy that loading makes, fit in the memory available (each rank of the
    node makes its own); else one line ending in `fix`."""
    needed = count * 3 * cfg.image_size**2  # uint8 RGB
    if needed > (available := psutil.virtual_memory().available):
        raise DataError(f"data.image_size={cfg.image_size}: the {count} images of data.name={cfg.name} take "
                        f"{needed / 2**30:.1f} GiB in memory at that size, more than the {available / 2**30:.1f} GiB "
                        f"available: {fix}")


def _at_size(images: ImageSet, size: int) -> bool:
    return images.images.shape[-2:] == (size, size)


def _resized(images: ImageSet, size: int) -> ImageSet:
    """`images` at size×size, resized RESIZE_CHUNK images at a time (a float copy of one chunk, not of them all)."""
    if _at_size(images, size):
        return images
    resized = torch.empty((*images.images.shape[:2], size, size), dtype=torch.uint8)
    for chunk, out in zip(images.images.split(RESIZE_CHUNK), resized.split(RESIZE_CHUNK)):
        scaled = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True)
        out.copy_(scaled.round().clamp(0, 255))
    return ImageSet(resized, images.labels)


def _training_stats(train: Samples, sampled: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training images; when `sampled` (a source that can be streamed, streamed or
    held in memory alike), of a fixed subset of STATS_SAMPLES."""
    if sampled and len(train) > STATS_SAMPLES:
        subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(SUBSET_SEED))[:STATS_SAMPLES]
        train = train.subset(subset.sort().values)
    if isinstance(train, ImageSet):
        return _channel_stats(train.images)
    return _channel_stats(decode_all(train, "normalisation statistics").images)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pixels = images.float().div(255).transpose(0, 1).reshape(3, -1)
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp_min(1e-3).tolist())


def _gray_to_rgb(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[N, H, W] grayscale -> [N, 3, H, W]."""
    return torch.as_tensor(images).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _digits(cfg: DataConfig) -> tuple[ImageSet, ImageSet, list[str], bool]:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped with the package); a fixed 20 % test split."""
    pixels, target = digits_arrays()
    images = _gray_to_rgb(np.clip(pixels * 16, 0, 255).astype(np.uint8))
    labels = torch.as_tensor(target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(12345))
    n_test = len(labels) // 5
    full = ImageSet(images, labels)
    return full.subset(order[n_test:]), full.subset(order[:n_test]), [str(d) for d in range(10)], False


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """load_digits()'s images [1797, 8, 8] (values 0-16) and labels, read from the file scikit-learn ships: importing
    scikit-learn (and SciPy) would add ~1.7 CPU-s to every rank's start-up. load_digits where that file is not found
    through the package's metadata."""
    try:
        listed = importlib.metadata.files("scikit-learn") or ()
    except importlib.metadata.PackageNotFoundError:  # importable without its metadata (e.g. a source tree)
        listed = ()
    shipped = [path for f in listed if f.as_posix() == DIGITS_FILE and (path := Path(f.locate())).is_file()]
    if not shipped:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    table = np.loadtxt(shipped[0], delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


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
    made = [folder for folder in (root, *root.parents) if not folder.exists()]  # deepest first
    try:
        with written_into(root, then="rerun the same command"):  # the download, 340 MB with its archive
            splits = [CIFAR10(str(root), train=train, download=cfg.download) for train in (True, False)]
    except (RuntimeError, OSError) as error:
        for folder in made:  # the folders torchvision made for a download that failed, if it left them empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(error, OutOfSpace):
            raise
        how, online = (("the download failed (offline?)", "rerun online") if cfg.download else
                       ("data.download is false", "run online with data.download=true"))
        raise DataError(
            f"CIFAR-10 not found in {root} and {how}: put cifar-10-batches-py/ (from "
            f"cifar-10-python.tar.gz) in {root}, or {online} ({_first_line(error)})"
        ) from None
    train, test = (
        ImageSet(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(s.targets)) for s in splits
    )
    return train, test, list(splits[0].classes), True


def _npz(cfg: DataConfig) -> tuple[ImageSet, ImageSet, list[str], bool]:
    """Images already decoded: data.root/train.npz and test.npz (or val.npz), each with `images` (uint8
    [N, H, W, 3]), `labels` ([N], 0..C-1) and optionally `classes` (their names, the same in both)."""
    root = Path(cfg.root)
    held_out = held_out_split(root, ".npz", Path.is_file) or root / "test.npz"
    splits, named = [], {}
    for path in (root / "train.npz", held_out):
        if not path.is_file():
            raise DataError(f"data.name=npz: {path} {not_a_file(path)}: save train.npz and test.npz (or val.npz) in "
                            f"{root} with numpy.savez(path, images=..., labels=...)")
        images, labels, named[path.name] = _npz_arrays(path)
        splits.append((path, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels))
    for (path, _, labels), which in zip(splits, ("training", "held-out")):
        if len(labels) == 0:  # a held-out one failed once the teacher had trained (torch.cat of no batches)
            raise DataError(f"{path} holds no images: save the {which} images in it")
    given = [names for names in named.values() if names is not None]
    if len(given) == 2 and given[0] != given[1]:
        raise DataError(f"train.npz and {held_out.name} name the classes differently ({given[0]} and {given[1]}): "
                        "save both with the same classes in the same order, as their labels index them")
    num_classes = len(given[0]) if given else int(max(labels.max(initial=0) for *_, labels in splits)) + 1
    train, test = (ImageSet(images, _class_ids(path, labels, num_classes)) for path, images, labels in splits)
    _every_class_trained(splits[0][0], train.labels, num_classes, named=bool(given))
    return train, test, given[0] if given else [str(c) for c in range(num_classes)], True


def _every_class_trained(path: Path, labels: torch.Tensor, num_classes: int, named: bool) -> None:
    """Each class 0..num_classes-1 has images in the training split `path` (as each training class folder must):
    else a class the models predict but never learn, or, from one stray label, a head of that many classes."""
    present = labels.unique()  # sorted
    if len(present) < num_classes:
        gaps = torch.nonzero(present != torch.arange(len(present)))
        missing = int(gaps[0]) if len(gaps) else len(present)
        counted = "that `classes` names" if named else "that the labels make (0 to the largest, in either split)"
        raise DataError(f"{path} has no images of class {missing}, one of the {num_classes} classes {counted}: give "
                        "every class training images, with labels 0..C-1")


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """One npz file's images, labels and class names (None when it names none), checked."""
    if not zipfile.is_zipfile(path):  # numpy would try it as a pickle, and say that pickles are not allowed
        raise DataError(f"{path} cannot be read as an npz file (not a whole zip archive, as numpy.savez writes: empty, "
                        "cut short or another format): save it with numpy.savez(path, images=..., labels=...)")
    try:
        with np.load(path) as arrays:
            images, labels = arrays.get("images"), arrays.get("labels")
            if images is None or labels is None or images.dtype != np.uint8 or images.ndim != 4 \
                    or images.shape[-1] != 3 or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) \
                    or len(labels) != len(images):
                raise DataError(f"{path} must hold `images` (uint8 [N, H, W, 3]) and `labels` (integers [N]); it holds "
                                f"{', '.join(f'{k} {arrays[k].dtype}{list(arrays[k].shape)}' for k in arrays)}")
            return images, labels, [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # numpy's for an empty or damaged file
        raise DataError(f"{path} cannot be read as an npz file ({type(error).__name__}: {_first_line(error)}): save "
                        "it with numpy.savez(path, images=..., labels=...)") from None


def _image_folder(cfg: DataConfig) -> tuple[Samples, Samples, list[str], bool]:
    """Your own images: data.root/train/<class>/* and data.root/test/<class>/* (or val/<class>/*, as ImageNet
    has), as file lists read by loader workers."""
    root = Path(cfg.root)
    train_split, held_out = split_folders(root, "<class>/ folders")
    classes, train_paths, train_labels = list_image_folder(train_split)
    every_class_has_images(train_split, classes, train_labels)
    same_classes(root, held_out.name, classes, held_out_classes(held_out))
    _, test_paths, test_labels = list_image_folder(held_out, classes)
    if len(test_paths) == 0:  # every training class has images (checked above)
        raise no_images(held_out)
    train, test = (_streamed(cfg, FolderImages(split, paths), labels)
                   for split, paths, labels in ((train_split, train_paths, train_labels),
                                                (held_out, test_paths, test_labels)))
    return train, test, classes, True


def _arrow(cfg: DataConfig) -> tuple[Samples, Samples, list[str], bool]:
    """Hugging Face `datasets` splits saved with save_to_disk in data.root/train and data.root/test (or val): an
    `image` column (encoded images) and a `label` ClassLabel column, memory-mapped and read by loader workers."""
    import datasets

    root = Path(cfg.root)
    splits = split_folders(root, "datasets saved with save_to_disk (python -m dist_tsp.shards writes them)")
    tables = []
    for split in splits:
        try:
            table = datasets.load_from_disk(str(split))
            if isinstance(table, datasets.Dataset):
                table.data.table.validate(full=True)  # offsets past their buffers (damaged bytes) would crash a reader
        except (FileNotFoundError, OSError, ValueError) as error:
            raise DataError(f"{split} cannot be read as a dataset saved with save_to_disk ({_first_line(error)}): "
                            "rewrite it with python -m dist_tsp.shards, or point data.root elsewhere") from None
        if not isinstance(table, datasets.Dataset):
            first = next(iter(table), "train")
            raise DataError(f"{split} holds a DatasetDict (splits {', '.join(table)}), not one split: save one split "
                            f"there, e.g. dataset[{first!r}].save_to_disk('{split}'), and the held-out one in "
                            f"{root}/test or {root}/val")
        if not {"image", "label"} <= set(table.column_names):
            raise DataError(f"{split} has columns {table.column_names}: it needs 'image' and 'label'")
        tables.append(table.cast_column("image", datasets.Image(decode=False)))
    classes = [_class_names(split, table) for split, table in zip(splits, tables)]
    same_classes(root, splits[1].name, classes[0], classes[1])
    # each split's label ids follow its own ClassLabel names: the held-out split's are mapped to train's by name
    relabel = [torch.arange(len(classes[0])), torch.tensor([classes[0].index(name) for name in classes[1]])]
    train, test = (_streamed(cfg, ArrowImages(split, np.arange(len(table)), table),
                             ids[_class_ids(split, table.with_format("numpy")["label"], len(ids))])
                   for split, table, ids in zip(splits, tables, relabel))
    return train, test, classes[0], True


def _class_ids(where: Path, labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """A split's labels, checked to be class ids 0..num_classes-1 (a benchmark's unlabelled test split has -1)."""
    ids = torch.as_tensor(labels, dtype=torch.int64)
    if len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < num_classes:
        raise DataError(f"{where} has labels from {int(ids.min())} to {int(ids.max())}, but its classes are 0.."
                        f"{num_classes - 1}: use a split with labels, or name every class")
    return ids


def split_folders(root: Path, what: str) -> tuple[Path, Path]:
    """root/train and the held-out split, root/test or else root/val."""
    held_out = held_out_split(root, "", Path.is_dir)
    if not (root / "train").is_dir() or held_out is None:
        raise DataError(f"{root} needs train/ and test/ (or val/) folders holding {what}")
    return root / "train", held_out


def held_out_split(root: Path, suffix: str, exists: Callable[[Path], bool]) -> Path | None:
    """root/test<suffix>, or else root/val<suffix> (ImageNet's name), whichever `exists` first; None if neither."""
    return next((path for name in ("test", "val") if exists(path := root / f"{name}{suffix}")), None)


def _class_names(split: Path, table) -> list[str]:
    names = getattr(table.features["label"], "names", None)
    if names is None:
        raise DataError(f"{split}: its label column is not a ClassLabel with class names: cast it with "
                        "datasets.ClassLabel(names=[...])")
    return list(names)


def every_class_has_images(split: Path, classes: list[str], labels: torch.Tensor) -> None:
    """A training class folder without images would be a class the models predict but never learn: named."""
    if not classes:
        raise no_class_folders(split)
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    if empty := [name for name, count in zip(classes, counts) if count == 0]:
        raise DataError(f"class folder {split / empty[0]} has no images ({' '.join(EXTENSIONS)}): add its images, "
                        "or remove the folder")


def held_out_classes(split: Path) -> list[str]:
    """The held-out image folder's class folders (named as train/'s, checked by same_classes)."""
    if not (classes := class_folders(split)):
        raise no_class_folders(split)
    return classes


def no_images(split: Path) -> DataError:
    """An image folder's held-out split without images, and the fix."""
    return DataError(f"image folder {split} has no images ({' '.join(EXTENSIONS)}): put each image in its class folder")


def no_class_folders(split: Path) -> DataError:
    """What a split folder without class folders holds instead, and the fix."""
    if (split / "state.json").is_file():
        return DataError(f"{split} holds a split saved with save_to_disk (Arrow shards), not class folders: train "
                         "with data.name=arrow")
    if loose := sum(1 for p in split.iterdir() if p.suffix.lower() in EXTENSIONS):
        return DataError(f"image folder {split} holds {loose} images but no class folders: sort them into class "
                         "folders named as train/'s (ImageNet's flat val/: README, 'Preparing ImageNet')")
    return DataError(f"image folder {split} has no class folders: put each image in its class folder")


def same_classes(root: Path, held_out: str, train: list[str], other: list[str]) -> None:
    """A class present in one split only is a layout error, named."""
    if extra := sorted(set(other) - set(train)) or sorted(set(train) - set(other)):
        where = f"{held_out}/ but not train/" if extra[0] in other else f"train/ but not {held_out}/"
        raise DataError(f"{root}: class {extra[0]!r} is in {where}: both splits need the same classes")


def _streamed(cfg: DataConfig, images: FolderImages | ArrowImages, labels: torch.Tensor) -> StreamedImages:
    if streaming.TORCHCODEC_MISSING is not None:
        release = torch.__version__.split("+")[0]
        raise DataError(f"data.name={cfg.name} decodes images with TorchCodec, which {streaming.TORCHCODEC_MISSING}: "
                        f"install the torchcodec release made for torch {release} and the FFmpeg libraries it loads "
                        "(or give the images decoded: data.name=npz)")
    return StreamedImages(images, labels, cfg.image_size, cfg.crop, cfg.loader_workers, cfg.loader_timeout_s)


def decode_all(files: StreamedImages, what: str) -> ImageSet:
    """Every image of `files` decoded (its evaluation view) into memory by the loader workers, into one tensor (not
    a list of chunks and their concatenation, twice the memory)."""
    chunks = torch.arange(len(files)).split(256)
    loader = files.loader(None, torch.device("cpu"))
    images = torch.empty((len(files), 3, files.image_size, files.image_size), dtype=torch.uint8)
    for chunk, decoded in zip(chunks, progress(loader(chunks, None), len(chunks), f"decoding {what}"), strict=True):
        images[chunk] = decoded
    return ImageSet(images, files.labels)


def progress(batches: Iterable[T], total: int, what: str) -> Iterable[T]:
    """`batches` with a transient progress bar saying `what`: on the main process only (global rank 0), and only
    for a reading of BAR_FROM_BATCHES batches or more."""
    hidden = total < BAR_FROM_BATCHES or (dist.is_initialized() and dist.get_rank() != 0)
    return tqdm(batches, total=total, desc=what, leave=False, disable=hidden)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


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


def check_fills_a_batch(images: int, batch_size: int, num_replicas: int, batch_size_setting: str) -> None:
    """Each replica's share of the training images must fill one batch (the batch stream drops the last partial
    one)."""
    if images // num_replicas < batch_size:
        replicas = f"{num_replicas} replica{'s' * (num_replicas > 1)}"
        raise DataError(f"{images} training images over {replicas} do not fill one batch of {batch_size}: "
                        f"lower {batch_size_setting}")


class PeerBatches:
    """One replica's batches: identical on every rank of a peer group, disjoint across replicas.

    The sample order depends only on (seed, epoch, replica), never on the rank; each sample's view comes from
    `augmentation`, made on the device (in memory) or in loader workers (streamed).
    """

    def __init__(self, data: Samples, *, batch_size: int, num_replicas: int, replica: int, seed: int,
                 augmentation: Augmentation, normalize: Normalizer, batch_size_setting: str = "data.batch_size"
                 ) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.num_replicas, self.replica = num_replicas, replica
        self.augmentation, self.normalize = augmentation, normalize
        check_fills_a_batch(len(data), batch_size, num_replicas, batch_size_setting)
        self.views = data.loader(augmentation, data.labels.device, persistent=True)

    def __len__(self) -> int:
        return len(self.data) // self.num_replicas // self.batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This replica's sample indices for every step of the epoch [steps, B] (on the CPU)."""
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(mixed_seed(self.seed, epoch)))
        steps, b = len(self), self.batch_size
        return order[self.replica :: self.num_replicas][: steps * b].view(steps, b)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield the batches of the epoch from `start_step`."""
        order = self.epoch_order(epoch)[start_step:]
        labels = self.data.labels[order.to(self.data.labels.device)]
        for step, images in enumerate(self.views(order, epoch)):
            yield Batch(self.normalize(images), labels[step], order[step])


def images_of(data: Samples, indices: list[int]) -> torch.Tensor:
    """The evaluation views of a few samples [len(indices), 3, S, S] uint8, on the CPU (only those are read)."""
    if not indices:
        return torch.empty(0, 3, data.image_size, data.image_size, dtype=torch.uint8)
    return next(data.loader(None, data.labels.device)([torch.tensor(indices)], None)).cpu()


def eval_batches(data: Samples, batch_size: int, normalize: Normalizer, indices: torch.Tensor | None = None,
                 group: dist.ProcessGroup | None = None, what: str | None = None) -> Iterator[Batch]:
    """The samples `indices` (default: the whole set) in order, unaugmented, `batch_size` at a time, on every rank
    of `group`, with a progress bar saying `what` (see progress) when given. A streamed set is read once over the
    group: each rank decodes 1/G of every batch, and one all-gather (of uint8 images) completes it."""
    indices = torch.arange(len(data)) if indices is None else indices
    chunks = indices.split(batch_size) if len(indices) else ()
    device = data.labels.device
    size = group_size(group) if isinstance(data, StreamedImages) else 1
    if size == 1:
        views = data.loader(None, device)(chunks, None)
    else:
        rank = dist.get_rank(group)
        views = (all_gather_cat(mine, group) for mine in data.loader(None, device)(
            [_share(chunk, rank, size) for chunk in chunks], None))
    read = zip(chunks, views)
    for chunk, images in read if what is None else progress(read, len(chunks), what):
        yield Batch(normalize(images[: len(chunk)]), data.labels[chunk.to(device)], chunk)


def _share(chunk: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous 1/`size` of `chunk`, padded with its last index: the ranks' shares, concatenated
    in rank order, are `chunk` followed by the padding."""
    share = -(-len(chunk) // size)
    mine = chunk[rank * share : (rank + 1) * share]
    return torch.cat([mine, chunk[-1:].expand(share - len(mine))])
