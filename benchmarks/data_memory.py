"""Peak memory of a run's whole process tree (the rank and its loader workers) against the size of an image folder.

    python benchmarks/data_memory.py                       # 2,000 and 20,000 training images at 64 x 64
    python benchmarks/data_memory.py --sizes 200 2000      # a tiny version

Every folder has the same 1,000 test images (so the evaluation batches are full, and alike, in every run) and
--sizes training images. For each size, a baseline run (the demo's students learning from each other, no teacher,
in one process for 3 steps: `python dist_tsp/train.py --config configs/demo.yaml data.name=image_folder
data.root=DIR data.image_size=64 loss.alpha=1 loss.beta=0 loss.gamma=1 train.max_steps=3`), the same with a live
and with a cached teacher, and the folder decoded into memory (data.in_memory=true) for contrast. Memory is the sum
of the processes' proportional set sizes (PSS: pages shared by forked workers counted once in all), sampled every
50 ms. A run's peak varies by a couple of hundred MB from run to run (when loader workers start and how much of the
parent's heap they have copied by then), so each cell is the median peak of --rounds runs, with their range.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from step_breakdown import arguments, at_least, print_row, work_dir, work_folder
from tabulate import tabulate

from dist_tsp import checkpoint
from dist_tsp.errors import ArgumentParser
from dist_tsp.models import build_model

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ["data.name=image_folder", "data.image_size=64", "loss.alpha=1", "loss.beta=0", "loss.gamma=1",
            "train.max_steps=3"]
TSP = ["loss.alpha=0.1", "loss.beta=0.8", "loss.gamma=0.1"]
VARIANTS = {  # label: (overrides on top of the baseline, whether the teacher file is given)
    "none (mutual learning)": ([], False),
    "live (sharded)": ([*TSP, "teacher.mode=sharded"], True),
    "cached": ([*TSP, "teacher.mode=cached"], True),
    "none, in memory": (["data.in_memory=true"], False),
}
SAMPLE_S = 0.05


def make_folder(root: Path, train: int, test: int = 1000, classes: int = 10, size: int = 64) -> Path:
    """JPEGs of smooth colour with noise: `train` in train/, `test` in test/, over `classes` class folders."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)[None, :, None]
    for split, images in (("train", train), ("test", test)):
        for i in range(images):
            folder = root / split / f"class_{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, 3) * ramp + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def tree_pss(process: psutil.Process) -> int:
    """Bytes: the PSS of `process` and every descendant."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def peak_memory(command: list[str], log: Path) -> int:
    """Run `command` to the end; the peak PSS of its process tree."""
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        watched, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            peak = max(peak, tree_pss(watched))
            time.sleep(SAMPLE_S)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {process.returncode}): see {log}")
    return peak


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=at_least(1), nargs="+", default=[2000, 20000],
                        help="training images per folder")
    parser.add_argument("--work-dir", type=work_folder, default=None,
                        help="where folders and runs go (default: a temp dir)")
    parser.add_argument("--rounds", type=at_least(1), default=3, help="runs per cell (the median peak is reported)")
    parser.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="TEACHER",
                        help=f"these rows only ({', '.join(map(repr, VARIANTS))})")
    args = arguments(parser)
    with work_dir(args.work_dir, "dist-tsp-memory-") as work:
        teacher = work / "teacher.pt"
        checkpoint.save_atomic({"model": build_model("resnet_cifar", 10, depth=8, width=16).state_dict()}, teacher)
        rows, first = [], {}
        for images in args.sizes:
            folder = work / f"folder_{images}"
            if not (folder / "test").is_dir():
                make_folder(folder, images)
            for number, (label, (overrides, with_teacher)) in enumerate(VARIANTS.items()):
                if label not in args.only:
                    continue
                run = work / f"run_{images}_{number}"
                given = [f"teacher.checkpoint={teacher}", f"teacher.cache_dir={work / 'cache'}"] if with_teacher else []
                command = [sys.executable, "dist_tsp/train.py", "--config", "configs/demo.yaml", *BASELINE,
                           f"data.root={folder}", f"output_dir={run}", "resume=off", *given, *overrides]
                peaks = sorted(peak_memory(command, run.with_suffix(".log")) / 2**20 for _ in range(args.rounds))
                peak = statistics.median(peaks)
                first.setdefault(label, peak)
                rows.append([f"{images:,}", label, f"{peak:,.0f}", f"{peaks[0]:,.0f}–{peaks[-1]:,.0f}",
                             f"{peak - first[label]:+,.0f}"])
                print_row(rows[-1])
    print(tabulate(rows, headers=["training images", "teacher", "peak MB (tree PSS, median)", "range",
                                  f"vs {args.sizes[0]:,}"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
