"""Image folders and Arrow shards streamed from disk by DataLoader workers keep every invariant of the in-memory batch
stream: the same views as the folder decoded into memory, views that depend on (seed, epoch, sample) alone whatever
the number of workers, identical batches in a peer group and disjoint shards across replicas on gloo ranks (each
sample once an epoch, with its own label and the view one process gives it, streamed or in memory), exact
mid-epoch resume, the same training on 3 ranks, and one clear line for a bad image, folder or shard."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from dist_tsp import streaming
from dist_tsp.config import DataConfig, load_config
from dist_tsp.data import BAR_FROM_BATCHES, DataError, Dataset, PeerBatches, eval_batches, images_of, load_dataset
from dist_tsp.errors import SharedUserError
from dist_tsp.logit_cache import cache_key
from dist_tsp.placement import Placement
from dist_tsp.shards import main
from dist_tsp.streaming import ArrowImages, ImageError, StreamedImages
from tests.multiprocess import run_on_ranks
from tests.runs import ENV, ROOT, TINY, TRAIN, launch, no_room, said_lines, snapshot, start, train_rows, wandb_runs

CLASSES = ("ant", "bee", "cat", "dog")


def write_folder(root: Path, per_class: int = 24, held_out: str = "test", size: tuple[int, int] = (30, 24)) -> Path:
    """JPEGs of noise over a class colour (one grayscale, and a PNG, a BMP and a TIFF among them), in
    root/{train,held_out}/<class>/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), (held_out, per_class // 4)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (size[1], size[0], 3)) + np.array([40 * label, 30, 200 - 40 * label])
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                if i == 1:
                    image = image.convert("L")
                image.save(folder / f"{i:03d}.{ {2: 'png', 3: 'bmp', 4: 'tif'}.get(i, 'jpg')}", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    """The folder converted to Arrow shards, as python -m dist_tsp.shards does (its images verified first)."""
    out = tmp_path_factory.mktemp("arrow")
    main([str(folder), str(out), "--max-shard-size", "20KB", "--verify", "--workers", "2"])  # several shards a split
    return out


def folder_data(root: Path, name: str = "image_folder", **options) -> Dataset:
    return load_dataset(DataConfig(name=name, root=root, **{"loader_workers": 2, **options}), seed=0)


def batches(data: Dataset, replica: int = 0, replicas: int = 1, seed: int = 0) -> PeerBatches:
    return PeerBatches(data.train, batch_size=8, num_replicas=replicas, replica=replica, seed=seed,
                       augmentation=data.augmentation(seed, enabled=True), normalize=data.normalize)


def as_tensors(stream) -> list[torch.Tensor]:
    return [torch.cat([b.images.flatten(), b.labels.float(), b.indices.float()]) for b in stream]


def test_a_streamed_folder_gives_the_batches_and_statistics_of_the_folder_in_memory(folder, monkeypatch):
    monkeypatch.setattr("dist_tsp.data.STATS_SAMPLES", 40)  # the statistics of the same subset, held in memory or not
    streamed, in_memory = folder_data(folder), folder_data(folder, in_memory=True)
    assert isinstance(streamed.train, StreamedImages) and in_memory.train.images.shape == (96, 3, 32, 32)
    assert streamed.mean == in_memory.mean and streamed.std == in_memory.std
    for epoch in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(as_tensors(batches(streamed).epoch(epoch)),
                                                      as_tensors(batches(in_memory).epoch(epoch)), strict=True))
    evaluated = [as_tensors(eval_batches(d.test, 10, d.normalize)) for d in (streamed, in_memory)]
    assert all(torch.equal(a, b) for a, b in zip(*evaluated, strict=True))
    assert torch.equal(images_of(streamed.test, [3, 0]), in_memory.test.images[[3, 0]])


def test_a_folder_held_in_memory_decodes_only_its_max_train_samples_subset_split_as_the_streamed_one(folder, tmp_path):
    """Before, the whole folder was decoded first (all of ImageNet for a 10,000-image subset)."""
    root = shutil.copytree(folder, tmp_path / "folder")
    options = {"max_train_samples": 30, "val_fraction": 0.2}
    streamed = folder_data(root, **options)
    read = {path for split in (streamed.train, streamed.val) for path in split.images.paths.tolist()}
    unread = next(path for path in sorted((root / "train").rglob("*.jpg")) if os.fsencode(
        path.relative_to(root / "train")) not in read)
    unread.write_text("not an image")
    in_memory = folder_data(root, in_memory=True, **options)
    for split in ("train", "val", "test"):
        one, other = getattr(streamed, split), getattr(in_memory, split)
        assert torch.equal(images_of(one, list(range(len(one)))), other.images), split
        assert torch.equal(one.labels, other.labels), split


def test_arrow_shards_give_the_batches_and_statistics_of_the_folder_they_were_made_from(folder, shards):
    assert len(list((shards / "train").glob("*.arrow"))) > 1
    from_folder, from_shards = folder_data(folder, crop="random_resized"), folder_data(shards, "arrow",
                                                                                       crop="random_resized")
    assert isinstance(from_shards.train.images, ArrowImages) and from_shards.classes == from_folder.classes
    assert (from_shards.mean, from_shards.std) == (from_folder.mean, from_folder.std)
    assert all(torch.equal(a, b) for a, b in zip(as_tensors(batches(from_shards).epoch(1)),
                                                  as_tensors(batches(from_folder).epoch(1)), strict=True))
    evaluated = [as_tensors(eval_batches(d.test, 10, d.normalize)) for d in (from_shards, from_folder)]
    assert all(torch.equal(a, b) for a, b in zip(*evaluated, strict=True))


def test_a_streamed_folders_teacher_logit_cache_is_keyed_by_its_image_size_normalisation_and_views(folder):
    """The cached logits are of normalised images at data.image_size, which the file names do not say, in the
    augmented views of the run's seed (the protocol's seeds share one cache folder)."""
    cfg, plain = load_config(ROOT / "configs" / "demo.yaml"), folder_data(folder)
    others = (folder_data(folder, normalization="imagenet"), folder_data(folder, image_size=36))
    keyed = [(data, data.augmentation(0, True)) for data in (plain, *others)]
    keyed += [(plain, plain.augmentation(1, True)), (plain, plain.augmentation(0, False))]
    keys = {json.dumps(cache_key(cfg, "teacher", data, views, "no"), sort_keys=True) for data, views in keyed}
    assert len(keys) == 5


def test_loader_workers_are_forked_from_the_rank_whatever_the_default_start_method(folder):
    """Python 3.14 makes forkserver the default on Linux; the workers stay forked from the rank, as this design has
    them (its file-name array shared without a copy, torchvision imported once, before they start)."""
    default = multiprocessing.get_start_method(allow_none=True)
    rank = psutil.Process()
    before = {child.pid for child in rank.children()}
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        stream = iter(batches(folder_data(folder)).epoch(0))
        next(stream)
        forked = [child for child in rank.children() if child.pid not in before and child.cmdline() == rank.cmdline()]
        stream.close()
    finally:
        multiprocessing.set_start_method(default, force=True)
    assert len(forked) == 2


def test_no_thread_is_starting_as_the_loader_workers_fork_behind_an_evaluations_progress_bar(folder, monkeypatch):
    """A fork while a thread starts can leave the worker blocked for ever in its first instant (seen in CI: the data
    loader's 300 s timeout ended the run). The bar starts no tqdm monitor thread, and the loader's watchdog thread,
    started just before the first fork, already waits."""
    from dist_tsp import streaming

    forks = []
    watchdog = streaming._Watchdog()  # its first wait starts its thread, as in a new process

    def fork_noting_threads():
        forks.append(([type(thread).__name__ for thread in threading.enumerate()], watchdog._watching))
        return fork()

    fork = os.fork
    monkeypatch.setattr(os, "fork", fork_noting_threads)
    monkeypatch.setattr(streaming, "_WATCHDOG", watchdog)
    data = folder_data(folder, normalization="imagenet")
    assert len(list(eval_batches(data.test, 2, lambda images: images, what="evaluating"))) >= BAR_FROM_BATCHES
    assert len(forks) == 2 and all("TMonitor" not in threads and watching for threads, watching in forks), forks


@pytest.mark.parametrize("crop", ["padded", "random_resized"])
def test_views_depend_on_seed_epoch_and_sample_alone_not_on_workers_replica_or_start_step(folder, crop):
    reference = folder_data(folder, crop=crop, loader_workers=0)
    one = as_tensors(batches(reference).epoch(2))
    assert all(torch.equal(a, b) for a, b in zip(one, as_tensors(batches(folder_data(folder, crop=crop,
                                                                                        loader_workers=2)).epoch(2))))
    resumed = as_tensors(batches(reference).epoch(2, start_step=5))
    assert len(resumed) == len(one) - 5 and all(torch.equal(a, b) for a, b in zip(one[5:], resumed))
    other_replica = next(batches(reference, replica=1, replicas=2).epoch(2))
    alone = {i: image for b in batches(reference).epoch(2) for i, image in zip(b.indices.tolist(), b.images)}
    assert all(torch.equal(image, alone[i]) for i, image in zip(other_replica.indices.tolist(), other_replica.images))
    next_epoch = {i: image for b in batches(reference).epoch(3) for i, image in zip(b.indices.tolist(), b.images)}
    assert sum(torch.equal(alone[i], next_epoch[i]) for i in alone) < len(alone) / 4  # redrawn every epoch


def test_random_resized_crops_vary_in_scale_and_evaluation_is_a_centre_crop(folder):
    data = folder_data(folder, crop="random_resized", image_size=16)
    first = next(batches(data).epoch(0))
    assert first.images.shape == (8, 3, 16, 16)
    views = [data.train.subset(torch.tensor([0])).loader(data.augmentation(s, True), torch.device("cpu"))
             for s in (0, 1)]
    crops = [next(v([torch.tensor([0])], 0)) for v in views]
    assert not torch.equal(*crops)  # another seed, another crop
    centre = images_of(data.test, [0])[0]
    decoded = torch.from_numpy(np.array(Image.open(folder / "test" / "ant" / "000.jpg"))).permute(2, 0, 1)
    side = round(16 / 0.875)  # the shorter side (24) resized to 18, then the centre 16 x 16
    resized = torch.nn.functional.interpolate(decoded[None].float(), size=(side, round(side * 30 / 24)),
                                              mode="bilinear", antialias=True)[0]
    assert (centre.float() - resized[:, 1:17, 3:19].round()).abs().max() <= 2


EPOCHS = (0, 1)


def epochs_seen(stream: PeerBatches) -> list[list[dict]]:
    """Per epoch of EPOCHS, each batch's sample indices, labels and the hash of each sample's view."""
    return [[{"indices": b.indices.tolist(), "labels": b.labels.tolist(),
              "views": [hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in b.images]}
             for b in stream.epoch(epoch)] for epoch in EPOCHS]


def evaluation_seen(data: Dataset, group: dist.ProcessGroup | None = None) -> list[str]:
    """The hash of each evaluation batch of the test split (images, labels, indices), 10 at a time, read over
    `group`."""
    return [hashlib.sha256(batch.numpy().tobytes()).hexdigest()
            for batch in as_tensors(eval_batches(data.test, 10, data.normalize, group=group))]


def _batches_seen(data_paths: dict[str, dict], num_students: int):
    """Per data path (name -> folder_data's arguments): this rank's replica, its epochs_seen, and its evaluation
    batches read over every rank."""
    placement = Placement(world_size=dist.get_world_size(), rank=dist.get_rank(), num_students=num_students)
    seen = {}
    for name, options in data_paths.items():
        data = folder_data(**options, loader_workers=0)
        seen[name] = {"replica": placement.replica_index, "evaluated": evaluation_seen(data, dist.group.WORLD),
                      "epochs": epochs_seen(batches(data, placement.replica_index, placement.replicas))}
    return seen


@pytest.fixture(scope="module")
def data_paths(folder, shards) -> dict[str, dict]:
    """The folder streamed, its Arrow shards streamed, and the folder decoded into memory."""
    return {"streamed folder": {"root": folder}, "Arrow shards": {"root": shards, "name": "arrow"},
            "folder in memory": {"root": folder, "in_memory": True}}


@pytest.fixture(scope="module")
def four_ranks(data_paths) -> list[dict]:
    """What each of 4 gloo ranks draws from every data path: W=4, N=2, peer groups {0,1} and {2,3}."""
    return run_on_ranks(_batches_seen, 4, data_paths, 2)


def test_peer_groups_see_identical_batches_and_replicas_disjoint_shards_on_every_data_path(data_paths, four_ranks):
    for name in data_paths:
        ranks = [rank[name] for rank in four_ranks]
        assert [r["replica"] for r in ranks] == [0, 0, 1, 1]
        assert ranks[0]["epochs"] == ranks[1]["epochs"] and ranks[2]["epochs"] == ranks[3]["epochs"], name
        for first, second in zip(ranks[0]["epochs"], ranks[2]["epochs"]):
            assert not {i for b in first for i in b["indices"]} & {i for b in second for i in b["indices"]}, name


def labels_by_hand(root: Path) -> list[int]:
    """Each training sample's class, read from its file's folder (the samples numbered in sorted path order)."""
    return [CLASSES.index(path.parent.name) for path in sorted((root / "train").glob("*/*"))]


def test_an_epoch_on_ranks_draws_each_sample_once_with_its_own_label_and_the_view_one_process_gives_it(
        folder, data_paths, four_ranks):
    """On every data path, the replicas' batches of an epoch hold no sample twice and leave out fewer than R*B (the
    partial batch each replica drops); each batch's labels are its samples' classes, read here from their folders;
    each sample's view is the one a process without a process group, drawing the whole epoch alone, gives it."""
    labels, replicas, batch_size = labels_by_hand(folder), 2, 8
    for name, options in data_paths.items():
        alone = epochs_seen(batches(folder_data(**options, loader_workers=0)))
        for epoch in range(len(EPOCHS)):
            drawn = [b for rank in (0, 2) for b in four_ranks[rank][name]["epochs"][epoch]]  # replicas 0 and 1
            indices = [i for b in drawn for i in b["indices"]]
            assert len(set(indices)) == len(indices), (name, epoch, "a sample drawn twice")
            assert 0 <= len(labels) - len(indices) < replicas * batch_size, (name, epoch, "samples left out")
            assert [y for b in drawn for y in b["labels"]] == [labels[i] for i in indices], (name, epoch)
            view_alone = {i: view for b in alone[epoch] for i, view in zip(b["indices"], b["views"])}
            assert [v for b in drawn for v in b["views"]] == [view_alone[i] for i in indices], (name, epoch)


def test_an_evaluation_read_over_the_ranks_gives_every_rank_the_batches_one_process_reads(data_paths, four_ranks):
    """A streamed split is decoded 1/G by each rank (the last share padded) and joined by an all-gather."""
    for name, options in data_paths.items():
        alone = evaluation_seen(folder_data(**options, loader_workers=0))
        assert len(alone) == 3 and all(rank[name]["evaluated"] == alone for rank in four_ranks), name


def _start_from(roots: list[Path], output_dir: Path, *overrides: str) -> dict:
    """On each rank, from its node's copy of the folder, roots[rank]: a run's start-up (process group, seed, data).
    The one line that refused it, or the dataset it loaded and the folders this rank listed."""
    from dist_tsp import data
    from dist_tsp.train import start

    listed, list_image_folder = [], data.list_image_folder
    data.list_image_folder = lambda *args: listed.append(str(args[0])) or list_image_folder(*args)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"output_dir={output_dir}", "data.name=image_folder",
                                                       f"data.root={roots[dist.get_rank()]}", *overrides])
    try:
        _, loaded, identity = start(cfg, trackers=False)
    except SharedUserError as error:
        return {"refused": str(error)}
    return {"listed": listed, "identity": identity, "loaded": _contents(loaded)}


def _contents(loaded: Dataset) -> tuple:
    """What a loaded streamed dataset holds: its splits' file names and labels, classes and statistics."""
    return (*((split.images.root, split.images.paths.tolist(), split.labels.tolist())
              for split in (loaded.train, loaded.test)), loaded.classes, loaded.mean, loaded.std)


def test_one_rank_per_node_lists_the_folder_and_every_rank_holds_what_one_process_loads(folder, tmp_path):
    """Ranks 0 and 1 on one node, rank 2 on another: the first rank of each lists the folder (train/ and test/) and
    works out its statistics, and the node's other ranks receive them, not walking the folder again."""
    alone = folder_data(folder, loader_workers=0)
    got = run_on_ranks(_start_from, 3, [folder] * 3, tmp_path / "run", nodes=[0, 0, 1])
    assert [len(rank["listed"]) for rank in got] == [2, 0, 2], got
    assert all(rank["loaded"] == _contents(alone) for rank in got)
    assert {rank["identity"] for rank in got} == {alone.identity()}


def test_a_node_whose_copy_of_the_folder_is_bad_stops_every_rank_naming_its_ranks(folder, tmp_path):
    """Node 1 (ranks 2 and 3) has a copy without test/: its first rank's line, said by every rank with its node's
    ranks; node 0's ranks, whose copy is whole, are stopped too."""
    broken = shutil.copytree(folder, tmp_path / "broken", ignore=shutil.ignore_patterns("test"))
    said = run_on_ranks(_start_from, 4, [folder, folder, broken, broken], tmp_path / "run", nodes=[0, 0, 1, 1])
    lines = {rank.get("refused") for rank in said}
    assert lines == {f"ranks 2, 3: {broken} needs train/ and test/ (or val/) folders holding <class>/ folders"}, said


def test_ranks_whose_copy_of_the_folder_differs_from_rank_0s_are_refused_on_every_rank_naming_them(folder, tmp_path):
    """A node's own copy of data.root with an image missing (rank 2), or one image in another class (rank 1: the same
    counts), would train peers on other images under the same indices. Launched without GROUP_RANK, each rank is a
    node of its own and lists its copy."""
    copies = [shutil.copytree(folder, tmp_path / name) for name in ("moved", "missing")]
    (copies[0] / "train" / "ant" / "005.jpg").rename(copies[0] / "train" / "bee" / "ant-005.jpg")
    (copies[1] / "train" / "cat" / "006.jpg").unlink()
    imagenet = "data.normalization=imagenet"
    unnamed = [None] * 3  # no GROUP_RANK
    whole = run_on_ranks(_start_from, 3, [folder] * 3, tmp_path / "run", imagenet, nodes=unnamed)
    assert [len(rank["listed"]) for rank in whole] == [2, 2, 2]
    said = [rank["refused"] for rank in run_on_ranks(_start_from, 3, [folder, *copies], tmp_path / "run", imagenet,
                                                      nodes=unnamed)]
    assert len(set(said)) == 1 and said[0].startswith("ranks 1, 2 loaded a dataset other than rank 0's (")
    assert said[0].endswith("): every node needs the same data (a node's own copy of data.root may differ)")
    assert said[0].count("96 training, 0 validation and 24 test images in 4 classes") == 2  # rank 1's, rank 0's


@pytest.fixture(scope="module")
def runs(folder, shards, tmp_path_factory) -> Path:
    """The demo students on 3 ranks learning from the folder decoded into memory, from its Arrow shards, and streamed
    from it in two launches (stopped after step 4, mid-epoch 2, then run on to step 6), with one teacher (trained by
    the first run) through its logit cache. The runs that read through loader workers log to W&B (offline)."""
    tmp = tmp_path_factory.mktemp("runs")
    common = ["--config", "configs/demo.yaml", *TINY, "data.name=image_folder", f"data.root={folder}",
              "teacher.mode=cached", f"teacher.checkpoint={tmp / 'teacher.pt'}", f"teacher.cache_dir={tmp / 'cache'}"]
    wandb = "tracking.report_to=wandb"
    for name, extra in (("in_memory", ["data.in_memory=true"]),
                        ("arrow", ["data.name=arrow", f"data.root={shards}", wandb]),
                        ("streamed", ["train.max_steps=4", wandb]), ("streamed", [wandb])):
        launch([*common, f"output_dir={tmp / name}", *extra], 3)
    return tmp


def test_a_streamed_run_resumed_mid_epoch_logs_every_step_once_and_reports_its_logit_cache_as_one_run(runs):
    """Its results.json says what the run computed, before and after the stop (before: only what the attempt after
    it did, the epoch it went on with reused)."""
    assert [r["step"] for r in train_rows(runs / "streamed")] == [1, 2, 3, 4, 5, 6]
    resumed = json.loads((runs / "streamed" / "results.json").read_text())["teacher"]["cache"]
    assert resumed["computed_epochs"] == [0, 1] and resumed["reused_epochs"] == []


def test_runs_reading_through_loader_workers_log_to_wandb_to_their_end(runs):
    """Before, a worker's first import of torchvision (its transforms) ran W&B's import hook in the forked worker,
    which raised: every streamed run logging to W&B crashed at its first batch."""
    assert [(r["exit_code"], max(r["steps"])) for r in wandb_runs(runs / "streamed")] == [(0, 4), (0, 6)]
    assert [(r["exit_code"], max(r["steps"])) for r in wandb_runs(runs / "arrow")] == [(0, 6)]


def test_three_ranks_train_from_a_streamed_folder_resumed_mid_epoch_or_its_shards_as_from_the_folder_in_memory(runs):
    """The streamed run, stopped and resumed mid-epoch, goes on bitwise as the runs that were not stopped."""
    names = ("streamed", "in_memory", "arrow")
    rows = [train_rows(runs / name) for name in names]
    assert len(rows[0]) == 6 and rows[0] == rows[1] == rows[2]
    results = [json.loads((runs / name / "results.json").read_text()) for name in names]
    assert results[0]["students"] == results[1]["students"] == results[2]["students"]  # evaluation read over ranks
    assert len({r["teacher"]["test_acc"] for r in results}) == 1
    caches = [r["teacher"]["cache"] for r in results]
    assert len({cache["path"] for cache in caches}) == 3  # keyed by file names, by pixels, by the shards' rows
    assert all(cache["computed_epochs"] == [0, 1] for cache in caches[1:])


def test_imagenet_layout_with_a_val_folder_is_found(tmp_path):
    data = folder_data(write_folder(tmp_path, per_class=8, held_out="val"), normalization="imagenet")
    assert len(data.test) == 8 and data.classes == list(CLASSES) and data.mean == (0.485, 0.456, 0.406)


def test_a_folder_where_torchcodec_cannot_be_loaded_is_one_line_naming_why_and_the_release_to_install(tmp_path,
                                                                                                       monkeypatch):
    """A TorchCodec built for another torch fails as it loads its libraries (an OSError, not an ImportError): the
    other data sources still run, and a folder says why it cannot."""
    monkeypatch.setattr(streaming, "TORCHCODEC_MISSING", "cannot be loaded (OSError: libtorchcodec_core8.so: "
                                                         "undefined symbol)")
    torch_release = torch.__version__.split("+")[0]
    with pytest.raises(DataError, match=re.escape(
            "data.name=image_folder decodes images with TorchCodec, which cannot be loaded (OSError: "
            f"libtorchcodec_core8.so: undefined symbol): install the torchcodec release made for torch "
            f"{torch_release} and the FFmpeg libraries it loads (or give the images decoded: data.name=npz)")):
        folder_data(write_folder(tmp_path, per_class=4))


@pytest.mark.parametrize("normalization", ["dataset", "imagenet"])  # read for the statistics, or first in training
def test_a_truncated_image_is_one_line_naming_the_file(tmp_path, normalization):
    root = write_folder(tmp_path, per_class=8)
    broken = root / "train" / "bee" / "005.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(ImageError) as error:
        list(batches(folder_data(root, normalization=normalization)).epoch(0))
    assert str(error.value) == (f"image {broken} cannot be read (Image is incomplete or truncated.): replace or "
                                "remove it")


def test_a_truncated_image_in_arrow_shards_names_its_row_and_file_and_the_fix_in_the_folder(tmp_path, capsys):
    """A shard cannot be edited by hand (before: "replace or remove it"); a conversion with --verify decodes every
    image first, in worker processes, and refuses in one line, writing nothing."""
    root = write_folder(tmp_path / "folder", per_class=8)
    broken = root / "train" / "bee" / "005.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(SystemExit) as stop:
        main([str(root), str(tmp_path / "verified"), "--verify", "--workers", "2"])
    assert stop.value.code == 2 and not (tmp_path / "verified").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"dist-tsp shards: error: 1 of 40 images cannot be read: {broken} (Image is incomplete or truncated.): "
        "replace or remove it, then convert again")
    main([str(root), str(tmp_path / "arrow")])
    with pytest.raises(ImageError, match=r"^image .*/arrow/train row \d+ \(bee/005.jpg\) cannot be read \(Image is "
                                         r"incomplete or truncated.\): replace it in the folder the shards came from "
                                         r"and convert it again \(python -m dist_tsp.shards\)$"):
        list(batches(folder_data(tmp_path / "arrow", "arrow")).epoch(0))


# (students, what it shows): one replica meets the image while the others wait for it; every rank meets it at once
MID_RUN = {"one student on 3 replicas": "[{name: solo, model: lenet}]",
           "3 students on the same batches": f"[{', '.join(f'{{name: {n}, model: lenet}}' for n in 'abc')}]"}


@pytest.mark.slow
@pytest.mark.parametrize("students", MID_RUN)
def test_an_image_met_mid_run_by_some_ranks_stops_every_rank_with_its_one_line_and_exit_2(tmp_path, students):
    """The ranks that did not meet it exit with its code, quietly, when their next collective fails: no
    traceback, no torchrun report, the line said once. The W&B run ends failed with that code (before, never). Its
    name is not UTF-8 (Latin-1), which the launch's store, where the ranks record it, keeps escaped."""
    root = write_folder(tmp_path / "folder", per_class=24)
    image = root / "train" / "bee" / "007.jpg"
    broken = Path(os.fsdecode(os.fsencode(image.with_name("007-caf")) + b"\xe9.jpg"))  # still the bee's 8th image
    broken.write_bytes(image.read_bytes()[:200])
    image.unlink()
    done = launch(["--config", str(ROOT / "configs" / "demo.yaml"), f"output_dir={tmp_path / 'run'}",
                   f"students={MID_RUN[students]}", "loss.preset=scratch", "data.batch_size=8", "train.epochs=2",
                   "train.max_steps=20", "data.name=image_folder", f"data.root={root}", "data.normalization=imagenet",
                   "tracking.report_to=wandb"], processes=3, check=False, launcher="dist-tsp")
    said = said_lines(done.stderr)  # on a line of its own, also where rank 0 draws its progress bar
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    printed = str(broken).encode("utf-8", "backslashreplace").decode()  # as stderr writes it
    assert len(said) == 1 and said[0].endswith(f"image {printed} cannot be read (Image is incomplete or truncated.): "
                                               "replace or remove it"), done.stderr[-3000:]
    assert [run["exit_code"] for run in wandb_runs(tmp_path / "run")] == [2]


def test_a_conversion_that_finds_no_room_is_one_line_leaving_the_earlier_one_whole_and_no_part_behind(
        small_file_system, tmp_path, capsys):
    """The file system holds the earlier conversion and the images once more, not twice (before: a traceback, and
    the half-written split stayed, taking room)."""
    root = write_folder(tmp_path / "folder", per_class=8, size=(128, 128))
    out = small_file_system / "arrow"
    main([str(root), str(out)])
    earlier = {split: snapshot(out / split) for split in ("train", "test")}
    images = sum(path.stat().st_size for path in root.rglob("*.*"))
    (small_file_system / "ballast").write_bytes(bytes(shutil.disk_usage(out).free - images * 3 // 2))
    with pytest.raises(SystemExit) as stop:
        main([str(root), str(out)])
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"dist-tsp shards: error: {no_room(small_file_system, then='convert again')}")
    assert sorted(os.listdir(out)) == ["test", "train"]
    assert {split: snapshot(out / split) for split in ("train", "test")} == earlier


def test_an_unreadable_or_damaged_shard_a_dataset_dict_or_a_split_without_labels_is_one_line(shards, tmp_path):
    import datasets

    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    shard = sorted((broken / "train").glob("*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=r"/train cannot be read as a dataset saved with save_to_disk \(.*\): rewrite "
                                        r"it with python -m dist_tsp.shards"):
        folder_data(broken, "arrow")
    damaged = tmp_path / "damaged"  # whole files whose image offsets point past their bytes: a reader would crash
    shutil.copytree(shards, damaged)
    shard = sorted((damaged / "test").glob("*.arrow"))[0]
    images = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()["image"].chunk(0).field("bytes")
    offsets = np.frombuffer(images.buffers()[1], "<i4")
    content = shard.read_bytes()
    at = content.index(offsets[:4].tobytes()) + 8
    shard.write_bytes(content[:at] + np.array([1 << 30], "<i4").tobytes() + content[at + 4:])
    with pytest.raises(DataError, match=r"/test cannot be read as a dataset saved with save_to_disk \(.*offset .* "
                                        r"out of bounds.*\): rewrite it with python -m dist_tsp.shards"):
        folder_data(damaged, "arrow")
    dictionary = tmp_path / "dictionary"  # the Hub's splits saved together
    datasets.DatasetDict({"train": saved_split(shards, "train"), "validation": saved_split(shards, "test")}
                         ).save_to_disk(str(dictionary / "train"))
    shutil.copytree(shards / "test", dictionary / "test")
    with pytest.raises(DataError, match=r"/train holds a DatasetDict \(splits train, validation\), not one split: save "
                                        r"one split there, e.g. dataset\['train'\].save_to_disk\('.*/train'\), and "
                                        r"the held-out one in .*/test or .*/val"):
        folder_data(dictionary, "arrow")
    unlabelled = tmp_path / "unlabelled"
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"image": [b"x"], "label": [0]}).save_to_disk(str(unlabelled / split))
    with pytest.raises(DataError, match=r"train: its label column is not a ClassLabel with class names"):
        folder_data(unlabelled, "arrow")
    with pytest.raises(DataError, match=r"/train holds a split saved with save_to_disk \(Arrow shards\), not class "
                                        r"folders: train with data.name=arrow"):
        folder_data(shards)  # data.name=image_folder
    test_without_labels = tmp_path / "test_without_labels"
    shutil.copytree(shards / "train", test_without_labels / "train")
    saved_split(shards, "test").map(lambda row: {"label": -1}).save_to_disk(str(test_without_labels / "test"))
    with pytest.raises(DataError, match=r"/test has labels from -1 to -1, but its classes are 0..3: use a split with "
                                        r"labels, or name every class"):
        folder_data(test_without_labels, "arrow")


RERUN = "then rerun the same command to resume from the last checkpoint"
KILLED = (r"a data loader worker died \((DataLoader worker \(pid(\(s\))? \d+\) (is killed by signal: Killed\.|exited "
          r"unexpectedly)|its connection closed as it handed a batch over: (ConnectionResetError: .*|EOFError))\): "
          r"if memory ran out, lower data.loader_workers; if an image crashed its decoder, python -m "
          rf"dist_tsp.check_data names it; {RERUN}")
STUCK = (r"the data loader's workers delivered no batch in 2 s \(data.loader_timeout_s\): one is stuck: if its decoder "
         r"loops on an image, python -m dist_tsp.check_data names it; if the file system is only slow, raise "
         rf"data.loader_timeout_s; {RERUN}")


@pytest.mark.slow
@pytest.mark.parametrize("where, fault", [("one process", "killed"), ("3 ranks", "killed"),
                                          ("the protocol's process", "killed"), ("one process", "stuck"),
                                          ("3 ranks", "stuck")])
def test_a_killed_or_stuck_loader_worker_ends_the_run_in_one_line_naming_the_likely_fixes(tmp_path, where, fault):
    """Killed as by the kernel's out-of-memory killer, torch notices wherever the main process is (before, its
    traceback from whatever line that was); stopped, as a worker stuck in a decoder or on a file system, the rank
    waits data.loader_timeout_s for its batch, then kills its workers (before, with one process, it waited for ever,
    and with several, the others' collectives timed out naming no cause). On 3 ranks the others, whose next collective
    fails, end quietly with its code (before, each with gloo's traceback), and dist-tsp-launch leaves out torchrun's
    report (before, its traceback and report followed the line). A run in the protocol's own process ends that run
    alone, which the protocol reports."""
    root = write_folder(tmp_path / "folder", per_class=24)
    settings = ["students=[{name: a, model: lenet}, {name: b, model: lenet}, {name: c, model: lenet}]",
                "data.batch_size=8", "data.name=image_folder", f"data.root={root}", "data.normalization=imagenet",
                "data.loader_workers=1", "teacher.epochs=200",
                # a killed worker is noticed by torch (within its 5 s status checks), before a timeout that long ends
                # the wait (under load, a 2 s one could, and the run said "stuck")
                f"data.loader_timeout_s={2 if fault == 'stuck' else 60}"]
    config = ["--config", str(ROOT / "configs" / "demo.yaml")]
    if where == "the protocol's process":  # one run at a time on a CPU: the teacher's, in the protocol's process
        run = subprocess.Popen([sys.executable, "-m", "dist_tsp.protocol", *config, "--out", str(tmp_path / "p"),
                                "--methods", "scratch", "--seeds", "1", *settings], cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    else:
        run = start([*config, f"output_dir={tmp_path / 'run'}", *settings], 3 if where == "3 ranks" else None,
                    launcher="dist-tsp")
    try:
        stderr = _signal_one_ranks_loader_workers(run, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    said = said_lines(stderr)
    assert run.returncode == 1 and "Connection closed" not in stderr and len(said) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Root Cause" not in stderr and "exitcode" not in stderr, stderr[-3000:]
    line = KILLED if fault == "killed" else STUCK
    if where == "the protocol's process":
        assert re.fullmatch(rf"dist-tsp protocol: run teacher failed \(exit 1\): dist-tsp: error: {line}; its log is "
                            r".*teacher.log. Rerun the same command to continue from there", said[0]), stderr[-3000:]
    else:
        assert re.fullmatch(rf"dist-tsp: error( \(rank \d\))?: {line}", said[0]), stderr[-3000:]


@pytest.mark.timeout(60)
def test_a_worker_stopped_before_handing_its_batch_over_is_given_up_after_the_loader_timeout(folder, tmp_path,
                                                                                            monkeypatch):
    """Its batch's message is queued, but the batch's memory is handed over by the worker itself when the main process
    takes it: torch's own timeout covered only the message, so the main process then waited for ever (as in CI, where
    a stopped worker could be caught in between). The worker here stops itself once its second batch is queued and
    the first taken."""
    from dist_tsp import streaming

    decode, decoded_here, first_taken = streaming.decoded, [], tmp_path / "first batch taken"

    def stop_on_the_third_batch(encoded):
        decoded_here.append(encoded)  # the forked worker's own list
        if len(decoded_here) == 17:
            while not first_taken.exists():
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGSTOP)
        return decode(encoded)

    data = folder_data(folder, loader_workers=1, loader_timeout_s=2, normalization="imagenet")
    monkeypatch.setattr(streaming, "decoded", stop_on_the_third_batch)
    monkeypatch.setattr(streaming, "_gave_up_after_s", 0.0)  # what the run's process learns, undone for the others
    stream = data.train.loader(None, torch.device("cpu"))(list(torch.arange(96).split(8)), None)
    next(stream)
    first_taken.touch()
    time.sleep(1)  # the worker stopped
    started, checks_worker_deaths = time.monotonic(), signal.getsignal(signal.SIGCHLD)
    try:
        with pytest.raises(RuntimeError) as error:
            next(stream)
        time.sleep(1)  # before, a worker's death noticed late could raise again here
    finally:
        signal.signal(signal.SIGCHLD, checks_worker_deaths)  # as the run's process ends, it stops checking
    assert 2 <= time.monotonic() - started - 1 < 15 and not multiprocessing.active_children()
    assert streaming.loader_failed(error.value).startswith("the data loader's workers delivered no batch in 2 s")


@pytest.mark.timeout(60)
def test_the_loader_timeout_counts_only_the_waits_for_a_batch_not_the_time_between_them(folder, monkeypatch):
    """A consumer slower than the limit (a long step, an evaluation between epochs) does not have its workers killed:
    each wait is timed from its own start."""
    from dist_tsp import streaming

    data = folder_data(folder, loader_workers=1, loader_timeout_s=2, normalization="imagenet")
    monkeypatch.setattr(streaming, "_gave_up_after_s", 0.0)
    stream = data.train.loader(None, torch.device("cpu"))(list(torch.arange(96).split(8)), None)
    next(stream)
    time.sleep(3)  # no wait in progress
    assert next(stream).shape[0] == 8 and multiprocessing.active_children()
    assert streaming._gave_up_after_s == 0.0
    stream.close()


def _signal_one_ranks_loader_workers(run: subprocess.Popen, fault: signal.Signals) -> str:
    """Send `fault` to every loader worker of one rank (the first training process found with forked children) until
    `run` ends; its stderr. Only a training process: a launcher starting its child is seen with a forked child too,
    between the fork and the exec, and signalling that child stopped or killed a whole rank (a rare failure in CI)."""
    def training(process: psutil.Process) -> bool:  # python [-u] TRAIN ..., or python -m dist_tsp.protocol ...
        script = [part for part in process.cmdline()[1:] if part != "-u"][:2]
        return script[:1] == [TRAIN] or script == ["-m", "dist_tsp.protocol"]

    deadline, rank = time.monotonic() + 120, None
    while run.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):  # a process that ended meanwhile
            if rank is None or not rank.is_running():
                rank = next((r for r in [psutil.Process(run.pid), *psutil.Process(run.pid).children(True)]
                             if training(r) and any(w.cmdline() == r.cmdline() for w in r.children())), None)
            for worker in rank.children() if rank else ():
                worker.send_signal(fault)
        time.sleep(0.2)
    return run.communicate(timeout=60)[1]


@pytest.mark.parametrize("out", ["the folder", "inside it", "its parent, the folder being named train"])
def test_shards_written_over_or_inside_the_image_folder_are_refused_in_one_line_keeping_every_image(folder, tmp_path,
                                                                                                      capsys, out):
    images = tmp_path / "train" if out.startswith("its parent") else tmp_path / "images"
    shutil.copytree(folder, images)
    before = sorted(p.relative_to(images) for p in images.rglob("*"))
    target = {"the folder": images, "inside it": images / "arrow"}.get(out, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([str(images), str(target)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (f"dist-tsp shards: error: the output {target} overlaps the image "
                                               f"folder {images}: its split folders would replace the images; give "
                                               "an output folder outside it")
    assert sorted(p.relative_to(images) for p in images.rglob("*")) == before


@pytest.mark.parametrize("problem", ["another image folder", "a file", "a split without images", "a bad size",
                                     "a negative size"])
def test_a_conversion_refused_in_one_line_leaves_the_output_as_it_was(folder, shards, tmp_path, capsys, problem):
    """Before, another image folder given as the output lost its images, and a split without images was found
    after the train split of the earlier conversion had been replaced."""
    images, out, options = tmp_path / "images", tmp_path / "out", []
    shutil.copytree(folder, images)
    if problem == "another image folder":
        shutil.copytree(folder, out)
    elif problem == "a file":
        out.write_text("notes\n")
    else:
        shutil.copytree(shards, out)
    if problem == "a split without images":
        for image in (images / "test").rglob("*.*"):
            image.unlink()
    if problem in ("a bad size", "a negative size"):  # before, -5MB was taken
        options = [f"--max-shard-size={'banana' if problem == 'a bad size' else '-5MB'}"]
    before = files(out) if out.is_dir() else out.read_bytes()
    with pytest.raises(SystemExit):
        main([str(images), str(out), *options])
    said = {"another image folder": f"{out / 'train'} exists and is not a split that python -m dist_tsp.shards wrote: "
                                    "choose another output folder, or remove it",
            "a file": f"the output {out}: {out} is a file, not a directory; choose another path",
            "a split without images": f"image folder {images / 'test'} has no images (.jpg .jpeg .png .webp .gif .bmp "
                                      ".tif .tiff .ppm .pgm): put each image in its class folder",
            "a bad size": "--max-shard-size 'banana' is not a size: write e.g. 500MB or 1GB",
            "a negative size": "--max-shard-size '-5MB' is not a size: write e.g. 500MB or 1GB"}[problem]
    assert capsys.readouterr().err.strip() == f"dist-tsp shards: error: {said}"
    assert (files(out) if out.is_dir() else out.read_bytes()) == before


def test_an_output_under_a_file_is_refused_in_one_line_before_any_image_is_read(folder, tmp_path, capsys,
                                                                                 monkeypatch):
    """Before: NotADirectoryError's traceback, after every image was verified."""
    monkeypatch.setattr("dist_tsp.shards.verify", lambda *_: pytest.fail("the images were verified"))
    (tmp_path / "notes").write_text("notes\n")
    with pytest.raises(SystemExit) as stop:
        main([str(folder), str(tmp_path / "notes" / "arrow"), "--verify"])
    assert stop.value.code == 2 and (tmp_path / "notes").read_text() == "notes\n"
    assert capsys.readouterr().err.strip() == (f"dist-tsp shards: error: the output {tmp_path / 'notes' / 'arrow'}: "
                                               f"{tmp_path / 'notes'} is a file, not a directory; choose another path")


def test_each_split_is_generated_under_its_own_name(tmp_path, capsys):
    """Hugging Face's progress line said "Generating train split" for the test split too."""
    main([str(write_folder(tmp_path / "images", per_class=4)), str(tmp_path / "arrow")])
    said = capsys.readouterr().err
    assert "Generating train split: 16 examples" in said and "Generating test split: 4 examples" in said


def test_a_conversion_killed_while_saving_is_rerun_over_its_leftovers(folder, shards, tmp_path):
    """Saved beside the output and renamed once every split is saved: a kill leaves the earlier conversion whole, and
    the rerun removes the cache the killed one was built in."""
    out = tmp_path / "out"
    shutil.copytree(shards, out)
    (out / ".train.partial").mkdir()
    (out / ".train.partial" / "data-00000-of-00002.arrow").write_bytes(b"cut short")
    (out / ".cache-k1ll3d" / "train").mkdir(parents=True)
    (out / ".cache-k1ll3d" / "train" / "cache-0.arrow").write_bytes(bytes(1000))
    main([str(folder), str(out), "--max-shard-size", "20KB"])
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    for split in ("train", "test"):
        assert saved_split(out, split)["label"] == saved_split(shards, split)["label"]


def test_a_second_conversion_into_an_output_that_another_is_writing_is_refused_in_one_line(folder, shards, tmp_path,
                                                                                          capsys):
    """Before, it removed the running one's cache as a killed conversion's, and both wrote the same partial splits."""
    out = tmp_path / "out"
    shutil.copytree(shards, out)
    (out / ".cache-running").mkdir()
    before = files(out)
    running = os.open(out, os.O_RDONLY)  # its lock, as the running conversion holds it
    fcntl.flock(running, fcntl.LOCK_EX)
    try:
        with pytest.raises(SystemExit) as stop:
            main([str(folder), str(out)])
    finally:
        os.close(running)
    assert stop.value.code == 2 and capsys.readouterr().err.strip() == (
        f"dist-tsp shards: error: another conversion is writing into {out}: wait for it to end, or give another "
        "output folder")
    assert files(out) == before and (out / ".cache-running").is_dir()

def files(root: Path) -> dict[Path, bytes]:
    return {path.relative_to(root): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_a_test_split_left_by_an_earlier_conversion_is_refused_when_the_folder_now_holds_val(folder, shards, tmp_path,
                                                                                          capsys):
    """data.name=arrow reads test/ before val/: the new val/ would never be read."""
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    (images / "test").rename(images / "val")
    out = tmp_path / "arrow"
    shutil.copytree(shards, out)
    with pytest.raises(SystemExit):
        main([str(images), str(out)])
    assert capsys.readouterr().err.strip() == (f"dist-tsp shards: error: {out / 'test'} is left from an earlier "
                                               "conversion and would be read instead of the new val/: remove it, or "
                                               "choose another output folder")


def saved_split(root: Path, name: str):
    import datasets

    return datasets.load_from_disk(str(root / name))


def test_arrow_splits_whose_class_names_are_in_another_order_are_labelled_by_name(folder, shards, tmp_path):
    """The held-out split's ids follow its own ClassLabel: ids of reversed names still mean the same classes."""
    import datasets

    reordered = tmp_path / "reordered"
    shutil.copytree(shards / "train", reordered / "train")
    test = saved_split(shards, "test")
    reversed_names = datasets.ClassLabel(names=list(reversed(CLASSES)))
    test = test.map(lambda row: {"label": len(CLASSES) - 1 - row["label"]}).cast_column("label", reversed_names)
    test.save_to_disk(str(reordered / "test"))
    from_folder, from_reordered = folder_data(folder), folder_data(reordered, "arrow")
    assert from_reordered.classes == list(CLASSES) and torch.equal(from_reordered.test.labels,
                                                                    from_folder.test.labels)


@pytest.mark.parametrize("problem, message", [
    ("missing class", r"class 'dog' is in train/ but not test/: both splits need the same classes"),
    ("extra class", r"class 'eel' is in test/ but not train/: both splits need the same classes"),
    ("empty split", r"image folder .*/test has no images \(.jpg .jpeg .png .webp .gif .bmp .tif .tiff .ppm .pgm\): "
                    r"put each image in its class folder"),
    ("flat held-out split", r"image folder .*/test holds 4 images but no class folders: sort them into class folders "
                            r"named as train/'s \(ImageNet's flat val/: README, 'Preparing ImageNet'\)"),
])
def test_a_bad_folder_layout_is_one_line_before_any_image_is_read(tmp_path, problem, message):
    """(before, a flat held-out folder, as ImageNet's val/ comes, said that train/'s first class was not in it)"""
    root = write_folder(tmp_path, per_class=4)
    if problem == "flat held-out split":
        for f in list((root / "test").rglob("*.*")):
            f.rename(root / "test" / f"{f.parent.name}_{f.name}")
            if not any(f.parent.iterdir()):
                f.parent.rmdir()
    elif problem == "missing class":
        for f in (root / "test" / "dog").iterdir():
            f.unlink()
        (root / "test" / "dog").rmdir()
    elif problem == "extra class":
        (root / "test" / "eel").mkdir()
    else:
        for f in (root / "test").rglob("*.*"):
            f.unlink()
    with pytest.raises(DataError, match=message):
        folder_data(root)
