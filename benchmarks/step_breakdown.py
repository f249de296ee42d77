"""Where a training step's time goes: real launches with train.profile=true, one table per configuration.

    python benchmarks/step_breakdown.py                 # CPU: scratch, kd/tsp x replicated/sharded/cached, W=1,2,3
    python benchmarks/step_breakdown.py --quick         # a tiny version (what CI runs)
    python benchmarks/step_breakdown.py --gpu           # one GPU: fp32 vs bf16 (+ default layout, compiled)
    python benchmarks/step_breakdown.py --only "tsp, teacher sharded"   # the configurations named so
    python benchmarks/step_breakdown.py --rounds 3      # every configuration 3 times, medians

Each configuration trains six students (the demo's three, twice; on GPU the demo's three) for
--steps steps from one shared teacher of the demo's shape, and every rank reports milliseconds per
step for each part of the step (dist_tsp/profiling.py), images/s per student and peak memory. On
CPU the script ends with the performance targets (ratios measured in this one run) and whether they
are met.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tabulate import tabulate

from dist_tsp import checkpoint
from dist_tsp.config import LOSS_PRESETS, load_config
from dist_tsp.errors import ArgumentParser, UserError, folder_argument
from dist_tsp.models import build_model
from dist_tsp.profiling import SECTIONS
from dist_tsp.side_by_side import port_of_its_own

ROOT = Path(__file__).resolve().parents[1]
PAPER_STUDENTS = ("students=[{name: lenet, model: lenet}, {name: alexnet, model: alexnet},"
                  " {name: mobilenet, model: mobilenet}]")
METHODS = {method: LOSS_PRESETS[method] for method in ("scratch", "kd", "tsp")}
# Six students (the demo's three, twice) fit W = 1, 2 and 3: 6, 3 or 2 students per rank.
SIX_STUDENTS = "students=[" + ", ".join(
    f"{{name: {name}{copy}, model: {name}, args: {args}}}" for copy in ("", "_b")
    for name, args in (("lenet", "{}"), ("alexnet", "{width: 0.25, hidden: 256}"), ("mobilenet", "{width_mult: 0.25}"))
) + "]"
# A variant of a configuration: its label and overrides. "default layout" is the "before" of the channels-last
# default (train.channels_last=false); "compiled" is train.compile=true.
VARIANTS = {"": [], " students default-layout": ["train.channels_last=false"],
            " students compiled": ["train.compile=true"]}
# (method, teacher mode, variant)
CPU_GRID = [("scratch", "sharded", ""), *((method, mode, "") for method in ("kd", "tsp")
                                          for mode in ("replicated", "sharded", "cached")),
            ("tsp", "cached", " students default-layout"), ("tsp", "cached", " students compiled")]
QUICK = [("scratch", "sharded", ""), ("tsp", "cached", "")]


RUNNING: set[subprocess.Popen] = set()  # the commands run_command is running now (threads may start several)


def run_command(command: list[str], timeout: float | None = None, **options) -> subprocess.CompletedProcess:
    """subprocess.run with the output captured, in a process group of its own: past `timeout` seconds (or on Ctrl-C
    in this thread) the whole group goes (an accelerate launch and its workers) and TimeoutError (or the interrupt)
    is raised; stop_commands() ends every running one from any thread."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **options)
    RUNNING.add(process)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException as error:
        _kill(process)
        try:
            stderr = process.communicate(timeout=10)[1]
        except subprocess.TimeoutExpired:  # a process of another session still holds the pipe
            stderr = ""
        if isinstance(error, subprocess.TimeoutExpired):
            raise TimeoutError(f"not done in {timeout:.0f} s, killed: ...{' '.join(command)[-300:]}\n"
                               f"{stderr[-2000:]}") from None
        raise
    finally:
        RUNNING.discard(process)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def stop_commands() -> None:
    """Kill every command that run_command is running, with the processes each started."""
    for process in list(RUNNING):
        _kill(process)


def _kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(process.pid, signal.SIGKILL)


def arguments(parser: argparse.ArgumentParser, check: Callable[[argparse.Namespace], None] = lambda _: None
              ) -> argparse.Namespace:
    """A benchmark's arguments (its parser a dist_tsp.errors.ArgumentParser), checked before any work: a bad one,
    argparse's or a UserError of `check`, is one line, `NAME: error: ...`, and exit 2."""
    try:
        args = parser.parse_args()
        check(args)
    except UserError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    return args


def at_least(low: int) -> Callable[[str], int]:
    """An option's type: an integer of at least `low`."""
    def number(text: str) -> int:
        if int(text) < low:  # a ValueError: argparse's 'invalid int value'
            raise argparse.ArgumentTypeError(f"{text}: give at least {low}")
        return int(text)

    number.__name__ = "int"
    return number


def work_folder(text: str) -> Path:
    """--work-dir's type: a folder (not empty: folder_argument), made if missing, not a file."""
    if (folder := folder_argument(text)).exists() and not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file: give a folder")
    return folder


@contextlib.contextmanager
def work_dir(given: Path | None, prefix: str) -> Iterator[Path]:
    """The --work-dir given (made if missing, kept), else a temporary folder: removed at the end, Ctrl-C included, but
    kept when the benchmark fails, for what its runs left there, and named in one line on stderr."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    work, failed = Path(tempfile.mkdtemp(prefix=prefix)), False
    try:
        yield work
    except (Exception, SystemExit) as error:
        failed = not isinstance(error, SystemExit) or error.code not in (None, 0)
        raise
    finally:
        if failed:
            print(f"{Path(sys.argv[0]).name}: the work folder, kept for the failed runs: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def print_row(row: list) -> None:
    """A table's row as soon as it is measured, its cells joined with ' | ' (the whole table follows at the end)."""
    print(" | ".join(map(str, row)), flush=True)


def train(output_dir: Path, overrides: list[str], processes: int, extra_launch: list[str],
          timeout: float | None = None) -> None:
    """One run of dist_tsp/train.py on the demo config with `overrides`; exits naming them if it fails."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                "--num_processes", str(processes), *port_of_its_own(), *extra_launch]
    if processes > 1 and "--multi_gpu" not in extra_launch:
        launcher += ["--config_file", str(ROOT / "configs" / "accelerate" / "cpu.yaml")]
    command = [*launcher, str(ROOT / "dist_tsp" / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               f"output_dir={output_dir}", "resume=off", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = run_command(command, timeout, cwd=ROOT, env=env)
    if done.returncode != 0:
        sys.exit(f"benchmark run failed ({' '.join(overrides)}):\n{done.stderr[-3000:]}")


def profile(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "profile").glob("rank*.json"))]


def table(ranks: list[dict]) -> str:
    rows = [[r, *(f"{p['ms'][s]:.1f}" for s in SECTIONS), f"{p['step_ms']:.1f}",
             f"{p['images_per_s_per_student']:.0f}", f"{p['peak_mb']:.0f}"] for r, p in enumerate(ranks)]
    return tabulate(rows, headers=["rank", *SECTIONS, "step ms", "img/s/student", "peak MB"], tablefmt="github")


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny (what CI runs): the demo's 3 students on W=3, scratch and tsp cached, 5 steps")
    parser.add_argument("--gpu", action="store_true", help="one GPU: fp32 and bf16, and bf16 with the students in the "
                        "default layout or compiled")
    parser.add_argument("--steps", type=at_least(4), default=25, help="steps per configuration (3 are warm-up)")
    parser.add_argument("--work-dir", type=work_folder, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--rounds", type=at_least(1), default=1, help="run every configuration this many times, "
                        "interleaved, and report each number's median (for a machine with noisy neighbours)")
    parser.add_argument("--only", metavar="TEXT", nargs="+", help="run only the configurations whose name contains "
                        "one of the TEXTs, e.g. 'tsp, teacher sharded'")
    args = arguments(parser)
    steps = 5 if args.quick else args.steps
    common = [f"train.max_steps={steps}", f"train.log_every={steps}", "train.epochs=100", "train.profile=true",
              "data.batch_size=48"]
    with work_dir(args.work_dir, "dist-tsp-bench-") as work:
        teacher = work / "teacher.pt"  # the demo's teacher architecture, untrained: its cost is what is measured
        if not teacher.is_file():
            demo = load_config(ROOT / "configs" / "demo.yaml")
            model = build_model(demo.teacher.model, 10, **demo.teacher.args)
            checkpoint.save_atomic({"model": model.state_dict()}, teacher)
        common.append(f"teacher.checkpoint={teacher}")

        if args.gpu:
            tsp = ["loss.alpha=0.1", "loss.beta=0.8", "loss.gamma=0.1"]
            configs = [(f"tsp, {label} students, 1 GPU, {mp}", [*tsp, *students], 1, ["--mixed_precision", mp])
                       for label, students in (("demo", []), ("paper-size", [PAPER_STUDENTS, "data.batch_size=128"]))
                       for mp in ("no", "bf16")]
            configs += [(f"tsp, {label} students, 1 GPU, bf16{variant}", [*tsp, *students, *VARIANTS[variant]], 1,
                         ["--mixed_precision", "bf16"])
                        for label, students in (("demo", []), ("paper-size", [PAPER_STUDENTS, "data.batch_size=128"]))
                        for variant in (" students default-layout", " students compiled")]
        else:
            common += [f"teacher.cache_dir={work / 'logit_cache'}", *([] if args.quick else [SIX_STUDENTS])]
            configs = [(cpu_name(method, mode, world, variant), [*method_overrides(method, mode), *VARIANTS[variant]],
                        world, ["--cpu"] if world == 1 else [])
                       for world in ((3,) if args.quick else (1, 2, 3))
                       for method, mode, variant in (QUICK if args.quick else CPU_GRID)]
        configs = [config for config in configs if args.only is None or any(t in config[0] for t in args.only)]

        rounds: dict[str, list[list[dict]]] = {name: [] for name, *_ in configs}
        for round_index in range(args.rounds):  # interleaved, so that a slow spell of the machine hits every config
            for name, overrides, world, launch_args in configs:
                run = work / name.replace(", ", "_").replace(" ", "-").replace("=", "")
                if args.rounds > 1:
                    run = run / f"round{round_index}"
                train(run, [*common, *overrides], world, launch_args)
                rounds[name].append(profile(run))
    summary, measured = [], {}
    for name, per_round in rounds.items():
        ranks = measured[name] = median_ranks(per_round)
        print(f"\n### {name}\n\n{table(ranks)}")
        slowest = max(ranks, key=lambda p: p["step_ms"])
        summary.append([name, f"{slowest['step_ms']:.1f}", f"{max(p['ms']['teacher'] for p in ranks):.1f}",
                        f"{max(p['ms']['idle'] for p in ranks):.1f}", f"{max(p['ms']['exchange'] for p in ranks):.1f}",
                        f"{100 * max(p['ms']['data'] / p['step_ms'] for p in ranks):.1f}"])
    print("\n### Summary (slowest rank)\n")
    print(tabulate(summary, headers=["configuration", "step ms", "teacher ms", "idle ms", "exchange ms", "data %"],
                   tablefmt="github"))
    if not args.gpu:
        print("\n### Targets\n")
        print(tabulate(targets(measured), headers=["target", "W", "measured", "limit", "met"], tablefmt="github"))


def median_ranks(per_round: list[list[dict]]) -> list[dict]:
    """Each rank's report with every number the median over the rounds."""
    def median_of(values: list) -> Any:
        return {key: median_of([v[key] for v in values]) for key in values[0]} if isinstance(values[0], dict) \
            else statistics.median(values)

    return [median_of(list(reports)) for reports in zip(*per_round)]


def cpu_name(method: str, mode: str, world: int, variant: str = "") -> str:
    """A CPU configuration's name; a method without a teacher term (scratch) runs no teacher, so it names no mode."""
    teacher = f", teacher {mode}" if METHODS[method][1] else ""
    return f"{method}{teacher}{variant}, W={world} CPU"


def method_overrides(method: str, mode: str) -> list[str]:
    alpha, beta, gamma = METHODS[method]
    return [f"loss.alpha={alpha}", f"loss.beta={beta}", f"loss.gamma={gamma}", f"teacher.mode={mode}"]


def targets(measured: dict[str, list[dict]]) -> list[list]:
    """The performance targets, from the slowest rank of each configuration on the same machine."""
    def step(method: str, mode: str, world: int) -> float | None:
        ranks = measured.get(cpu_name(method, mode, world))
        return None if ranks is None else max(p["step_ms"] for p in ranks)

    def teacher(mode: str, world: int) -> float | None:
        ranks = measured.get(cpu_name("tsp", mode, world))
        return None if ranks is None else max(p["ms"]["teacher"] for p in ranks)

    rows = []
    for world in sorted({int(name.rsplit("W=", 1)[1].split()[0]) for name in measured}):
        scratch, replicated = step("scratch", "sharded", world), teacher("replicated", world)
        checks = [
            ("TSP cached / scratch step", _ratio(step("tsp", "cached", world), scratch), 1.03),
            ("teacher sharded / replicated", _ratio(teacher("sharded", world), replicated), 1.15 / world),
            ("TSP step / (scratch step + teacher / G)", _ratio(
                step("tsp", "sharded", world), None if None in (scratch, replicated) else scratch + replicated / world),
             1.10),
        ]
        for target, value, limit in checks:
            rows.append([target, world, "-" if value is None else f"{value:.3f}", f"{limit:.3f}",
                         "-" if value is None else ("yes" if value <= limit else "no")])
        worst_data = max(100 * p["ms"]["data"] / p["step_ms"] for name, ranks in measured.items()
                         if f"W={world} " in name for p in ranks)
        rows.append(["data % of step (worst)", world, f"{worst_data:.2f}", "2.00", "yes" if worst_data <= 2 else "no"])
    return rows


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


if __name__ == "__main__":
    main()
