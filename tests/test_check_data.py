"""python -m dist_tsp.check_data: before a run, the run's dataset passes training's start-up checks and every image
it would stream (an image folder's files, Arrow shards' rows) is decoded in worker processes; the unreadable ones are
named in one line, exit 2."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from dist_tsp import check_data, data, shards
from dist_tsp.config import load_config
from dist_tsp.data import DataError, load_dataset
from dist_tsp.streaming import FolderImages, list_image_folder
from tests.runs import ROOT
from tests.test_streaming import write_folder

DEMO = ROOT / "configs" / "demo.yaml"
FOLDER_DATA = ["data.name=image_folder", "data.batch_size=4"]  # normalization=dataset: statistics decoded first
FOLDER = ["--config", str(DEMO), *FOLDER_DATA, "--workers", "2"]


def refused(capsys, argv: list[str]) -> str:
    """The one line that check_data exits 2 with."""
    with pytest.raises(SystemExit) as stop:
        check_data.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2, err
    return err[-1]


def training_paths(root: Path, overrides: list[str]) -> list[Path]:
    """The training images (then the validation split's) that a run with `overrides` reads, as it draws them."""
    dataset = load_dataset(load_config(DEMO, [*overrides, "data.normalization=imagenet"]).data, seed=0)
    splits = [dataset.train] + [dataset.val] * (dataset.val is not None)
    return [root / "train" / path.decode() for split in splits for path in split.images.paths.tolist()]


def test_a_readable_folder_passes_with_the_runs_identity_its_files_listed_once(tmp_path, capsys, monkeypatch):
    write_folder(tmp_path, per_class=8)
    overrides = [*FOLDER_DATA, f"data.root={tmp_path}", "data.val_fraction=0.25"]
    listed = []
    monkeypatch.setattr(data, "list_image_folder", lambda *args: listed.append(args[0]) or list_image_folder(*args))
    # the training set's own statistics: the parent decodes a sample with torch's threads before the workers fork
    check_data.main(["--config", str(DEMO), *overrides, "--workers", "2"])
    assert listed == [tmp_path / "train", tmp_path / "test"]
    run = load_dataset(load_config(DEMO, overrides).data, seed=0)
    assert capsys.readouterr().out.strip() == f"data.name=image_folder: {run.identity()}: every image can be read"
    assert run.identity().startswith("24 training, 8 validation and 8 test images in 4 classes, content ")


def test_every_unreadable_image_of_every_split_is_counted_and_named_in_one_line(tmp_path, capsys):
    """Training, validation and test images alike; the statistics' sample (every training image here) would have
    stopped at the first."""
    write_folder(tmp_path, per_class=8)
    overrides = [*FOLDER_DATA, f"data.root={tmp_path}", "data.val_fraction=0.25"]
    paths = training_paths(tmp_path, overrides)
    truncated, in_validation, in_test = paths[0], paths[-1], tmp_path / "test" / "cat" / "000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    for path in (in_validation, in_test):
        path.write_text("not an image")
    line = refused(capsys, ["--config", str(DEMO), *overrides, "--workers", "2"])
    assert line.startswith(f"dist-tsp check_data: error: 3 of 40 images cannot be read: {truncated} (Image is "
                           "incomplete or truncated.); ") and line.endswith(": for each, replace or remove it")
    assert f"; {in_validation} (" in line and f"; {in_test} (" in line


def test_an_unreadable_row_of_arrow_shards_is_named_by_its_file_in_the_source_folder_with_the_fix(tmp_path, capsys):
    import datasets

    write_folder(tmp_path / "folder", per_class=8)
    truncated = tmp_path / "folder" / "train" / "bee" / "005.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    shards.main([str(tmp_path / "folder"), str(tmp_path / "arrow")])  # without --verify: the bad image is in a row
    line = refused(capsys, ["--config", str(DEMO), "data.name=arrow", f"data.root={tmp_path / 'arrow'}",
                            "data.batch_size=4", "--workers", "2"])
    assert line.startswith(f"dist-tsp check_data: error: 1 of 40 images cannot be read: {tmp_path / 'arrow'}/train "
                           "row ")
    assert line.endswith("(bee/005.jpg) (Image is incomplete or truncated.): replace it in the folder the shards "
                         "came from and convert it again (python -m dist_tsp.shards)")
    for split in ("train", "test"):  # as a Hub dataset saved with save_to_disk: the image's base name alone
        datasets.load_from_disk(str(tmp_path / "arrow" / split)).remove_columns("file").save_to_disk(
            str(tmp_path / "hub" / split))
    line = refused(capsys, ["--config", str(DEMO), "data.name=arrow", f"data.root={tmp_path / 'hub'}",
                            "data.batch_size=4", "--workers", "2"])
    assert f"{tmp_path / 'hub'}/train row " in line and "(005.jpg) (Image is incomplete" in line


class KilledAt(FolderImages):
    """Image files whose reading kills the process at one of them, as a reader's crash on damaged bytes would; or,
    with a `once` file to create, only the first time, as a kill for lack of memory would; or, `hangs`, whose reading
    never ends there, as a decoder looping on it or a file system that stopped answering."""

    killed_at = 70  # in the second chunk
    once: Path | None = None
    hangs = False

    def encoded(self, index: int) -> tuple[str, str | bytes]:
        if index == self.killed_at and self.hangs:
            time.sleep(3600)
        if index == self.killed_at and not (self.once and self.once.exists()):
            if self.once:
                self.once.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encoded(index)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["every time", "once", "hangs"])
def test_a_process_killed_decoding_is_put_down_to_the_image_that_kills_or_stalls_it_alone_or_else_to_memory(
        tmp_path, monkeypatch, how):
    """Before: the pool waited for ever."""
    write_folder(tmp_path)
    images = KilledAt(tmp_path / "train", list_image_folder(tmp_path / "train")[1])
    if how == "once":
        object.__setattr__(images, "once", tmp_path / "killed")
    if how == "hangs":
        object.__setattr__(images, "hangs", True)
        monkeypatch.setattr(check_data, "READ_TIMEOUT_S", 3)  # a fork and a decode under load stay well inside it
    with pytest.raises(DataError) as refusal:
        check_data.verify([images], 2, "replace or remove it")
    assert str(refusal.value) == {
        "every time": f"decoding {images.where(KilledAt.killed_at)} (SIGKILL) kills the process: replace or remove it",
        "once": "a process decoding images was killed, though each image it was reading decodes alone: most likely "
                "memory ran out: rerun with fewer --workers",
        "hangs": f"reading {images.where(KilledAt.killed_at)} takes longer than 3 s: replace or remove it"}[how]


def test_a_run_streamed_or_held_in_memory_reads_only_its_max_train_samples_subset(tmp_path, capsys):
    write_folder(tmp_path, per_class=8)
    subset = [*FOLDER_DATA, f"data.root={tmp_path}", "data.max_train_samples=4"]
    read = training_paths(tmp_path, subset)
    unread = next(path for path in sorted((tmp_path / "train").rglob("*.jpg")) if path not in read)
    unread.write_text("not an image")
    for in_memory in ("data.normalization=imagenet", "data.in_memory=true"):  # loaded once; decoded into memory
        check_data.main(["--config", str(DEMO), *subset, in_memory, "--workers", "2"])
        assert capsys.readouterr().out.strip().startswith("data.name=image_folder: 4 training, 0 validation and 8 test")
    read[0].write_text("not an image")
    assert refused(capsys, ["--config", str(DEMO), *subset]).startswith(
        f"dist-tsp check_data: error: 1 of 12 images cannot be read: {read[0]} (")


def test_the_runs_data_checks_and_bad_arguments_are_one_line(tmp_path, capsys):
    write_folder(tmp_path, per_class=8)
    prefix = "dist-tsp check_data: error: "
    assert refused(capsys, [*FOLDER, f"data.root={tmp_path}", "data.batch_size=48"]) == \
        f"{prefix}32 training images over 1 replica do not fill one batch of 48: lower data.batch_size"
    assert refused(capsys, ["--config", str(DEMO)]) == (
        f"{prefix}data.name=digits is loaded whole and checked as a run starts; check_data checks the images a run "
        "reads from disk: data.name=image_folder or arrow")
    assert refused(capsys, ["--config", str(tmp_path / "missing.yaml")]).startswith(
        f"{prefix}config file {tmp_path / 'missing.yaml'} ")
    (tmp_path / "test").rename(tmp_path / "elsewhere")
    assert refused(capsys, [*FOLDER, f"data.root={tmp_path}"]) == \
        f"{prefix}{tmp_path} needs train/ and test/ (or val/) folders holding <class>/ folders"
    assert "give the run's --config FILE" in refused(capsys, [])
    assert "--workers 0: give at least 1" in refused(capsys, [*FOLDER, "--workers", "0"])


def test_no_more_worker_processes_start_than_there_are_chunks_of_images(tmp_path, capsys, monkeypatch):
    """Before, --workers 100000 forked every one of them at the first chunk, and the machine stalled."""
    write_folder(tmp_path, per_class=8)  # 32 training and 8 test images: one chunk each
    started = []
    monkeypatch.setattr(check_data, "ProcessPoolExecutor",
                        lambda workers, **options: started.append(workers) or ProcessPoolExecutor(workers, **options))
    check_data.main(["--config", str(DEMO), *FOLDER_DATA, f"data.root={tmp_path}", "--workers", "16"])
    assert started == [2] and capsys.readouterr().out.strip().endswith("every image can be read")


def test_the_help_gives_the_read_timeout_in_seconds(capsys):
    with pytest.raises(SystemExit):
        check_data.main(["--help"])
    assert f"longer than {check_data.READ_TIMEOUT_S} s " in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["check_data", "shards"])
def test_ctrl_c_ends_check_data_and_shards_in_one_line_with_exit_130(tmp_path, capsys, monkeypatch, command):
    write_folder(tmp_path / "folder", per_class=8)

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    if command == "check_data":
        monkeypatch.setattr(check_data, "verify", interrupted)
        argv = ["--config", str(DEMO), *FOLDER_DATA, f"data.root={tmp_path / 'folder'}", "--workers", "1"]
    else:
        monkeypatch.setattr(shards, "convert", interrupted)
        argv = [str(tmp_path / "folder"), str(tmp_path / "arrow")]
    with pytest.raises(SystemExit) as stop:
        getattr(check_data if command == "check_data" else shards, "main")(argv)
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"dist-tsp {command}: interrupted (Ctrl-C)")
