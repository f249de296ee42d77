"""Loader throughput per source, and the data share of a training step on a streamed folder.

    python benchmarks/loader.py                  # 256 ImageNet-size JPEGs; workers 0, 1, 2; the demo step on 3 ranks
    python benchmarks/loader.py --quick          # a tiny version

1. Decode alone: TorchCodec's JPEG decoder on the CPU (and on the GPU, nvJPEG, when one is present), images/s in
   one process.
2. Each source through the run's loader (dist_tsp: a batch plan, DataLoader workers, views, the device):
   ImageNet-style training views (RandomResizedCrop 224 + flip) from a streamed folder and from the same images
   in Arrow shards (python -m dist_tsp.shards), evaluation views (Resize 256 + CenterCrop 224), and padded-crop
   views of the same images decoded into memory, images/s per rank and per worker, in a random order.
3. The data share of a step: the demo's students on 3 CPU ranks learning from a streamed 32-px folder, from the
   run's own profile (train.profile=true): the time a step waits for its batch over the step's time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from step_breakdown import arguments, at_least, print_row, work_dir, work_folder
from tabulate import tabulate
from torchcodec.decoders import decode_image, decode_jpeg

from dist_tsp.config import DataConfig
from dist_tsp.data import load_dataset
from dist_tsp.errors import ArgumentParser
from dist_tsp.shards import convert
from dist_tsp.side_by_side import port_of_its_own

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (640, 480))  # typical ImageNet photos (w, h)


def make_folder(root: Path, images: int, sizes: tuple[tuple[int, int], ...], classes: int = 4) -> Path:
    """JPEGs (quality 90) of smooth colour plus noise, a quarter as many in test/ as in train/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("test", max(classes, images // 4))):
        for i in range(count):
            w, h = sizes[i % len(sizes)]
            ramp = np.linspace(0, 1, w)[None, :, None] * np.linspace(1, 0.5, h)[:, None, None]
            pixels = rng.integers(0, 256, 3) * ramp + rng.normal(0, 25, (h, w, 3))
            folder = root / split / f"class_{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def decode_rate(files: list[Path], device: str) -> float:
    """Images/s decoding `files` (read beforehand) on `device`, in this process."""
    encoded = [f.read_bytes() for f in files]
    decode = decode_image if device == "cpu" else (lambda data: decode_jpeg(data, device=device))
    decode(encoded[0])
    started = time.perf_counter()
    for data in encoded:
        decode(data)
    if device != "cpu":
        torch.cuda.synchronize()
    return len(encoded) / (time.perf_counter() - started)


def loader_rate(cfg: DataConfig, workers: int, train: bool, batch: int = 16) -> float:
    """Images/s of the run's loader over its split, in a random order: one pass to start the (persistent) workers,
    then a timed pass."""
    data = load_dataset(cfg.model_copy(update={"loader_workers": workers}), seed=0)
    split = data.train if train else data.test
    augmentation = data.augmentation(0, enabled=True) if train else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = torch.randperm(len(split)).split(batch)
    loader = split.to(device).loader(augmentation, device, persistent=True)
    for _ in loader(plan, 0 if train else None):
        pass
    started = time.perf_counter()
    count = sum(len(images) for images in loader(plan, 1 if train else None))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def step_share(work: Path, steps: int) -> float:
    """The worst rank's data % of a step: the demo's students on 3 CPU ranks, a streamed 32-px folder."""
    folder = work / "small"
    if not (folder / "test").is_dir():
        make_folder(folder, 1536, ((32, 32),), classes=10)
    run = work / "step"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "cpu.yaml"), "--num_processes", "3", *port_of_its_own(),
               str(ROOT / "dist_tsp" / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               "data.name=image_folder", f"data.root={folder}", f"output_dir={run}", "teacher.epochs=1",
               f"train.max_steps={steps}", "train.epochs=100", f"train.log_every={steps}", "train.profile=true",
               "resume=off"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.loads(p.read_text()) for p in sorted((run / "profile").glob("rank*.json"))]
    return max(100 * r["ms"]["data"] / r["step_ms"] for r in ranks)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=at_least(1), default=256, help="ImageNet-size training JPEGs")
    parser.add_argument("--workers", type=at_least(0), nargs="+", default=[0, 1, 2], help="loader workers per rank")
    parser.add_argument("--steps", type=at_least(1), default=60, help="steps of the demo run for the data share")
    parser.add_argument("--quick", action="store_true", help="48 images, workers 0 and 1, 15 steps")
    parser.add_argument("--work-dir", type=work_folder, default=None)
    args = arguments(parser)
    if args.quick:
        args.images, args.workers, args.steps = 48, [0, 1], 15
    with work_dir(args.work_dir, "dist-tsp-loader-") as work:
        folder = work / f"imagenet_size_{args.images}"
        if not (folder / "test").is_dir():
            make_folder(folder, args.images, IMAGENET_SIZES)
        files = sorted((folder / "train").rglob("*.jpg"))
        rows = [["decode only (TorchCodec, CPU)", "-", f"{decode_rate(files, 'cpu'):.0f}", "-"]]
        if torch.cuda.is_available():
            rows.append(["decode only (TorchCodec, GPU nvJPEG)", "-", f"{decode_rate(files, 'cuda'):.0f}", "-"])
        shards = work / f"arrow_{args.images}"
        if not (shards / "test").is_dir():
            convert(folder, shards, max_shard_size="64MB")
        streamed = DataConfig(name="image_folder", root=folder, image_size=224, crop="random_resized",
                              normalization="imagenet")
        arrow = streamed.model_copy(update={"name": "arrow", "root": shards})
        in_memory = DataConfig(name="image_folder", root=folder, image_size=224, in_memory=True,
                               normalization="imagenet")
        for label, cfg, train in (("folder, streamed: RandomResizedCrop 224 + flip", streamed, True),
                                  ("Arrow shards, streamed: RandomResizedCrop 224 + flip", arrow, True),
                                  ("folder, streamed: Resize 256 + CenterCrop 224", streamed, False),
                                  ("folder in memory (224 px): padded crop + flip", in_memory, True)):
            for workers in args.workers if cfg.in_memory is None else [0]:
                rate = loader_rate(cfg, workers, train)
                rows.append([label, workers, f"{rate:.0f}", f"{rate / max(workers, 1):.0f}"])
                print_row(rows[-1])
        print(tabulate(rows, headers=["source: views", "workers", "images/s per rank", "images/s per worker"],
                       tablefmt="github"))
        share = step_share(work, args.steps)
    print(f"\ndata share of a step, demo students on 3 CPU ranks, streamed 32-px folder (worst rank): {share:.2f} % "
          f"(target <= 2 %: {'met' if share <= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
