"""Check a run's data before the run: the dataset checks training makes at start-up, then every image of an image
folder or Arrow shards that the run would read decoded as the loader decodes it, in worker processes (a bad image
is otherwise met when a step first needs it, hours in):

    python -m dist_tsp.check_data --config configs/imagenet/tsp.yaml [key=value ...] [--workers N]

A run reads only its data.max_train_samples subset, streamed or decoded into memory up front.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from ctypes import Array
from multiprocessing.context import BaseContext

import torch
from tqdm.auto import tqdm

from dist_tsp.config import STREAMABLE, ConfigError, load_config
from dist_tsp.data import DataError, check_fills_a_batch, load_dataset, normalized
from dist_tsp.errors import ArgumentParser, exits_in_one_line
from dist_tsp.streaming import ArrowImages, FolderImages, decoded

CHUNK = 64  # images a worker decodes per task
READ_TIMEOUT_S = 60  # to read and decode one image: a verifying process still at it is killed (SIGALRM)
# in a verifying worker process: the images it decodes, and per chunk the image being decoded (-1: not started)
_image_sets: list[FolderImages | ArrowImages] = []
_reading: Array | None = None


def verify(image_sets: list[FolderImages | ArrowImages], workers: int, fix: str) -> None:
    """Decode every image of `image_sets`, as the loader will, in `workers` processes (no more than there are chunks
    of CHUNK images); DataError counting the unreadable ones, naming the first three, and `fix` (for one image); or,
    when a process died, naming what killed it (an image whose reading kills a process, or takes longer than
    READ_TIMEOUT_S)."""
    chunks = [(which, start, min(start + CHUNK, len(images)))
              for which, images in enumerate(image_sets) for start in range(0, len(images), CHUNK)]
    total = sum(map(len, image_sets))
    bad = []
    fork = multiprocessing.get_context("fork")
    reading = fork.RawArray("q", [-1] * len(chunks))
    pool = ProcessPoolExecutor(min(workers, len(chunks)), mp_context=fork, initializer=_start_worker,
                               initargs=(image_sets, reading))
    try:
        results = pool.map(_unreadable, range(len(chunks)), chunks)  # fork: every worker starts at the first submit
        with tqdm(total=total, desc="verifying images", unit="image") as bar:
            for (_, start, stop), reasons in zip(chunks, results):
                bad += reasons
                bar.update(stop - start)
    except BrokenProcessPool:
        pool.shutdown(cancel_futures=True)  # every worker gone: what each was reading stays as it was
        now = reading[:]
        raise _killed([(image_sets[which], now[number]) for number, (which, start, stop) in enumerate(chunks)
                       if start <= now[number] < stop], fix, fork) from None
    finally:
        pool.shutdown(cancel_futures=True)
    if bad:
        named = "; ".join(bad[:3]) + "; …" * (len(bad) > 3)
        raise DataError(f"{len(bad)} of {total} images cannot be read: {named}: {_for_each(len(bad), fix)}")


def _killed(reading: list[tuple[FolderImages | ArrowImages, int]], fix: str, fork: BaseContext) -> DataError:
    """What killed a verifying process, found by decoding each image the workers were reading alone in a process of
    its own: the images that kill that one too (a reader's crash), or else a kill for lack of memory."""
    deadly, endless = [], []
    for images, index in reading:
        alone = fork.Process(target=_decode_alone, args=(images, index), daemon=True)
        alone.start()
        alone.join(READ_TIMEOUT_S)
        if alone.exitcode is None:
            alone.kill()
            alone.join()
            endless.append(images.where(index))
        elif alone.exitcode < 0:
            deadly.append(f"{images.where(index)} ({_signal_name(-alone.exitcode)})")
    if deadly or endless:
        found = [f"decoding {' and '.join(deadly)} kills the process"] * bool(deadly) + [
            f"reading {' and '.join(endless)} takes longer than {READ_TIMEOUT_S} s"] * bool(endless)
        return DataError(f"{'; '.join(found)}: {_for_each(len(deadly) + len(endless), fix)}")
    alone_too = ", though each image it was reading decodes alone" * bool(reading)
    return DataError(f"a process decoding images was killed{alone_too}: most likely memory ran out: rerun with fewer "
                     "--workers")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal
        return f"signal {number}"


def _for_each(count: int, fix: str) -> str:
    return fix if count == 1 else f"for each, {fix}"


def _decode_alone(images: FolderImages | ArrowImages, index: int) -> None:
    _as_a_decoding_process()
    decoded(images.encoded(index)[1])


def _start_worker(image_sets: list[FolderImages | ArrowImages], reading: Array) -> None:
    global _image_sets, _reading
    _as_a_decoding_process()
    _image_sets, _reading = image_sets, reading


def _as_a_decoding_process() -> None:
    """A forked decoding process: Ctrl-C is the parent's to report, once; SIGALRM kills it (whatever handler the
    parent had); one thread, as DataLoader's workers (a forked child's parallel region after the parent's would
    deadlock)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    torch.set_num_threads(1)


def _unreadable(number: int, chunk: tuple[int, int, int]) -> list[str]:
    """Each unreadable image of chunk `number` (images `start` to `stop` of set `which`): its name and why."""
    which, start, stop = chunk
    reasons = []
    try:
        for index in range(start, stop):
            _reading[number] = index
            signal.alarm(READ_TIMEOUT_S)  # kills this process, even inside a decoder's C code, unless it is done first
            name, encoded = _image_sets[which].encoded(index)
            if isinstance(image := decoded(encoded), str):
                reasons.append(f"{name} ({image})")
    finally:  # a chunk's error goes to the parent; this process goes on with the next chunk, with no alarm set
        signal.alarm(0)
    _reading[number] = stop
    return reasons


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m dist_tsp.check_data",
                            description=__doc__,
                            epilog=f"An image whose reading takes longer than {READ_TIMEOUT_S} s (a decoder that "
                                   "loops on it,\na file system that stops answering) is named too.",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run's YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="the run's dotted overrides, e.g. data.root=/datasets/imagenet")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes decoding the images (every CPU this process may use)")
    with exits_in_one_line("dist-tsp check_data", "interrupted (Ctrl-C)"):
        args = parser.parse_intermixed_args(argv)
        if args.config is None and not args.overrides:
            parser.error("give the run's --config FILE, its key=value overrides, or both")
        if args.workers < 1:
            parser.error(f"--workers {args.workers}: give at least 1")
        cfg = load_config(args.config, args.overrides)
        if cfg.data.name not in STREAMABLE:
            raise ConfigError(f"data.name={cfg.data.name} is loaded whole and checked as a run starts; check_data "
                              f"checks the images a run reads from disk: data.name={' or '.join(STREAMABLE)}")
        # every image the run decodes, streamed here without its own decoding first (a statistics sample, or an
        # in-memory folder's images), which would stop at the first unreadable one
        read = load_dataset(cfg.data.model_copy(update={"normalization": "imagenet", "in_memory": False}), cfg.seed)
        verify([split.images for split in (read.train, read.val, read.test) if split is not None], args.workers,
               read.train.images.fix_unreadable)
        # as the run loads it: decoded into memory, or the same file lists with the run's normalisation
        dataset = load_dataset(cfg.data, cfg.seed) if cfg.data.in_memory else normalized(read, cfg.data.normalization)
        check_fills_a_batch(len(dataset.train), cfg.data.batch_size, 1, "data.batch_size")
    print(f"data.name={cfg.data.name}: {dataset.identity()}: every image can be read")


if __name__ == "__main__":
    main()
