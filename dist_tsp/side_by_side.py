"""Independent runs side by side (the protocol's and a sweep's --parallel-runs): how many at once, on which GPUs,
and each run's launch, in this process or in processes of its own with its output in a log file.

One launch-bound run leaves a GPU mostly idle (paper-size students on an H200: scratch, KD and TSP took about 50 s
each one after the other, 56 s for all three at once), so runs that do not depend on each other go together.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from dist_tsp.config import RunConfig, load_config
from dist_tsp.errors import (
    INTERRUPTED,
    INTERRUPTED_EXIT_CODE,
    NonFiniteLoss,
    OutOfSpace,
    Preempted,
    RunStopped,
    UserError,
)
from dist_tsp.launch import STOP_SIGNALS, check_accelerate_config
from dist_tsp.run_control import StopRequest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "dist_tsp" / "train.py")
RUN_GIB = 16  # --parallel-runs auto: GPU memory set aside per process of a run (ample for the configs here)
MAX_RUNS_PER_GPU = 4  # --parallel-runs auto: however much memory is free, the GPU's compute and the CPU are shared
EPHEMERAL_PORTS = "/proc/sys/net/ipv4/ip_local_port_range"  # the range Linux picks a socket's port from
PORTS_FROM = 30000  # free_port's lowest: above slurm/launch.sh's rendezvous ports and most services' own


class RunFailed(Exception):
    """A run crashed (or was killed): the protocol or the sweep that launched it stops with 1."""

    exit_code = 1


# how a launched run (or Ctrl-C, which a terminal sends the runs too) may end the protocol or a sweep (see `end`)
ENDINGS = (UserError, OutOfSpace, RunStopped, RunFailed, KeyboardInterrupt)
# else RunFailed; a run killed by a stop signal was starting, before its handler was in place
ENDING_BY_CODE = {ending.exit_code: ending for ending in (UserError, Preempted, NonFiniteLoss)} | \
    {-signum: Preempted for signum in STOP_SIGNALS}


class Named(Protocol):
    name: str


Run = TypeVar("Run", bound=Named)


def add_options(parser: argparse.ArgumentParser, record: str) -> None:
    """--processes, --accelerate-config and --parallel-runs; `record` is the file that does not keep the last."""
    parser.add_argument("--processes", type=int, default=1,
                        help="processes per run (1: one process; more: accelerate launch)")
    parser.add_argument("--accelerate-config", default=None,
                        help="accelerate config for --processes > 1 (default: gpu.yaml with a GPU, else cpu.yaml)")
    parser.add_argument("--parallel-runs", default="auto", metavar="N|auto",
                        help="independent runs at once, each in a process of its own (1: one at a time). Default "
                             f"auto: 1 on CPU; on GPUs, one run per {RUN_GIB} GiB free on every GPU of a run, at most "
                             f"{MAX_RUNS_PER_GPU} per GPU and one process per CPU core, concurrent runs spread over "
                             f"disjoint sets of --processes GPUs when there are several. Not part of {record}: a "
                             "rerun may change it")


def accelerate_config(args: argparse.Namespace) -> str | None:
    """The accelerate config of multi-process runs: --accelerate-config, else the shipped one for this machine.
    Raises UserError for a bad --processes or --parallel-runs, or an --accelerate-config accelerate cannot read."""
    if args.processes < 1:
        raise UserError(f"--processes {args.processes}: give the number of processes per run (1, 2, ...)")
    if args.parallel_runs != "auto" and not (args.parallel_runs.isdigit() and int(args.parallel_runs) >= 1):
        raise UserError(f"--parallel-runs {args.parallel_runs}: give a number of runs at once (1, 2, ...) or auto")
    if args.accelerate_config is not None:
        check_accelerate_config(Path(args.accelerate_config), "--accelerate-config")
    if args.processes == 1 or args.accelerate_config is not None:
        return args.accelerate_config
    return str(ROOT / "configs" / "accelerate" / f"{'gpu' if torch.cuda.is_available() else 'cpu'}.yaml")


def check_configs(config: str | Path, runs: Iterable[tuple[str, list[str]]]) -> list[RunConfig]:
    """Every run's config (`config` with its overrides), given as (name, overrides), loaded and so checked before any
    run starts or anything is written; raises UserError naming the first bad run and its problem."""
    configs = []
    for name, overrides in runs:
        try:
            configs.append(load_config(config, overrides))
        except UserError as error:
            raise UserError(f"{name}: {error}") from None
    return configs


@dataclass(frozen=True, slots=True)
class Slots:
    """How many runs go at once (one slot each) and which GPUs each slot's runs see. Chosen by every command and kept
    out of the records of what runs compute: it decides when runs happen, not what they compute."""

    devices: tuple[str | None, ...]  # per slot: CUDA_VISIBLE_DEVICES for its runs (None: this process's)
    reason: str  # why that many, for the start-up line

    @property
    def one_at_a_time(self) -> bool:
        return len(self.devices) == 1

    def describe(self, what: str) -> str:
        count = len(self.devices)
        return f"{what}: {count} runs at once ({self.reason})" if count > 1 else \
            f"{what}: 1 run at a time ({self.reason})"


def choose_slots(parallel_runs: str, processes: int) -> Slots:
    """--parallel-runs N, or auto from this machine's GPUs, their free memory and the CPU cores."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if parallel_runs == "auto":
        free_gib = [torch.cuda.mem_get_info(i)[0] / 2**30 for i in range(gpus)]
        count, reason = auto_runs(free_gib, processes, len(os.sched_getaffinity(0)))
    else:
        count, reason = int(parallel_runs), f"--parallel-runs {parallel_runs}"
    names = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")[:gpus]
    return Slots(slot_devices(count, gpu_groups(gpus, processes), names), reason)


def gpu_groups(gpus: int, processes: int) -> list[range]:
    """Disjoint sets of `processes` GPUs, one per concurrent run placement (all of them when they hold fewer)."""
    return [range(k * processes, (k + 1) * processes) for k in range(gpus // processes)] or [range(gpus)]


def auto_runs(free_gib: Sequence[float], processes: int, cpus: int) -> tuple[int, str]:
    """--parallel-runs auto: 1 without GPUs (runs would share the CPU's cores); else on each group of GPUs one run
    per RUN_GIB free on its fullest GPU (per process a run puts there), at most MAX_RUNS_PER_GPU, and at most one
    process per CPU core in all; never fewer than 1. Returns the number and why."""
    if not free_gib:
        return 1, "auto: no GPU, runs would share the CPU cores"
    groups = gpu_groups(len(free_gib), processes)
    per_gpu = -(-processes // len(groups[0]))  # a run's processes on each GPU of its group
    by_memory = sum(min(MAX_RUNS_PER_GPU, int(min(free_gib[i] for i in group) // (RUN_GIB * per_gpu)))
                    for group in groups)
    where = f"GPU 0: {free_gib[0]:.0f} GiB free" if len(free_gib) == 1 else \
        f"{len(free_gib)} GPUs in {len(groups)} group(s), the fullest {min(free_gib):.0f} GiB free"
    return max(1, min(by_memory, cpus // processes)), (f"auto: {where}, {RUN_GIB} GiB per run process, at most "
                                                       f"{MAX_RUNS_PER_GPU} per GPU; {cpus} CPU cores")


def slot_devices(count: int, groups: list[range], names: list[str]) -> tuple[str | None, ...]:
    """Each of `count` slots' CUDA_VISIBLE_DEVICES, spread over the groups in turn (None: one group, no change)."""
    if len(groups) == 1 or count == 1:
        return (None,) * count
    return tuple(",".join(names[i] for i in groups[k % len(groups)]) for k in range(count))


class SignalledStop(StopRequest):
    """A stop signal to the protocol or a sweep, and which one: every run of theirs answers it, one starting as it
    comes too."""

    def __init__(self) -> None:
        super().__init__()
        self.signum: int | None = None

    def receive(self, signum: int) -> None:
        self.signum = signum
        self.set()


_RUNNING: set[subprocess.Popen] = set()  # the runs in processes of their own now, which stop signals reach
_STOP: SignalledStop | None = None  # the one the runs of run_concurrently answer, while they go


def run_concurrently(runs: list[Run], slots: Sequence[str | None], run: Callable[[Run, str | None], Path],
                     bar: tqdm, waits_for: Callable[[Run], str | None] = lambda _: None) -> list[Path]:
    """`run(planned, slot)` for every run in threads, up to one per slot, each started as soon as a slot is free and
    the run named by `waits_for(run)` has finished (in list order otherwise); their directories in list order. After
    a failure none starts: those in flight finish, then the first failure is raised. The bar shows the runs in
    flight and counts the finished ones. With one slot the runs go one after another in this thread (a run in this
    process needs the main thread, for its signal handlers). SIGTERM or SIGUSR1 stops them as it stops one run (see
    `_stop_signals_reach_the_runs`): Preempted, exit 75, and a rerun continues."""
    with _stop_signals_reach_the_runs() as stop:
        directories = _sequentially(runs, slots[0], run, bar, stop) if len(slots) == 1 else \
            _side_by_side(runs, slots, run, bar, waits_for, stop)
    if stop.is_set():
        raise Preempted("stopped by a signal: every run in flight stopped after its next step with a checkpoint; rerun "
                        "the same command to continue")
    return directories


@contextlib.contextmanager
def _stop_signals_reach_the_runs() -> Iterator[StopRequest]:
    """While the runs go, SIGTERM and SIGUSR1 reach every run in processes of its own, which stops after its next step
    with a checkpoint, and no further run starts (the request is set); a run in this process answers them itself
    (train.stop_on_signals, which gives these handlers back after it)."""
    global _STOP
    requested = _STOP = SignalledStop()

    def pass_on(signum: int, _frame: object) -> None:
        requested.receive(signum)
        for child in list(_RUNNING):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    before = {signum: signal.signal(signum, pass_on) for signum in STOP_SIGNALS}
    try:
        yield requested
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        _STOP = None


def _sequentially(runs: list[Run], slot: str | None, run: Callable[[Run, str | None], Path], bar: tqdm,
                  stop: StopRequest) -> list[Path]:
    directories = []
    for planned in runs:
        if stop.is_set():
            break
        bar.set_postfix_str(planned.name)
        directories.append(run(planned, slot))
        bar.update()
    return directories


def _side_by_side(runs: list[Run], slots: Sequence[str | None], run: Callable[[Run, str | None], Path], bar: tqdm,
                  waits_for: Callable[[Run], str | None], stop: StopRequest) -> list[Path]:
    directories: dict[str, Path] = {}
    waiting, running, free, failures = list(runs), {}, list(range(len(slots))), []
    with ThreadPoolExecutor(len(slots)) as pool:
        while running or (waiting and not failures and not stop.is_set()):
            unfinished = {p.name for p in waiting} | {p.name for p, _ in running.values()}
            ready = [] if failures or stop.is_set() else [p for p in waiting if waits_for(p) not in unfinished]
            for planned in ready[:len(free)]:
                waiting.remove(planned)
                slot = free.pop(0)
                running[pool.submit(run, planned, slots[slot])] = planned, slot
            bar.set_postfix_str(", ".join(p.name for p, _ in running.values()))
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                planned, slot = running.pop(future)
                free = sorted([*free, slot])
                if future.exception() is not None:
                    failures.append(future.exception())
                else:
                    directories[planned.name] = future.result()
                    bar.update()
    if failures:
        raise failures[0]
    return [directories[p.name] for p in runs if p.name in directories]


def launch_run(name: str, args: list[str], log: Path, *, processes: int, accelerate_config: str | None,
               devices: str | None, in_process: bool) -> None:
    """One training run (dist_tsp/train.py `args`), its output appended to `log`: in this process when it may be
    (`in_process`: no other run at the same time) and the run has one process; else in processes of its own
    (dist-tsp-launch for several, on a rendezvous port of its own) seeing the GPUs `devices`. When it fails, raises
    what its exit code means, naming the log: UserError (bad input), Preempted (stopped by a signal with a
    checkpoint), NonFiniteLoss, else RunFailed (a crash)."""
    stop = _STOP  # None outside run_concurrently
    if stop is not None and stop.is_set():  # it came while this run was handed its slot
        raise Preempted(f"run {name} was not started: stopped by a signal. Rerun the same command to continue")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as output:
        earlier = output.tell()  # the log of attempts before this one
        if processes == 1 and in_process:
            code = _in_process(args, output, stop)
        else:
            command = [sys.executable, TRAIN, *args]
            if processes > 1:
                command = [sys.executable, "-m", "dist_tsp.launch", "--config_file", accelerate_config,
                           "--num_processes", str(processes), *port_of_its_own(), *command[1:]]
            env = None if devices is None else {**os.environ, "CUDA_VISIBLE_DEVICES": devices}
            child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
            _RUNNING.add(child)
            if stop is not None and stop.signum is not None:  # it came as this run started, before its handler
                child.send_signal(stop.signum)
            try:
                code = child.wait()
            finally:
                _RUNNING.discard(child)
    if code != 0:
        with open(log) as written:
            written.seek(earlier)
            tail = [line for line in written.read().splitlines() if line.startswith("dist-tsp:")][-1:]
        ending = ENDING_BY_CODE.get(code, RunFailed)
        how = "stopped" if issubclass(ending, RunStopped) else "failed"
        killed = f": {signal.Signals(-code).name}" if -code in set(signal.Signals) else ""
        raise ending(f"run {name} {how} (exit {code}{killed}){': ' + tail[0] if tail else ''}; its log is {log}. "
                     "Rerun the same command to continue from there")


def end(prog: str, ending: UserError | OutOfSpace | RunStopped | RunFailed | KeyboardInterrupt) -> NoReturn:
    """Exit the protocol or a sweep (`prog`: its lines' prefix) with one line and the exit code of `ending`: 2 for
    bad input, a launched run's deliberate stop's (75: rerun to resume; 3: non-finite loss), 1 for a run's crash or
    a full disk, 130 for Ctrl-C (the runs in flight have stopped at once: a terminal sends it them too)."""
    if isinstance(ending, KeyboardInterrupt):
        print(f"{prog}: {INTERRUPTED}", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    print(f"{prog}: {'error: ' if isinstance(ending, (UserError, OutOfSpace)) else ''}{ending}", file=sys.stderr)
    sys.exit(ending.exit_code)


def _in_process(args: list[str], output, stop_requested: StopRequest | None) -> int:
    """train.main in this process, its output into `output`, answering `stop_requested` (set by a signal before its
    own handlers are in place, too); the exit code it would have had (a crash's traceback goes to `output`, as a
    launched run's would)."""
    from dist_tsp import train

    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            train.main(args, stop_requested)
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else 1
        except Exception:  # noqa: BLE001 -- a crash of the run, not of the protocol or the sweep
            traceback.print_exc()
            return 1
    return 0


def port_of_its_own() -> list[str]:
    """accelerate launch's option for a rendezvous port free now: launches side by side on one node (runs, benchmarks,
    tests) need one each, and accelerate's own check of its default port races with a launch starting beside it."""
    return ["--main_process_port", str(free_port())]


def free_port() -> int:
    """A TCP port no process on this machine listens on now, outside the range the system picks ports from (so that
    no socket bound meanwhile, as the gloo listeners of a run beside it, takes it before the launch binds it); the
    system's pick where that range is not known."""
    try:
        low, high = map(int, Path(EPHEMERAL_PORTS).read_text().split())
    except (OSError, ValueError):
        low = high = 0
    outside = [*range(PORTS_FROM, low), *range(high + 1, 65536)] if low else []
    for port in random.SystemRandom().sample(outside, min(len(outside), 100)):  # not the runs' seeded generator
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind(("", port))
            return port
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
