"""Check a run's dataset before the run: the checks training makes at start-up, then every image of an image folder
or Arrow shards decoded as the loader will decode it, in worker processes (a bad image is otherwise met when a step
first needs it, hours in):

    python -m dist_tsp.check_data --config configs/imagenet/tsp.yaml [key=value ...] [--workers N]

It decodes the images the run would read (data.max_train_samples included), and nothing else.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

import torch
from tqdm.auto import tqdm

from dist_tsp.config import load_config
from dist_tsp.data import DataError, load_dataset
from dist_tsp.errors import UserError
from dist_tsp.streaming import ArrowImages, FolderImages, StreamedImages, decoded

_image_sets: list[FolderImages | ArrowImages] = []  # in a verifying worker process: the images it decodes


def verify(image_sets: list[FolderImages | ArrowImages], workers: int, fix: str) -> None:
    """Decode every image of `image_sets`, as the loader will, in `workers` processes; DataError naming the
    unreadable ones and `fix` (for one image)."""
    samples = [(which, index) for which, images in enumerate(image_sets) for index in range(len(images))]
    # one thread each, as DataLoader's workers: a forked child's parallel region after the parent's would deadlock
    with multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker, initargs=(image_sets,)) as pool:
        reasons = list(tqdm(pool.imap(_unreadable, samples, chunksize=64), total=len(samples),
                            desc="verifying images", unit="image"))
    if bad := [reason for reason in reasons if reason is not None]:
        named = "; ".join(bad[:3]) + "; …" * (len(bad) > 3)
        raise DataError(f"{len(bad)} of {len(samples)} images cannot be read: {named}: "
                        f"{fix if len(bad) == 1 else f'for each, {fix}'}")


def _start_worker(image_sets: list[FolderImages | ArrowImages]) -> None:
    global _image_sets
    torch.set_num_threads(1)
    _image_sets = image_sets


def _unreadable(sample: tuple[int, int]) -> str | None:
    """The sample's name and why it cannot be read, or None when it can."""
    which, index = sample
    name, encoded = _image_sets[which].encoded(index)
    image = decoded(encoded)
    return f"{name} ({image})" if isinstance(image, str) else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dist_tsp.check_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run's YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="the run's dotted overrides, e.g. data.root=/datasets/imagenet")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes decoding the images (every CPU this process may use)")
    args = parser.parse_intermixed_args(argv)
    if args.config is None and not args.overrides:
        parser.error("give the run's --config FILE, its key=value overrides, or both")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: give at least 1")
    try:
        cfg = load_config(args.config, args.overrides)
        dataset = load_dataset(cfg.data, cfg.seed)
        if isinstance(dataset.train, StreamedImages):  # else decoded into memory by load_dataset
            splits = (dataset.train, dataset.val, dataset.test)
            verify([split.images for split in splits if split is not None], args.workers,
                   dataset.train.images.fix_unreadable)
    except UserError as error:
        print(f"dist-tsp check_data: error: {error}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    print(f"data.name={cfg.data.name}: {dataset.identity()}: every image can be read")


if __name__ == "__main__":
    main()
