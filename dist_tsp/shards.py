"""Convert an image folder into Arrow shards for data.name=arrow (Hugging Face `datasets`, save_to_disk):

    python -m dist_tsp.shards /datasets/imagenet /shared/imagenet-arrow [--max-shard-size 1GB] [--verify]

Each split (train, and test or val) becomes a folder of a few large memory-mapped .arrow files holding the
encoded images as they are (no re-encoding) and their ClassLabel labels: a cluster filesystem then serves a few
large files instead of millions of small ones, and a sample is still reached by its index. A dataset from the
Hugging Face Hub with `image` and `label` columns (ImageNet-1k is distributed that way) works as well once saved
with `dataset.save_to_disk(OUT / split)`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dist_tsp.check_data import verify
from dist_tsp.checkpoint import check_writable, try_lock, written_into
from dist_tsp.data import (
    DataError,
    every_class_has_images,
    held_out_classes,
    no_images,
    same_classes,
    split_folders,
)
from dist_tsp.errors import ArgumentParser, exits_in_one_line
from dist_tsp.streaming import FolderImages, list_image_folder

CACHE = ".cache-"  # the prefix of the folder in the output where the Arrow files are built before they are saved


def convert(folder: Path, out: Path, max_shard_size: str = "1GB", verify_workers: int | None = None) -> list[Path]:
    """Write out/train and out/<held-out> from the image folder's splits; return the split folders written. Every
    split is read before an earlier conversion's is replaced. With `verify_workers`, every image is decoded first,
    in that many processes, and an unreadable one is refused before anything is written."""
    from datasets.utils.py_utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except ValueError:
        size = 0
    if size <= 0:
        raise DataError(f"--max-shard-size {max_shard_size!r} is not a size: write e.g. 500MB or 1GB")
    train, held_out = split_folders(folder, "<class>/ folders")
    _check_output(folder, out, (train, held_out))
    classes, _, labels = list_image_folder(train)
    every_class_has_images(train, classes, labels)
    same_classes(folder, held_out.name, classes, held_out_classes(held_out))
    listed = {split: list_image_folder(split, classes)[1:] for split in (train, held_out)}
    if len(listed[held_out][0]) == 0:  # every training class has images (checked above)
        raise no_images(held_out)
    if verify_workers is not None:
        verify([FolderImages(split, paths) for split, (paths, _) in listed.items()], verify_workers,
               "replace or remove it, then convert again")
    out.mkdir(parents=True, exist_ok=True)
    with _alone_in(out):
        return _write(listed, classes, out, max_shard_size)


@contextlib.contextmanager
def _alone_in(out: Path) -> Iterator[None]:
    """Hold the output folder's lock while converting into it: a second conversion into it is refused in one line
    (the lock goes with a conversion killed midway)."""
    folder = os.open(out, os.O_RDONLY)
    try:
        if not try_lock(folder):
            raise DataError(f"another conversion is writing into {out}: wait for it to end, or give another output "
                            "folder")
        yield
    finally:
        os.close(folder)


def _write(listed: dict[Path, tuple], classes: list[str], out: Path, max_shard_size: str) -> list[Path]:
    """Save each listed split as out/.<split>.partial, then put them in their splits' places."""
    import datasets

    # `file`: the image's path in its split folder, as save_to_disk keeps only the base name of the image's own path
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes),
                                  "file": datasets.Value("string")})

    for killed in out.glob(f"{CACHE}*"):  # what a conversion killed midway left: the images' size
        shutil.rmtree(killed, ignore_errors=True)
    partials = {split: out / f".{split.name}.partial" for split in listed}  # a kill leaves the earlier ones whole
    try:  # the Arrow files are built in the output's file system, which must hold them twice meanwhile
        with written_into(out, then="convert again"), tempfile.TemporaryDirectory(dir=out, prefix=CACHE) as cache:
            tables = {split: datasets.Dataset.from_generator(
                _rows, gen_kwargs={"split": split, "paths": paths.tolist(), "labels": labels.tolist()},
                features=features, cache_dir=str(Path(cache) / split.name), split=datasets.NamedSplit(split.name))
                for split, (paths, labels) in listed.items()}
            for split, table in tables.items():
                shutil.rmtree(partials[split], ignore_errors=True)
                table.save_to_disk(str(partials[split]), max_shard_size=max_shard_size)
    except BaseException:  # a conversion that fails leaves no half-written split taking room
        for partial in partials.values():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    for split, partial in partials.items():
        if (out / split.name).exists():
            shutil.rmtree(out / split.name)
        partial.rename(out / split.name)
    return [out / split.name for split in partials]

def _check_output(folder: Path, out: Path, splits: tuple[Path, ...]) -> None:
    """The output is a folder that can be written, and replaces out/<split> for each split: only an earlier
    conversion's, never the images or other files; and no split of an earlier conversion may be left that
    data.name=arrow would read instead."""
    source, target = folder.resolve(), out.resolve()
    if target.is_relative_to(source) or any(source.is_relative_to(target / split.name) for split in splits):
        raise DataError(f"the output {out} overlaps the image folder {folder}: its split folders would replace the "
                        "images; give an output folder outside it")
    check_writable(out, f"the output {out}")
    for split in splits:
        if (out / split.name).exists() and not _saved_split(out / split.name):
            raise DataError(f"{out / split.name} exists and is not a split that python -m dist_tsp.shards wrote: "
                            "choose another output folder, or remove it")
    if (out / "test").exists() and all(split.name != "test" for split in splits):  # arrow would read it, not val/
        raise DataError(f"{out / 'test'} is left from an earlier conversion and would be read instead of the new "
                        f"{splits[1].name}/: remove it, or choose another output folder")


def _saved_split(path: Path) -> bool:
    """Whether `path` is a dataset saved with save_to_disk (what an earlier conversion wrote)."""
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _rows(split: Path, paths: list[bytes], labels: list[int]) -> Iterator[dict]:
    for path, label in zip(paths, labels):
        name = path.decode(errors="replace")  # Arrow's strings are UTF-8: a name that is not keeps U+FFFD in its place
        yield {"image": {"bytes": (split / os.fsdecode(path)).read_bytes(), "path": name}, "label": label, "file": name}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m dist_tsp.shards", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="an image folder: train/<class>/* and test/<class>/* (or val/)")
    parser.add_argument("out", type=Path, help="where the Arrow splits go (out/train, out/test or out/val)")
    parser.add_argument("--max-shard-size", default="1GB", help="the largest .arrow file (default 1GB)")
    parser.add_argument("--verify", action="store_true",
                        help="decode every image first, in --workers processes, and write nothing if one cannot be "
                             "read, rather than meet it mid-run (about 800 ImageNet-size images/s per process)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes for --verify (every CPU this process may use)")
    with exits_in_one_line("dist-tsp shards", "interrupted (Ctrl-C): rerun the same command to convert"):
        args = parser.parse_args(argv)
        if args.workers < 1:
            parser.error(f"--workers {args.workers}: give at least 1")
        written = convert(args.folder, args.out, args.max_shard_size, args.workers if args.verify else None)
    print(f"Written: {', '.join(map(str, written))}; train with data.name=arrow data.root={args.out}")


if __name__ == "__main__":
    main()
