"""Convert an image folder into Arrow shards for data.name=arrow (Hugging Face `datasets`, save_to_disk):

    python -m dist_tsp.shards /datasets/imagenet /shared/imagenet-arrow [--max-shard-size 1GB]

Each split (train, and test or val) becomes a folder of a few large memory-mapped .arrow files holding the
encoded images as they are (no re-encoding) and their ClassLabel labels: a cluster filesystem then serves a few
large files instead of millions of small ones, and a sample is still reached by its index. A dataset from the
Hugging Face Hub with `image` and `label` columns (ImageNet-1k is distributed that way) works as well once saved
with `dataset.save_to_disk(OUT / split)`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dist_tsp.data import DataError, same_classes, split_folders
from dist_tsp.errors import UserError
from dist_tsp.streaming import list_image_folder


def convert(folder: Path, out: Path, max_shard_size: str = "1GB") -> list[Path]:
    """Write out/train and out/<held-out> from the image folder's splits; return the split folders written."""
    import datasets

    train, held_out = split_folders(folder, "<class>/ folders")
    _refuse_overlap(folder, out, (train, held_out))
    if (out / "test").exists() and held_out.name != "test":  # data.name=arrow would read it, not the new val/
        raise DataError(f"{out / 'test'} is left from an earlier conversion and would be read instead of the new "
                        f"{held_out.name}/: remove it, or choose another output folder")
    classes, _, _ = list_image_folder(train)
    same_classes(folder, held_out.name, classes, sorted(p.name for p in held_out.iterdir() if p.is_dir()))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    written = []
    for split in (train, held_out):
        _, paths, labels = list_image_folder(split, classes)
        if len(paths) == 0:
            raise DataError(f"image folder {split} has no images")
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as cache:
            table = datasets.Dataset.from_generator(
                _rows, gen_kwargs={"split": split, "paths": paths.tolist(), "labels": labels.tolist()},
                features=features, cache_dir=cache)
            target = out / split.name
            if target.exists():
                shutil.rmtree(target)
            table.save_to_disk(str(target), max_shard_size=max_shard_size)
        written.append(target)
    return written


def _refuse_overlap(folder: Path, out: Path, splits: tuple[Path, ...]) -> None:
    """The output replaces out/<split> for each split: it may neither lie inside the images nor hold them."""
    source, target = folder.resolve(), out.resolve()
    if target.is_relative_to(source) or any(source.is_relative_to(target / split.name) for split in splits):
        raise DataError(f"the output {out} overlaps the image folder {folder}: its split folders would replace the "
                        "images; give an output folder outside it")


def _rows(split: Path, paths: list[bytes], labels: list[int]) -> Iterator[dict]:
    for path, label in zip(paths, labels):
        relative = path.decode()
        yield {"image": {"bytes": (split / relative).read_bytes(), "path": relative}, "label": label}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dist_tsp.shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="an image folder: train/<class>/* and test/<class>/* (or val/)")
    parser.add_argument("out", type=Path, help="where the Arrow splits go (out/train, out/test or out/val)")
    parser.add_argument("--max-shard-size", default="1GB", help="the largest .arrow file (default 1GB)")
    args = parser.parse_args(argv)
    try:
        written = convert(args.folder, args.out, args.max_shard_size)
    except UserError as error:
        print(f"dist-tsp shards: error: {error}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    print(f"Written: {', '.join(map(str, written))}; train with data.name=arrow data.root={args.out}")


if __name__ == "__main__":
    main()
