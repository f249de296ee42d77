"""Teacher time per training step and teacher memory per rank, in every teacher.mode, for W = 1, 2, 3.

    python benchmarks/teacher_modes.py                  # CPU, W = 1, 2, 3 (gloo), a ResNet-20 teacher
    python benchmarks/teacher_modes.py --quick          # tiny (what CI runs)
    python benchmarks/teacher_modes.py --teacher resnet50 --gpu   # one process per GPU (NCCL)
    python benchmarks/teacher_modes.py --data data.name=npz data.root=DIR   # other images than the demo's digits

For each W, one real `accelerate launch` of W processes (one student's place per rank, W peers)
runs this file with --worker: every mode builds the teacher as a run does (dist_tsp.teacher), then
times --steps calls for a batch of --batch images (after warm-up), the slowest rank counting. The
cached mode's one-off cost (computing an epoch of logits over all ranks) is shown apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from step_breakdown import arguments, at_least, work_dir, work_folder
from tabulate import tabulate

from dist_tsp.config import TEACHER_MODES, load_config
from dist_tsp.errors import ArgumentParser, UserError
from dist_tsp.side_by_side import port_of_its_own

ROOT = Path(__file__).resolve().parents[1]
ADVICE = """Which mode when:
- cached: the teacher is fixed and the same views recur (sweeps, seeds sharing teacher.cache_dir): the step pays
  only a read; its one-off cost is one teacher pass per epoch, split over all ranks.
- sharded (default): the teacher fits every device; each rank runs 1/G of the batch and one all-gather joins it.
- replicated: a single rank, or a teacher so small that the all-gather costs more than the forward it saves.
- fsdp / deepspeed: the teacher does not fit one device; each rank holds 1/W of its parameters and gathers them
  layer by layer in the forward (more communication per step). DeepSpeed adds CPU/NVMe parameter offload."""


def worker(args: argparse.Namespace) -> None:
    """One rank: every mode's teacher time per step and bytes held; rank 0 writes the JSON."""
    import torch
    import torch.distributed as dist

    from dist_tsp import checkpoint
    from dist_tsp.config import load_config
    from dist_tsp.data import eval_batches
    from dist_tsp.models import build_model
    from dist_tsp.placement import Groups, Placement
    from dist_tsp.run_control import StopRequest
    from dist_tsp.teacher import prepare_teacher, teacher_logits
    from dist_tsp.teacher_modes import gathered_logits
    from dist_tsp.train import start

    world = int(os.environ.get("WORLD_SIZE", "1"))
    teacher_args = json.loads(args.teacher_args)
    students = ", ".join(f"{{name: s{i}, model: lenet}}" for i in range(world))

    def config(mode: str, teacher_file: Path | None = None):
        return load_config(None, [
            f"students=[{students}]", f"output_dir={args.work_dir / f'W{world}-{mode}'}",
            f"teacher.model={args.teacher}", f"teacher.args={json.dumps(teacher_args)}",
            *([f"teacher.checkpoint={teacher_file}"] if teacher_file else []), f"teacher.mode={mode}",
            f"teacher.cache_dir={args.work_dir / f'cache-W{world}'}", *args.data, f"data.batch_size={args.batch}"])

    accelerator, data, _ = start(config(args.modes[0]), trackers=False)  # as a run starts; data for all modes
    placement = Placement(world_size=world, rank=accelerator.process_index, num_students=world)
    groups = Groups.from_mesh(placement.build_mesh(accelerator.device.type))
    shape = "-".join([args.teacher, *(f"{k}{v}" for k, v in teacher_args.items()), f"{data.num_classes}classes"])
    teacher_file = args.work_dir / f"{shape}.pt"  # an untrained teacher for the data's classes: its cost is measured
    if accelerator.is_main_process and not teacher_file.is_file():
        model = build_model(args.teacher, data.num_classes, **teacher_args)
        checkpoint.save_atomic({"model": model.state_dict()}, teacher_file)
    accelerator.wait_for_everyone()
    rows = []
    for mode in args.modes:
        cfg = config(mode, teacher_file)
        model, info, _ = prepare_teacher(cfg, data, accelerator, groups)
        source = teacher_logits(cfg, model, info, data, accelerator, groups, StopRequest())
        started = time.perf_counter()
        source.start_epoch(0)  # the cache's one-off pass; nothing for the other modes
        one_off = time.perf_counter() - started
        batch = next(eval_batches(data.train, args.batch, data.normalize))  # the first training images
        for _ in range(3):
            gathered_logits(source, batch, groups.peer)
        synchronize(accelerator.device)
        started = time.perf_counter()
        for _ in range(args.steps):
            gathered_logits(source, batch, groups.peer)
        synchronize(accelerator.device)
        step_ms = torch.tensor([1000 * (time.perf_counter() - started) / args.steps], device=accelerator.device)
        if world > 1:
            dist.all_reduce(step_ms, op=dist.ReduceOp.MAX)
        rows.append({"mode": mode, "world": world, "images": len(data.train), "step_ms": step_ms.item(),
                     "one_off_s": one_off, "bytes_full": info.parameter_bytes,
                     "bytes_per_rank": info.parameter_bytes_per_rank})
        del model, source
    if accelerator.is_main_process:
        (args.work_dir / f"W{world}.json").write_text(json.dumps(rows))
    accelerator.end_training()  # ends the process groups: gloo may abort at exit with groups still open


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def launch(world: int, args: argparse.Namespace) -> list[dict]:
    """One `accelerate launch` of W workers; their rows."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes",
                str(world), "--mixed_precision", "no", *port_of_its_own()]
    launcher += ["--multi_gpu"] if args.gpu and world > 1 else []
    launcher += [] if args.gpu or world == 1 else ["--config_file", str(ROOT / "configs" / "accelerate" / "cpu.yaml")]
    launcher += ["--cpu"] if not args.gpu and world == 1 else []
    command = [*launcher, __file__, "--worker", "--work-dir", str(args.work_dir), "--teacher", args.teacher,
               "--teacher-args", args.teacher_args,
               "--steps", str(args.steps), "--batch", str(args.batch), "--modes", *args.modes, "--data", *args.data]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark launch with W={world} failed:\n{done.stderr[-4000:]}")
    return json.loads((args.work_dir / f"W{world}.json").read_text())


def check_benchmark(args: argparse.Namespace) -> None:
    """What every launched rank would otherwise meet with its own traceback: a teacher or data overrides the runs
    cannot build."""
    if args.teacher_args is not None:
        try:
            teacher_args = json.loads(args.teacher_args)
        except ValueError:
            teacher_args = None
        if not isinstance(teacher_args, dict):
            raise UserError(f"--teacher-args {args.teacher_args}: give a JSON object, e.g. '{{\"depth\": 20}}'")
    load_config(None, ["students=[{name: s0, model: lenet}]", f"teacher.model={args.teacher}", *args.data])


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny: W = 3, a small teacher, a few steps (what CI runs)")
    parser.add_argument("--gpu", action="store_true", help="one process per GPU (NCCL)")
    parser.add_argument("--teacher", default="resnet_cifar", help="a registry model (default: ResNet-20 for CIFAR)")
    parser.add_argument("--teacher-args", default=None,
                        help='its constructor arguments as JSON (default: {"depth": 20, "width": 16} for resnet_cifar)')
    parser.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE",
                        help="data.* overrides of every run: other images than the demo's digits (which need "
                        "scikit-learn), the teacher made for their classes")
    parser.add_argument("--worlds", type=at_least(1), nargs="+", default=[1, 2, 3])
    parser.add_argument("--modes", nargs="+", default=list(TEACHER_MODES), choices=TEACHER_MODES)
    parser.add_argument("--steps", type=at_least(1), default=20)
    parser.add_argument("--batch", type=at_least(1), default=128, help="images per step (one peer group's batch)")
    parser.add_argument("--work-dir", type=work_folder,
                        help="keep teacher, caches and JSON here (default: a temp folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = arguments(parser, check_benchmark)
    if args.worker:
        return worker(args)  # launched by launch(), with its --work-dir
    if args.teacher_args is None:
        args.teacher_args = json.dumps({"depth": 20, "width": 16} if args.teacher == "resnet_cifar" else {})
    if args.quick:
        args.worlds, args.steps, args.batch, args.teacher_args = [3], 3, 48, '{"depth": 8, "width": 8}'
    with work_dir(args.work_dir, "dist-tsp-teacher-bench-") as args.work_dir:
        rows = [row for world in args.worlds for row in launch(world, args)]
    table = [[r["mode"], r["world"], f"{r['step_ms']:.2f}", f"{r['one_off_s']:.1f}" if r["mode"] == "cached" else "-",
              f"{r['bytes_full'] / 2**20:.2f}", f"{max(r['bytes_per_rank']) / 2**20:.2f}",
              f"{max(r['bytes_per_rank']) / r['bytes_full']:.2f}"] for r in sorted(rows, key=lambda r: r["world"])]
    data = f"{' '.join(args.data) or 'the demo digits (data.name=digits)'} ({rows[0]['images']} training images)"
    print(f"Teacher {args.teacher} {args.teacher_args}, data {data}, batch {args.batch}, {args.steps} timed steps, "
          "slowest rank\n")
    print(tabulate(table, headers=["mode", "W", "teacher ms/step", "cache build s/epoch", "teacher MiB",
                                   "MiB per rank", "share"], tablefmt="github"))
    print(f"\n{ADVICE}")


if __name__ == "__main__":
    main()
