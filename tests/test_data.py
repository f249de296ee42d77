import contextlib
import errno
import gzip
import hashlib
import importlib.metadata
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from dist_tsp import shards
from dist_tsp.augmentation import Augmentation
from dist_tsp.config import DataConfig
from dist_tsp.data import (
    BAR_FROM_BATCHES,
    DataError,
    PeerBatches,
    digits_arrays,
    held_out_classes,
    images_of,
    load_dataset,
    progress,
)
from dist_tsp.errors import OutOfSpace
from dist_tsp.evaluation import predict
from dist_tsp.placement import Placement
from dist_tsp.streaming import ImageError, list_image_folder
from tests.multiprocess import run_on_ranks
from tests.runs import ROOT


def digits_batches(replica: int, replicas: int, augment: bool = True, seed: int = 0) -> PeerBatches:
    data = load_dataset(DataConfig(name="digits"), seed=0)
    augmentation = Augmentation(enabled=augment, hflip=True, pad=4, seed=seed)
    return PeerBatches(data.train, batch_size=32, num_replicas=replicas, replica=replica, seed=seed,
                       augmentation=augmentation, normalize=data.normalize)


def _batch_fingerprints(num_students: int):
    placement = Placement(world_size=dist.get_world_size(), rank=dist.get_rank(), num_students=num_students)
    batches = digits_batches(placement.replica_index, placement.replicas)
    hashes, indices = [], []
    for epoch in (0, 1):
        for step, (images, labels, _) in enumerate(batches.epoch(epoch)):
            if step == 3:
                break
            hashes.append(hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest())
        indices.append(batches.epoch_order(epoch).flatten().tolist())
    return {"replica": placement.replica_index, "hashes": hashes, "indices": indices}


def test_peer_group_sees_bit_identical_batches_and_replicas_disjoint_shards():
    results = run_on_ranks(_batch_fingerprints, 4, 2)  # W=4, N=2: peer groups {0,1} and {2,3}
    assert [r["replica"] for r in results] == [0, 0, 1, 1]
    assert results[0]["hashes"] == results[1]["hashes"] and results[2]["hashes"] == results[3]["hashes"]
    assert not set(results[0]["hashes"]) & set(results[2]["hashes"])
    for epoch in (0, 1):
        first, second = set(results[0]["indices"][epoch]), set(results[2]["indices"][epoch])
        assert not first & second
    assert results[0]["indices"][0] != results[0]["indices"][1]  # reshuffled every epoch


def test_batches_depend_only_on_seed_epoch_step_and_replica():
    a, b = digits_batches(1, 2), digits_batches(1, 2)
    first = [torch.cat([x.flatten(), y.float()]) for x, y, _ in a.epoch(2)]
    again = [torch.cat([x.flatten(), y.float()]) for x, y, _ in b.epoch(2)]
    resumed = [torch.cat([x.flatten(), y.float()]) for x, y, _ in b.epoch(2, start_step=3)]
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert all(torch.equal(p, q) for p, q in zip(first[3:], resumed))
    other_seed = next(iter(digits_batches(1, 2, seed=1).epoch(2)))[0]
    assert not torch.equal(other_seed, next(iter(a.epoch(2)))[0])


def test_augmentation_crops_and_flips_on_the_fly():
    plain, augmented = digits_batches(0, 1, augment=False), digits_batches(0, 1)
    _, y_plain, i_plain = next(iter(plain.epoch(0)))
    x_aug, y_aug, i_aug = next(iter(augmented.epoch(0)))
    assert torch.equal(y_plain, y_aug) and torch.equal(i_plain, i_aug)
    offsets, flips = augmented.augmentation.epoch_views(0, len(augmented.data), torch.device("cpu"))
    p = augmented.augmentation.pad
    assert offsets.shape == (len(augmented.data), 2)
    assert offsets.min() == 0 and offsets.max() == 2 * p  # every crop, the two extremes included
    assert 0.3 < flips.float().mean() < 0.7
    assert flips[i_aug].any() and not flips[i_aug].all()
    for image, sample in zip(x_aug, i_aug.tolist()):
        oy, ox = offsets[sample].tolist()
        raw = torch.nn.functional.pad(augmented.data.images[sample], (p, p, p, p))[:, oy : oy + 32, ox : ox + 32]
        assert torch.equal(image, augmented.normalize((raw.flip(-1) if flips[sample] else raw)[None])[0])


def test_a_samples_view_depends_on_seed_and_epoch_not_on_the_replica():
    one, two = digits_batches(0, 1), digits_batches(1, 2)
    images, _, indices = next(iter(two.epoch(3)))
    augmentation, n, cpu = one.augmentation, len(one.data), torch.device("cpu")
    for epoch, same in ((3, True), (4, False)):
        view = augmentation.view(one.data.images, indices, augmentation.epoch_views(epoch, n, cpu))
        assert torch.equal(images, one.normalize(view)) is same


def test_a_random_resized_view_draws_from_its_own_seed_and_leaves_every_global_generator_as_it_was(monkeypatch):
    """Loader-less on a GPU, the views are made in the training process: reseeding CUDA's generator there would
    reset the teacher's dropout stream at every sample."""
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("CUDA's generator was reseeded"))
    augmentation = Augmentation(enabled=True, hflip=True, pad=4, seed=0, crop="random_resized")
    image = torch.arange(3 * 40 * 50, dtype=torch.float32).reshape(3, 40, 50)
    state = torch.get_rng_state()
    views = [augmentation.random_resized(image, 32, epoch=0, index=i) for i in (0, 1, 0)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(views[0], views[2]) and not torch.equal(views[0], views[1])


def _bars_hidden() -> list[bool]:
    hidden = []
    for batches in (BAR_FROM_BATCHES - 1, BAR_FROM_BATCHES):
        with progress(range(batches), batches, "reading") as bar:
            hidden.append(bar.disable)
    return hidden


def test_a_reading_shows_its_progress_bar_on_rank_0_alone_and_only_from_bar_from_batches_batches():
    assert _bars_hidden() == [True, False]  # one process, no process group: the main one
    assert run_on_ranks(_bars_hidden, 3) == [[True, False], [True, True], [True, True]]


def _downloads(log: Path) -> str:
    """A download (the work that logs its start and end) through main_process_first, then one that node 1 finds
    impossible (its own data.root); the line said."""
    from accelerate import Accelerator

    from dist_tsp.errors import SharedUserError
    from dist_tsp.shared_errors import main_process_first

    rank = dist.get_rank()
    accelerator = Accelerator(cpu=True)

    def download() -> int:
        for moment in ("start", "end"):
            with log.open("a") as lines:
                lines.write(f"{moment} {rank}\n")
            time.sleep(0.2)
        return rank

    assert main_process_first(accelerator, download) == rank

    def node_1_offline() -> None:
        if os.environ["GROUP_RANK"] == "1":
            raise DataError("CIFAR-10 not found in data/cifar10 and the download failed (offline?)")

    try:
        main_process_first(accelerator, node_1_offline)
    except SharedUserError as error:
        return str(error)
    return "nothing said"


def test_a_download_runs_on_rank_0_then_on_each_other_nodes_first_rank_then_on_the_other_ranks(tmp_path):
    """Ranks 0, 1 on node 0 and 2, 3 on node 1, each node with its own data.root: before, ranks 1, 2 and 3 downloaded
    at once after rank 0, two of them into node 1's folder, and bad input there raised on its ranks alone."""
    said = run_on_ranks(_downloads, 4, tmp_path / "log", nodes=[0, 0, 1, 1])
    lines = (tmp_path / "log").read_text().split("\n")
    assert lines[:4] == ["start 0", "end 0", "start 2", "end 2"], lines
    assert sorted(lines[4:]) == ["", "end 1", "end 3", "start 1", "start 3"], lines
    assert said == ["rank 2: CIFAR-10 not found in data/cifar10 and the download failed (offline?)"] * 4


def test_too_few_images_for_one_batch_is_a_clear_error():
    data = load_dataset(DataConfig(name="digits"), seed=0)
    with pytest.raises(DataError, match=r"do not fill one batch of 4096: lower data.batch_size"):
        PeerBatches(data.train, batch_size=4096, num_replicas=1, replica=0, seed=0,
                    augmentation=data.augmentation(0, enabled=False), normalize=data.normalize)


def test_digits_is_the_embedded_default_resized_to_rgb_32():
    data = load_dataset(DataConfig(), seed=0)
    assert data.train.images.shape[1:] == (3, 32, 32) and data.train.images.dtype == torch.uint8
    assert len(data.train) + len(data.test) == 1797 and data.num_classes == 10 and data.val is None


def test_digits_are_read_from_scikit_learns_file_without_importing_it_and_equal_load_digits():
    """A rank's start-up does not pay for importing scikit-learn and SciPy; the arrays are load_digits()'s."""
    check = ("import sys, numpy as np; from dist_tsp.data import digits_arrays; images, labels = digits_arrays(); "
             "assert 'sklearn' not in sys.modules and 'scipy' not in sys.modules, 'imported'; "
             "from sklearn.datasets import load_digits; digits = load_digits(); "
             "assert np.array_equal(images, digits.images) and np.array_equal(labels, digits.target), 'differ'")
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


class ListedButGone(PurePosixPath):
    """A file scikit-learn's metadata lists but that is not on disk (a stale RECORD)."""

    def locate(self) -> Path:
        return Path("/nonexistent") / self


def no_metadata(name):
    raise importlib.metadata.PackageNotFoundError(name)


@pytest.mark.parametrize("files", [lambda name: None, no_metadata,
                                   lambda name: [ListedButGone("sklearn/datasets/data/digits.csv.gz")]],
                         ids=["not listed (no RECORD)", "no metadata (a source tree)", "listed but not on disk"])
def test_digits_fall_back_to_load_digits_where_the_file_is_not_found(monkeypatch, files):
    from sklearn.datasets import load_digits

    monkeypatch.setattr(importlib.metadata, "files", files)
    images, labels = digits_arrays()
    assert np.array_equal(images, load_digits().images) and np.array_equal(labels, load_digits().target)


def test_val_fraction_splits_train_80_20_with_the_seed():
    full = load_dataset(DataConfig(), seed=0)
    split = load_dataset(DataConfig(val_fraction=0.2), seed=0)
    assert len(split.val) == round(0.2 * len(full.train)) and len(split.train) + len(split.val) == len(full.train)
    assert torch.equal(split.test.labels, full.test.labels)
    other = load_dataset(DataConfig(val_fraction=0.2), seed=1)
    assert not torch.equal(split.val.labels, other.val.labels)
    with pytest.raises(DataError, match=r"data.val_fraction=0.0001 of 1438 training images holds none out: raise it"):
        load_dataset(DataConfig(val_fraction=0.0001), seed=0)
    with pytest.raises(DataError, match=r"data.val_fraction=0.9999 of 1438 training images holds every one out: "
                                        r"lower it$"):
        load_dataset(DataConfig(val_fraction=0.9999), seed=0)


def test_replicas_past_the_end_of_a_small_evaluation_set_predict_nothing_and_the_others_every_image():
    data = load_dataset(DataConfig(), seed=0)
    two = data.test.subset(torch.arange(2))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    shards = [predict([model], two, shard=shard, num_shards=4, batch_size=8, normalize=data.normalize,
                      autocast=contextlib.nullcontext)[0] for shard in range(4)]
    assert [(s >= 0).tolist() for s in shards] == [[True, False], [False, True], [False, False], [False, False]]


def test_max_train_samples_keeps_the_same_subset_for_every_seed_and_the_whole_test_set():
    full = load_dataset(DataConfig(), seed=0)
    small, other_seed = (load_dataset(DataConfig(max_train_samples=300), seed=s) for s in (0, 1))
    assert len(small.train) == 300 and torch.equal(small.train.images, other_seed.train.images)
    assert torch.equal(small.test.labels, full.test.labels)
    assert len(load_dataset(DataConfig(max_train_samples=300, val_fraction=0.2), seed=0).train) == 240


def write_idx(path, array: np.ndarray) -> None:
    magic = {3: 0x0803, 1: 0x0801}[array.ndim]
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_with_torchvision(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 6)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_dataset(DataConfig(name="fashion_mnist", root=tmp_path), seed=0)
    assert data.train.images.shape == (12, 3, 32, 32) and len(data.test) == 6
    assert data.classes[0] == "T-shirt/top" and data.train.labels.tolist() == [i % 10 for i in range(12)]


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(name="fashion_mnist", root=tmp_path), seed=0)


def test_cifar10_loads_python_batches_from_root(tmp_path, monkeypatch):
    import pickle

    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a: True)  # ours can't match the md5s
    data = load_dataset(DataConfig(name="cifar10", root=tmp_path, download=False), seed=0)
    assert data.train.images.shape == (20, 3, 32, 32) and len(data.test) == 4 and data.classes[3] == "c3"


def test_cifar10_absent_offline_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR-10 not found in .* put cifar-10-batches-py/"):
        load_dataset(DataConfig(name="cifar10", root=tmp_path, download=False), seed=0)


@pytest.mark.parametrize("failure", ["offline", "no room"])
def test_a_cifar10_download_that_fails_says_why_and_leaves_no_empty_folders_behind(tmp_path, monkeypatch, failure):
    """torchvision makes data.root before it downloads: offline, an empty data/cifar10/ was left in the working
    directory. A disk that fills up as the archive is written is not called offline (before, it was)."""
    import urllib.error

    from torchvision.datasets import cifar

    def failing(url, download_root, **_):
        Path(download_root).mkdir(parents=True, exist_ok=True)
        raise {"offline": urllib.error.URLError("no network"),
               "no room": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))}[failure]

    monkeypatch.setattr(cifar, "download_and_extract_archive", failing)
    root = tmp_path / "data" / "cifar10"
    error, said = {"offline": (DataError, r"CIFAR-10 not found in .* and the download failed \(offline\?\)"),
                   "no room": (OutOfSpace, r"^no room left on the file system at /\S* \(No space left on device\): "
                                           r"free space there \(or raise this user's quota\), then rerun the same "
                                           r"command$")}[failure]
    with pytest.raises(error, match=said):
        load_dataset(DataConfig(name="cifar10", root=root), seed=0)
    assert list(tmp_path.iterdir()) == []


def test_normalisation_statistics_are_each_channels_mean_and_std_over_the_training_images_alone(tmp_path):
    """Written out with numpy: per channel, over every training pixel (the sample std), in [0, 1]; the test images
    (all white here) count for nothing; the images normalised with them."""
    train = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), np.uint8)
    train[..., 0] //= 4  # three channels with three different statistics
    train[..., 2] = train[..., 2] // 2 + 128
    np.savez(tmp_path / "train.npz", images=train, labels=np.arange(20) % 2)
    np.savez(tmp_path / "test.npz", images=np.full((4, 8, 8, 3), 255, np.uint8), labels=np.arange(4) % 2)
    data = load_dataset(DataConfig(name="npz", root=tmp_path, image_size=8), seed=0)
    pixels = train.reshape(-1, 3) / 255
    assert data.mean == pytest.approx(tuple(pixels.mean(0)), rel=1e-5)
    assert data.std == pytest.approx(tuple(pixels.std(0, ddof=1)), rel=1e-5)
    normalized = (train / 255 - pixels.mean(0)) / pixels.std(0, ddof=1)  # what the models see
    torch.testing.assert_close(data.normalize(torch.from_numpy(train).permute(0, 3, 1, 2)),
                               torch.from_numpy(normalized).permute(0, 3, 1, 2).float(), rtol=1e-5, atol=1e-5)


def test_npz_arrays_load_as_images_labels_and_class_names_and_bad_arrays_are_named(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 2]), classes=["a", "b", "c"])
    np.savez(tmp_path / "val.npz", images=images[:2], labels=np.array([2, 1]))
    data = load_dataset(DataConfig(name="npz", root=tmp_path, image_size=40), seed=0)
    assert data.classes == ["a", "b", "c"] and data.test.labels.tolist() == [2, 1]
    assert torch.equal(data.train.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    bad = {"images float32[2, 40, 40, 3], labels int64[2]": (images[:2].astype(np.float32), np.array([2, 1])),
           "images uint8[2, 40, 40, 3], labels int64[2, 1]": (images[:2], np.array([[2], [1]])),
           "images uint8[2, 40, 40, 3], labels float64[2]": (images[:2], np.array([2.0, 1.0]))}
    for held, (bad_images, bad_labels) in bad.items():
        np.savez(tmp_path / "val.npz", images=bad_images, labels=bad_labels)
        with pytest.raises(DataError, match=r"val.npz must hold `images` \(uint8 \[N, H, W, 3\]\) and `labels` "
                                            rf"\(integers \[N\]\); it holds {re.escape(held)}$"):
            load_dataset(DataConfig(name="npz", root=tmp_path), seed=0)
    (tmp_path / "val.npz").unlink()
    with pytest.raises(DataError, match=r"test.npz does not exist: save train.npz and test.npz"):
        load_dataset(DataConfig(name="npz", root=tmp_path), seed=0)


NOT_A_ZIP = (r"train.npz cannot be read as an npz file \(not a whole zip archive, as numpy.savez writes: empty, cut "
             r"short or another format\): save it with numpy.savez")
NO_CLASS = r"train.npz has no images of class {}, one of the {} classes that {}: give every class training images"
LABELS_MAKE = r"the labels make \(0 to the largest, in either split\)"


@pytest.mark.parametrize("problem, message", [
    ("empty", NOT_A_ZIP),
    ("garbage", NOT_A_ZIP),  # before: numpy's "This file contains pickled (object) data" (pickles are not allowed)
    ("cut short", NOT_A_ZIP),
    ("objects", r"train.npz cannot be read as an npz file \(ValueError: Object arrays cannot be loaded"),
    ("no images", r"train.npz holds no images: save the training images in it$"),
    # before: a crash once the teacher had trained (its test predictions, torch.cat of no batches)
    ("no test images", r"test.npz holds no images: save the held-out images in it$"),
    ("other class names", r"train.npz and test.npz name the classes differently \(\['a', 'b'\] and \['b', 'a'\]\): "
                          r"save both with the same classes in the same order"),
    # before: accepted, classes the models predict but never learn; a stray label, a head of that many classes
    ("a named class without training images", NO_CLASS.format(1, 2, "`classes` names")),
    ("a test label past the training ones", NO_CLASS.format(2, 3, LABELS_MAKE)),
    ("a stray label", NO_CLASS.format(1, 1000000001, LABELS_MAKE)),
    ("one class", r"data.name=npz in .* has a single class, '0': a classifier needs two or more"),
])
def test_an_npz_file_damaged_empty_naming_other_classes_or_without_a_class_is_one_line(tmp_path, problem, message):
    """Before: numpy's tracebacks, NaN statistics for no images, and one split's class names used for both."""
    images = np.zeros((2, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "test.npz", images=images, labels=np.array([0, 1]), classes=["b", "a"])
    train = tmp_path / "train.npz"
    if problem == "empty":
        train.write_bytes(b"")
    elif problem == "garbage":
        train.write_bytes(b"not an npz file\n" * 10)
    elif problem == "cut short":
        np.savez(train, images=images, labels=np.array([0, 1]))
        train.write_bytes(train.read_bytes()[:-100])
    elif problem == "objects":
        np.savez(train, images=np.array([images[0], None], dtype=object), labels=np.array([0, 1]))
    elif problem == "no images":
        np.savez(train, images=images[:0], labels=np.array([], np.int64))
    elif problem == "no test images":
        np.savez(train, images=images, labels=np.array([0, 1]))
        np.savez(tmp_path / "test.npz", images=images[:0], labels=np.array([], np.int64))
    elif problem == "a named class without training images":
        np.savez(train, images=images, labels=np.array([0, 0]), classes=["b", "a"])
    elif problem in ("a test label past the training ones", "a stray label", "one class"):
        labels = {"a test label past the training ones": [0, 1], "a stray label": [0, 10**9], "one class": [0, 0]}
        np.savez(train, images=images, labels=np.array(labels[problem]))
        np.savez(tmp_path / "test.npz", images=images, labels=np.array([0, 2 if "test" in problem else 0]))
    else:
        np.savez(train, images=images, labels=np.array([0, 1]), classes=["a", "b"])
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(name="npz", root=tmp_path), seed=0)


def test_a_training_class_folder_without_images_is_one_line_naming_it(tmp_path):
    """Before: accepted, a class the models predicted but never learned (or, with no test/ folder for it, named as
    a class missing from test/)."""
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "0.png")
    (tmp_path / "train" / "emu").mkdir()
    with pytest.raises(DataError, match=rf"class folder {tmp_path / 'train' / 'emu'} has no images \(.*\): add its "
                                        r"images, or remove the folder$"):
        load_dataset(DataConfig(name="image_folder", root=tmp_path), seed=0)


def test_a_symbolic_link_to_no_image_is_one_line_naming_it_and_a_link_to_an_image_is_read(tmp_path):
    """Before, an image whose link was broken (a moved dataset) was left out of the dataset without a word."""
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "0.png")
    (tmp_path / "train" / "cat" / "1.png").symlink_to(tmp_path / "train" / "dog" / "0.png")
    assert len(load_dataset(DataConfig(name="image_folder", root=tmp_path), seed=0).train) == 3
    (tmp_path / "train" / "dog" / "2.png").symlink_to(tmp_path / "moved" / "2.png")
    (tmp_path / "train" / "dog" / "notes.txt").symlink_to(tmp_path / "moved" / "notes.txt")  # no image: not listed
    with pytest.raises(ImageError, match=rf"^image {tmp_path / 'train' / 'dog' / '2.png'} is a symbolic link to no "
                                         rf"file \(1 such in {tmp_path / 'train' / 'dog'}\): fix or remove it$"):
        load_dataset(DataConfig(name="image_folder", root=tmp_path), seed=0)


def test_a_folder_lists_nested_images_and_links_to_images_enters_no_linked_folder_and_names_one_it_cannot_read(
        tmp_path, monkeypatch):
    """The listing reads the folders' entries, without looking up each file (1.28 M for ImageNet): it lists what
    pathlib's rglob listed, and a folder it cannot read, which rglob passed over, is one line."""
    split, elsewhere = tmp_path / "train", tmp_path / "elsewhere"
    for folder in (split / "cat" / "sub", split / "dog", elsewhere):
        folder.mkdir(parents=True)
    for image in ("cat/0.png", "cat/sub/1.png", "dog/.2.png", "../elsewhere/3.png"):
        (split / image).touch()
    (split / "dog" / "4.png").symlink_to(elsewhere / "3.png")
    (split / "dog" / "linked").symlink_to(elsewhere)
    (split / "dog" / "sub").symlink_to(split / "cat" / "sub")
    classes, paths, labels = list_image_folder(split)
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 0, 1, 1]
    assert paths.tolist() == [b"cat/0.png", b"cat/sub/1.png", b"dog/.2.png", b"dog/4.png"]
    scandir, unreadable = os.scandir, split / "cat" / "sub"

    def scandir_but_the_unreadable(path):
        if Path(path) == unreadable:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_but_the_unreadable)
    one_line = rf"^folder {unreadable} cannot be read \(Permission denied\): give this user read access to it$"
    with pytest.raises(ImageError, match=one_line):
        list_image_folder(split)
    unreadable = split  # the split itself: before, PermissionError's traceback
    for list_classes in (list_image_folder, held_out_classes):
        with pytest.raises(ImageError, match=rf"^folder {split} cannot be read \(Permission denied\): give this user"):
            list_classes(split)


def test_image_folder_loads_and_resizes_class_folders_into_memory_where_they_fit(tmp_path):
    for split in ("train", "test"):
        for cls, color in (("cat", 10), ("dog", 200)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 50), (color, i, 0)).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset(DataConfig(name="image_folder", root=tmp_path, in_memory=True), seed=0)
    assert data.classes == ["cat", "dog"] and data.train.images.shape == (6, 3, 32, 32)
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError, match=r"^data.image_size=1048576: the 12 images of data.name=image_folder take "
                                        r"[\d.]+ GiB in memory at that size, more than the [\d.]+ GiB available: lower "
                                        r"data.image_size, or stream them from disk \(remove data.in_memory\)$"):
        load_dataset(DataConfig(name="image_folder", root=tmp_path, in_memory=True, image_size=1 << 20), seed=0)


def test_file_names_that_are_not_utf8_are_read_from_the_folder_and_from_its_shards(tmp_path):
    """A Latin-1 name (café.png), as older archives and Windows shares hold them: before, a UnicodeEncodeError
    traceback at every rank's start-up, in check_data and in the conversion to shards."""
    for split in ("train", "test"):
        for cls, red in (("cat", 10), ("dog", 200)):
            folder = os.fsencode(tmp_path / "folder" / split / cls)
            os.makedirs(folder)
            for green, name in enumerate((b"caf\xe9.png", b"plain.png")):
                Image.new("RGB", (8, 8), (red, green, 0)).save(os.fsdecode(folder + b"/" + name))
    shards.main([str(tmp_path / "folder"), str(tmp_path / "arrow")])
    for name, root in (("image_folder", tmp_path / "folder"), ("arrow", tmp_path / "arrow")):
        data = load_dataset(DataConfig(name=name, root=root, batch_size=2), seed=0)
        assert images_of(data.train, [0, 1, 2, 3])[:, :2, 0, 0].tolist() == [[10, 0], [10, 1], [200, 0], [200, 1]]


def test_image_folder_without_test_split_is_reported(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"needs train/ and test/ \(or val/\) folders holding <class>/ folders"):
        load_dataset(DataConfig(name="image_folder", root=tmp_path), seed=0)



def test_an_in_memory_dataset_is_resized_in_chunks_to_the_pixels_of_one_resize_and_refused_where_it_cannot_fit(
        tmp_path, monkeypatch):
    """Before, the whole set was resized at once through a float copy of it (4 bytes a pixel, on top of the result),
    and a size whose images cannot fit in memory ended in torch's allocation traceback."""
    from dist_tsp import data

    images = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", images=images, labels=np.arange(30) % 3)
    whole = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(20, 20),
                                            mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
    monkeypatch.setattr(data, "RESIZE_CHUNK", 7)
    assert torch.equal(load_dataset(DataConfig(name="npz", root=tmp_path, image_size=20), seed=0).train.images, whole)
    with pytest.raises(DataError, match=r"^data.image_size=1048576: the 60 images of data.name=npz take [\d.]+ GiB in "
                                        r"memory at that size, more than the [\d.]+ GiB available: lower "
                                        r"data.image_size"):
        load_dataset(DataConfig(name="npz", root=tmp_path, image_size=1 << 20), seed=0)
