"""What a top-k teacher cache changes: the KD term and the students' accuracy, dense cache against top-k.

    python benchmarks/topk_cache.py                  # 100 classes, k = 10
    python benchmarks/topk_cache.py --classes 20 --k 5 --epochs 1   # a tiny version

A generated image folder with --classes classes (each class a colour pattern plus noise), one teacher trained on it,
then the same KD run (the demo's students, one process) three times, the teacher's logits read from its cache:
dense float32, top-k float32 and top-k float16. Reported per cache: the KD term of the first step (the same
weights and batch in every run, so the difference is the cache's alone), the mean KD term over training, and
the students' final test accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from step_breakdown import arguments, at_least, print_row, work_dir, work_folder
from tabulate import tabulate

from dist_tsp.errors import ArgumentParser, UserError

ROOT = Path(__file__).resolve().parents[1]
CACHES = {"dense float32": [], "top-k float32": ["teacher.cache_topk={k}"],
          "top-k float16": ["teacher.cache_topk={k}", "teacher.cache_precision=float16"]}


def make_folder(root: Path, classes: int, train: int, test: int, size: int = 32) -> Path:
    """Per class a fixed random 4x4 colour pattern, upsampled, plus noise."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (classes, 4, 4, 3))
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.kron(patterns[c], np.ones((size // 4, size // 4, 1)))
            for i in range(count):
                pixels = base + rng.normal(0, 40, base.shape)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def run(args: list[str], log: Path) -> None:
    with open(log, "w") as output:
        subprocess.run([sys.executable, "dist_tsp/train.py", "--config", "configs/demo.yaml", *args], cwd=ROOT,
                       stdout=output, stderr=subprocess.STDOUT, check=True)


def check_benchmark(args: argparse.Namespace) -> None:
    if args.k > args.classes:
        raise UserError(f"--k {args.k}: give at most --classes ({args.classes})")
    if not args.temperature > 0:
        raise UserError(f"--temperature {args.temperature:g}: give one above 0")


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=at_least(2), default=100)
    parser.add_argument("--k", type=at_least(1), default=10)
    parser.add_argument("--epochs", type=at_least(1), default=3, help="student epochs")
    parser.add_argument("--temperature", type=float, default=4.0, help="loss.temperature (the demo's: 4)")
    parser.add_argument("--work-dir", type=work_folder, default=None)
    args = arguments(parser, check_benchmark)
    with work_dir(args.work_dir, "dist-tsp-topk-") as work:
        folder = work / "folder"
        if not (folder / "test").is_dir():
            make_folder(folder, args.classes, train=24, test=8)
        common = ["data.name=image_folder", f"data.root={folder}", "data.in_memory=true", "data.batch_size=64",
                  f"teacher.checkpoint={work / 'teacher.pt'}", "teacher.epochs=6", "teacher.mode=cached",
                  "loss.alpha=0.1", "loss.beta=0.9", "loss.gamma=0", f"loss.temperature={args.temperature:g}",
                  f"train.epochs={args.epochs}", "train.log_every=1"]
        rows = []
        for label, extra in CACHES.items():
            out = work / f"{label.replace(' ', '_')}_T{args.temperature:g}"
            run([*common, f"output_dir={out}", f"teacher.cache_dir={work / 'cache'}",
                 *(e.format(k=args.k) for e in extra)], out.with_suffix(".log"))
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            train = [m for m in metrics if "train/lenet/kd" in m]
            results = json.loads((out / "results.json").read_text())
            names = list(results["students"])
            first_kd = np.mean([train[0][f"train/{n}/kd"] for n in names])
            mean_kd = np.mean([m[f"train/{n}/kd"] for m in train for n in names])
            accuracies = [100 * results["students"][n]["test_acc"] for n in names]
            rows.append([label, f"{first_kd:.5f}", f"{mean_kd:.4f}", *(f"{a:.2f}" for a in accuracies)])
            print_row(rows[-1])
        teacher = json.loads((work / f"dense_float32_T{args.temperature:g}" / "results.json").read_text())["teacher"]
    dense_first = float(rows[0][1])
    for row in rows:
        row.insert(2, f"{100 * (float(row[1]) - dense_first) / dense_first:+.3f} %")
    print(f"\n{args.classes} classes, k = {args.k}, T = {args.temperature:g}, teacher test accuracy "
          f"{100 * teacher['test_acc']:.2f} %")
    print(tabulate(rows, headers=["teacher cache", "KD term, step 1", "vs dense", "KD term, mean",
                                  *(f"{n} test %" for n in names)], tablefmt="github"))


if __name__ == "__main__":
    main()
