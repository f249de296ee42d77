"""python -m dist_tsp.check_data: before a run, the run's dataset passes training's start-up checks and every image
it would stream (an image folder's files, Arrow shards' rows) is decoded in worker processes; the unreadable ones are
named in one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_tsp import check_data, shards
from dist_tsp.config import load_config
from dist_tsp.data import load_dataset
from tests.runs import ROOT
from tests.test_streaming import write_folder

DEMO = ROOT / "configs" / "demo.yaml"
FOLDER_DATA = ["data.name=image_folder", "data.normalization=imagenet"]
FOLDER = ["--config", str(DEMO), *FOLDER_DATA, "--workers", "2"]


def refused(capsys, argv: list[str]) -> str:
    """The one line that check_data exits 2 with."""
    with pytest.raises(SystemExit) as stop:
        check_data.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2, err
    return err[-1]


def broken_folder(root: Path) -> tuple[Path, Path]:
    """An image folder with a truncated training JPEG and a held-out file that is no image at all."""
    write_folder(root, per_class=8)
    truncated, not_an_image = root / "train" / "bee" / "005.jpg", root / "test" / "cat" / "000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    not_an_image.write_text("not an image")
    return truncated, not_an_image


def test_a_readable_folder_passes_with_its_splits_counted_including_the_validation_split(tmp_path, capsys):
    write_folder(tmp_path, per_class=8)
    # the training set's own statistics: the parent decodes a sample with torch's threads before the workers fork
    check_data.main([*FOLDER, f"data.root={tmp_path}", "data.val_fraction=0.25", "data.normalization=dataset"])
    assert capsys.readouterr().out.strip().startswith(
        "data.name=image_folder: 24 training, 8 validation and 8 test images in 4 classes, content ")


def test_every_unreadable_image_of_every_split_is_named_in_one_line(tmp_path, capsys):
    truncated, not_an_image = broken_folder(tmp_path)
    line = refused(capsys, [*FOLDER, f"data.root={tmp_path}"])
    assert line.startswith(f"dist-tsp check_data: error: 2 of 40 images cannot be read: {truncated} (Image is "
                           "incomplete or truncated.); ") and line.endswith(": for each, replace or remove it")
    assert f"{not_an_image} (" in line


def test_an_unreadable_row_of_arrow_shards_is_named_with_the_fix_in_the_source_folder(tmp_path, capsys):
    truncated, _ = broken_folder(tmp_path / "folder")
    (tmp_path / "folder" / "test" / "cat" / "000.jpg").unlink()  # 32 training and 7 test images
    shards.main([str(tmp_path / "folder"), str(tmp_path / "arrow")])  # without --verify: the bad image is in a row
    line = refused(capsys, ["--config", str(DEMO), "data.name=arrow", f"data.root={tmp_path / 'arrow'}",
                            "data.normalization=imagenet", "--workers", "2"])
    assert line.startswith(f"dist-tsp check_data: error: 1 of 39 images cannot be read: {tmp_path / 'arrow'}/train "
                           "row ")
    assert line.endswith("(005.jpg) (Image is incomplete or truncated.): replace it in the folder the shards "
                         "came from and convert it again (python -m dist_tsp.shards)")


def test_only_the_images_the_run_reads_are_decoded(tmp_path, capsys):
    """data.max_train_samples: a training image outside the subset the run draws is not read."""
    write_folder(tmp_path, per_class=8)
    overrides = [*FOLDER_DATA, f"data.root={tmp_path}", "data.max_train_samples=4"]
    read = set(load_dataset(load_config(DEMO, overrides).data, seed=0).train.images.paths.tolist())
    unread = next(path for path in sorted((tmp_path / "train").rglob("*.jpg"))
                  if str(path.relative_to(tmp_path / "train")).encode() not in read)
    unread.write_text("not an image")
    check_data.main(["--config", str(DEMO), *overrides, "--workers", "2"])
    assert capsys.readouterr().out.strip().startswith("data.name=image_folder: 4 training, 0 validation and 8 test")


def test_training_start_up_checks_and_a_missing_config_are_one_line(tmp_path, capsys):
    write_folder(tmp_path, per_class=8)
    (tmp_path / "test").rename(tmp_path / "elsewhere")
    assert refused(capsys, [*FOLDER, f"data.root={tmp_path}"]).startswith("dist-tsp check_data: error: ")
    assert "give the run's --config FILE" in refused(capsys, [])
