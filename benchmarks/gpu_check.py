"""The GPU check, one command and one markdown report: is the captured step right, how fast is each step beside the
floor of the same step written minimally, does bf16 pay, the fast CIFAR teacher, the paper's protocol, the teacher
modes.

    python benchmarks/gpu_check.py                          # CIFAR-size synthetic data (5 min targeted, unmeasured)
    python benchmarks/gpu_check.py --cifar10 DATA           # CIFAR-10 as an image folder: {train,test}/<class>/*
    python benchmarks/gpu_check.py --cifar10 DATA --seeds 3 # the protocol's 3-seed target
    python benchmarks/gpu_check.py --quick                  # tiny, on any device: on a CPU all but the capture

Parts (--parts, default all): correctness (the captured step against the same step uncaptured, bitwise, in fp32 and
bf16; against the eager step; a resume on the GPU), steps (eager and captured, fp32 and bf16, with train.profile,
beside the floor: three students' forward, backward and Adam, the teacher's forward and the TSP loss, captured in
one CUDA graph), teacher (configs/paper/teacher_airbench.yaml: time and test accuracy), protocol (scratch, KD, TSP for
--seeds seeds, teacher shared), modes (benchmarks/teacher_modes.py on one GPU). The images are decoded once into
data.name=npz arrays, so that no part needs TorchCodec. A part that needs a missing package, or no GPU, says so in
one line; a part that fails says why (with the end of each unfinished run's log) and the next part runs; on a GPU a
command that hangs is killed after a time limit (below). The report goes to --out and to stdout, rewritten after
every part; Ctrl-C or SIGTERM (a `timeout` around the check) ends it there, the interrupted part saying what it got
done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# this checkout's dist_tsp, here and in every run it starts, also where it is not installed (a lent GPU machine)
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
# What the check cannot run without (import name: what pip installs): pydantic and its three dependencies and
# tabulate, which a GPU machine's image may lack; pyyaml, tqdm and psutil, which come with accelerate
REQUIRED = {"pydantic": "pydantic", "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
            "typing_inspection": "typing-inspection", "tabulate": "tabulate", "yaml": "pyyaml", "tqdm": "tqdm",
            "psutil": "psutil"}
if missing := [package for name, package in REQUIRED.items() if find_spec(name) is None]:
    sys.exit(f"gpu_check.py: error: {', '.join(missing)} not installed, without which dist-tsp cannot run: install "
             "them, or on a machine without internet carry their wheels (README.md, The GPU check)")

from step_breakdown import (  # noqa: E402
    arguments,
    at_least,
    profile,
    run_command,
    stop_commands,
    train,
    work_dir,
    work_folder,
)
from tabulate import tabulate  # noqa: E402

from dist_tsp import checkpoint  # noqa: E402
from dist_tsp.config import LOSS_PRESETS, LOSS_WEIGHTS, TEACHER_MODES, load_config  # noqa: E402
from dist_tsp.errors import ArgumentParser, UserError  # noqa: E402
from dist_tsp.models import build_model  # noqa: E402
from dist_tsp.report import RESULTS_LINE  # noqa: E402
from dist_tsp.streaming import EXTENSIONS  # noqa: E402

PARTS = ("correctness", "steps", "teacher", "protocol", "modes")
RECIPE = ROOT / "configs" / "paper" / "teacher_airbench.yaml"
PAPER = ROOT / "configs" / "paper" / "tsp.yaml"
STUDENTS = ("alexnet", "lenet", "mobilenet")
TSP = [f"loss.{k}={w}" for k, w in zip(LOSS_WEIGHTS, LOSS_PRESETS["tsp"])]
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PRECISION = {"no": "fp32", "bf16": "bf16"}  # --mixed_precision: the name in the report
OPTIONAL = ("wandb", "deepspeed", "torchcodec", "datasets", "matplotlib")
# What a run says where cuDNN has no kernel for a convolution under train.deterministic=true
CUDNN_WITHOUT_KERNEL = re.compile(r"unable to find an engine|CUDNN_STATUS_NOT_SUPPORTED|no deterministic convolution")
# On a GPU (lent for minutes): seconds before a command is killed, so that one hung run loses one part, not the rest.
# Several times what each took on an H200; per seed for the protocol. On a CPU commands are not timed out.
GPU_LIMITS_S = {"run": 240, "teacher": 300, "protocol": 150, "modes": 180}


def main() -> None:
    limits = ("time limits on a GPU: {run} s per training run (correctness, steps), {teacher} s for the teacher,\n"
              "{protocol} s per protocol seed, {modes} s for the modes").format(**GPU_LIMITS_S)
    parser = ArgumentParser(description=__doc__, epilog=limits, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar10", type=Path, help="CIFAR-10 as an image folder (train/<class>/*.jpg, test/...)")
    parser.add_argument("--seeds", type=at_least(1), default=1, help="protocol seeds (1; 3 for the 3-seed target)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs, on any device")
    parser.add_argument("--out", type=Path, default=Path("gpu_report.md"), help="the markdown report")
    parser.add_argument("--work-dir", type=work_folder, help="keep the runs here (default: a temporary directory); a "
                        "check rerun there reuses the decoded images and the teacher part's teacher, and redoes each "
                        "part it runs")
    args = arguments(parser, check_arguments)  # before anything is decoded or run, on a GPU lent for minutes
    parts = [p for p in args.parts.split(",") if p]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: the running command's processes go too
    try:
        with work_dir(args.work_dir, "dist-tsp-gpu-check-") as work:
            check = GpuCheck(work, args.quick, write_data(work / "data", args.cifar10, args.quick), args.seeds,
                             real_data=args.cifar10 is not None)
            run_parts(check, parts, environment(args.cifar10), args.out)
    except KeyboardInterrupt:
        sys.exit(f"gpu_check.py: interrupted (Ctrl-C or SIGTERM); the parts done so far are in {args.out}")


def check_arguments(args: argparse.Namespace) -> None:
    """UserError, naming the fix, for arguments the check would meet late (a part, a folder)."""
    if unknown := [p for p in args.parts.split(",") if p and p not in PARTS]:
        raise UserError(f"--parts: unknown part {unknown[0]!r}: choose from {', '.join(PARTS)}")
    if args.cifar10 is not None and (missing := next((args.cifar10 / split / name for split in ("train", "test")
                                                      for name in CIFAR_CLASSES
                                                      if not (args.cifar10 / split / name).is_dir()), None)):
        raise UserError(f"--cifar10 {args.cifar10}: {missing} is not a folder: give CIFAR-10 as an image folder, "
                        "train/<class>/* and test/<class>/* for its 10 classes (as unpack_cifar10.py writes it)")
    if args.out.is_dir() or not args.out.absolute().parent.is_dir():
        raise UserError(f"--out {args.out}: give a file in a folder that exists")


def run_parts(check: GpuCheck, parts: list[str], environment_lines: str, out: Path) -> None:
    """Each part in turn, into the report at `out` (and stdout), rewritten after every part so that a check cut short
    keeps what it did: a failed part says why and the next one runs; an interrupted one says what it got done."""
    sections = []

    def report(section: str) -> None:
        sections.append(section)
        print(f"\n{section}", flush=True)
        out.write_text("\n\n".join(sections) + "\n")

    report(f"# dist-tsp GPU check\n\n{environment_lines}\n- parts: {', '.join(parts)}")
    for part in parts:
        started = time.perf_counter()
        check.clear(part)
        try:
            body = getattr(check, part)()
        except (Exception, SystemExit) as error:
            body = f"**failed**: {str(error).strip()[-8000:]}"
        except KeyboardInterrupt:
            report(f"## {part} (interrupted after {time.perf_counter() - started:.0f} s)\n\n"
                   f"{check.unfinished(part) or 'nothing finished'}")
            raise
        report(f"## {part} ({time.perf_counter() - started:.0f} s)\n\n{body}")


def environment(cifar10: Path | None) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"
    missing = [name for name in OPTIONAL if find_spec(name) is None]
    return (f"- device: {device}; torch {torch.__version__}; Python {platform.python_version()}\n"
            f"- data: {cifar10 or 'synthetic, CIFAR-10 sized (accuracies are not meaningful)'}\n"
            f"- not installed here: {', '.join(missing) or 'none (' + ', '.join(OPTIONAL) + ' all are)'}")


def write_data(folder: Path, cifar10: Path | None, quick: bool) -> list[str]:
    """The data overrides of every run: CIFAR-10 (or random images of its size) as data.name=npz arrays (the
    batch size aside), made once per work folder; a check of other data (--cifar10, --quick) is refused there."""
    folder.mkdir(parents=True, exist_ok=True)
    source, record = {"cifar10": cifar10 and str(cifar10.resolve()), "quick": quick}, folder / "source.json"
    if record.is_file() and (made := json.loads(record.read_text())) != source:
        sys.exit(f"gpu_check.py: error: --work-dir {folder.parent} holds a check of other data ({made}, this one "
                 f"{source}): give this check another --work-dir, or the same --cifar10 and --quick")
    record.write_text(json.dumps(source))
    sizes = {"train": 512 if quick else 50_000, "test": 256 if quick else 10_000}
    for split, size in sizes.items():
        path = folder / f"{split}.npz"
        if path.is_file():
            continue
        if cifar10 is None:
            rng = np.random.default_rng(len(split))
            images, labels = rng.integers(0, 256, (size, 32, 32, 3), np.uint8), rng.integers(0, 10, size)
        else:
            images, labels = decode_folder(cifar10 / split, size if quick else None)
        partial = folder / f"{split}.partial.npz"  # a check cut short leaves no npz that a rerun would take as whole
        np.savez(partial, images=images, labels=labels, classes=np.array(CIFAR_CLASSES))
        partial.replace(path)
    return ["data.name=npz", f"data.root={folder}"]


def decode_folder(split: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """An image folder's images [N, 32, 32, 3] and labels, decoded with Pillow (every CIFAR class folder)."""
    from PIL import Image

    files = [(path, label) for label, name in enumerate(CIFAR_CLASSES) for path in sorted((split / name).iterdir())
             if path.suffix.lower() in EXTENSIONS]  # not a stray .DS_Store
    files = files[:: max(1, len(files) // limit)][:limit] if limit else files
    with ThreadPoolExecutor() as pool:
        images = list(pool.map(lambda item: np.asarray(Image.open(item[0]).convert("RGB")), files))
    return np.stack(images), np.array([label for _, label in files])


class GpuCheck:
    """The parts; each returns its markdown."""

    def __init__(self, work: Path, quick: bool, data: list[str], seeds: int, *, real_data: bool) -> None:
        self.work, self.quick, self.seeds, self.real_data = work, quick, seeds, real_data
        self.images, self.data = data, [*data, "data.batch_size=128"]  # the images; the data overrides of a run
        self.cuda = torch.cuda.is_available()
        self.limits = GPU_LIMITS_S if self.cuda else dict.fromkeys(GPU_LIMITS_S)
        self.step_rows: list[list[str]] = []  # the steps part's rows so far (what an interrupted one reports)
        self.teacher_file = work / "untrained_teacher.pt"  # the demo's teacher shape: its cost is what is measured
        if not self.teacher_file.is_file():
            demo = load_config(ROOT / "configs" / "demo.yaml")
            model = build_model(demo.teacher.model, 10, **demo.teacher.args)
            checkpoint.save_atomic({"model": model.state_dict()}, self.teacher_file)
        students = "students=[" + ", ".join(f"{{name: {s}, model: {s}}}" for s in STUDENTS) + "]"
        self.paper_size = [*self.data, students, *TSP, f"teacher.checkpoint={self.teacher_file}",
                           "teacher.mode=replicated", "train.epochs=1000"]

    def clear(self, part: str) -> None:
        """Remove what an earlier check in this work folder left of `part`: its runs would be resumed or reused, not
        measured. The decoded images stay, and so does the teacher trained by an earlier teacher part, which the
        protocol part uses (a check cut in two: --parts correctness,steps,teacher, then --parts protocol,modes)."""
        for left in self.work.glob(f"{part}*"):
            shutil.rmtree(left)

    def _run(self, name: str, overrides: list[str], precision: str = "no") -> Path:
        run = self.work / name
        train(run, [*self.paper_size, *overrides], 1, ["--mixed_precision", precision], self.limits["run"])
        return run

    def correctness(self) -> str:
        """The captured step against itself uncaptured (bitwise), against the eager step, and resumed; cuDNN on its
        deterministic kernels, so that a difference is the capture's (on its default ones where those fail)."""
        steps, note = 8, ""
        try:
            done = self._correctness_runs(steps, deterministic=True)
        except (Exception, SystemExit) as error:
            if not CUDNN_WITHOUT_KERNEL.search(str(error)):
                raise
            done = self._correctness_runs(steps, deterministic=False)
            note = ("\n\ncuDNN's deterministic kernels failed here, so these runs used its default ones (a difference "
                    f"may be cuDNN's): {end_of(error)}")
        rows = [
            ["captured = uncaptured, fp32 (losses of every step, final weights)",
             *same(done["captured"], done["uncaptured"], steps), "bitwise"],
            ["captured = uncaptured, bf16", *same(done["captured bf16"], done["uncaptured bf16"], steps), "bitwise"],
            ["resumed after step 4 = uninterrupted (captured)",
             *same(done["resumed"], done["captured constant"], steps), "bitwise"],
        ]
        eager, captured = train_rows(done["eager"]), train_rows(done["captured"])
        rows.append(["eager = captured, step 1 losses (same weights, same dropout)",
                     f"{max_relative(eager[:1], captured[:1]):.1e}", "", "<= 1e-5"])
        rows.append([f"eager vs captured, steps 2-{steps} (foreach vs fused Adam)",
                     f"{max_relative(eager[1:], captured[1:]):.1e}", "", "reported"])
        if not self.cuda:
            note += "\n\nNo CUDA device: the 'captured' runs ran the graph-ready step without capture."
        return tabulate(rows, headers=["check", "losses", "weights", "required"], tablefmt="github") + note

    def _correctness_runs(self, steps: int, deterministic: bool) -> dict[str, Path]:
        """The correctness part's runs, all at once: their directories by name."""
        folder = "correctness" if deterministic else "correctness-default-kernels"
        exact = ["train.log_every=1", f"train.deterministic={str(deterministic).lower()}"]
        cosine = [f"train.max_steps={steps}", *exact, "train.optimizer.schedule=cosine"]
        runs = {
            "eager": (["train.step=eager", *cosine], "no"),
            "captured": (["train.step=graph", *cosine], "no"),
            "uncaptured": (["train.step=graph", "train.graph_warmup=1000", *cosine], "no"),
            "captured bf16": (["train.step=graph", *cosine], "bf16"),
            "uncaptured bf16": (["train.step=graph", "train.graph_warmup=1000", *cosine], "bf16"),
            "captured constant": (["train.step=graph", f"train.max_steps={steps}", *exact], "no"),
        }
        resumed = ["train.step=graph", *exact, "resume=auto"]

        stopped = threading.Event()  # another run failed: the resumed one does not start its second half

        def run_resumed() -> Path:  # 4 steps (3 eager, 1 replayed), then 4 more from the checkpoint
            self._run(f"{folder}/resumed", [*resumed, "train.max_steps=4"])
            if stopped.is_set():
                raise RuntimeError("stopped: another run failed")
            return self._run(f"{folder}/resumed", [*resumed, f"train.max_steps={steps}"])

        with ThreadPoolExecutor(len(runs) + 1) as pool:
            futures = {name: pool.submit(self._run, f"{folder}/{name}", overrides, precision)
                       for name, (overrides, precision) in runs.items()}
            futures["resumed"] = pool.submit(run_resumed)
            try:
                return {name: future.result() for name, future in futures.items()}
            except BaseException:  # one failed, or Ctrl-C: the others need not finish (the pool waits for them)
                stopped.set()
                stop_commands()
                raise

    def steps(self) -> str:
        """Step time (train.profile, after warm-up) of the eager and captured step, fp32 and bf16, and the floor. A
        failed run or floor is a row of its own; the others are still measured."""
        count = 8 if self.quick else 40
        precisions = ("no", "bf16") if self.cuda or not self.quick else ("no",)  # bf16 is slow on most CPUs
        self.step_rows = rows = []
        measured = {}
        for step in ("eager", "graph"):
            for precision in precisions:
                kind = "eager" if step == "eager" else "captured" if self.cuda else "graph-ready, not captured"
                name = f"dist-tsp, {kind}, {PRECISION[precision]}"
                try:
                    run = self._run(f"steps/{step}-{precision}", [
                        f"train.step={step}", "train.profile=true", f"train.max_steps={count}",
                        f"train.log_every={count}"], precision)
                except (Exception, SystemExit) as error:  # the other runs and the floors are still measured
                    rows.append([name, "failed", end_of(error)])
                    continue
                parts = {k: v for k, v in profile(run)[0]["ms"].items() if v > 0 and k != "data"}
                measured[step, precision] = sum(parts.values())
                rows.append([name, f"{measured[step, precision]:.2f}", ", ".join(f"{k} {v:.1f}"
                                                                               for k, v in parts.items())])
        floors = {}
        for precision in ("no", "bf16") if self.cuda else ():
            name = f"floor (minimal step, one CUDA graph, the faster layout), {PRECISION[precision]}"
            try:  # the steps above stay in the report whatever happens here
                floors[precision] = min(floor_ms(self.teacher_file, precision == "bf16", layout,
                                                 5 if self.quick else 50)
                                        for layout in (torch.contiguous_format, torch.channels_last))
            except Exception as error:
                rows.append([name, "failed", end_of(error)])
            else:
                rows.append([name, f"{floors[precision]:.2f}", "3 students fwd+bwd+Adam, teacher fwd, TSP loss"])
        captured = {precision: measured.get(("graph", precision)) for precision in ("no", "bf16")}
        if "bf16" not in precisions:
            bf16_pays = ["--quick on a CPU: bf16 not run", "-"]
        elif None in captured.values():
            bf16_pays = ["a run failed", "**NO**"]
        else:
            bf16_pays = [f"{captured['bf16']:.2f} vs {captured['no']:.2f}", yes(captured["bf16"] < captured["no"])]
        targets = [["bf16 captured step < fp32 captured step", *bf16_pays]]
        for precision, ms in floors.items():
            label = f"captured step <= 1.25 x floor ({PRECISION[precision]})"
            if captured[precision] is None:
                targets.append([label, "the captured run failed", "**NO**"])
            else:
                ratio = captured[precision] / ms
                targets.append([label, f"{ratio:.2f}", yes(ratio <= 1.25)])
        if not self.cuda:
            targets.append(["captured step <= 1.25 x floor", "no CUDA device: the floor is a CUDA graph", "-"])
        note = ("Each part of the eager step is timed between device synchronisations, so its sum is an upper bound on "
                "the eager step; the captured step is timed whole, from the copy of its inputs to the replay's end. "
                "Both include `between`, the host's work between steps (learning-rate updates, metrics, the stop "
                "vote); the batch's gather is left out, as the floor has none.")
        return f"{step_table(rows)}\n\n{note}\n\n" + tabulate(targets, headers=["target", "measured", "met"],
                                                                tablefmt="github")

    def unfinished(self, part: str) -> str:
        """What an interrupted part got done: the steps measured, the protocol's unfinished runs' logs."""
        if part == "steps" and self.step_rows:
            return step_table(self.step_rows)
        if part == "protocol":
            return unfinished_logs(self.work / "protocol" / "logs")
        return ""

    def teacher(self) -> str:
        """The fast CIFAR teacher recipe, its training step captured where it can be: wall time of its teacher stage
        and its test accuracy."""
        out = self.work / "teacher"
        quick = ["teacher.epochs=1", "teacher.batch_size=128"] if self.quick else []
        device = ["--mixed_precision", "bf16"] if self.cuda else ["--cpu"]
        started = time.perf_counter()
        done = run_command([sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                            "--num_processes", "1", *device, str(ROOT / "dist_tsp" / "train.py"), "--teacher-only",
                            "--config", str(RECIPE), *self.data, f"output_dir={out}",
                            f"teacher.checkpoint={out / 'model.pt'}", "train.step=auto", *quick],
                           self.limits["teacher"], cwd=ROOT)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        accuracy = float(re.search(r"test accuracy ([\d.]+) %", done.stdout).group(1))
        rows = [["test accuracy %", f"{accuracy:.2f}", ">= 94", yes(accuracy >= 94) if self.real_data else "-"],
                ["teacher stage, wall s (start-up included)", f"{seconds:.0f}", "<= 120", yes(seconds <= 120)]]
        step = re.search(r"^teacher step: .*$", done.stdout, re.MULTILINE)
        table = tabulate(rows, headers=["", "measured", "target", "met"], tablefmt="github")
        note = ("\n\nOn the JPEG copy of CIFAR-10 (unpack_cifar10.py) even airbench94.py falls short of its published "
                "accuracy: see the README, 'The fast CIFAR-10 teacher on CPUs'.") if self.real_data else ""
        return f"`{RECIPE.relative_to(ROOT)}`, {step[0] if step else 'teacher step: not said'}\n\n{table}{note}"

    def protocol(self) -> str:
        """The paper's comparison (scratch, KD, TSP) for --seeds seeds on one GPU, the teacher shared."""
        if find_spec("matplotlib") is None:
            return "skipped: matplotlib is not installed here (the protocol's report draws its figures with it)"
        quick = ["train.max_steps=4", "train.epochs=1"] if self.quick else []
        out = self.work / "protocol"
        teacher, which = self._protocol_teacher()
        env = {**os.environ, **({"ACCELERATE_MIXED_PRECISION": "bf16"} if self.cuda else {})}
        started = time.perf_counter()
        limit = self.limits["protocol"] and self.limits["protocol"] * self.seeds
        try:
            done = run_command([sys.executable, "-m", "dist_tsp.protocol", "--config", str(PAPER), "--seeds",
                                str(self.seeds), "--methods", "scratch,kd,tsp", "--out", str(out), *self.data,
                                *teacher, "train.step=auto", *quick], limit, cwd=ROOT, env=env)
        except TimeoutError as error:
            raise TimeoutError(f"{error}{unfinished_logs(out / 'logs')}") from None
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:] + unfinished_logs(out / "logs"))
        target = "" if self.seeds != 3 else f"\n\n3 seeds in {seconds:.0f} s (target <= 300 s with the teacher: " \
                                            f"{yes(seconds <= 300)})"
        return (f"{self.seeds} seed(s), scratch + KD + TSP, the teacher shared ({which}): {seconds:.0f} s\n\n"
                + (out / "table2.md").read_text() + target)

    def _protocol_teacher(self) -> tuple[list[str], str]:
        """The protocol's teacher as overrides, and which it is: the teacher part's in this work folder, else an
        untrained one of the demo's shape."""
        trained = self.work / "teacher" / "model.pt"
        if trained.is_file():
            return [f"teacher.checkpoint={trained}", *teacher_spec(RECIPE)], "the teacher part's"
        return ([f"teacher.checkpoint={self.teacher_file}", *teacher_spec(ROOT / "configs" / "demo.yaml")],
                "untrained, the demo's shape: no teacher part has trained one in this work folder")

    def modes(self) -> str:
        """benchmarks/teacher_modes.py on this one device."""
        modes = [m for m in TEACHER_MODES if m != "deepspeed" or find_spec("deepspeed") is not None]
        flags = ["--steps", "3", "--batch", "48"] if self.quick else []
        done = run_command([sys.executable, str(ROOT / "benchmarks" / "teacher_modes.py"), "--worlds", "1",
                            "--modes", *modes, *flags, *(["--gpu"] if self.cuda else []), "--data", *self.images,
                            "--work-dir", str(self.work / "modes")], self.limits["modes"], cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        skipped = "" if "deepspeed" in modes else "\n\ndeepspeed: skipped (not installed here)"
        return done.stdout.strip() + skipped


def end_of(error: BaseException, characters: int = 300) -> str:
    """The end of an error's message, on one line (a table's cell)."""
    return " ".join(str(error).split())[-characters:]


def step_table(rows: list[list[str]]) -> str:
    return tabulate(rows, headers=["step (paper-size TSP, batch 128)", "ms", "parts (ms)"], tablefmt="github")


def unfinished_logs(logs: Path, lines: int = 25) -> str:
    """The last lines of every run log under `logs` that does not end with its results (only the report leaves a
    lent GPU machine, not the logs)."""
    tails = []
    for log in sorted(logs.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()
        if not any(line.startswith(RESULTS_LINE) for line in text):
            tails.append(f"\n\n{log.name}, last {lines} lines:\n```\n" + "\n".join(text[-lines:]) + "\n```")
    return "".join(tails)


def teacher_spec(config: Path) -> list[str]:
    """The teacher architecture of a config, as overrides (what a teacher checkpoint from it is loaded into)."""
    teacher = load_config(config).teacher
    return [f"teacher.model={teacher.model}", f"teacher.args={json.dumps(teacher.args)}",
            f"teacher.input_scale={teacher.input_scale}"]


def train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k.startswith("train/")} for row in rows
            if any(k.startswith("train/") for k in row)]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    directory = checkpoint.step_dir(run, step)
    return {f"{name}.{key}": value for name in STUDENTS
            for key, value in checkpoint.load(checkpoint.student_file(directory, name), name)["model"].items()}


def same(a: Path, b: Path, steps: int) -> list[str]:
    """Whether two runs' losses at every step and weights at step `steps` are bitwise equal."""
    rows_equal = train_rows(a) == train_rows(b)
    wa, wb = weights(a, steps), weights(b, steps)
    weights_equal = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return [yes(rows_equal, "equal"), yes(weights_equal, "equal")]


def max_relative(a: list[dict], b: list[dict]) -> float:
    return max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b, strict=True) for k in x)


def yes(ok: bool, word: str = "yes") -> str:
    return word if ok else "**NO**"


class MinimalStep(NamedTuple):
    """The floor's step and what it works on: each call of `step` is one step and returns its loss."""

    step: Callable[[], torch.Tensor]
    teacher: nn.Module
    students: list[nn.Module]
    images: torch.Tensor
    labels: torch.Tensor


def minimal_step(teacher_file: Path, bf16: bool, layout: torch.memory_format, device: torch.device) -> MinimalStep:
    """The paper-size TSP step written minimally, its models and images in `layout` on `device`: three students'
    forward, backward and fused Adam, the teacher's forward, the TSP loss (summed over the students) at batch 128."""
    demo = load_config(ROOT / "configs" / "demo.yaml")
    teacher = build_model(demo.teacher.model, 10, **demo.teacher.args)
    teacher.load_state_dict(checkpoint.load(teacher_file, "teacher")["model"])
    teacher = teacher.to(device, memory_format=layout).eval().requires_grad_(False)
    students = [build_model(name, 10).to(device, memory_format=layout) for name in STUDENTS]
    optimizers = [torch.optim.Adam(s.parameters(), lr=torch.tensor(1e-3, device=device), fused=True,
                                   capturable=True) for s in students]
    images = torch.randn(128, 3, 32, 32, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, 10, (128,), device=device)
    (alpha, beta, gamma), temperature = LOSS_PRESETS["tsp"], 10.0

    def step() -> torch.Tensor:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
            with torch.no_grad():
                soft_teacher = F.softmax(teacher(images).float() / temperature, dim=-1)
            logits = torch.stack([s(images) for s in students]).float()
        log_probs = F.log_softmax(logits / temperature, dim=-1)
        probs = log_probs.detach().exp()
        loss = 0.0
        for k in range(len(students)):
            kd = F.kl_div(log_probs[k], soft_teacher, reduction="batchmean")
            peer = sum(F.kl_div(log_probs[k], probs[j], reduction="batchmean") for j in range(len(students)) if j != k)
            loss = loss + alpha * F.cross_entropy(logits[k], labels) + temperature**2 * (beta * kd + gamma * peer)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        return loss.detach()

    return MinimalStep(step, teacher, students, images, labels)


def floor_ms(teacher_file: Path, bf16: bool, layout: torch.memory_format, replays: int) -> float:
    """The minimal step captured in one CUDA graph: ms per replay."""
    step = minimal_step(teacher_file, bf16, layout, torch.device("cuda")).step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / replays


if __name__ == "__main__":
    main()
